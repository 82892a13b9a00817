"""HunyuanVideo DiT configurations: one frozen dataclass, one classmethod per variant."""

import dataclasses
from typing import Any, ClassVar, Mapping, Tuple

import jax.numpy as jnp

from models.config_common import DiTConfigMixin

# Fields that define the weights; RoPE and dtype fields do not.
_ARCH_FIELDS = ("num_layers", "num_single_layers", "num_refiner_layers", "num_heads",
                "head_dim", "mlp_ratio", "in_channels", "out_channels", "patch_size",
                "patch_size_t", "text_dim", "pooled_projection_dim", "guidance_embeds")
_POSITIVE_INTS = ("num_layers", "num_single_layers", "num_refiner_layers", "num_heads",
                  "head_dim", "in_channels", "out_channels", "patch_size", "patch_size_t",
                  "text_dim", "pooled_projection_dim", "freq_dim")


@dataclasses.dataclass(frozen=True)
class HunyuanConfig(DiTConfigMixin):
  """Architecture of a HunyuanVideo DiT (diffusers `HunyuanVideoTransformer3DModel`).

  Attributes:
    num_layers: double-stream blocks (separate video / text weights, joint attention).
    num_single_layers: single-stream blocks over the concatenated [video | text] tokens.
    num_refiner_layers: blocks of the text token refiner (`context_embedder`).
    num_heads: attention heads; inner dim = num_heads * head_dim.
    head_dim: per-head width (128).
    mlp_ratio: feed-forward width / inner dim.
    in_channels: latent channels in.
    out_channels: latent channels out.
    patch_size: spatial (h, w) patch of the patch embedding.
    patch_size_t: temporal patch.
    text_dim: width of the text-encoder states (LLaVA-Llama-3-8B: 4096).
    pooled_projection_dim: width of the pooled CLIP-L text embedding (768).
    guidance_embeds: embedded guidance (the guidance-distilled T2V model).
    rope_axes_dim: (t, h, w) rotary widths, summing to head_dim.
    rope_theta: RoPE base.
    freq_dim: width of the timestep / guidance sinusoid.
    eps: epsilon of every LayerNorm / RMSNorm.
    param_dtype: dtype of the large weights (norm scales and the small conditioning
      embedders stay float32).
    dtype: compute dtype of activations outside the float32 islands.
  """

  num_layers: int = 20
  num_single_layers: int = 40
  num_refiner_layers: int = 2
  num_heads: int = 24
  head_dim: int = 128
  mlp_ratio: float = 4.0
  in_channels: int = 16
  out_channels: int = 16
  patch_size: int = 2
  patch_size_t: int = 1
  text_dim: int = 4096
  pooled_projection_dim: int = 768
  guidance_embeds: bool = True
  rope_axes_dim: Tuple[int, int, int] = (16, 56, 56)
  rope_theta: float = 256.0
  freq_dim: int = 256
  eps: float = 1e-6
  param_dtype: Any = jnp.bfloat16
  dtype: Any = jnp.bfloat16

  ARCH_FIELDS: ClassVar[Tuple[str, ...]] = _ARCH_FIELDS
  FAMILY: ClassVar[str] = "HunyuanVideo"

  @classmethod
  def variants(cls):
    return VARIANTS

  def __post_init__(self):
    object.__setattr__(self, "rope_axes_dim", tuple(int(d) for d in self.rope_axes_dim))
    object.__setattr__(self, "mlp_ratio", float(self.mlp_ratio))
    object.__setattr__(self, "param_dtype", jnp.dtype(self.param_dtype))
    object.__setattr__(self, "dtype", jnp.dtype(self.dtype))
    for field in _POSITIVE_INTS:
      value = getattr(self, field)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"HunyuanConfig.{field}={value!r}: must be an int >= 1")
    if not isinstance(self.guidance_embeds, bool):
      raise ValueError(f"HunyuanConfig.guidance_embeds={self.guidance_embeds!r}: must be a bool")
    if self.mlp_ratio <= 0 or self.mlp_dim < 1:
      raise ValueError(f"HunyuanConfig.mlp_ratio={self.mlp_ratio}: must give an MLP width >= 1")
    if self.freq_dim % 2:
      raise ValueError(f"HunyuanConfig.freq_dim={self.freq_dim}: must be even")
    rope = self.rope_axes_dim
    if len(rope) != 3 or any(d < 0 or d % 2 for d in rope) or sum(rope) != self.head_dim:
      raise ValueError(f"HunyuanConfig.rope_axes_dim={rope}: must be 3 even widths summing to "
                       f"head_dim={self.head_dim}")

  @property
  def dim(self) -> int:
    """Inner (model) width."""
    return self.num_heads * self.head_dim

  @property
  def mlp_dim(self) -> int:
    """Feed-forward hidden width (diffusers: int(dim * mlp_ratio))."""
    return int(self.dim * self.mlp_ratio)

  @property
  def num_joint_layers(self) -> int:
    """Joint (video + text) attentions per forward: double then single blocks."""
    return self.num_layers + self.num_single_layers

  @property
  def patch(self) -> Tuple[int, int, int]:
    """(t, h, w) patch."""
    return self.patch_size_t, self.patch_size, self.patch_size

  def describe(self) -> str:
    """Short human-readable description, e.g. for error messages."""
    name = self.variant_name()
    return (f"{name or 'custom'} HunyuanVideo ({self.num_layers}+{self.num_single_layers} "
            f"layers, dim {self.dim}, in/out channels {self.in_channels}/{self.out_channels})")

  @classmethod
  def t2v_720p(cls, **overrides) -> "HunyuanConfig":
    """HunyuanVideo T2V 13B, guidance-distilled ("HYVideo-T/2-cfgdistill"), 720p weights."""
    return cls(**overrides)

  @classmethod
  def tiny(cls, **overrides) -> "HunyuanConfig":
    """Toy size for tests: 2 + 2 layers, 1 refiner layer, 2 heads of 12, fp32."""
    return cls(**{**dict(num_layers=2, num_single_layers=2, num_refiner_layers=1, num_heads=2,
                         head_dim=12, in_channels=4, out_channels=4, text_dim=16,
                         pooled_projection_dim=8, rope_axes_dim=(4, 4, 4),
                         param_dtype=jnp.float32, dtype=jnp.float32), **overrides})

  @classmethod
  def from_diffusers_config(cls, config: Mapping[str, Any], **overrides) -> "HunyuanConfig":
    """From a diffusers `HunyuanVideoTransformer3DModel` config.json.

    `image_condition_type="latent_concat"` (I2V, image latents stacked on the channels) has
    the T2V architecture and is accepted; "token_replace" is not supported.
    """
    if config.get("image_condition_type") not in (None, "latent_concat"):
      raise ValueError(f"image_condition_type={config['image_condition_type']!r} is not "
                       "supported (only None and 'latent_concat')")
    if config.get("qk_norm", "rms_norm") != "rms_norm":
      raise ValueError(f"qk_norm={config.get('qk_norm')!r} is not supported")
    in_ch = int(config.get("in_channels", 16))
    fields = dict(
        num_layers=int(config.get("num_layers", 20)),
        num_single_layers=int(config.get("num_single_layers", 40)),
        num_refiner_layers=int(config.get("num_refiner_layers", 2)),
        num_heads=int(config.get("num_attention_heads", 24)),
        head_dim=int(config.get("attention_head_dim", 128)),
        mlp_ratio=float(config.get("mlp_ratio", 4.0)),
        in_channels=in_ch,
        out_channels=int(config.get("out_channels") or in_ch),
        patch_size=int(config.get("patch_size", 2)),
        patch_size_t=int(config.get("patch_size_t", 1)),
        text_dim=int(config.get("text_embed_dim", 4096)),
        pooled_projection_dim=int(config.get("pooled_projection_dim", 768)),
        guidance_embeds=bool(config.get("guidance_embeds", True)),
        rope_axes_dim=tuple(config.get("rope_axes_dim", (16, 56, 56))),
        rope_theta=float(config.get("rope_theta", 256.0)),
    )
    return cls(**{**fields, **overrides})


VARIANTS = {
    "t2v-720p": HunyuanConfig.t2v_720p,
}
