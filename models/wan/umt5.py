"""UMT5 text encoder (Wan's umt5-xxl) in flax.nnx, mirroring transformers' `UMT5EncoderModel`.

Differences from T5/mT5 that matter: every layer has its own relative position bias table
(T5 computes it in layer 0 and reuses it), the attention logits are not scaled by
1/sqrt(d_kv), and the feed-forward is gated with tanh-GELU ("gated-gelu" = `gelu_new`).
Norms are T5's RMSNorm (weight only, variance in float32). Parameter names follow the
transformers state dict (see `models.wan.umt5_convert`); Linear kernels are (in, out).

Precision follows transformers loading the model in `dtype`: weights and matmuls in `dtype`,
norms in float32. Logits and softmax are float32 here (torch's bf16 attention rounds them to
bf16). For float16 only, `wo` (the FFN output projection: transformers'
`_keep_in_fp32_modules`, which it applies to fp16 loads only) stays float32, making the
residual stream float32 from the first FFN on, and infinities are clamped after each sublayer
as transformers does; bfloat16 (Wan's T5 dtype) has neither exception.
"""

import dataclasses
import math
import os
from typing import Any, ClassVar, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.config_common import EncoderConfigMixin
from models.layers import matmul_precision

# feed_forward_proj -> transformers' `dense_act_fn` (gelu_new = tanh-approximated GELU).
_GATED_ACTS = {"gated-gelu": "gelu_new"}


@dataclasses.dataclass(frozen=True)
class UMT5Config(EncoderConfigMixin):
  """Encoder architecture (transformers `UMT5Config` names and defaults), plus a dtype.

  Attributes:
    vocab_size: rows of the token embedding (umt5-xxl: 256,384, padded).
    d_model: hidden width.
    d_kv: width of one attention head (num_heads * d_kv need not equal d_model).
    d_ff: feed-forward width.
    num_layers: encoder blocks.
    num_heads: attention heads.
    relative_attention_num_buckets: relative position buckets (half per direction).
    relative_attention_max_distance: distances at or beyond this share the last bucket.
    feed_forward_proj: only "gated-gelu" (UMT5's and Wan's) is supported.
    layer_norm_epsilon: RMSNorm epsilon.
    dtype: weight and compute dtype (norms, logits and softmax are float32; float16 keeps
      `wo` in float32, as transformers does).
  """

  vocab_size: int = 250112
  d_model: int = 512
  d_kv: int = 64
  d_ff: int = 1024
  num_layers: int = 8
  num_heads: int = 6
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  feed_forward_proj: str = "gated-gelu"
  layer_norm_epsilon: float = 1e-6
  dtype: Any = jnp.float32

  FAMILY: ClassVar[str] = "UMT5 encoder"

  @classmethod
  def variants(cls):
    return {"umt5-xxl": cls.umt5_xxl}

  def describe(self) -> str:
    return (f"UMT5 encoder ({self.num_layers} layers, d_model {self.d_model}, vocab "
            f"{self.vocab_size})")

  def __post_init__(self):
    self.check_positive_ints(("vocab_size", "d_model", "d_kv", "d_ff", "num_layers",
                              "num_heads", "relative_attention_num_buckets",
                              "relative_attention_max_distance"))
    nb = self.relative_attention_num_buckets
    if nb < 4 or nb % 4:
      # The encoder halves the buckets per direction and then halves again (exact / log).
      raise ValueError(f"UMT5Config.relative_attention_num_buckets must be a multiple of 4, "
                       f"got {nb}")
    if self.relative_attention_max_distance <= nb // 4:
      raise ValueError("UMT5Config.relative_attention_max_distance must exceed "
                       f"relative_attention_num_buckets // 4 = {nb // 4}, got "
                       f"{self.relative_attention_max_distance}")
    if self.feed_forward_proj not in _GATED_ACTS:
      raise ValueError(f"UMT5Config.feed_forward_proj {self.feed_forward_proj!r} is not "
                       f"supported (only {sorted(_GATED_ACTS)})")
    if not self.layer_norm_epsilon > 0:
      raise ValueError(f"UMT5Config.layer_norm_epsilon must be > 0, got "
                       f"{self.layer_norm_epsilon!r}")
    object.__setattr__(self, "dtype", jnp.dtype(self.dtype))

  @classmethod
  def umt5_xxl(cls, **overrides) -> "UMT5Config":
    """The encoder of Wan's `umt5-xxl` (diffusers `text_encoder/` of every Wan2.x pipeline)."""
    return cls(**{**dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24,
                         num_heads=64), **overrides})

  @classmethod
  def from_hf_config(cls, raw: dict, **overrides) -> "UMT5Config":
    """From a transformers `config.json` of a UMT5 model (other keys are ignored).

    Raises:
      ValueError: not a UMT5 config (T5/mT5 share one bias table and would load wrongly), or
        an unsupported field.
    """
    model_type = raw.get("model_type")
    if model_type != "umt5":
      raise ValueError(f"model_type is {model_type!r}, expected 'umt5' (T5 and mT5 share "
                       "layer 0's relative position bias; this port is UMT5's per-layer "
                       "bias)")
    names = [f.name for f in dataclasses.fields(cls) if f.name != "dtype"]
    return cls(**{**{k: raw[k] for k in names if k in raw}, **overrides})


