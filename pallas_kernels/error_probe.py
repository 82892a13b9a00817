"""EAR probe: log of the centroid-compensation error of every (query centroid, key cluster)
block, streamed over the cluster-permuted keys (ALGORITHM.md 2(e)).

  E_ij = sum_{t in C_j} || e^{a_t} v_t - e^{c_ij} vbar_j ||^2,  a_t = qbar_i . k_t * scale,
       = sum_t e^{2 a_t} ||v_t||^2 - 2 e^{c_ij} sum_t e^{a_t} <vbar_j, v_t> + n_j e^{2 c_ij} ||vbar_j||^2

One program owns a block of query centroids and walks every key cluster's token range,
with a running max per (centroid, cluster) that starts at c_ij (as the reference kernel),
and writes log E_ij = log(E') + 2 max, so nothing overflows (the reference multiplies by
e^{2 max} in float32). Per-token ||v_t||^2 and <vbar_j, v_t> are precomputed: in XLA
(`value_stats`), or handed in by the walk that computed the value means
(`cluster_moments.cluster_means(value_stats=True)`), which saves a pass over v.
Keys and values may be [G, S, D] or tokens-first [B, S, H, D] (head g = b * H + h read in
place through strides), optionally only their first `num_rows` rows (HunyuanVideo's video
tokens), so no transposed or sliced copy is made.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import common

_HI = lax.Precision.HIGHEST


def value_stats(v, k_sizes, v_centroids, kv_index=None, num_rows=None):
  """||v_t||^2 and <vbar_j, v_t> per permuted key position: [G, N] float32 each.

  v is [G, S, D] or tokens-first [B, S, H, D] (first num_rows rows; N = num_rows or S),
  kv_index [G, N] the sorted order (sorted position p is token kv_index[g, p]; None: v is
  sorted), key cluster j the positions [off_j, off_j + k_sizes_j). The per-token values
  are computed in v's own layout (one fused pass over v, no transposed copy of it) and only
  the [G, N] results are rearranged.
  """
  g, h, n, _ = common.head_rows(v, "v", num_rows)
  rows = jnp.arange(n)
  labels = common.searchsorted_rows(jnp.cumsum(k_sizes, -1), rows)
  if kv_index is not None:  # labels of the tokens in their own (unpermuted) order
    labels = jax.vmap(lambda p, lab: jnp.zeros_like(lab).at[p].set(lab))(kv_index, labels)
  vc = v_centroids.astype(jnp.float32)
  if h is None:
    vf = v[:, :n].astype(jnp.float32)
    vc_t = jnp.take_along_axis(vc, labels[..., None], axis=1, mode="clip")
    vsq, cross = jnp.sum(vf * vf, -1), jnp.sum(vf * vc_t, -1)
  else:  # [B, N, H] per-token values, head g = b * H + h
    b = v.shape[0]
    vf = v[:, :n].astype(jnp.float32)
    lab = labels.reshape(b, h, n).transpose(0, 2, 1)  # [B, N, H]
    head = jnp.arange(b * h).reshape(b, 1, h)
    vc_t = vc[head, jnp.minimum(lab, vc.shape[1] - 1)]  # [B, N, H, D]
    to_heads = lambda a: a.transpose(0, 2, 1).reshape(g, n)
    vsq, cross = to_heads(jnp.sum(vf * vf, -1)), to_heads(jnp.sum(vf * vc_t, -1))
  if kv_index is not None:  # [G, N] gathers instead of permuted copies of v
    vsq = jnp.take_along_axis(vsq, kv_index, axis=1)
    cross = jnp.take_along_axis(cross, kv_index, axis=1)
  return vsq, cross


def _kernel(off_ref, size_ref, c_ref, vcsq_ref, qc_ref, k_ref, vsq_ref, cross_ref, *refs,
            block_qc, block_k, num_q, num_k_clusters, clusters_per_program, scale, head_dim,
            precision):
  *idx_ref, o_ref = refs
  i0 = pl.program_id(0) * block_qc
  dp = qc_ref.shape[-1]  # head_dim padded to a power of two (k's extra columns masked off)
  cols = jnp.arange(dp)
  col_ok = cols < head_dim
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
      k_mask = ok[:, None] if dp == head_dim else ok[:, None] & col_ok[None, :]
      k = plgpu.load(k_ref.at[k_rows[:, None], cols[None, :]], mask=k_mask, other=0.)
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


def _check(q_centroids, k, v, k_centroids, v_centroids, k_sizes, kv_index, num_rows):
  """(G, N, D, Kq, Kk) after checking the shapes (k, v: [G, S, D] or [B, S, H, D])."""
  g, _, n, d = common.head_rows(k, "k", num_rows)
  if v.shape != k.shape or not jnp.issubdtype(v.dtype, jnp.floating):
    raise ValueError(f"v must be shaped like k {k.shape} and float, got {v.shape} {v.dtype}")
  if q_centroids.ndim != 3 or q_centroids.shape[0] != g or q_centroids.shape[2] != d:
    raise ValueError(f"q_centroids must be [G, Kq, D] with G = {g}, D = {d}, got "
                     f"{q_centroids.shape}")
  if k_sizes.ndim != 2 or k_sizes.shape[0] != g:
    raise ValueError(f"k_sizes must be [G, Kk] with G = {g}, got {k_sizes.shape}")
  kk = k_sizes.shape[1]
  for name, c in (("k_centroids", k_centroids), ("v_centroids", v_centroids)):
    if c.shape != (g, kk, d):
      raise ValueError(f"{name} must be [G, Kk, D] = {(g, kk, d)}, got {c.shape}")
  if kv_index is not None and kv_index.shape != (g, n):
    raise ValueError(f"kv_index must be [G, N] = {(g, n)}, got {kv_index.shape}")
  return g, n, d, q_centroids.shape[1], kk


@functools.partial(jax.jit, static_argnames=("sm_scale", "num_rows", "block_qc", "block_k",
                                             "cluster_splits", "num_warps", "num_stages",
                                             "interpret"))
def ear_error_probe(q_centroids, k, v, k_centroids, v_centroids, k_sizes, *, sm_scale: float,
                    block_qc: int = 64, block_k: int = 32, cluster_splits: int = 32,
                    num_warps: int = 4, num_stages: int = 2, kv_index=None,
                    pseudo_logits=None, num_rows=None, value_terms=None,
                    interpret: bool = False):
  """log E_ij for every (query centroid, key cluster) pair.

  Args:
    q_centroids: [G, Kq, D] query centroids (any float dtype; the dot runs in k's dtype,
      at full float32 precision when k is float32).
    k, v: [G, S, D] keys / values sorted by key cluster (cluster j = rows
      [off_j, off_j + k_sizes_j), off = exclusive cumsum of k_sizes), or in token order
      when `kv_index` is given; or either of these tokens-first, [B, S, H, D] (G = B * H,
      head g = b * H + h is k[b, :, h, :], read in place).
    k_centroids, v_centroids: [G, Kk, D] key centroid (for c_ij) and mean value per cluster.
    k_sizes: [G, Kk] int32.
    sm_scale: softmax scale.
    block_qc, block_k: centroid rows per program / keys per tile (powers of two >= 16).
    cluster_splits: programs that share the key clusters of one block of centroids (each
      walks a contiguous range of clusters). One program per centroid block walking all
      keys leaves too few programs in flight to hide the gathers' latency (Kq / block_qc x
      G = 200 at Wan 720p, on 132 SMs): H100, Wan 720p, 1 / 8 / 32 splits: 5.56 / 3.11 /
      2.89 ms.
    kv_index: optional [G, N] int32 permutation: sorted position p is token kv_index[g, p]
      of k and v (read through it, so no permuted copies are made).
    pseudo_logits: optional [G, Kq, Kk] float32 logit of the pseudo-token that replaces
      block (i, j) (default c_ij = qbar_i . kbar_j * sm_scale, the paper's); e.g. c_ij plus
      a second-moment correction, so that E_ij is the error of the compensation in use.
    num_rows: static; only the first N = num_rows rows of every head of k and v are keys
      (default all S), e.g. HunyuanVideo's video tokens ahead of its text ones.
    value_terms: optional (||v_p||^2, <vbar_j, v_p>) [G, N] float32 per sorted position,
      as `value_stats` computes them (default: computed here, one pass over v).
    interpret: Pallas interpret mode (CPU).

  Returns:
    [G, Kq, Kk] float32 natural-log errors, -inf where E_ij <= 0 (e.g. empty clusters).
  """
  g, n, d, kq, kk = _check(q_centroids, k, v, k_centroids, v_centroids, k_sizes, kv_index,
                           num_rows)
  for name, b in (("block_qc", block_qc), ("block_k", block_k)):
    common.check_block(name, b)
  if isinstance(cluster_splits, bool) or not isinstance(cluster_splits, int) or cluster_splits < 1:
    raise ValueError(f"cluster_splits must be an int >= 1, got {cluster_splits!r}")
  per_program = common.cdiv(kk, cluster_splits)
  k_sizes = k_sizes.astype(jnp.int32)
  if kv_index is not None:
    kv_index = kv_index.astype(jnp.int32)
  if value_terms is None:
    vsq, cross = value_stats(v, k_sizes, v_centroids, kv_index, n)
  else:
    vsq, cross = value_terms
    if vsq.shape != (g, n) or cross.shape != (g, n):
      raise ValueError(f"value_terms must be two [G, N] = {(g, n)} arrays, got "
                       f"{vsq.shape} and {cross.shape}")
    vsq, cross = vsq.astype(jnp.float32), cross.astype(jnp.float32)
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
  if dp != d:  # the centroids are small: pad them; k's extra columns are masked in the kernel
    qc = jnp.pad(qc, ((0, 0), (0, 0), (0, dp - d)))
  offsets = (jnp.cumsum(k_sizes, -1) - k_sizes).astype(jnp.int32)
  precision = _HI if k.dtype == jnp.float32 else None
  kernel = functools.partial(_kernel, block_qc=block_qc, block_k=block_k, num_q=kq,
                             num_k_clusters=kk, clusters_per_program=per_program,
                             scale=sm_scale, head_dim=d, precision=precision)
  inputs = [offsets, k_sizes, logits.reshape(g, -1), vc_sq, qc, k, vsq, cross]
  if kv_index is not None:
    inputs.append(kv_index)
  specs = [common.head_spec(x.shape) for x in inputs]
  specs[5] = common.head_rows_spec(k, n)  # k: read in place (tokens-first: strided)
  # centroid blocks vary fastest, then cluster ranges: the programs in flight share a head's
  # keys in L2
  out = pl.pallas_call(
      kernel, grid=(common.cdiv(kq, block_qc), common.cdiv(kk, per_program), g),
      in_specs=specs, out_specs=common.head_spec((g, kk * kq)),
      out_shape=jax.ShapeDtypeStruct((g, kk * kq), jnp.float32), interpret=interpret,
      name="svg_ear_error_probe",
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
  )(*inputs)
  return out.reshape(g, kk, kq).transpose(0, 2, 1)


def ear_error_probe_reference(q_centroids, k, v, k_centroids, v_centroids, k_sizes, *,
                              sm_scale: float, pseudo_logits=None, kv_index=None,
                              num_rows=None):
  """Direct float32 jnp evaluation of the same log E_ij (materialises [G, Kq, N, D]); k, v,
  kv_index, num_rows as in `ear_error_probe`."""
  g, n, d, kq, kk = _check(q_centroids, k, v, k_centroids, v_centroids, k_sizes, kv_index,
                           num_rows)
  k, v = common.heads_first(k, n), common.heads_first(v, n)
  if kv_index is not None:  # sorted copies
    idx = kv_index.astype(jnp.int32)[..., None]
    k, v = jnp.take_along_axis(k, idx, axis=1), jnp.take_along_axis(v, idx, axis=1)
  labels = common.searchsorted_rows(jnp.cumsum(k_sizes, -1), jnp.arange(n))
  f32 = lambda x: x.astype(jnp.float32)
  a = jnp.einsum("gqd,gsd->gqs", f32(q_centroids), f32(k), precision=_HI) * sm_scale
  c = jnp.einsum("gqd,gkd->gqk", f32(q_centroids), f32(k_centroids), precision=_HI) * sm_scale
  if pseudo_logits is not None:
    c = f32(pseudo_logits)
  c_t = jnp.take_along_axis(c, jnp.broadcast_to(labels[:, None, :], a.shape), axis=2,
                            mode="clip")
  vc_t = jnp.take_along_axis(f32(v_centroids), labels[..., None], axis=1, mode="clip")
  diff = (jnp.exp(a)[..., None] * f32(v)[:, None] - jnp.exp(c_t)[..., None] * vc_t[:, None])
  per_token = jnp.sum(diff * diff, -1)  # [G, Kq, N]
  err = jax.vmap(lambda pt, lab: jax.ops.segment_sum(pt.T, lab, num_segments=kk).T)(
      per_token, labels)
  return jnp.where(err > 0, jnp.log(jnp.where(err > 0, err, 1.0)), -jnp.inf)
