"""Attention cores of HunyuanVideo: masked joint [video | text] attention, dense or SVG-EAR,
and the refiner's pairwise-masked text self-attention.

Key validity follows diffusers and the original (`cu_seqlens`): the valid keys of sample b
are its first `kv_len[b] = L_video + sum(encoder_attention_mask[b])` tokens, i.e. the text
mask is read as a count, with the prompt first and padding last.
"""

from typing import Optional, Tuple

import jax
import jax.numpy as jnp

from models.attention import svg_ear_self_attention
from svg_ear_jax import SvgEarConfig, SvgEarState
from svg_ear_jax.dense import cudnn_supported


def joint_key_lengths(num_video: int, text_mask: jax.Array) -> jax.Array:
  """[B] int32 number of valid keys: `num_video` + valid text tokens ([B, L_text] mask)."""
  return num_video + jnp.sum(text_mask.astype(jnp.int32), axis=1)


def joint_key_mask(kv_len: jax.Array, seq_len: int) -> jax.Array:
  """[B, S] bool: token s is a valid key iff s < kv_len[b]."""
  return jnp.arange(seq_len)[None, :] < kv_len[:, None]


def masked_dense_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                           kv_len: jax.Array) -> jax.Array:
  """Exact attention over the first `kv_len[b]` keys, scale 1/sqrt(D).

  Args:
    q, k, v: [B, S, H, D].
    kv_len: [B] int32 valid keys per sample (>= 1).

  Returns:
    [B, S, H, D] in q.dtype. cuDNN (padding mask) on GPU for bf16/f16, XLA otherwise
    (which materialises [B, H, S, S] logits: keep S moderate off cuDNN).
  """
  kv_len = kv_len.astype(jnp.int32)
  if cudnn_supported(q):
    return jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=kv_len,
                                        implementation="cudnn")
  # float32 means float32 on GPU too (not TF32), as in the PyTorch reference.
  precision = "highest" if q.dtype == jnp.float32 else "default"
  with jax.default_matmul_precision(precision):
    return jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=kv_len,
                                        implementation="xla")


def refiner_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
  """Text self-attention of the token refiner (<= 256 tokens, always dense).

  Args:
    q, k, v: [B, L, H, D].
    mask: [B, L, L] bool, True = query i may attend to key j.

  Returns:
    [B, L, H, D] in q.dtype.
  """
  precision = "highest" if q.dtype == jnp.float32 else "default"
  with jax.default_matmul_precision(precision):
    return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], implementation="xla")


def svg_ear_joint_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, cfg: SvgEarConfig,
    state: Optional[SvgEarState], *, num_text: int, key_mask: jax.Array
) -> Tuple[jax.Array, Optional[SvgEarState], jax.Array]:
  """One joint attention layer with SVG-EAR on the video tokens.

  The trailing `num_text` tokens are dense (their queries see every valid key, every query
  sees the valid text keys); padded keys are never attended and never compensated.

  Args:
    q, k, v: [B, S, H, D], S = L_video + num_text, video first.
    cfg: static SVG-EAR config.
    state: this layer's centroids from the previous call ([B, H, K, D]), or None.
    num_text: static number of text tokens.
    key_mask: [B, S] bool, False = padding key.

  Returns:
    (out [B, S, H, D], new state (float32; None only for routing="dense" without a
    state), density [B, H] float32).
  """
  return svg_ear_self_attention(q, k, v, cfg, state, num_dense_tokens=num_text,
                                key_mask=key_mask)
