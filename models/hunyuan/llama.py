"""Llama decoder stack as a text encoder (HunyuanVideo's LLaVA-Llama-3-8B language model) in
flax.nnx, mirroring transformers' `LlamaModel`.

HunyuanVideo reads `hidden_states[-3]` of the encoder (diffusers' `num_hidden_layers_to_skip
= 2`): the output of layer N - 2, before the last two layers and without the final norm. The
encoder therefore returns `hidden_states[i]` for any i in transformers' numbering (0 = token
embeddings, i = output of layer i, N = -1 = the normed last layer, `last_hidden_state`) and
runs only the layers that state needs; it can also be built with a prefix of the layers
(`num_layers`), so that the unused ones are never loaded.

Attention is transformers': causal, plus padding. With right padding (HunyuanVideo's
tokenizer) the padded query rows attend to every real token before them and are computed,
not zeroed, like transformers' outputs at those positions. A query row with no key at all
(leading pads of left padding) gets a zero attention output, as transformers' default SDPA
path gives (its eager path would average all values instead). Positions are 0..L-1 whatever
the mask.

Precision follows transformers loading the model in `dtype`: weights, matmuls, the residual
stream and the rotary products in `dtype`; RMSNorm statistics, logits and softmax in float32;
rotary cos/sin computed in float32 and rounded to `dtype`. Parameter names follow the
transformers state dict (see `models.hunyuan.text_convert`); Linear kernels are (in, out).
"""

import dataclasses
import math
import os
from typing import Any, ClassVar, Optional, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.config_common import EncoderConfigMixin
from models.layers import matmul_precision

ROPE_TYPES = ("default", "llama3")
_ACTS = {"silu": jax.nn.silu}


