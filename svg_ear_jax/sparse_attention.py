"""Exact selected blocks + centroid compensation in one softmax, in XLA (ALGORITHM.md 2(d)).

Runs on any backend. It works in token order with a key mask built from the block map and
the cluster labels, chunked over queries so that at most `chunk_mb` of logits exist at a
time: memory-bounded, but its FLOPs are those of dense attention. The Pallas kernel is the
fast path on GPU; this is the portable one and the large-S check of the kernel.
"""

from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax

from svg_ear_jax import chunking
from svg_ear_jax import compensation as comp


def _precision(dtype):
  return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def sparse_attention_xla(q: jax.Array, k: jax.Array, v: jax.Array, q_labels: jax.Array,
                         k_labels: jax.Array, block_map: jax.Array, k_centroids: jax.Array,
                         v_centroids: jax.Array, k_sizes: jax.Array, *, scale: float,
                         compensation, k_spread: Optional[comp.KeySpread] = None,
                         chunk_mb: int = 512) -> jax.Array:
  """Block-sparse attention with centroid pseudo-tokens for the skipped key clusters.

  Args:
    q, k, v: [G, S, D] in token order.
    q_labels, k_labels: [G, S] int32 query / key cluster of every token; a key labelled
      Kk belongs to no cluster (masked) and is never attended.
    block_map: [G, Kq, Kk] bool, True = key cluster computed exactly for the query cluster.
    k_centroids, v_centroids: [G, Kk, D] float32 key centroid and mean value per cluster.
    k_sizes: [G, Kk] int32 keys per cluster.
    scale: softmax scale.
    compensation: "mean" (or True): one pseudo-token (logit q.kbar*scale + log n, value
      vbar) for every skipped non-empty key cluster; "variance": the same with the
      second-moment logit correction (needs `k_spread`); "none" (or False): no pseudo-tokens.
    k_spread: the key clusters' spread, for "variance".
    chunk_mb: bound on the f32 temporaries of one query chunk, all heads together.

  Returns:
    [G, S, D] in q.dtype; a row that attends to nothing is 0.
  """
  mode = comp.mode(compensation, k_spread)
  g, s, d = q.shape
  kk = k_sizes.shape[-1]
  precision = _precision(q.dtype)
  log_n = jnp.log(jnp.maximum(k_sizes, 1).astype(jnp.float32))
  kc = k_centroids.astype(q.dtype)
  vc = v_centroids.astype(v.dtype)

  padded_map = jnp.pad(block_map, ((0, 0), (0, 0), (0, 1)))  # column Kk: masked keys

  def one_chunk(qc, qlab):
    padded_row = jnp.take_along_axis(padded_map, qlab[..., None], axis=1)  # [G, c, Kk + 1]
    row_map = padded_row[..., :kk]
    key_on = jnp.take_along_axis(padded_row, jnp.broadcast_to(k_labels[:, None, :],
                                                              qlab.shape + (s,)), axis=2)
    logits = jnp.einsum("gqd,gkd->gqk", qc, k, precision=precision,
                        preferred_element_type=jnp.float32) * scale
    logits = jnp.where(key_on, logits, -jnp.inf)
    m = jnp.max(logits, axis=-1)
    if mode != "none":
      pseudo = jnp.einsum("gqd,gkd->gqk", qc, kc, precision=precision,
                          preferred_element_type=jnp.float32) * scale + log_n[:, None, :]
      if mode == "variance":
        pseudo = pseudo + comp.logit_correction(qc, k_spread, scale)
      pseudo = jnp.where(~row_map & (k_sizes > 0)[:, None, :], pseudo, -jnp.inf)
      m = jnp.maximum(m, jnp.max(pseudo, axis=-1))
    m = jnp.where(jnp.isfinite(m), m, 0.0)[..., None]
    p = jnp.exp(logits - m)
    denom = jnp.sum(p, axis=-1)
    num = jnp.einsum("gqk,gkd->gqd", p.astype(v.dtype), v, precision=precision,
                     preferred_element_type=jnp.float32)
    if mode != "none":
      pc = jnp.exp(pseudo - m)
      denom = denom + jnp.sum(pc, axis=-1)
      num = num + jnp.einsum("gqk,gkd->gqd", pc.astype(v.dtype), vc, precision=precision,
                             preferred_element_type=jnp.float32)
    out = num / jnp.where(denom == 0, 1.0, denom)[..., None]
    return out.astype(q.dtype)

  rows = chunking.rows_per_chunk(s, 4 * 4 * g * (s + (2 if mode == "variance" else 1) * kk),
                                 chunk_mb)
  return chunking.map_row_chunks(one_chunk, (q, q_labels), rows)
