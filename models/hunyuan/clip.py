"""CLIP text encoder (HunyuanVideo's `text_encoder_2`, CLIP-L) in flax.nnx, mirroring
transformers' `CLIPTextModel`.

Token plus learned absolute position embeddings, pre-LN blocks (LayerNorm -> attention with
biases -> residual, LayerNorm -> fc1 -> act -> fc2 -> residual), causal attention (plus
padding when a mask is given; HunyuanVideo passes none; a query row with no key left gets a
zero attention output, as transformers' default SDPA path gives), final LayerNorm. The pooled output
is the final state at one position per row, chosen as transformers does: with the legacy
`eos_token_id == 2` of CLIP-L's config, the argmax of the ids (the end-of-text id is the
largest of CLIP's vocabulary); otherwise the first position holding `eos_token_id`.

Precision follows transformers loading the model in `dtype`: weights, matmuls, activations
and the residual stream in `dtype`; LayerNorm statistics, logits and softmax in float32.
Parameter names follow the transformers state dict (see `models.hunyuan.text_convert`).
"""

import dataclasses
import os
from typing import Any, ClassVar, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.config_common import EncoderConfigMixin
from models.hunyuan.llama import masked_softmax
from models.layers import matmul_precision


def _quick_gelu(x: jax.Array) -> jax.Array:
  return x * jax.nn.sigmoid(1.702 * x)


# transformers ACT2FN names -> functions (CLIP-L: quick_gelu).
_ACTS = {
    "quick_gelu": _quick_gelu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}
LEGACY_EOS_TOKEN_ID = 2  # configs from before transformers PR #24773: pool at argmax(ids)


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig(EncoderConfigMixin):
  """Text tower architecture (transformers `CLIPTextConfig` names and defaults), plus a dtype.

  Attributes:
    vocab_size: rows of the token embedding.
    hidden_size: residual width.
    intermediate_size: MLP width.
    num_hidden_layers: encoder layers.
    num_attention_heads: heads (must divide hidden_size).
    max_position_embeddings: rows of the position embedding (the longest input).
    hidden_act: MLP activation (transformers' name; CLIP-L: "quick_gelu").
    layer_norm_eps: LayerNorm epsilon.
    eos_token_id: end-of-text id; 2 selects the legacy argmax pooling.
    dtype: weight and compute dtype.
  """

  vocab_size: int = 49408
  hidden_size: int = 512
  intermediate_size: int = 2048
  num_hidden_layers: int = 12
  num_attention_heads: int = 8
  max_position_embeddings: int = 77
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  eos_token_id: int = 49407
  dtype: Any = jnp.float32

  FAMILY: ClassVar[str] = "CLIP text encoder"

  @classmethod
  def variants(cls):
    return {"clip-l": cls.clip_l}

  def describe(self) -> str:
    return (f"CLIP text encoder ({self.num_hidden_layers} layers, hidden {self.hidden_size}, "
            f"vocab {self.vocab_size})")

  def __post_init__(self):
    self.check_positive_ints(("vocab_size", "hidden_size", "intermediate_size",
                              "num_hidden_layers", "num_attention_heads",
                              "max_position_embeddings"))
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(f"CLIPTextConfig.num_attention_heads ({self.num_attention_heads}) must "
                       f"divide hidden_size ({self.hidden_size})")
    if self.hidden_act not in _ACTS:
      raise ValueError(f"CLIPTextConfig.hidden_act {self.hidden_act!r} is not supported (only "
                       f"{sorted(_ACTS)})")
    eps = self.layer_norm_eps
    if isinstance(eps, bool) or not isinstance(eps, (int, float, np.floating)) or not eps > 0:
      raise ValueError(f"CLIPTextConfig.layer_norm_eps must be > 0, got {eps!r}")
    eos = self.eos_token_id
    if isinstance(eos, bool) or not isinstance(eos, (int, np.integer)) or eos < 0:
      raise ValueError(f"CLIPTextConfig.eos_token_id must be a non-negative integer, got "
                       f"{eos!r}")
    object.__setattr__(self, "dtype", jnp.dtype(self.dtype))

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  @classmethod
  def clip_l(cls, **overrides) -> "CLIPTextConfig":
    """CLIP ViT-L/14's text tower (HunyuanVideo's `text_encoder_2/`)."""
    return cls(**{**dict(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                         num_hidden_layers=12, num_attention_heads=12,
                         max_position_embeddings=77, eos_token_id=LEGACY_EOS_TOKEN_ID),
                  **overrides})

  @classmethod
  def from_hf_config(cls, raw: dict, **overrides) -> "CLIPTextConfig":
    """From a transformers `config.json` of a `CLIPTextModel` (other keys are ignored;
    absent ones take transformers' defaults).

    Raises:
      ValueError: not a CLIP text config, or an unsupported field.
    """
    model_type = raw.get("model_type")
    if model_type != "clip_text_model":
      raise ValueError(f"model_type is {model_type!r}, expected 'clip_text_model' (a "
                       "CLIPTextModel save; full CLIPModel folders are not supported)")
    names = [f.name for f in dataclasses.fields(cls) if f.name != "dtype"]
    fields = {k: raw[k] for k in names if raw.get(k) is not None}
    if isinstance(fields.get("eos_token_id"), (list, tuple)):
      raise ValueError(f"eos_token_id {fields['eos_token_id']!r}: a list is not supported "
                       "(transformers' pooling compares against a single id)")
    return cls(**{**fields, **overrides})


