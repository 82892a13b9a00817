"""Pure float32 oracles for small S: the token-level picture of SVG-EAR attention.

Selected blocks are exact keys, every skipped key cluster is one pseudo-token (logit
q . kbar_j * scale + log n_j, plus the second-moment correction with "variance"
compensation; value vbar_j), and everything goes through one softmax over
[S keys ; Kk pseudo-tokens]. Materialises [G, S, S + Kk]: only for tests and small inputs.
"""

from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax

from svg_ear_jax import compensation as comp

_HI = lax.Precision.HIGHEST


def dense_attention_reference(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """Softmax attention in float32, [B, S, H, D] layout, scale 1/sqrt(D)."""
  q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=_HI) / jnp.sqrt(q.shape[-1])
  return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v, precision=_HI)


def sparse_attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, q_labels: jax.Array,
                               k_labels: jax.Array, block_map: jax.Array,
                               k_centroids: jax.Array, v_centroids: jax.Array,
                               k_sizes: jax.Array, *, scale: float, compensation,
                               k_spread: Optional[comp.KeySpread] = None) -> jax.Array:
  """Same contract as `sparse_attention.sparse_attention_xla`, computed in float32 at once.

  Returns [G, S, D] float32.
  """
  mode = comp.mode(compensation, k_spread)
  q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
  kk = block_map.shape[-1]
  padded = jnp.pad(block_map, ((0, 0), (0, 0), (0, 1)))  # key label Kk = masked key
  padded_row = jnp.take_along_axis(padded, q_labels[..., None], axis=1)  # [G, S, Kk + 1]
  row_map = padded_row[..., :kk]
  token_mask = jnp.take_along_axis(
      padded_row, jnp.broadcast_to(k_labels[:, None, :], q_labels.shape + k_labels.shape[-1:]),
      axis=2)  # [G, S, S]
  logits = jnp.where(token_mask, jnp.einsum("gqd,gkd->gqk", q, k, precision=_HI) * scale,
                     -jnp.inf)
  values = v
  if mode != "none":
    n = k_sizes.astype(jnp.float32)
    pseudo = jnp.einsum("gqd,gkd->gqk", q, k_centroids.astype(jnp.float32),
                        precision=_HI) * scale + jnp.log(jnp.maximum(n, 1.0))[:, None, :]
    if mode == "variance":
      pseudo = pseudo + comp.logit_correction(q, k_spread, scale)
    pseudo = jnp.where(~row_map & (n > 0)[:, None, :], pseudo, -jnp.inf)
    logits = jnp.concatenate([logits, pseudo], axis=-1)
    values = jnp.concatenate([v, v_centroids.astype(jnp.float32)], axis=1)
  attends = jnp.any(jnp.isfinite(logits), axis=-1, keepdims=True)
  probs = jax.nn.softmax(jnp.where(attends, logits, 0.0), axis=-1)
  probs = jnp.where(attends & jnp.isfinite(logits), probs, 0.0)
  return jnp.einsum("gqk,gkd->gqd", probs, values, precision=_HI)
