"""Kernel metadata (int32 tables, built in jnp) for variable-size block-sparse attention.

Inputs are cluster sizes and a cluster block map; every table is per head g (G = B * H).
A query "row" is a query cluster; row Kq is an extra row covering the positions past the
last query cluster (sum(q_sizes) < S), which attends to nothing and so writes zeros.

Key side, "packed" layout: the selected non-empty key clusters of row c are listed in cluster
order; their keys (contiguous ranges of the cluster-permuted K/V) form one virtual range
[0, row_len_c) of positions. List entry e covers positions [ends_{e-1}, ends_e) and maps
position p to key row base_e + p (base_e = k_off_j - ends_{e-1}). Tiles of block_k positions
only waste the row's last partial tile. A tile whose first position lies in entry a finds
each position's row as base_a + p + sum_{w < W} [ends_{a+w} <= p] * (base_{a+w+1} - base_{a+w}),
a [block_k, W] compare; tiles touching at most W_FAST entries ("fast", the common case) use
W = W_FAST, the others W = block_k (always enough: listed clusters are non-empty). Tiles are
stored fast-first so the kernel runs two loops of fixed width.

Key side, "flat" layout (PALLAS_GPU.md 1.11): every selected cluster is cut into its own tiles
of block_k keys (start, end); simpler, but each cluster wastes its last partial tile.

Query side: a static-size table of query tiles (row, first position, end of the row), padded
with dead tiles (q0 == q_end == 0). With `tail_block_q`, a row's full block_q tiles (and a
remainder longer than tail_block_q) go to the main table and a short remainder
(<= tail_block_q rows) to a second table run with the smaller tile.
"""

import jax
import jax.numpy as jnp

from pallas_kernels.common import cdiv

BIG = 2 ** 30
W_FAST = 8


def _exclusive_cumsum(x):
  return jnp.cumsum(x, axis=-1, dtype=jnp.int32) - x


def _count_le(values, num_bins: int):
  """out[..., t] = #{e : values[..., e] <= t} for t in [0, num_bins); values >= 0 int32."""
  flat = values.reshape(-1, values.shape[-1])
  hist = jax.vmap(lambda v: jnp.zeros((num_bins,), jnp.int32).at[v].add(1, mode="drop"))(flat)
  return jnp.cumsum(hist, axis=-1, dtype=jnp.int32).reshape(values.shape[:-1] + (num_bins,))


def _compact(flags):
  """Indices of the True entries of each row first, in order ([..., K] int32, tail = 0)."""
  k = flags.shape[-1]
  dest = jnp.where(flags, jnp.cumsum(flags, axis=-1, dtype=jnp.int32) - 1, k)
  src = jnp.arange(k, dtype=jnp.int32)
  flat = dest.reshape(-1, k)
  out = jax.vmap(lambda d: jnp.zeros((k,), jnp.int32).at[d].set(src, mode="drop"))(flat)
  return out.reshape(flags.shape)


def _rows(block_map, q_sizes, seq_len: int):
  """Appends the empty row Kq that covers positions past the last query cluster."""
  q_sizes = q_sizes.astype(jnp.int32)
  rest = seq_len - jnp.sum(q_sizes, axis=-1, keepdims=True, dtype=jnp.int32)
  bm = jnp.pad(block_map, ((0, 0), (0, 1), (0, 0)))
  return bm, jnp.concatenate([q_sizes, rest], axis=-1)


def _entries(block_map, k_sizes):
  """Packed key list of each row: (ids, sizes, ends, count) [G, R, Kk] / [G, R]."""
  listed = block_map & (k_sizes > 0)[:, None, :]
  ids = _compact(listed)
  count = jnp.sum(listed, axis=-1, dtype=jnp.int32)
  in_list = jnp.arange(listed.shape[-1], dtype=jnp.int32) < count[..., None]
  sizes = jnp.take_along_axis(jnp.broadcast_to(k_sizes[:, None, :], ids.shape), ids, axis=-1)
  sizes = jnp.where(in_list, sizes, 0)
  return ids, sizes, jnp.cumsum(sizes, axis=-1, dtype=jnp.int32), count


