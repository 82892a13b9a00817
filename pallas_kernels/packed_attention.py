"""Variable-size block-sparse attention with centroid compensation, one online softmax.

Layout ("packed key list"): for query cluster i, the selected non-empty key clusters are
listed in cluster order and their keys, contiguous ranges of the cluster-permuted K/V,
form one virtual range [0, row_len_i) of positions. The kernel walks it in tiles of BK
positions, so no MMA work is wasted on cluster padding (only the row's last tile is
partial), then one pseudo-token per skipped non-empty key cluster (logit
q.kbar_j * scale + log n_j, value vbar_j) in the same softmax.

Position p of list entry e maps to key row base_e + p with base_e = k_offset_j - start_e;
a tile starting in entry a finds every position's row as
  row(p) = base_a + p + sum_{w < W} [end_{a+w} <= p] * (base_{a+w+1} - base_{a+w}),
a [BK, W] compare that needs no gather from registers. Tiles that touch at most W_FAST
entries (the common case: ~76 keys per cluster at Wan 720p) take W = W_FAST; the rare
tiles over many tiny clusters take W = BK, which is always enough because every listed
cluster holds at least one key. Both lists are precomputed, so no tile's addresses depend
on a previous tile (the software pipeliner can prefetch).
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import common

_BIG = 2 ** 30
_LOG2E = 1.4426950408889634
W_FAST = 8


def _exclusive_cumsum(x):
  return jnp.cumsum(x, axis=-1) - x


def packed_metadata(block_map, q_sizes, k_sizes, seq_len: int, block_q: int, block_k: int):
  """Int32 tables the kernel reads (all per head g = batch * head).

  Args:
    block_map: [G, Kq, Kk] bool.
    q_sizes, k_sizes: [G, Kq] / [G, Kk] int32 cluster sizes (permuted order offsets are their
      exclusive cumsums).
    seq_len: S.
    block_q, block_k: tile sizes.

  Returns:
    dict of int32 arrays: ends/base/dbase [G, Kq*Kk] (packed list per query cluster),
    row_len [G, Kq], tile_a/tile_order [G, Kq*NT] (NT = cdiv(S, block_k)), n_fast/n_wide
    [G, Kq], and the query-tile table tile_c/tile_q0/tile_qend [G, cdiv(S, block_q) + Kq].
  """
  g, kq, kk = block_map.shape
  q_sizes = q_sizes.astype(jnp.int32)
  k_sizes = k_sizes.astype(jnp.int32)
  listed = block_map & (k_sizes > 0)[:, None, :]
  order = jnp.argsort(~listed, axis=-1, stable=True).astype(jnp.int32)
  count = jnp.sum(listed, axis=-1, dtype=jnp.int32)
  rank = jnp.arange(kk, dtype=jnp.int32)
  in_list = rank < count[..., None]
  sizes = jnp.where(in_list, jnp.take_along_axis(
      jnp.broadcast_to(k_sizes[:, None, :], listed.shape), order, axis=-1), 0)
  ends = jnp.cumsum(sizes, axis=-1, dtype=jnp.int32)
  row_len = ends[..., -1]
  k_off = _exclusive_cumsum(k_sizes)
  base = jnp.take_along_axis(jnp.broadcast_to(k_off[:, None, :], listed.shape), order,
                             axis=-1) - (ends - sizes)
  base = jnp.where(in_list, base, 0)
  dbase = jnp.concatenate([base[..., 1:] - base[..., :-1], jnp.zeros_like(base[..., :1])], -1)
  dbase = jnp.where(rank + 1 < count[..., None], dbase, 0)
  ends = jnp.where(in_list, ends, _BIG)

  nt = -(-seq_len // block_k)
  starts = jnp.arange(nt + 1, dtype=jnp.int32) * block_k
  tile_a = jax.vmap(jax.vmap(lambda e: jnp.searchsorted(e, starts, side="right")))(ends)
  tile_a = tile_a.astype(jnp.int32)  # [G, Kq, NT + 1]: list entry holding each tile's start
  n_tiles = (row_len + block_k - 1) // block_k
  t = jnp.arange(nt, dtype=jnp.int32)
  valid = t < n_tiles[..., None]
  wide = (tile_a[..., 1:] - tile_a[..., :-1]) > W_FAST - 1
  key = jnp.where(valid, wide.astype(jnp.int32), 2)
  tile_order = jnp.argsort(key, axis=-1, stable=True).astype(jnp.int32)
  n_fast = jnp.sum(valid & ~wide, axis=-1, dtype=jnp.int32)
  n_wide = jnp.sum(valid & wide, axis=-1, dtype=jnp.int32)

  q_off = _exclusive_cumsum(q_sizes)
  q_tiles = (q_sizes + block_q - 1) // block_q
  q_tiles_end = jnp.cumsum(q_tiles, axis=-1)
  num_q_tiles = -(-seq_len // block_q) + kq
  tq = jnp.arange(num_q_tiles, dtype=jnp.int32)
  c = jax.vmap(lambda te: jnp.searchsorted(te, tq, side="right"))(q_tiles_end)
  real = c < kq
  c = jnp.minimum(c, kq - 1).astype(jnp.int32)
  first_tile = jnp.take_along_axis(q_tiles_end - q_tiles, c, axis=-1)
  q0 = jnp.take_along_axis(q_off, c, axis=-1) + (tq[None] - first_tile) * block_q
  q_end = jnp.take_along_axis(q_off + q_sizes, c, axis=-1)
  return dict(ends=ends.reshape(g, -1), base=base.reshape(g, -1).astype(jnp.int32),
              dbase=dbase.reshape(g, -1).astype(jnp.int32), row_len=row_len,
              tile_a=tile_a[..., :nt].reshape(g, -1), tile_order=tile_order.reshape(g, -1),
              n_fast=n_fast, n_wide=n_wide, tile_c=c,
              tile_q0=jnp.where(real, q0, 0).astype(jnp.int32),
              tile_qend=jnp.where(real, q_end, 0).astype(jnp.int32))


def padding_waste(block_map, q_sizes, k_sizes, seq_len: int, block_q: int, block_k: int):
  """Useful / visited (query x key) slots of this layout, per head: [G] float32."""
  md = packed_metadata(block_map, q_sizes, k_sizes, seq_len, block_q, block_k)
  area = jnp.sum(jnp.where(block_map, q_sizes[:, :, None].astype(jnp.float32)
                           * k_sizes[:, None, :].astype(jnp.float32), 0.0), axis=(1, 2))
  q_tiles = (q_sizes + block_q - 1) // block_q
  k_tiles = (md["row_len"] + block_k - 1) // block_k
  visited = jnp.sum((q_tiles * k_tiles).astype(jnp.float32), axis=-1) * block_q * block_k
  return area / jnp.maximum(visited, 1.0)


def _kernel(tile_c_ref, tile_q0_ref, tile_qend_ref, ends_ref, base_ref, dbase_ref, row_len_ref,
            tile_a_ref, tile_order_ref, n_fast_ref, n_wide_ref, skip_ref, log_n_ref,
            q_ref, k_ref, v_ref, kc_ref, vc_ref, o_ref, *, block_q, block_k, block_c,
            num_k_clusters, num_k_tiles, scale, compensation):
  t = pl.program_id(0)
  c = tile_c_ref[t]
  q0 = tile_q0_ref[t]
  q_end = tile_qend_ref[t]
  live = q0 < q_end
  d = q_ref.shape[-1]
  cols = jnp.arange(d)
  q_rows = q0 + jnp.arange(block_q)
  q_ok = q_rows < q_end
  q = plgpu.load(q_ref.at[q_rows[:, None], cols[None, :]], mask=q_ok[:, None], other=0.)
  row_len = row_len_ref[c]
  pos0 = jnp.arange(block_k)
  kk = num_k_clusters

  def update(carry, s, vals):
    m, l, acc = carry
    m_new = jnp.maximum(m, s.max(axis=-1))
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    alpha = jnp.exp2(m - m_safe)
    p = jnp.exp2(s - m_safe[:, None])
    return (m_new, alpha * l + p.sum(axis=-1),
            alpha[:, None] * acc + plgpu.dot(p.astype(vals.dtype), vals))

  def tile_body(window):
    def body(i, carry):
      j = tile_order_ref[c * num_k_tiles + i]
      a = tile_a_ref[c * num_k_tiles + j]
      pos = j * block_k + pos0
      ok = pos < row_len
      entry = a + jnp.arange(window)
      in_row = entry < kk
      ends = plgpu.load(ends_ref.at[c * kk + entry], mask=in_row, other=_BIG)
      steps = plgpu.load(dbase_ref.at[c * kk + entry], mask=in_row, other=0)
      rows = base_ref[c * kk + a] + pos + jnp.sum(
          jnp.where(ends[None, :] <= pos[:, None], steps[None, :], 0), axis=1)
      rows = jnp.where(ok, rows, 0)
      k = plgpu.load(k_ref.at[rows[:, None], cols[None, :]], mask=ok[:, None], other=0.)
      v = plgpu.load(v_ref.at[rows[:, None], cols[None, :]], mask=ok[:, None], other=0.)
      s = jnp.where(ok[None, :], plgpu.dot(q, k, trans_b=True) * scale, -jnp.inf)
      return update(carry, s, v)
    return body

  n_fast = jnp.where(live, n_fast_ref[c], 0)
  n_wide = jnp.where(live, n_wide_ref[c], 0)
  carry = (jnp.full((block_q,), -jnp.inf, jnp.float32), jnp.zeros((block_q,), jnp.float32),
           jnp.zeros((block_q, d), jnp.float32))
  carry = lax.fori_loop(0, n_fast, tile_body(min(W_FAST, block_k)), carry)
  carry = lax.fori_loop(n_fast, n_fast + n_wide, tile_body(block_k), carry)

  if compensation:
    idx0 = jnp.arange(block_c)

    def centroid_body(jb, carry):
      idx = jb * block_c + idx0
      ok = idx < kk
      kc = plgpu.load(kc_ref.at[idx[:, None], cols[None, :]], mask=ok[:, None], other=0.)
      vc = plgpu.load(vc_ref.at[idx[:, None], cols[None, :]], mask=ok[:, None], other=0.)
      log_n = plgpu.load(log_n_ref.at[idx], mask=ok, other=-jnp.inf)
      skip = plgpu.load(skip_ref.at[c * kk + idx], mask=ok, other=1)
      s = plgpu.dot(q, kc, trans_b=True) * scale + log_n[None, :]
      s = jnp.where(((skip == 0) & ok)[None, :], s, -jnp.inf)
      return update(carry, s, vc)

    num_c = jnp.where(live, jnp.int32(-(-kk // block_c)), jnp.int32(0))
    carry = lax.fori_loop(jnp.int32(0), num_c, centroid_body, carry)
  _, l, acc = carry
  out = acc / jnp.where(l == 0, 1.0, l)[:, None]
  plgpu.store(o_ref.at[q_rows[:, None], cols[None, :]], out.astype(o_ref.dtype),
              mask=(q_ok & live)[:, None])



@functools.partial(jax.jit, static_argnames=(
    "compensation", "sm_scale", "block_q", "block_k", "block_c", "num_warps", "num_stages",
    "interpret"))
def packed_sparse_attention(q, k, v, q_sizes, k_sizes, block_map, k_centroids, v_centroids, *,
                            compensation: bool, sm_scale: float, block_q: int = 64,
                            block_k: int = 64, block_c: int = 64, num_warps: int = 4,
                            num_stages: int = 3, interpret: bool = False):
  """Cluster-sparse attention + centroid compensation on cluster-permuted inputs.

  Args:
    q: [G, S, D] queries sorted by query cluster (cluster i = rows [off_i, off_i + q_sizes_i),
      off = exclusive cumsum of q_sizes).
    k, v: [G, S, D] keys / values sorted by key cluster likewise with k_sizes.
    q_sizes, k_sizes: [G, Kq] / [G, Kk] int32; they may sum to less than S (rows past the
      sum belong to no cluster and are neither attended nor written).
    block_map: [G, Kq, Kk] bool, True = key cluster j exact for query cluster i.
    k_centroids, v_centroids: [G, Kk, D] (any float dtype) key centroid / mean value.
    compensation: one pseudo-token per skipped non-empty key cluster.
    sm_scale: softmax scale.
    block_q, block_k, block_c: query / key / centroid tile sizes (powers of two >= 16).
    num_warps, num_stages: Triton launch parameters.
    interpret: run in Pallas interpret mode (CPU tests).

  Returns:
    [G, S, D] in q.dtype, permuted query order; rows of no cluster are 0, rows that attend
    to nothing are 0.
  """
  g, s, d = q.shape
  kq, kk = block_map.shape[1:]
  for name, b in (("block_q", block_q), ("block_k", block_k), ("block_c", block_c)):
    common.check_block(name, b)
  dp = max(16, common.next_pow2(d))
  if dp != d:  # zero columns change no dot product; the padded output columns are cut off
    pad = lambda x: jnp.pad(x, ((0, 0), (0, 0), (0, dp - d)))
    q, k, v, k_centroids, v_centroids = map(pad, (q, k, v, k_centroids, v_centroids))
  md = packed_metadata(block_map, q_sizes, k_sizes, s, block_q, block_k)
  nt = -(-s // block_k)
  k_sizes = k_sizes.astype(jnp.int32)
  log_n = jnp.where(k_sizes > 0, jnp.log(jnp.maximum(k_sizes, 1).astype(jnp.float32)),
                    -jnp.inf) * _LOG2E
  skip_not = (block_map | (k_sizes == 0)[:, None, :]).astype(jnp.int32).reshape(g, -1)
  kernel = functools.partial(
      _kernel, block_q=block_q, block_k=block_k, block_c=block_c, num_k_clusters=kk,
      num_k_tiles=nt, scale=sm_scale * _LOG2E, compensation=compensation)
  inputs = [md["tile_c"], md["tile_q0"], md["tile_qend"], md["ends"], md["base"], md["dbase"],
            md["row_len"], md["tile_a"], md["tile_order"], md["n_fast"], md["n_wide"],
            skip_not, log_n, q, k, v, k_centroids.astype(q.dtype), v_centroids.astype(v.dtype)]
  spec = lambda x: pl.BlockSpec((None,) + x.shape[1:],
                                lambda t, h, _n=x.ndim: (h,) + (0,) * (_n - 1))
  out = pl.pallas_call(
      kernel, grid=(md["tile_c"].shape[1], g), in_specs=[spec(x) for x in inputs],
      out_specs=spec(q), out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      input_output_aliases={}, interpret=interpret, name="svg_ear_packed_attention",
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
  )(*inputs)
  # Rows past the last query cluster are never visited: define them as 0.
  covered = jnp.sum(q_sizes, axis=-1, dtype=jnp.int32)[:, None, None]
  out = jnp.where(jnp.arange(s)[None, :, None] < covered, out, jnp.zeros((), out.dtype))
  return out[..., :d] if dp != d else out


def packed_sparse_attention_reference(q, k, v, q_sizes, k_sizes, block_map, k_centroids,
                                      v_centroids, *, compensation: bool, sm_scale: float):
  """Token-level float32 jnp reference of `packed_sparse_attention` (same arguments)."""
  g, s, d = q.shape
  kq, kk = block_map.shape[1:]
  q_lab = jax.vmap(lambda e: jnp.searchsorted(e, jnp.arange(s), side="right"))(
      jnp.cumsum(q_sizes, -1))
  k_lab = jax.vmap(lambda e: jnp.searchsorted(e, jnp.arange(s), side="right"))(
      jnp.cumsum(k_sizes, -1))  # == Kk past the last cluster
  padded = jnp.pad(block_map, ((0, 0), (0, 1), (0, 1)))
  row = jnp.take_along_axis(padded, q_lab[..., None], axis=1)  # [G, S, Kk + 1]
  key_on = jnp.take_along_axis(row, jnp.broadcast_to(k_lab[:, None, :], (g, s, s)), axis=2)
  f32 = lambda x: x.astype(jnp.float32)
  hi = lax.Precision.HIGHEST
  logits = jnp.where(key_on, jnp.einsum("gqd,gkd->gqk", f32(q), f32(k), precision=hi) * sm_scale,
                     -jnp.inf)
  values = f32(v)
  if compensation:
    n = k_sizes.astype(jnp.float32)
    pseudo = jnp.einsum("gqd,gkd->gqk", f32(q), f32(k_centroids), precision=hi) * sm_scale
    pseudo = pseudo + jnp.log(jnp.maximum(n, 1.0))[:, None, :]
    pseudo = jnp.where(~row[..., :kk] & (n > 0)[:, None, :] & (q_lab < kq)[..., None], pseudo,
                       -jnp.inf)
    logits = jnp.concatenate([logits, pseudo], axis=-1)
    values = jnp.concatenate([values, f32(v_centroids)], axis=1)
  attends = jnp.any(jnp.isfinite(logits), axis=-1, keepdims=True)
  probs = jax.nn.softmax(jnp.where(attends, logits, 0.0), axis=-1)
  probs = jnp.where(attends & jnp.isfinite(logits), probs, 0.0)
  return jnp.einsum("gqk,gkd->gqd", probs, values, precision=hi)