def relative_position_buckets(length: int, num_buckets: int, max_distance: int) -> np.ndarray:
  """Bidirectional T5 buckets of `key - query` for a [length, length] attention, as transformers
  computes them (float32 log, truncation toward zero).

  Returns:
    [length, length] int32 in [0, num_buckets).
  """
  pos = np.arange(length, dtype=np.int64)
  rel = pos[None, :] - pos[:, None]
  half = num_buckets // 2
  buckets = (rel > 0).astype(np.int64) * half
  n = np.abs(rel)
  max_exact = half // 2
  with np.errstate(divide="ignore"):
    # float32 throughout, like torch: the result at exact bucket edges depends on it.
    ratio = np.log(n.astype(np.float32) / np.float32(max_exact))
    ratio = ratio / np.float32(math.log(max_distance / max_exact))
    ratio = ratio * np.float32(half - max_exact)
  large = max_exact + np.where(n < max_exact, 0, ratio).astype(np.int64)
  large = np.minimum(large, half - 1)
  buckets = buckets + np.where(n < max_exact, n, large)
  return buckets.astype(np.int32)


class T5LayerNorm(nnx.Module):
  """T5 RMSNorm: x * rsqrt(mean(x^2) + eps) in float32, cast to the weight's dtype if that is
  half precision, times the weight (no bias, no mean subtraction)."""

  def __init__(self, dim: int, *, eps: float, dtype: Any):
    self.eps = eps
    self.weight = nnx.Param(jnp.ones((dim,), dtype))

  def __call__(self, x: jax.Array) -> jax.Array:  # [..., D] -> [..., D]
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + self.eps)
    weight = self.weight[...]
    if weight.dtype in (jnp.float16, jnp.bfloat16):
      y = y.astype(weight.dtype)
    return weight * y


def _linear(d_in: int, d_out: int, dtype: Any, rngs: nnx.Rngs) -> nnx.Linear:
  return nnx.Linear(d_in, d_out, use_bias=False, dtype=dtype, param_dtype=dtype,
                    precision=matmul_precision(dtype), rngs=rngs)


class UMT5Attention(nnx.Module):
  """Self-attention with this layer's own relative position bias and no logit scaling."""

  def __init__(self, cfg: UMT5Config, *, rngs: nnx.Rngs):
    inner = cfg.num_heads * cfg.d_kv
    self.cfg = cfg
    self.q = _linear(cfg.d_model, inner, cfg.dtype, rngs)
    self.k = _linear(cfg.d_model, inner, cfg.dtype, rngs)
    self.v = _linear(cfg.d_model, inner, cfg.dtype, rngs)
    self.o = _linear(inner, cfg.d_model, cfg.dtype, rngs)
    self.relative_attention_bias = nnx.Param(jax.random.normal(
        rngs.params(), (cfg.relative_attention_num_buckets, cfg.num_heads), cfg.dtype))

  def __call__(self, x: jax.Array, mask_bias: jax.Array) -> jax.Array:
    """x: [B, L, D]; mask_bias: [B, 1, 1, L] float32 (0 or a large negative) -> [B, L, D]."""
    cfg = self.cfg
    b, length, _ = x.shape
    q, k, v = (p(x).reshape(b, length, cfg.num_heads, cfg.d_kv) for p in (self.q, self.k, self.v))
    precision = matmul_precision(cfg.dtype)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=precision,
                        preferred_element_type=jnp.float32)
    buckets = relative_position_buckets(length, cfg.relative_attention_num_buckets,
                                        cfg.relative_attention_max_distance)
    bias = self.relative_attention_bias[...][buckets]  # [L, L, H]
    logits = logits + jnp.transpose(bias, (2, 0, 1)).astype(jnp.float32)[None] + mask_bias
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v, precision=precision)
    return self.o(out.reshape(b, length, -1))


def wo_dtype(dtype: Any) -> jnp.dtype:
  """dtype of `wo`: float32 for a float16 model (transformers' `_keep_in_fp32_modules`), else
  the model's."""
  return jnp.dtype(jnp.float32) if jnp.dtype(dtype) == jnp.float16 else jnp.dtype(dtype)