def _query_tiles(sizes, seq_len: int, block_q: int, tail_block_q):
  """Query-tile tables [(tile_c, tile_q0, tile_qend)], one per pass ([G, T] int32 each)."""
  offs = _exclusive_cumsum(sizes)
  r = sizes.shape[-1]
  full, rem = sizes // block_q, sizes % block_q
  passes = []
  if tail_block_q is None:
    passes.append((full + (rem > 0), offs, cdiv(seq_len, block_q) + r))
  else:
    short = (rem > 0) & (rem <= tail_block_q)
    passes.append((full + ((rem > 0) & ~short), offs, cdiv(seq_len, block_q) + r))
    passes.append((short.astype(jnp.int32), offs + full * block_q, r))
  tables = []
  for count, first, size in passes:
    count = count.astype(jnp.int32)
    cum = jnp.cumsum(count, axis=-1, dtype=jnp.int32)
    c = _count_le(cum, size)  # tile t belongs to row #{c : cum_c <= t}
    real = c < r
    c = jnp.minimum(c, r - 1)
    t = jnp.arange(size, dtype=jnp.int32)[None]
    k = t - jnp.take_along_axis(cum - count, c, axis=-1)
    q0 = jnp.take_along_axis(first, c, axis=-1) + k * block_q
    q_end = jnp.take_along_axis(offs + sizes, c, axis=-1)
    tables.append((c, jnp.where(real, q0, 0), jnp.where(real, q_end, 0)))
  return tables