class CLIPTextOutput(NamedTuple):
  """last_hidden_state [B, L, hidden_size] (after the final LayerNorm) and pooler_output
  [B, hidden_size], in the model's dtype."""

  last_hidden_state: jax.Array
  pooler_output: jax.Array


class CLIPLayerNorm(nnx.Module):
  """LayerNorm with weight and bias, computed in float32, output in x's dtype."""

  def __init__(self, dim: int, *, eps: float, dtype: Any):
    self.eps = eps
    self.weight = nnx.Param(jnp.ones((dim,), dtype))
    self.bias = nnx.Param(jnp.zeros((dim,), dtype))

  def __call__(self, x: jax.Array) -> jax.Array:  # [..., D] -> [..., D]
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
    y = y * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
    return y.astype(x.dtype)


def _linear(d_in: int, d_out: int, dtype: Any, rngs: nnx.Rngs) -> nnx.Linear:
  return nnx.Linear(d_in, d_out, use_bias=True, dtype=dtype, param_dtype=dtype,
                    precision=matmul_precision(dtype), rngs=rngs)


class CLIPAttention(nnx.Module):
  """Multi-head self-attention with biases and a 1/sqrt(head_dim) logit scale."""

  def __init__(self, cfg: CLIPTextConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d = cfg.hidden_size
    self.q_proj = _linear(d, d, cfg.dtype, rngs)
    self.k_proj = _linear(d, d, cfg.dtype, rngs)
    self.v_proj = _linear(d, d, cfg.dtype, rngs)
    self.out_proj = _linear(d, d, cfg.dtype, rngs)

  def __call__(self, x: jax.Array, allowed: jax.Array) -> jax.Array:
    """x: [B, L, D]; allowed: [B or 1, 1, Lq, Lk] bool (query may attend to key) ->
    [B, L, D]."""
    cfg = self.cfg
    b, length, _ = x.shape
    h, hd = cfg.num_attention_heads, cfg.head_dim
    q, k, v = (p(x).reshape(b, length, h, hd) for p in (self.q_proj, self.k_proj, self.v_proj))
    precision = matmul_precision(cfg.dtype)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=precision,
                        preferred_element_type=jnp.float32)
    probs = masked_softmax(logits * np.float32(hd ** -0.5), allowed).astype(v.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v, precision=precision)
    return self.out_proj(out.reshape(b, length, -1))


class CLIPMLP(nnx.Module):
  """fc2(act(fc1 x))."""

  def __init__(self, cfg: CLIPTextConfig, *, rngs: nnx.Rngs):
    self.act = _ACTS[cfg.hidden_act]
    self.fc1 = _linear(cfg.hidden_size, cfg.intermediate_size, cfg.dtype, rngs)
    self.fc2 = _linear(cfg.intermediate_size, cfg.hidden_size, cfg.dtype, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:  # [B, L, D] -> [B, L, D]
    return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nnx.Module):
  """x += attn(ln1(x)); x += mlp(ln2(x))."""

  def __init__(self, cfg: CLIPTextConfig, *, rngs: nnx.Rngs):
    eps = cfg.layer_norm_eps
    self.layer_norm1 = CLIPLayerNorm(cfg.hidden_size, eps=eps, dtype=cfg.dtype)
    self.self_attn = CLIPAttention(cfg, rngs=rngs)
    self.layer_norm2 = CLIPLayerNorm(cfg.hidden_size, eps=eps, dtype=cfg.dtype)
    self.mlp = CLIPMLP(cfg, rngs=rngs)

  def __call__(self, x: jax.Array, allowed: jax.Array) -> jax.Array:
    x = x + self.self_attn(self.layer_norm1(x), allowed)
    return x + self.mlp(self.layer_norm2(x))


