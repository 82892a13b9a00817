"""EAR probe in XLA: the centroid-compensation error of every (query cluster, key cluster)
block, evaluated at the query centroid (ALGORITHM.md 2(e)).

E_ij = sum_{t in C_j} || e^{a_t} v_t - e^{c_ij} vbar_j ||^2,  a_t = qbar_i . k_t * scale,
c_ij = qbar_i . kbar_j * scale, expanded into per-token scalars so that only [Kq, S] logits
are needed. Each block is shifted by its own max (as the reference kernel does), and the
result is returned as log E in absolute units, which cannot overflow (the reference
multiplies back by e^{2 max} in float32).
"""

import jax
import jax.numpy as jnp
from jax import lax

from svg_ear_jax import chunking


def value_stats(v: jax.Array, k_labels: jax.Array, v_centroids: jax.Array):
  """Per-token ||v_t||^2 and <vbar_{label t}, v_t> ([G, S] f32 each), per-cluster ||vbar||^2."""
  vf = v.astype(jnp.float32)
  # labels == Kk (keys outside every cluster) read a clipped row; segment sums drop them
  vc_t = jnp.take_along_axis(v_centroids, k_labels[..., None], axis=1, mode="clip")
  return (jnp.sum(vf * vf, -1), jnp.sum(vf * vc_t, -1),
          jnp.sum(v_centroids * v_centroids, -1))


def error_probe_xla(q_centroids: jax.Array, k: jax.Array, v: jax.Array, k_labels: jax.Array,
                    k_sizes: jax.Array, v_centroids: jax.Array, logits: jax.Array, *,
                    scale: float, chunk_mb: int = 512) -> jax.Array:
  """log E_ij for all blocks, chunked over heads so that [Kq, S] temporaries stay bounded.

  Args:
    q_centroids: [G, Kq, D] float32.
    k, v: [G, S, D] keys and values in token order.
    k_labels: [G, S] int32 key cluster of every token (Kk = in no cluster: ignored).
    k_sizes: [G, Kk] int32.
    v_centroids: [G, Kk, D] float32 mean value of each key cluster.
    logits: [G, Kq, Kk] float32 centroid logits c_ij.
    scale: softmax scale (1/sqrt(D)).
    chunk_mb: bound on the temporaries of one chunk of heads.

  Returns:
    [G, Kq, Kk] float32 log E_ij (-inf where E_ij <= 0, e.g. empty clusters).
  """
  g, s, _ = k.shape
  kq, kk = logits.shape[1:]
  vsq, cross, vc_sq = value_stats(v, k_labels, v_centroids)
  precision = lax.Precision.HIGHEST if k.dtype == jnp.float32 else None

  def one_head(args):
    qc, kh, lab, n, vsq_h, cross_h, vc_sq_h, c = args
    a = jnp.einsum("qd,sd->qs", qc.astype(kh.dtype), kh, precision=precision,
                   preferred_element_type=jnp.float32) * scale
    block_max = jax.ops.segment_max(a.T, lab, num_segments=kk).T  # [Kq, Kk], -inf if empty
    shift = jnp.maximum(block_max, c)
    e = jnp.exp(a - shift[:, lab])
    sq = jax.ops.segment_sum((e * e * vsq_h).T, lab, num_segments=kk).T
    cr = jax.ops.segment_sum((e * cross_h).T, lab, num_segments=kk).T
    pc = jnp.exp(c - shift)
    err = sq - 2.0 * pc * cr + pc * pc * (vc_sq_h * n.astype(jnp.float32))
    return jnp.where(err > 0, jnp.log(jnp.where(err > 0, err, 1.0)) + 2.0 * shift, -jnp.inf)

  per_head = 4 * 6 * kq * s
  heads = chunking.rows_per_chunk(g, per_head, chunk_mb)
  return lax.map(one_head, (q_centroids, k, k_labels, k_sizes, vsq, cross, vc_sq, logits),
                 batch_size=heads)