def sparse_attention_metadata(block_map, q_sizes, k_sizes, *, seq_len: int, block_q: int,
                              block_k: int, layout: str = "packed", tail_block_q=None) -> dict:
  """Int32 tables of `sparse_attention` (all leading dim G; R = Kq + 1 rows).

  Args:
    block_map: [G, Kq, Kk] bool, True = key cluster j exact for query cluster i.
    q_sizes: [G, Kq] int32 query-cluster sizes (sum <= seq_len).
    k_sizes: [G, Kk] int32 key-cluster sizes (sum <= seq_len).
    seq_len: S.
    block_q, block_k: query / key tile sizes.
    layout: "packed" or "flat" (see the module docstring).
    tail_block_q: optional smaller query tile for short row remainders (second pass).

  Returns:
    dict with "q_tables" (list of (tile_c, tile_q0, tile_qend) [G, T_pass]) and, for
    "packed": tile_j, tile_e, tile_base [G, R * NT] (NT = cdiv(S, block_k); tiles in
    fast-first order: position tile index, first list entry, its base), ends, dbase
    [G, R * Kk], row_len, n_fast, n_wide [G, R]; for "flat": tile_start, tile_end
    [G, R * NTF] (NTF = NT + Kk) and n_tiles [G, R].
  """
  g, kq, kk = block_map.shape
  k_sizes = k_sizes.astype(jnp.int32)
  bm, rows = _rows(block_map, q_sizes, seq_len)
  ids, sizes, ends, count = _entries(bm, k_sizes)
  rank = jnp.arange(kk, dtype=jnp.int32)
  k_off = jnp.take_along_axis(
      jnp.broadcast_to(_exclusive_cumsum(k_sizes)[:, None, :], ids.shape), ids, axis=-1)
  md = dict(q_tables=_query_tiles(rows, seq_len, block_q, tail_block_q))
  nt = cdiv(seq_len, block_k)
  if layout == "packed":
    in_list = rank < count[..., None]
    base = jnp.where(in_list, k_off - (ends - sizes), 0)
    dbase = jnp.concatenate([base[..., 1:] - base[..., :-1], jnp.zeros_like(base[..., :1])], -1)
    dbase = jnp.where(rank + 1 < count[..., None], dbase, 0)
    ends = jnp.where(in_list, ends, BIG)
    row_len = jnp.max(jnp.where(in_list, ends, 0), axis=-1)
    # entry holding position t * block_k = #{e : ends_e <= t * block_k}
    tile_a = _count_le((ends + block_k - 1) // block_k, nt + 1)
    t = jnp.arange(nt, dtype=jnp.int32)
    valid = t < ((row_len + block_k - 1) // block_k)[..., None]
    wide = (tile_a[..., 1:] - tile_a[..., :-1]) >= W_FAST  # entries touched <= diff + 1
    fast, wide = valid & ~wide, valid & wide
    n_fast = jnp.sum(fast, axis=-1, dtype=jnp.int32)
    dest = jnp.where(fast, jnp.cumsum(fast, axis=-1, dtype=jnp.int32) - 1,
                     jnp.where(wide, n_fast[..., None]
                               + jnp.cumsum(wide, axis=-1, dtype=jnp.int32) - 1, nt))
    order = jax.vmap(lambda d: jnp.zeros((nt,), jnp.int32).at[d].set(t, mode="drop"))(
        dest.reshape(-1, nt)).reshape(dest.shape)
    tile_e = jnp.take_along_axis(tile_a[..., :nt], order, axis=-1)
    tile_base = jnp.take_along_axis(base, jnp.minimum(tile_e, kk - 1), axis=-1)
    flat2 = lambda x: x.reshape(g, -1).astype(jnp.int32)
    md.update(tile_j=flat2(order), tile_e=flat2(tile_e), tile_base=flat2(tile_base),
              ends=flat2(ends), dbase=flat2(dbase), row_len=row_len.astype(jnp.int32),
              n_fast=n_fast, n_wide=jnp.sum(wide, axis=-1, dtype=jnp.int32))
  elif layout == "flat":
    ntf = nt + kk
    tiles = (sizes + block_k - 1) // block_k
    tend = jnp.cumsum(tiles, axis=-1, dtype=jnp.int32)
    e = jnp.minimum(_count_le(tend, ntf), kk - 1)  # entry of flat tile i
    i = jnp.arange(ntf, dtype=jnp.int32)
    first = jnp.take_along_axis(tend - tiles, e, axis=-1)
    start = jnp.take_along_axis(k_off, e, axis=-1) + (i - first) * block_k
    end = jnp.take_along_axis(k_off + sizes, e, axis=-1)
    md.update(tile_start=start.reshape(g, -1), tile_end=end.reshape(g, -1),
              n_tiles=tend[..., -1])
  else:
    raise ValueError(f"unknown layout {layout!r}")
  return md


def padding_waste(block_map, q_sizes, k_sizes, *, seq_len: int, block_q: int, block_k: int,
                  layout: str = "packed", tail_block_q=None):
  """Useful / visited (query, key) slots of the exact part of a layout, per head.

  Useful = sum_ij map_ij |Q_i| |K_j|; visited = what the kernel's tiles cover, padding
  included (the compensation loop is not counted).

  Returns:
    [G] float32 in (0, 1].
  """
  bm, rows = _rows(block_map, q_sizes, seq_len)
  k_sizes = k_sizes.astype(jnp.int32)
  _, sizes, ends, _ = _entries(bm, k_sizes)
  if layout == "packed":
    key_slots = (ends[..., -1] + block_k - 1) // block_k * block_k
  elif layout == "flat":
    key_slots = jnp.sum((sizes + block_k - 1) // block_k, axis=-1) * block_k
  else:
    raise ValueError(f"unknown layout {layout!r}")
  full, rem = rows // block_q, rows % block_q
  if tail_block_q is None:
    q_slots = (full + (rem > 0)) * block_q
  else:
    short = (rem > 0) & (rem <= tail_block_q)
    q_slots = (full + ((rem > 0) & ~short)) * block_q + short * tail_block_q
  f32 = lambda x: x.astype(jnp.float32)
  useful = jnp.sum(f32(ends[..., -1]) * f32(rows), axis=-1)
  visited = jnp.sum(f32(key_slots) * f32(q_slots), axis=-1)
  return useful / jnp.maximum(visited, 1.0)