@dataclasses.dataclass(frozen=True)
class LlamaConfig(EncoderConfigMixin):
  """Decoder architecture (transformers `LlamaConfig` names and defaults), plus a dtype.

  Attributes:
    vocab_size: rows of the token embedding.
    hidden_size: residual width.
    intermediate_size: SwiGLU width.
    num_hidden_layers: decoder layers of the checkpoint.
    num_attention_heads: query heads.
    num_key_value_heads: key/value heads (GQA; None: as many as query heads); must divide
      `num_attention_heads`.
    head_dim: width of one head (None: hidden_size // num_attention_heads).
    hidden_act: MLP activation; only "silu" (Llama's) is supported.
    max_position_embeddings: the model's context length (llama3 rope scaling default for
      `original_max_position_embeddings`; not a limit here, as in transformers).
    rms_norm_eps: RMSNorm epsilon.
    rope_theta: rotary base (Llama 3: 500000).
    rope_type: "default" or "llama3" (Llama 3.1 frequency scaling; LLaVA-Llama-3-8B has
      none).
    rope_factor, rope_low_freq_factor, rope_high_freq_factor,
    rope_original_max_position_embeddings: the llama3 scaling parameters (unused otherwise).
    attention_bias, mlp_bias: Linear biases (False for Llama).
    dtype: weight and compute dtype.
  """

  vocab_size: int = 32000
  hidden_size: int = 4096
  intermediate_size: int = 11008
  num_hidden_layers: int = 32
  num_attention_heads: int = 32
  num_key_value_heads: Optional[int] = None
  head_dim: Optional[int] = None
  hidden_act: str = "silu"
  max_position_embeddings: int = 2048
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_type: str = "default"
  rope_factor: float = 8.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_position_embeddings: Optional[int] = None
  attention_bias: bool = False
  mlp_bias: bool = False
  dtype: Any = jnp.float32

  FAMILY: ClassVar[str] = "Llama encoder"

  @classmethod
  def variants(cls):
    return {"llava-llama-3-8b": cls.llava_llama3_8b}

  def describe(self) -> str:
    return (f"Llama encoder ({self.num_hidden_layers} layers, hidden {self.hidden_size}, "
            f"vocab {self.vocab_size})")

  def __post_init__(self):
    if self.num_key_value_heads is None:
      object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
    if self.head_dim is None:
      heads = self.num_attention_heads
      if isinstance(heads, (int, np.integer)) and heads > 0:
        object.__setattr__(self, "head_dim", self.hidden_size // heads)
    self.check_positive_ints(("vocab_size", "hidden_size", "intermediate_size",
                              "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                              "head_dim", "max_position_embeddings"))
    if self.num_attention_heads % self.num_key_value_heads:
      raise ValueError(f"LlamaConfig.num_key_value_heads ({self.num_key_value_heads}) must "
                       f"divide num_attention_heads ({self.num_attention_heads})")
    if self.head_dim % 2:
      raise ValueError(f"LlamaConfig.head_dim must be even (rotary pairs), got {self.head_dim}")
    if self.hidden_act not in _ACTS:
      raise ValueError(f"LlamaConfig.hidden_act {self.hidden_act!r} is not supported (only "
                       f"{sorted(_ACTS)})")
    if self.rope_type not in ROPE_TYPES:
      raise ValueError(f"LlamaConfig.rope_type {self.rope_type!r} is not supported (only "
                       f"{list(ROPE_TYPES)})")
    for name in ("rms_norm_eps", "rope_theta", "rope_factor", "rope_low_freq_factor",
                 "rope_high_freq_factor"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)) or \
          not value > 0:
        raise ValueError(f"LlamaConfig.{name} must be a positive number, got {value!r}")
    if self.rope_type == "llama3" and not self.rope_high_freq_factor > self.rope_low_freq_factor:
      raise ValueError("LlamaConfig.rope_high_freq_factor must exceed rope_low_freq_factor, got "
                       f"{self.rope_high_freq_factor} and {self.rope_low_freq_factor}")
    orig = self.rope_original_max_position_embeddings
    if orig is not None and (not isinstance(orig, (int, np.integer)) or orig < 1):
      raise ValueError("LlamaConfig.rope_original_max_position_embeddings must be a positive "
                       f"integer or None, got {orig!r}")
    for name in ("attention_bias", "mlp_bias"):
      if not isinstance(getattr(self, name), (bool, np.bool_)):
        raise ValueError(f"LlamaConfig.{name} must be a bool, got {getattr(self, name)!r}")
    object.__setattr__(self, "dtype", jnp.dtype(self.dtype))

  @classmethod
  def llava_llama3_8b(cls, **overrides) -> "LlamaConfig":
    """HunyuanVideo's `text_encoder/` (the LLaVA-Llama-3-8B language model as `LlamaModel`)."""
    return cls(**{**dict(vocab_size=128320, hidden_size=4096, intermediate_size=14336,
                         num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                         head_dim=128, max_position_embeddings=8192, rms_norm_eps=1e-5,
                         rope_theta=500000.0), **overrides})

  @classmethod
  def from_hf_config(cls, raw: dict, **overrides) -> "LlamaConfig":
    """From a transformers `config.json` of a Llama model, or of a LLaVA model (its
    `text_config`). Other keys are ignored; absent ones take transformers' defaults.

    RoPE parameters are read as transformers 5 does: `rope_scaling` (old saves) or
    `rope_parameters` (new saves), with `rope_theta` inside it or at the top level.

    Raises:
      ValueError: not a Llama / LLaVA-on-Llama config, or an unsupported field (another
        rope type, partial rotary embeddings, another activation).
    """
    model_type = raw.get("model_type")
    if model_type == "llava":
      text = raw.get("text_config")
      if not isinstance(text, dict):
        raise ValueError("LLaVA config.json has no text_config")
      raw = {"model_type": "llama", **text}
      model_type = raw.get("model_type")
    if model_type != "llama":
      raise ValueError(f"model_type is {model_type!r}, expected 'llama' (or 'llava' with a "
                       "Llama text_config)")
    names = [f.name for f in dataclasses.fields(cls)
             if f.name != "dtype" and not f.name.startswith("rope_")]
    fields = {k: raw[k] for k in names if raw.get(k) is not None}
    params = raw.get("rope_scaling") or raw.get("rope_parameters") or {}
    if not isinstance(params, dict):
      raise ValueError(f"rope_scaling / rope_parameters must be an object, got {params!r}")
    theta = params.get("rope_theta", raw.get("rope_theta"))
    if theta is not None:
      fields["rope_theta"] = float(theta)
    rope_type = params.get("rope_type", params.get("type", "default"))
    fields["rope_type"] = rope_type
    partial = params.get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
      raise ValueError(f"partial_rotary_factor {partial} is not supported (only 1.0)")
    if rope_type == "llama3":
      try:
        fields.update(rope_factor=float(params["factor"]),
                      rope_low_freq_factor=float(params["low_freq_factor"]),
                      rope_high_freq_factor=float(params["high_freq_factor"]))
      except KeyError as err:
        raise ValueError(f"llama3 rope scaling needs {err.args[0]!r}") from err
      # transformers: a top-level value wins, then the dict's, then max_position_embeddings.
      orig = raw.get("original_max_position_embeddings",
                     params.get("original_max_position_embeddings"))
      if orig is not None:
        fields["rope_original_max_position_embeddings"] = int(orig)
    return cls(**{**fields, **overrides})


def resolve_hidden_state_index(index: int, num_layers: int) -> int:
  """transformers' `hidden_states[index]` (a tuple of num_layers + 1) as an index in
  [0, num_layers]: 0 is the token embedding, i < num_layers the output of layer i,
  num_layers the normed output of the last layer.

  Raises:
    IndexError: out of range.
  """
  if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
    raise TypeError(f"hidden state index must be an int, got {index!r}")
  n = num_layers + 1
  if not -n <= index < n:
    raise IndexError(f"hidden state index {index} out of range for {num_layers} layers "
                     f"({n} hidden states)")
  return int(index) % n


def rope_inv_freq(cfg: LlamaConfig) -> np.ndarray:
  """Rotary inverse frequencies [head_dim // 2] float32, op for op as transformers computes
  them in float32 (default, or llama3 scaling)."""
  dim = cfg.head_dim
  exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
  inv_freq = np.float32(1.0) / (np.float32(cfg.rope_theta) ** exponent)
  if cfg.rope_type == "default":
    return inv_freq.astype(np.float32)
  factor = np.float32(cfg.rope_factor)
  low, high = cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
  old_len = cfg.rope_original_max_position_embeddings or cfg.max_position_embeddings
  low_freq_wavelen = old_len / low
  high_freq_wavelen = old_len / high
  wavelen = np.float32(2 * math.pi) / inv_freq
  scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq).astype(np.float32)
  smooth = ((np.float32(old_len) / wavelen - np.float32(low))
            / np.float32(high - low)).astype(np.float32)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
  return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_cos_sin(cfg: LlamaConfig, length: int, dtype: Any) -> Tuple[jax.Array, jax.Array]:
  """cos, sin [length, head_dim] for positions 0..length-1 (float32, rounded to `dtype`)."""
  inv_freq = jnp.asarray(rope_inv_freq(cfg))
  freqs = jnp.arange(length, dtype=jnp.float32)[:, None] * inv_freq[None, :]
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def _rotate_half(x: jax.Array) -> jax.Array:
  half = x.shape[-1] // 2
  return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """x [B, L, H, D] rotated by cos/sin [L, D] (transformers' rotate_half convention)."""
  return x * cos[:, None, :] + _rotate_half(x) * sin[:, None, :]


class LlamaRMSNorm(nnx.Module):
  """x * rsqrt(mean(x^2) + eps) in float32, cast back to x's dtype, times the weight."""

  def __init__(self, dim: int, *, eps: float, dtype: Any):
    self.eps = eps
    self.weight = nnx.Param(jnp.ones((dim,), dtype))

  def __call__(self, x: jax.Array) -> jax.Array:  # [..., D] -> [..., D]
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + self.eps)
    return self.weight[...] * y.astype(x.dtype)