class UMT5FeedForward(nnx.Module):
  """wo(gelu_tanh(wi_0 x) * wi_1 x), no biases."""

  def __init__(self, cfg: UMT5Config, *, rngs: nnx.Rngs):
    self.wi_0 = _linear(cfg.d_model, cfg.d_ff, cfg.dtype, rngs)
    self.wi_1 = _linear(cfg.d_model, cfg.d_ff, cfg.dtype, rngs)
    self.wo_dtype = wo_dtype(cfg.dtype)
    self.wo = _linear(cfg.d_ff, cfg.d_model, self.wo_dtype, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:  # [B, L, D] -> [B, L, D]
    h = jax.nn.gelu(self.wi_0(x), approximate=True) * self.wi_1(x)
    return self.wo(h.astype(self.wo_dtype))


class UMT5Block(nnx.Module):
  """x += attn(norm(x)); x += ffn(norm(x)) (pre-norm residual, inference: no dropout)."""

  def __init__(self, cfg: UMT5Config, *, rngs: nnx.Rngs):
    eps = cfg.layer_norm_epsilon
    self.attn_norm = T5LayerNorm(cfg.d_model, eps=eps, dtype=cfg.dtype)
    self.attn = UMT5Attention(cfg, rngs=rngs)
    self.ffn_norm = T5LayerNorm(cfg.d_model, eps=eps, dtype=cfg.dtype)
    self.ffn = UMT5FeedForward(cfg, rngs=rngs)

  def __call__(self, x: jax.Array, mask_bias: jax.Array) -> jax.Array:
    # dtype promotion as in torch: a float16 stream becomes float32 once the fp32 `wo` adds in.
    x = _clamp_fp16(x + self.attn(self.attn_norm(x), mask_bias))
    return _clamp_fp16(x + self.ffn(self.ffn_norm(x)))


def _clamp_fp16(x: jax.Array) -> jax.Array:
  """transformers' fp16 guard: clamp to +-(max - 1000) when any value is infinite."""
  if x.dtype != jnp.float16:
    return x
  big = jnp.finfo(jnp.float16).max
  limit = jnp.where(jnp.isinf(x).any(), big - 1000, big).astype(x.dtype)
  return jnp.clip(x, -limit, limit)


class UMT5Encoder(nnx.Module):
  """transformers `UMT5EncoderModel`: token ids -> `last_hidden_state`.

  Attention over padding is removed by a large negative logit bias on masked keys (padded
  query rows are still computed, as in transformers; `encode_prompt` zeroes them).
  """

  def __init__(self, cfg: UMT5Config, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed_tokens = nnx.Embed(cfg.vocab_size, cfg.d_model, dtype=cfg.dtype,
                                  param_dtype=cfg.dtype, rngs=rngs)
    self.blocks = nnx.List([UMT5Block(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
    self.final_layer_norm = T5LayerNorm(cfg.d_model, eps=cfg.layer_norm_epsilon,
                                        dtype=cfg.dtype)

  def __call__(self, input_ids: jax.Array,
               attention_mask: Optional[jax.Array] = None) -> jax.Array:
    """input_ids: [B, L] int; attention_mask: [B, L] (1 = token, 0 = padding; None: all 1).

    Returns:
      last_hidden_state [B, L, d_model] in `cfg.dtype`.
    """
    if input_ids.ndim != 2:
      raise ValueError(f"input_ids must be [B, L], got shape {input_ids.shape}")
    if attention_mask is None:
      attention_mask = jnp.ones(input_ids.shape, jnp.int32)
    if attention_mask.shape != input_ids.shape:
      raise ValueError(f"attention_mask shape {attention_mask.shape} != input_ids shape "
                       f"{input_ids.shape}")
    keep = (attention_mask > 0)[:, None, None, :]
    mask_bias = jnp.where(keep, 0.0, jnp.finfo(jnp.float32).min).astype(jnp.float32)
    x = self.embed_tokens(input_ids)
    for block in self.blocks:
      x = block(x, mask_bias)
    return self.final_layer_norm(x)

  @classmethod
  def from_pretrained(cls, path: Union[str, os.PathLike], *, dtype: Any = jnp.float32,
                      progress: bool = False,
                      device: Optional[jax.Device] = None) -> "UMT5Encoder":
    """Loads a local transformers `UMT5EncoderModel` save (a diffusers Wan `text_encoder/`
    folder, or a pipeline folder holding one); see `models.wan.umt5_convert.load_umt5`."""
    from models.wan.umt5_convert import load_umt5

    return load_umt5(path, dtype=dtype, progress=progress, device=device)
