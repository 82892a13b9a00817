"""EAR probe: log of the centroid-compensation error of every (query centroid, key cluster)
block, streamed over the cluster-permuted keys (ALGORITHM.md 2(e)).

  E_ij = sum_{t in C_j} || e^{a_t} v_t - e^{c_ij} vbar_j ||^2,  a_t = qbar_i . k_t * scale,
       = sum_t e^{2 a_t} ||v_t||^2 - 2 e^{c_ij} sum_t e^{a_t} <vbar_j, v_t> + n_j e^{2 c_ij} ||vbar_j||^2

One program owns a block of query centroids and walks every key cluster's token range,
with a running max per (centroid, cluster) that starts at c_ij (as the reference kernel),
and writes log E_ij = log(E') + 2 max, so nothing overflows (the reference multiplies by
e^{2 max} in float32). Per-token ||v_t||^2 and <vbar_j, v_t> are precomputed in XLA.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import common

_HI = lax.Precision.HIGHEST


def _value_stats(v, k_sizes, v_centroids, kv_index):
  """||v_t||^2 and <vbar_j, v_t> per permuted key position: [G, S] float32 each."""
  s = v.shape[1]
  rows = jnp.arange(s)
  labels = common.searchsorted_rows(jnp.cumsum(k_sizes, -1), rows)
  if kv_index is not None:  # labels of the tokens in their own (unpermuted) order
    labels = jax.vmap(lambda p, lab: jnp.zeros_like(lab).at[p].set(lab))(kv_index, labels)
  vf = v.astype(jnp.float32)
  vc_t = jnp.take_along_axis(v_centroids.astype(jnp.float32), labels[..., None], axis=1,
                             mode="clip")
  vsq, cross = jnp.sum(vf * vf, -1), jnp.sum(vf * vc_t, -1)
  if kv_index is not None:  # [G, S] gathers instead of permuted copies of v
    vsq = jnp.take_along_axis(vsq, kv_index, axis=1)
    cross = jnp.take_along_axis(cross, kv_index, axis=1)
  return vsq, cross


def _kernel(off_ref, size_ref, c_ref, vcsq_ref, qc_ref, k_ref, vsq_ref, cross_ref, *refs,
            block_qc, block_k, num_q, num_k_clusters, clusters_per_program, scale, precision):
  *idx_ref, o_ref = refs
  i0 = pl.program_id(0) * block_qc
  d = qc_ref.shape[-1]
  cols = jnp.arange(d)
  rows_q = i0 + jnp.arange(block_qc)
  q_ok = rows_q < num_q
  qc = plgpu.load(qc_ref.at[rows_q[:, None], cols[None, :]], mask=q_ok[:, None], other=0.)
  qc = qc.astype(k_ref.dtype)
  t0 = jnp.arange(block_k)

  def cluster(j, carry):
    start = off_ref[j]
    n = size_ref[j]
    c = plgpu.load(c_ref.at[j * num_q + rows_q], mask=q_ok, other=0.)

    def tile(t, carry):
      m, sq, cr = carry
      rows = start + t * block_k + t0
      ok = rows < start + n
      k_rows = plgpu.load(idx_ref[0].at[rows], mask=ok, other=0) if idx_ref else rows
      k = plgpu.load(k_ref.at[k_rows[:, None], cols[None, :]], mask=ok[:, None], other=0.)
      vsq = plgpu.load(vsq_ref.at[rows], mask=ok, other=0.)
      cross = plgpu.load(cross_ref.at[rows], mask=ok, other=0.)
      a = plgpu.dot(qc, k, trans_b=True, precision=precision) * scale
      a = jnp.where(ok[None, :], a, -jnp.inf)
      m_new = jnp.maximum(m, a.max(axis=-1))
      e = jnp.exp(a - m_new[:, None])
      r = jnp.exp(m - m_new)
      sq = sq * r * r + jnp.sum(e * e * vsq[None, :], axis=-1)
      cr = cr * r + jnp.sum(e * cross[None, :], axis=-1)
      return m_new, sq, cr

    zero = jnp.zeros((block_qc,), jnp.float32)
    m, sq, cr = lax.fori_loop(jnp.int32(0), lax.div(n + block_k - 1, block_k), tile,
                              (c, zero, zero))
    pc = jnp.exp(c - m)
    err = sq - 2.0 * pc * cr + pc * pc * vcsq_ref[j] * n.astype(jnp.float32)
    log_err = jnp.where(err > 0, jnp.log(jnp.where(err > 0, err, 1.0)) + 2.0 * m, -jnp.inf)
    plgpu.store(o_ref.at[j * num_q + rows_q], log_err, mask=q_ok)
    return carry

  j0 = pl.program_id(1) * clusters_per_program
  j1 = jnp.minimum(j0 + clusters_per_program, num_k_clusters)
  lax.fori_loop(j0, j1, cluster, jnp.int32(0))



@functools.partial(jax.jit, static_argnames=("sm_scale", "block_qc", "block_k", "cluster_splits",
                                             "num_warps", "num_stages", "interpret"))
def ear_error_probe(q_centroids, k, v, k_centroids, v_centroids, k_sizes, *, sm_scale: float,
                    block_qc: int = 64, block_k: int = 32, cluster_splits: int = 32,
                    num_warps: int = 4, num_stages: int = 2, kv_index=None,
                    pseudo_logits=None, interpret: bool = False):
  """log E_ij for every (query centroid, key cluster) pair.

  Args:
    q_centroids: [G, Kq, D] query centroids (any float dtype; the dot runs in k's dtype,
      at full float32 precision when k is float32).
    k, v: [G, S, D] keys / values sorted by key cluster (cluster j = rows
      [off_j, off_j + k_sizes_j), off = exclusive cumsum of k_sizes), or in token order
      when `kv_index` is given.
    k_centroids, v_centroids: [G, Kk, D] key centroid (for c_ij) and mean value per cluster.
    k_sizes: [G, Kk] int32.
    sm_scale: softmax scale.
    block_qc, block_k: centroid rows per program / keys per tile (powers of two >= 16).
    cluster_splits: programs that share the key clusters of one block of centroids (each
      walks a contiguous range of clusters). One program per centroid block walking all
      keys leaves too few programs in flight to hide the gathers' latency (Kq / block_qc x
      G = 200 at Wan 720p, on 132 SMs): H100, Wan 720p, 1 / 8 / 32 splits: 5.56 / 3.11 /
      2.89 ms.
    kv_index: optional [G, S] int32 permutation: sorted position p is token kv_index[g, p]
      of k and v (read through it, so no permuted copies are made).
    pseudo_logits: optional [G, Kq, Kk] float32 logit of the pseudo-token that replaces
      block (i, j) (default c_ij = qbar_i . kbar_j * sm_scale, the paper's); e.g. c_ij plus
      a second-moment correction, so that E_ij is the error of the compensation in use.
    interpret: Pallas interpret mode (CPU).

  Returns:
    [G, Kq, Kk] float32 natural-log errors, -inf where E_ij <= 0 (e.g. empty clusters).
  """
  g, kq, d = q_centroids.shape
  kk = k_sizes.shape[-1]
  for name, b in (("block_qc", block_qc), ("block_k", block_k)):
    common.check_block(name, b)
  if isinstance(cluster_splits, bool) or not isinstance(cluster_splits, int) or cluster_splits < 1:
    raise ValueError(f"cluster_splits must be an int >= 1, got {cluster_splits!r}")
  per_program = common.cdiv(kk, cluster_splits)
  k_sizes = k_sizes.astype(jnp.int32)
  if kv_index is not None:
    kv_index = kv_index.astype(jnp.int32)
  vsq, cross = _value_stats(v, k_sizes, v_centroids, kv_index)
  if pseudo_logits is None:
    logits = jnp.einsum("gqd,gkd->gkq", q_centroids.astype(jnp.float32),
                        k_centroids.astype(jnp.float32), precision=_HI) * sm_scale
  else:
    if pseudo_logits.shape != (g, kq, kk):
      raise ValueError(f"pseudo_logits must be [G, Kq, Kk] = {(g, kq, kk)}, got "
                       f"{pseudo_logits.shape}")
    logits = pseudo_logits.astype(jnp.float32).transpose(0, 2, 1)
  vc_sq = jnp.sum(jnp.square(v_centroids.astype(jnp.float32)), -1)
  dp = max(16, common.next_pow2(d))
  qc = q_centroids.astype(jnp.float32)
  if dp != d:
    pad = lambda x: jnp.pad(x, ((0, 0), (0, 0), (0, dp - d)))
    qc, k = pad(qc), pad(k)
  offsets = (jnp.cumsum(k_sizes, -1) - k_sizes).astype(jnp.int32)
  precision = _HI if k.dtype == jnp.float32 else None
  kernel = functools.partial(_kernel, block_qc=block_qc, block_k=block_k, num_q=kq,
                             num_k_clusters=kk, clusters_per_program=per_program,
                             scale=sm_scale, precision=precision)
  inputs = [offsets, k_sizes, logits.reshape(g, -1), vc_sq, qc, k, vsq, cross]
  if kv_index is not None:
    inputs.append(kv_index)
  spec = lambda x: pl.BlockSpec((None,) + x.shape[1:],
                                lambda i, j, h, _n=x.ndim: (h,) + (0,) * (_n - 1))
  # centroid blocks vary fastest, then cluster ranges: the programs in flight share a head's
  # keys in L2
  out = pl.pallas_call(
      kernel, grid=(common.cdiv(kq, block_qc), common.cdiv(kk, per_program), g),
      in_specs=[spec(x) for x in inputs],
      out_specs=pl.BlockSpec((None, kk * kq), lambda i, j, h: (h, 0)),
      out_shape=jax.ShapeDtypeStruct((g, kk * kq), jnp.float32), interpret=interpret,
      name="svg_ear_error_probe",
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
  )(*inputs)
  return out.reshape(g, kk, kq).transpose(0, 2, 1)


def ear_error_probe_reference(q_centroids, k, v, k_centroids, v_centroids, k_sizes, *,
                              sm_scale: float, pseudo_logits=None):
  """Direct float32 jnp evaluation of the same log E_ij (materialises [G, Kq, S, D])."""
  g, s, d = k.shape
  kk = k_sizes.shape[-1]
  labels = common.searchsorted_rows(jnp.cumsum(k_sizes, -1), jnp.arange(s))
  f32 = lambda x: x.astype(jnp.float32)
  a = jnp.einsum("gqd,gsd->gqs", f32(q_centroids), f32(k), precision=_HI) * sm_scale
  c = jnp.einsum("gqd,gkd->gqk", f32(q_centroids), f32(k_centroids), precision=_HI) * sm_scale
  if pseudo_logits is not None:
    c = f32(pseudo_logits)
  c_t = jnp.take_along_axis(c, jnp.broadcast_to(labels[:, None, :], a.shape), axis=2,
                            mode="clip")
  vc_t = jnp.take_along_axis(f32(v_centroids), labels[..., None], axis=1, mode="clip")
  diff = (jnp.exp(a)[..., None] * f32(v)[:, None] - jnp.exp(c_t)[..., None] * vc_t[:, None])
  per_token = jnp.sum(diff * diff, -1)  # [G, Kq, S]
  err = jax.vmap(lambda pt, lab: jax.ops.segment_sum(pt.T, lab, num_segments=kk).T)(
      per_token, labels)
  return jnp.where(err > 0, jnp.log(jnp.where(err > 0, err, 1.0)), -jnp.inf)