def _linear(d_in: int, d_out: int, bias: bool, dtype: Any, rngs: nnx.Rngs) -> nnx.Linear:
  return nnx.Linear(d_in, d_out, use_bias=bias, dtype=dtype, param_dtype=dtype,
                    precision=matmul_precision(dtype), rngs=rngs)


class LlamaAttention(nnx.Module):
  """Grouped-query self-attention with rotary q/k and a 1/sqrt(head_dim) logit scale."""

  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d, hd, b = cfg.hidden_size, cfg.head_dim, cfg.attention_bias
    self.q_proj = _linear(d, cfg.num_attention_heads * hd, b, cfg.dtype, rngs)
    self.k_proj = _linear(d, cfg.num_key_value_heads * hd, b, cfg.dtype, rngs)
    self.v_proj = _linear(d, cfg.num_key_value_heads * hd, b, cfg.dtype, rngs)
    self.o_proj = _linear(cfg.num_attention_heads * hd, d, b, cfg.dtype, rngs)

  def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array,
               allowed: jax.Array) -> jax.Array:
    """x: [B, L, D]; cos, sin: [L, head_dim]; allowed: [B, 1, 1, Lq, Lk] bool (query may
    attend to key) -> [B, L, D]."""
    cfg = self.cfg
    bsz, length, _ = x.shape
    kv, hd = cfg.num_key_value_heads, cfg.head_dim
    rep = cfg.num_attention_heads // kv
    q = apply_rope(self.q_proj(x).reshape(bsz, length, kv * rep, hd), cos, sin)
    k = apply_rope(self.k_proj(x).reshape(bsz, length, kv, hd), cos, sin)
    v = self.v_proj(x).reshape(bsz, length, kv, hd)
    # Query head h uses key/value head h // rep (transformers' repeat_kv).
    q = q.reshape(bsz, length, kv, rep, hd)
    precision = matmul_precision(cfg.dtype)
    logits = jnp.einsum("bqgrd,bkgd->bgrqk", q, k, precision=precision,
                        preferred_element_type=jnp.float32)
    probs = masked_softmax(logits * np.float32(hd ** -0.5), allowed).astype(v.dtype)
    out = jnp.einsum("bgrqk,bkgd->bqgrd", probs, v, precision=precision)
    return self.o_proj(out.reshape(bsz, length, -1))