def pooled_positions(input_ids: jax.Array, eos_token_id: int) -> jax.Array:
  """[B] int32: the position transformers pools per row (argmax of the ids for the legacy
  eos_token_id 2, else the first position equal to eos_token_id, or 0 if there is none)."""
  ids = input_ids.astype(jnp.int32)
  if eos_token_id == LEGACY_EOS_TOKEN_ID:
    return jnp.argmax(ids, axis=-1).astype(jnp.int32)
  return jnp.argmax((ids == eos_token_id).astype(jnp.int32), axis=-1).astype(jnp.int32)


class CLIPTextEncoder(nnx.Module):
  """transformers `CLIPTextModel`: token ids -> (last_hidden_state, pooler_output)."""

  def __init__(self, cfg: CLIPTextConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.token_embedding = nnx.Embed(cfg.vocab_size, cfg.hidden_size, dtype=cfg.dtype,
                                     param_dtype=cfg.dtype, rngs=rngs)
    self.position_embedding = nnx.Embed(cfg.max_position_embeddings, cfg.hidden_size,
                                        dtype=cfg.dtype, param_dtype=cfg.dtype, rngs=rngs)
    self.layers = nnx.List([CLIPEncoderLayer(cfg, rngs=rngs)
                            for _ in range(cfg.num_hidden_layers)])
    self.final_layer_norm = CLIPLayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps,
                                          dtype=cfg.dtype)

  def __call__(self, input_ids: jax.Array,
               attention_mask: Optional[jax.Array] = None) -> CLIPTextOutput:
    """input_ids: [B, L] int, L <= max_position_embeddings; attention_mask: [B, L] (1 =
    token, 0 = padding; None: causal only, as HunyuanVideo calls it).

    Returns:
      CLIPTextOutput(last_hidden_state [B, L, D], pooler_output [B, D]).
    """
    cfg = self.cfg
    if input_ids.ndim != 2:
      raise ValueError(f"input_ids must be [B, L], got shape {input_ids.shape}")
    length = input_ids.shape[1]
    if length > cfg.max_position_embeddings:
      raise ValueError(f"sequence length {length} exceeds max_position_embeddings "
                       f"{cfg.max_position_embeddings}")
    allowed = jnp.tril(jnp.ones((length, length), bool))[None]
    if attention_mask is not None:
      if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {attention_mask.shape} != input_ids shape "
                         f"{input_ids.shape}")
      allowed = allowed & (attention_mask > 0)[:, None, :]
    allowed = allowed[:, None]  # [B or 1, 1 (head), Lq, Lk]
    x = self.token_embedding(input_ids) + self.position_embedding(jnp.arange(length))[None]
    for layer in self.layers:
      x = layer(x, allowed)
    x = self.final_layer_norm(x)
    pos = pooled_positions(input_ids, cfg.eos_token_id)
    pooled = jnp.take_along_axis(x, pos[:, None, None], axis=1)[:, 0]
    return CLIPTextOutput(last_hidden_state=x, pooler_output=pooled)

  @classmethod
  def from_pretrained(cls, path: Union[str, os.PathLike], *, dtype: Any = jnp.float32,
                      progress: bool = False,
                      device: Optional[jax.Device] = None) -> "CLIPTextEncoder":
    """Loads a local transformers `CLIPTextModel` save (a diffusers HunyuanVideo
    `text_encoder_2/` folder, or a pipeline folder holding one) or a folder written by
    `svg-ear-convert clip` (no torch needed); see `models.hunyuan.text_convert.load_clip`."""
    from models.hunyuan.text_convert import load_clip

    return load_clip(path, dtype=dtype, progress=progress, device=device)
