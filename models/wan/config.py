"""Wan2.2 DiT configurations: one frozen dataclass, one classmethod per published variant."""

import dataclasses
from typing import Any, ClassVar, Literal, Mapping, Optional, Tuple

import jax.numpy as jnp

from models.config_common import DiTConfigMixin

ModelType = Literal["t2v", "i2v", "ti2v"]

# Fields that define the weights; dtype fields and the expert switch do not.
_ARCH_FIELDS = ("num_layers", "num_heads", "head_dim", "ffn_dim", "in_channels", "out_channels",
                "text_dim", "freq_dim", "patch_size", "cross_attn_norm")


@dataclasses.dataclass(frozen=True)
class WanConfig(DiTConfigMixin):
  """Architecture of one Wan DiT (one expert of an A14B pair).

  Attributes:
    num_layers: transformer blocks.
    num_heads: attention heads; inner dim = num_heads * head_dim.
    head_dim: per-head width (128 in every Wan2.2 model).
    ffn_dim: feed-forward hidden width.
    in_channels: latent channels in (I2V stacks noise 16 + mask 4 + image latent 16 = 36).
    out_channels: latent channels out.
    text_dim: width of the text-encoder states (UMT5-XXL: 4096).
    freq_dim: width of the timestep sinusoid.
    patch_size: (t, h, w) patch of the Conv3d patch embedding.
    eps: epsilon of every LayerNorm / RMSNorm.
    cross_attn_norm: affine LayerNorm before cross-attention (True in every Wan2.2 model).
    rope_max_seq_len: longest grid axis the RoPE table covers.
    rope_theta: RoPE base.
    model_type: "t2v", "i2v" or "ti2v" (informative: the weights' shapes tell them apart).
    boundary_ratio: for A14B two-expert pairs, the high-noise expert runs while
      t >= boundary_ratio * 1000; None for single models.
    param_dtype: dtype of the matmul weights (norms, time embedding and modulation tables
      stay float32).
    dtype: compute dtype of activations outside the float32 islands.
  """

  num_layers: int = 40
  num_heads: int = 40
  head_dim: int = 128
  ffn_dim: int = 13824
  in_channels: int = 16
  out_channels: int = 16
  text_dim: int = 4096
  freq_dim: int = 256
  patch_size: Tuple[int, int, int] = (1, 2, 2)
  eps: float = 1e-6
  cross_attn_norm: bool = True
  rope_max_seq_len: int = 1024
  rope_theta: float = 10000.0
  model_type: ModelType = "t2v"
  boundary_ratio: Optional[float] = None
  param_dtype: Any = jnp.bfloat16
  dtype: Any = jnp.bfloat16

  ARCH_FIELDS: ClassVar[Tuple[str, ...]] = _ARCH_FIELDS
  FAMILY: ClassVar[str] = "Wan"

  @classmethod
  def variants(cls):
    return VARIANTS

  def __post_init__(self):
    object.__setattr__(self, "patch_size", tuple(int(p) for p in self.patch_size))
    object.__setattr__(self, "param_dtype", jnp.dtype(self.param_dtype))
    object.__setattr__(self, "dtype", jnp.dtype(self.dtype))
    for field in ("num_layers", "num_heads", "head_dim", "ffn_dim", "in_channels",
                  "out_channels", "text_dim", "freq_dim", "rope_max_seq_len"):
      value = getattr(self, field)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"WanConfig.{field}={value!r}: must be an int >= 1")
    if self.head_dim % 2 or self.freq_dim % 2:
      raise ValueError(f"WanConfig: head_dim={self.head_dim} and freq_dim={self.freq_dim} "
                       "must be even")
    if len(self.patch_size) != 3 or min(self.patch_size) < 1:
      raise ValueError(f"WanConfig.patch_size={self.patch_size}: must be 3 ints >= 1")
    if self.model_type not in ("t2v", "i2v", "ti2v"):
      raise ValueError(f"WanConfig.model_type={self.model_type!r}: must be t2v, i2v or ti2v")
    if self.boundary_ratio is not None and not 0.0 < self.boundary_ratio < 1.0:
      raise ValueError(f"WanConfig.boundary_ratio={self.boundary_ratio}: must be in (0, 1)")

  @property
  def dim(self) -> int:
    """Inner (model) width."""
    return self.num_heads * self.head_dim

  def describe(self) -> str:
    """Short human-readable description, e.g. for error messages."""
    name = self.variant_name()
    return (f"{name or 'custom'} Wan ({self.model_type}, {self.num_layers} layers, dim "
            f"{self.dim}, in/out channels {self.in_channels}/{self.out_channels})")

  @classmethod
  def t2v_a14b(cls, **overrides) -> "WanConfig":
    """Wan2.2 T2V-A14B, one expert (both experts share it); switch at t = 875."""
    return cls(**{**dict(model_type="t2v", boundary_ratio=0.875), **overrides})

  @classmethod
  def i2v_a14b(cls, **overrides) -> "WanConfig":
    """Wan2.2 I2V-A14B, one expert: 36 input channels, no CLIP branch; switch at t = 900."""
    return cls(**{**dict(in_channels=36, model_type="i2v", boundary_ratio=0.9), **overrides})

  @classmethod
  def ti2v_5b(cls, **overrides) -> "WanConfig":
    """Wan2.2 TI2V-5B: 48-channel latents, per-token timesteps in image-to-video mode."""
    return cls(**{**dict(num_layers=30, num_heads=24, ffn_dim=14336, in_channels=48,
                         out_channels=48, model_type="ti2v"), **overrides})

  @classmethod
  def tiny(cls, **overrides) -> "WanConfig":
    """Toy size for tests: 2 layers, 2 heads of 16 (unequal RoPE dims (8, 4, 4)), fp32."""
    return cls(**{**dict(num_layers=2, num_heads=2, head_dim=16, ffn_dim=32, in_channels=4,
                         out_channels=4, text_dim=16, freq_dim=256, rope_max_seq_len=32,
                         param_dtype=jnp.float32, dtype=jnp.float32), **overrides})

  # Checkpoint config.json formats.

  @classmethod
  def from_diffusers_config(cls, config: Mapping[str, Any], **overrides) -> "WanConfig":
    """From a diffusers `WanTransformer3DModel` config.json (Wan2.1 image branch rejected)."""
    if config.get("image_dim") is not None or config.get("added_kv_proj_dim") is not None:
      raise ValueError("Wan2.1 image-branch checkpoints (image_dim / added_kv_proj_dim) are "
                       "not supported; Wan2.2 models have no CLIP branch")
    if config.get("qk_norm", "rms_norm_across_heads") != "rms_norm_across_heads":
      raise ValueError(f"qk_norm={config.get('qk_norm')!r} is not supported")
    in_ch = int(config.get("in_channels", 16))
    out_ch = int(config.get("out_channels") or in_ch)
    fields = dict(
        num_layers=int(config.get("num_layers", 40)),
        num_heads=int(config.get("num_attention_heads", 40)),
        head_dim=int(config.get("attention_head_dim", 128)),
        ffn_dim=int(config.get("ffn_dim", 13824)),
        in_channels=in_ch,
        out_channels=out_ch,
        text_dim=int(config.get("text_dim", 4096)),
        freq_dim=int(config.get("freq_dim", 256)),
        patch_size=tuple(config.get("patch_size", (1, 2, 2))),
        eps=float(config.get("eps", 1e-6)),
        cross_attn_norm=bool(config.get("cross_attn_norm", True)),
        rope_max_seq_len=int(config.get("rope_max_seq_len", 1024)),
        model_type=_guess_model_type(in_ch, out_ch),
    )
    return cls(**{**fields, **overrides})

  @classmethod
  def from_original_config(cls, config: Mapping[str, Any], **overrides) -> "WanConfig":
    """From an original Wan2.2 `WanModel` config.json (`dim`, `in_dim`, `model_type`, ...)."""
    dim = int(config.get("dim", 5120))
    heads = int(config.get("num_heads", 40))
    if dim % heads:
      raise ValueError(f"original config: dim={dim} is not a multiple of num_heads={heads}")
    model_type = config.get("model_type", "t2v")
    if model_type not in ("t2v", "i2v", "ti2v"):
      raise ValueError(f"original config: model_type={model_type!r} is not a Wan2.2 DiT")
    fields = dict(
        num_layers=int(config.get("num_layers", 40)),
        num_heads=heads,
        head_dim=dim // heads,
        ffn_dim=int(config.get("ffn_dim", 13824)),
        in_channels=int(config.get("in_dim", 16)),
        out_channels=int(config.get("out_dim", 16)),
        text_dim=int(config.get("text_dim", 4096)),
        freq_dim=int(config.get("freq_dim", 256)),
        patch_size=tuple(config.get("patch_size", (1, 2, 2))),
        eps=float(config.get("eps", 1e-6)),
        cross_attn_norm=bool(config.get("cross_attn_norm", True)),
        model_type=model_type,
    )
    return cls(**{**fields, **overrides})


def _guess_model_type(in_channels: int, out_channels: int) -> ModelType:
  if in_channels == 2 * out_channels + 4:
    return "i2v"
  return "ti2v" if in_channels == 48 else "t2v"


VARIANTS = {
    "t2v-a14b": WanConfig.t2v_a14b,
    "i2v-a14b": WanConfig.i2v_a14b,
    "ti2v-5b": WanConfig.ti2v_5b,
}