def masked_softmax(logits: jax.Array, allowed: jax.Array) -> jax.Array:
  """float32 softmax over the allowed keys; all-zero rows where no key is allowed."""
  logits = jnp.where(allowed, logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1)
  return jnp.where(jnp.any(allowed, axis=-1, keepdims=True), probs, 0.0)


class LlamaMLP(nnx.Module):
  """down(silu(gate x) * up x)."""

  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
    d, f, b = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
    self.act = _ACTS[cfg.hidden_act]
    self.gate_proj = _linear(d, f, b, cfg.dtype, rngs)
    self.up_proj = _linear(d, f, b, cfg.dtype, rngs)
    self.down_proj = _linear(f, d, b, cfg.dtype, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:  # [B, L, D] -> [B, L, D]
    return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nnx.Module):
  """x += attn(norm(x)); x += mlp(norm(x))."""

  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
    eps = cfg.rms_norm_eps
    self.input_layernorm = LlamaRMSNorm(cfg.hidden_size, eps=eps, dtype=cfg.dtype)
    self.self_attn = LlamaAttention(cfg, rngs=rngs)
    self.post_attention_layernorm = LlamaRMSNorm(cfg.hidden_size, eps=eps, dtype=cfg.dtype)
    self.mlp = LlamaMLP(cfg, rngs=rngs)

  def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array,
               allowed: jax.Array) -> jax.Array:
    x = x + self.self_attn(self.input_layernorm(x), cos, sin, allowed)
    return x + self.mlp(self.post_attention_layernorm(x))


class LlamaEncoder(nnx.Module):
  """transformers `LlamaModel` run as an encoder: token ids -> one of its hidden states.

  Attributes:
    cfg: the architecture (num_hidden_layers is the checkpoint's depth).
    num_layers: decoder layers built (a prefix of cfg.num_hidden_layers); the final norm
      exists only when all are.
  """

  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs, num_layers: Optional[int] = None):
    """num_layers: build only the first this many layers (None: all); hidden states past
    them are then unavailable."""
    if num_layers is None:
      num_layers = cfg.num_hidden_layers
    if isinstance(num_layers, bool) or not isinstance(num_layers, (int, np.integer)) or \
        not 0 <= num_layers <= cfg.num_hidden_layers:
      raise ValueError(f"num_layers must be an int in [0, {cfg.num_hidden_layers}], got "
                       f"{num_layers!r}")
    self.cfg = cfg
    self.num_layers = int(num_layers)
    self.embed_tokens = nnx.Embed(cfg.vocab_size, cfg.hidden_size, dtype=cfg.dtype,
                                  param_dtype=cfg.dtype, rngs=rngs)
    self.layers = nnx.List([LlamaDecoderLayer(cfg, rngs=rngs) for _ in range(self.num_layers)])
    self.norm = (LlamaRMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=cfg.dtype)
                 if self.num_layers == cfg.num_hidden_layers else None)

  def _check(self, input_ids: jax.Array, attention_mask: Optional[jax.Array]) -> jax.Array:
    if input_ids.ndim != 2:
      raise ValueError(f"input_ids must be [B, L], got shape {input_ids.shape}")
    if attention_mask is None:
      attention_mask = jnp.ones(input_ids.shape, jnp.int32)
    if attention_mask.shape != input_ids.shape:
      raise ValueError(f"attention_mask shape {attention_mask.shape} != input_ids shape "
                       f"{input_ids.shape}")
    return attention_mask

  def _run(self, input_ids: jax.Array, attention_mask: Optional[jax.Array], stop: int,
           collect: bool):
    attention_mask = self._check(input_ids, attention_mask)
    length = input_ids.shape[1]
    causal = jnp.tril(jnp.ones((length, length), bool))
    allowed = causal[None] & (attention_mask > 0)[:, None, :]  # [B, Lq, Lk]
    allowed = allowed[:, None, None]  # [B, 1 (kv group), 1 (rep), Lq, Lk]
    x = self.embed_tokens(input_ids)
    cos, sin = rope_cos_sin(self.cfg, length, x.dtype)
    states = [x]
    for i in range(stop):
      x = self.layers[i](x, cos, sin, allowed)
      states.append(x)
    if stop == self.cfg.num_hidden_layers:
      states[-1] = self.norm(x)
    return tuple(states) if collect else states[-1]

  def __call__(self, input_ids: jax.Array, attention_mask: Optional[jax.Array] = None, *,
               hidden_state_index: int = -1) -> jax.Array:
    """One hidden state, computing only the layers it needs.

    Args:
      input_ids: [B, L] int.
      attention_mask: [B, L] (1 = token, 0 = padding; None: all 1).
      hidden_state_index: transformers' `hidden_states[i]` (0: embeddings; -1:
        `last_hidden_state`, normed; HunyuanVideo: -3, the output of layer N - 2).

    Returns:
      [B, L, hidden_size] in `cfg.dtype`.
    """
    stop = resolve_hidden_state_index(hidden_state_index, self.cfg.num_hidden_layers)
    self._require(stop, hidden_state_index)
    return self._run(input_ids, attention_mask, stop, collect=False)

  def hidden_states(self, input_ids: jax.Array,
                    attention_mask: Optional[jax.Array] = None) -> Tuple[jax.Array, ...]:
    """All num_hidden_layers + 1 hidden states (transformers' `output_hidden_states=True`),
    each [B, L, hidden_size]; needs every layer."""
    self._require(self.cfg.num_hidden_layers, -1)
    return self._run(input_ids, attention_mask, self.cfg.num_hidden_layers, collect=True)

  def _require(self, stop: int, index: int) -> None:
    if stop > self.num_layers or (stop == self.cfg.num_hidden_layers and self.norm is None):
      raise ValueError(f"hidden state {index} needs {stop} layers"
                       f"{' and the final norm' if stop == self.cfg.num_hidden_layers else ''}"
                       f", but this encoder holds only the first {self.num_layers} of "
                       f"{self.cfg.num_hidden_layers} layers")

  @classmethod
  def from_pretrained(cls, path: Union[str, os.PathLike], *, dtype: Any = jnp.float32,
                      up_to_hidden_state: Optional[int] = None, progress: bool = False,
                      device: Optional[jax.Device] = None) -> "LlamaEncoder":
    """Loads a local transformers `LlamaModel` / `LlamaForCausalLM` /
    `LlavaForConditionalGeneration` save (a diffusers HunyuanVideo `text_encoder/` folder, or
    a pipeline folder holding one) or a folder written by `svg-ear-convert llama` (no torch
    needed); see `models.hunyuan.text_convert.load_llama`."""
    from models.hunyuan.text_convert import load_llama

    return load_llama(path, dtype=dtype, up_to_hidden_state=up_to_hidden_state,
                      progress=progress, device=device)
