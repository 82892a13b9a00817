"""Cluster block-sparse attention with centroid compensation as a Mosaic GPU (Hopper) kernel.

Same contract as `sparse_attention.sparse_attention` (the Pallas-Triton kernel): for a query
in query cluster i, one softmax over every key of every key cluster j with block_map[i, j],
plus (with compensation) one pseudo-token per skipped non-empty key cluster (logit
q.kbar_j * sm_scale + log n_j, value vbar_j).

Why a second kernel: Triton has no warp specialisation, TMA or asynchronous wgmma, and
tops out near 420 TFLOP/s on dense attention on an H100, while jax's Mosaic GPU flash
attention reaches ~580 (benchmarks/results/kernels_h100.md). This kernel is that design
(two consumer warpgroups of 64 query rows in ping-pong, one TMA producer warpgroup) walking
a per-query-cluster list of key chunks instead of a contiguous key range:

- Keys and values are copied sorted by key cluster, each cluster padded to a multiple of
  `chunk_rows` (default CHUNK = 16) rows (`_padded_rows`): TMA cannot gather rows. A
  128-slot key step is 128 / chunk_rows TMA copies of chunk_rows rows, so any set of
  clusters packs into full steps with < chunk_rows wasted slots per cluster.
- Padding key rows are NaN (their values 0): q.k is NaN there for every query, which the
  kernel turns into -inf. No per-step mask metadata is needed.
- Compensation steps read the key/value centroids (appended after the keys) with a
  per-(query cluster, key cluster) bias row: log2 n_j, or -inf where j is exact or empty.
  With "variance" compensation a step covers 64 centroids: its 128 key rows are the 64
  centroids and their 64 pseudo-keys 0.5 sm_scale var_j, so two wgmmas of one shared-memory
  slot give q.kbar and (q*q).w, and the bias row holds the 64 biases and the 64 scaled radii
  of the clamp (no second ring, no extra shared memory; q*q is squared in registers once
  per tile and fed to the wgmma from registers).
- Query tiles are 128 rows of one query cluster, read from a cluster-sorted copy padded
  likewise (Mosaic must prove every TMA row offset a multiple of 8); rows past the cluster
  are computed and dropped, except that a tile whose last 64 rows are all padding (the
  tail of about half the clusters) leaves its second warpgroup idle: it only keeps the
  barrier protocol, and the first one runs alone, faster than a full ping-pong tile.
  Outputs go to tile slots and are gathered back to the caller's layout and token order by
  XLA.
- The grid is (head, tile): the CTAs in flight share one head's keys and values.

Costs beyond the Triton kernel: the sorted copies and the slot buffer (~2.2x the dense
call's memory at Wan 720p instead of 1.1x). Hopper only (sm_90a). Mosaic GPU's interpret
mode (jax 0.11) does not run kernels of this shape, so CPU tests check `emulate_kernel` (the
same tables and data path in jnp) and the lowering to CUDA; the compiled kernel is tested
on an H100 against the float32 reference.
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import chunk_list, common

# Key rows per TMA copy; key clusters are padded to a multiple of it. H100, Wan 720p kernel
# problem at density 0.25 (benchmarks/results/kernels_h100.md): 8 -> 87.1 ms, 16 -> 79.6 ms
# (fewer copies per step outweigh ~5% more padding); without compensation 8 -> 80.0 ms and
# 64 -> 91.9 ms (padding dominates).
CHUNK = 16
_SMEM_BYTES = 232448 - 4096  # H100 per-block limit, less barriers and alignment
BLOCK_Q = 64  # query rows per consumer warpgroup; a tile is two of them
TILE_Q = 2 * BLOCK_Q
BLOCK_K = 128  # key slots per pipeline step
HALF_K = BLOCK_K // 2  # centroids per "variance" compensation step
_LOG2E = math.log2(math.e)


def on_hopper() -> bool:
  """Whether the default device is a Hopper GPU (what this kernel compiles for)."""
  if jax.default_backend() != "gpu":
    return False
  kind = jax.devices()[0].device_kind
  return any(name in kind for name in ("H100", "H200", "H800", "H20", "GH200"))


def _kernel(tile_c_ref, tile_q0_ref, tile_wgs_ref, n_exact_ref, chunk_ref, bias_ref, q_ref,
            k_ref, v_ref, out_ref, scoped, *, num_comp, comp_base, max_steps, mcs, scale,
            dtype, chunk, variance):
  """One CTA = one 128-row query tile (head g, tile t); warpgroups 0, 1 compute 64 rows
  each, warpgroup 2 streams the key steps (exact chunk steps, then compensation steps)
  through an `mcs`-deep shared-memory ring. Tables as in `sparse_layout_mgpu`."""
  per_step = BLOCK_K // chunk
  (qo_smem2, k_smem, v_smem, b_smem), (k_bar, v_bar, b_bar, q_bar), (k_used, v_used), sched = (
      scoped)
  t = lax.axis_index("tile")
  g = lax.axis_index("head")
  wg = lax.axis_index("wg")
  c = tile_c_ref[g, t]
  live = c >= 0
  c = jnp.maximum(c, 0)
  n_exact = n_exact_ref[g, c]
  n_steps = n_exact + num_comp

  def schedule_barrier():
    plgpu.barrier_arrive(sched)
    plgpu.barrier_wait(sched)

  @pl.when(wg < 2)
  def _consumer():
    plgpu.set_max_registers(232, action="increase")
    busy = wg < tile_wgs_ref[g, t]  # 0 for no tile; 1: rows 64.. are padding

    def wait_k(i):
      @pl.when(i < n_steps)
      def _():
        plgpu.barrier_wait(k_bar.at[lax.rem(i, jnp.int32(mcs))])

    def step(i, carry, comp, qo, q_sq=None):
      """Key step i. qo=None: warpgroup 1 of a half tile, which computes nothing but
      keeps every barrier operation of a computing warpgroup, in the same order, so that
      the producer's ring and the ping-pong rendezvous keep their counts. q_sq: (q*q in
      q's dtype, ||q||) of the warpgroup's rows, for "variance" compensation steps."""
      slot = lax.rem(i, jnp.int32(mcs))
      width = HALF_K if comp and variance else BLOCK_K
      keys = k_smem.at[slot] if width == BLOCK_K else k_smem.at[slot, pl.ds(0, width)]
      values = v_smem.at[slot] if width == BLOCK_K else v_smem.at[slot, pl.ds(0, width)]
      if qo is None:
        schedule_barrier()
      else:
        acc, m_i, l_i = carry
        acc_type = plgpu.ACC((BLOCK_Q, width), jnp.float32)
        if width == BLOCK_K:
          def compute_qk(acc_ref):
            plgpu.wgmma(acc_ref, qo, keys.transpose((1, 0)))
            schedule_barrier()
            return acc_ref[...]

          qk = pl.run_scoped(compute_qk, acc_type)
        else:
          def compute_qk(acc_ref, second_ref):
            plgpu.wgmma(acc_ref, qo, keys.transpose((1, 0)))
            plgpu.wgmma(second_ref, q_sq[0],
                        k_smem.at[slot, pl.ds(HALF_K, HALF_K)].transpose((1, 0)))
            schedule_barrier()
            return acc_ref[...], second_ref[...]

          qk, second = pl.run_scoped(compute_qk, acc_type, acc_type)
      if comp:
        plgpu.barrier_wait(b_bar.at[slot])
      if qo is not None:
        row_vec = plgpu.Layout.WGMMA.reduce(0)
        if comp and variance:
          bias = plgpu.load(b_smem.at[slot, pl.ds(0, HALF_K)], layout=row_vec)
          radius = plgpu.load(b_smem.at[slot, pl.ds(HALF_K, HALF_K)], layout=row_vec)
          bound = (lax.broadcast_in_dim(q_sq[1], qk.shape, [0])
                   * lax.broadcast_in_dim(radius, qk.shape, [1]))
          s = (qk * scale + lax.broadcast_in_dim(bias, qk.shape, [1])
               + jnp.minimum(second * scale, bound))
        elif comp:
          bias = plgpu.load(b_smem.at[slot], layout=row_vec)
          s = qk * scale + lax.broadcast_in_dim(bias, qk.shape, [1])
        else:  # NaN = a padding key row
          s = jnp.where(qk != qk, -jnp.inf, qk * scale)
      plgpu.barrier_arrive(k_used.at[slot])
      if qo is not None:
        m_new = jnp.maximum(m_i, s.max(axis=1))
        m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        alpha = jnp.exp2(m_i - m_use)
        p = jnp.exp2(s - lax.broadcast_in_dim(m_use, s.shape, [0]))
        acc *= lax.broadcast_in_dim(alpha, acc.shape, [0])
        l_i = l_i * alpha + p.sum(axis=1)
        p16 = p.astype(dtype)
        acc, l_i, m_new, p16 = lax.optimization_barrier((acc, l_i, m_new, p16))
      plgpu.barrier_arrive(sched)
      plgpu.barrier_wait(v_bar.at[slot])
      plgpu.barrier_wait(sched)
      if qo is None:
        wait_k(i + 1)
      else:
        def compute_pv(acc_ref):
          plgpu.wgmma(acc_ref, p16, values)
          wait_k(i + 1)  # while the wgmma runs

        acc = pl.run_state(compute_pv)(plgpu.ACC.init(acc))
        carry = acc, m_new, l_i
      plgpu.barrier_arrive(v_used.at[slot])
      return carry

    def key_steps(carry, qo):
      carry = lax.fori_loop(0, n_exact, functools.partial(step, comp=False, qo=qo), carry)
      if num_comp:
        q_sq = None
        if variance and qo is not None:  # live only during the compensation steps
          qf = qo[...].astype(jnp.float32)
          q_sq = ((qf * qf).astype(dtype), jnp.sqrt(jnp.sum(qf * qf, axis=1)))
        carry = lax.fori_loop(n_exact, n_steps,
                              functools.partial(step, comp=True, qo=qo, q_sq=q_sq), carry)
      return carry

    @pl.when(live & ~busy)
    def _idle():
      wait_k(jnp.int32(0))
      schedule_barrier()  # warpgroup 1's entry rendezvous, as below
      key_steps(0, None)

    @pl.when(live & busy)
    def _():
      qo = qo_smem2.at[wg]
      # row offsets are written as (x * chunk): Mosaic must prove TMA rows 8-aligned
      q_row = tile_q0_ref[g, t] * chunk + wg * BLOCK_Q
      plgpu.copy_gmem_to_smem(q_ref.at[g, pl.ds(q_row, BLOCK_Q)], qo, q_bar.at[wg])
      plgpu.barrier_wait(q_bar.at[wg])
      m_i = plgpu.layout_cast(jnp.full((BLOCK_Q,), -jnp.inf, jnp.float32),
                              plgpu.Layout.WGMMA.reduce(1))
      l_i = plgpu.layout_cast(jnp.full((BLOCK_Q,), 0, jnp.float32),
                              plgpu.Layout.WGMMA.reduce(1))
      acc = plgpu.layout_cast(jnp.full((BLOCK_Q, qo.shape[-1]), 0, jnp.float32),
                              plgpu.Layout.WGMMA)
      wait_k(jnp.int32(0))
      pl.when(wg == 1)(schedule_barrier)
      acc, _, l_i = key_steps((acc, m_i, l_i), qo)
      pl.when(wg == 0)(schedule_barrier)
      l_i = jnp.where(l_i == 0, 1.0, l_i)
      acc /= lax.broadcast_in_dim(l_i, acc.shape, [0])
      qo[...] = acc.astype(dtype)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(qo, out_ref.at[g, pl.ds(t * TILE_Q + wg * BLOCK_Q, BLOCK_Q)])
      plgpu.wait_smem_to_gmem(0)

  @pl.when(wg == 2)
  def _producer():
    plgpu.set_max_registers(40, action="decrease")

    def sources(i):
      exact = i < n_exact
      row = jnp.minimum(i, max_steps - 1) * per_step
      comp_chunk = comp_base // chunk + (i - n_exact) * per_step
      return exact, [jnp.where(exact, chunk_ref[g, c, row + j], comp_chunk + j) * chunk
                     for j in range(per_step)]

    def issue_k(i, slot, exact, rows):
      for j, r in enumerate(rows):
        plgpu.copy_gmem_to_smem(k_ref.at[g, pl.ds(r, chunk)],
                                k_smem.at[slot, pl.ds(j * chunk, chunk)], k_bar.at[slot])
      if num_comp:
        @pl.when(~exact)
        def _():
          plgpu.copy_gmem_to_smem(bias_ref.at[g, c, pl.ds((i - n_exact) * BLOCK_K, BLOCK_K)],
                                  b_smem.at[slot], b_bar.at[slot])

    def issue_v(slot, rows):
      for j, r in enumerate(rows):
        plgpu.copy_gmem_to_smem(v_ref.at[g, pl.ds(r, chunk)],
                                v_smem.at[slot, pl.ds(j * chunk, chunk)], v_bar.at[slot])

    @pl.when(live)
    def _():
      for s in range(mcs):
        @pl.when(s < n_steps)
        def _():
          exact, rows = sources(jnp.int32(s))
          issue_k(jnp.int32(s), s, exact, rows)
          issue_v(s, rows)

      @pl.loop(0, jnp.maximum(n_steps - mcs, 0))
      def _(i):
        step = i + mcs
        slot = lax.rem(i, jnp.int32(mcs))
        exact, rows = sources(step)  # loads issued before the wait hide their latency
        plgpu.barrier_wait(k_used.at[slot])
        issue_k(step, slot, exact, rows)
        plgpu.barrier_wait(v_used.at[slot])
        issue_v(slot, rows)


def _call(tables, q_sorted, k_pad, v_pad, *, num_comp, comp_base, mcs, scale, chunk,
          variance=False):
  """The kernel on prepared inputs (`prepare_mgpu`): slot-space output [G, T * 128, D]."""
  per_step = BLOCK_K // chunk
  tile_c, tile_q0, tile_wgs, n_exact, chunks, bias = tables
  g, num_tiles = tile_c.shape
  d = q_sorted.shape[-1]
  dtype = q_sorted.dtype
  max_steps = chunks.shape[-1] // per_step

  def entry(*refs):
    tiling = plgpu.TilingTransform((8, 64))
    swizzle = plgpu.SwizzleTransform(128)
    smem = (
        plgpu.SMEM((2, BLOCK_Q, d), dtype, transforms=(tiling, swizzle)),
        plgpu.SMEM((mcs, BLOCK_K, d), dtype, transforms=(tiling, swizzle)),
        plgpu.SMEM((mcs, BLOCK_K, d), dtype, transforms=(tiling, swizzle)),
        plgpu.SMEM((mcs, BLOCK_K), jnp.float32),
    )
    barriers = (
        plgpu.Barrier(num_arrivals=per_step, num_barriers=mcs),
        plgpu.Barrier(num_arrivals=per_step, num_barriers=mcs),
        plgpu.Barrier(num_barriers=mcs),
        plgpu.Barrier(num_barriers=2),
    )
    used = (plgpu.Barrier(num_arrivals=2, num_barriers=mcs),) * 2
    pl.run_scoped(
        lambda *scoped: _kernel(*refs, scoped, num_comp=num_comp, comp_base=comp_base,
                                max_steps=max_steps, mcs=mcs, scale=scale, dtype=dtype,
                                chunk=chunk, variance=variance),
        smem, barriers, used, plgpu.Barrier(num_arrivals=2), collective_axes="wg")

  return plgpu.kernel(
      entry, out_type=jax.ShapeDtypeStruct((g, num_tiles * TILE_Q, d), dtype),
      # the last grid axis varies fastest: the CTAs in flight share one head's keys and
      # values (~40 MB at Wan 720p, L2-resident); heads innermost thrashed L2 (101.7 ms
      # vs 80.0 ms on the kernel benchmark's problem)
      grid=(g, num_tiles), grid_names=("head", "tile"), num_threads=3, thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True),
  )(tile_c, tile_q0, tile_wgs, n_exact, chunks, bias, q_sorted, k_pad, v_pad)


def _key_chunks(seq_len, num_k_clusters, chunk):
  """Chunks of the padded keys: sum_j ceil(n_j / chunk) <= S / chunk + Kk."""
  return common.cdiv(seq_len, chunk) + num_k_clusters


def sparse_layout_mgpu(q_sizes, k_sizes, block_map, *, seq_len: int, chunk: int = CHUNK,
                       half_tiles: bool = True, chunk_impl: str = "jnp"):
  """Tables of the Mosaic GPU kernel (shapes static in S, Kq, Kk).

  Args:
    q_sizes: [G, Kq] int, query cluster sizes (clusters are consecutive in sorted order).
    k_sizes: [G, Kk] int, key cluster sizes likewise.
    block_map: [G, Kq, Kk] bool, True = key cluster j is exact for query cluster i.
    seq_len: S.
    chunk: key (and query) rows per chunk; clusters are padded to a multiple of it.
    half_tiles: mark tiles with at most BLOCK_Q real rows (tile_wgs = 1).
    chunk_impl: how the chunk lists are built: "jnp" (`chunk_list_reference`), "pallas"
      (the `chunk_list` kernel; GPU) or "interpret" (the kernel in interpret mode).

  Returns:
    dict with
      tile_c [G, T] int32: query cluster of 128-row tile t (-1: no tile),
      tile_q0 [G, T] int32: its first row in the padded queries, in units of chunk,
      tile_wgs [G, T] int32: consumer warpgroups that compute (0: no tile; 1: the tile's
        rows past BLOCK_Q are padding; else 2),
      query_rows [G, QR] int32: sorted query position of each padded query row (-1 =
        padding; query clusters are padded to a multiple of chunk rows too),
      n_exact [G, Kq] int32: 128-slot key steps of each query cluster's chunk list,
      chunks [G, Kq, max_steps * BLOCK_K // chunk] int32: chunk indices (in units of
        `chunk` rows) into the padded keys (`nan_chunk` past the list's end),
      key_rows [G, key_chunks * chunk] int32: sorted key position of each padded key row
        (-1 = padding),
      q_slot [G, S] int32: output slot of each sorted query position (-1: no cluster),
    and nan_chunk (the all-NaN chunk after the keys; centroid rows follow it).
  """
  if chunk_impl not in ("jnp", "pallas", "interpret"):
    raise ValueError(f"chunk_impl must be 'jnp', 'pallas' or 'interpret', got {chunk_impl!r}")
  g, kq, kk = block_map.shape
  s = seq_len
  per_step = BLOCK_K // chunk
  q_sizes = q_sizes.astype(jnp.int32)
  k_sizes = k_sizes.astype(jnp.int32)
  # query tiles: ceil(n_i / 128) per cluster, in cluster order
  nq = common.cdiv(q_sizes, TILE_Q)
  t_end = jnp.cumsum(nq, axis=-1)
  t_start = t_end - nq
  q_end = jnp.cumsum(q_sizes, axis=-1)
  q_off = q_end - q_sizes
  num_tiles = common.cdiv(s, TILE_Q) + kq  # sum of ceil(n_i / 128) <= S / 128 + Kq
  tc = common.searchsorted_rows(t_end, jnp.arange(num_tiles))
  tcs = jnp.minimum(tc, kq - 1)
  query_rows, qch_start = _padded_rows(q_sizes, q_off, common.cdiv(s, chunk) + kq, chunk)
  tile_q0 = (jnp.take_along_axis(qch_start, tcs, 1)
             + (jnp.arange(num_tiles) - jnp.take_along_axis(t_start, tcs, 1)) * (TILE_Q // chunk))
  tile_c = jnp.where(tc < kq, tc, -1)
  tile_rows = (jnp.take_along_axis(q_sizes, tcs, 1)
               - (jnp.arange(num_tiles) - jnp.take_along_axis(t_start, tcs, 1)) * TILE_Q)
  tile_wgs = jnp.where(tc < kq, 2, 0)
  if half_tiles:
    tile_wgs = jnp.where((tc < kq) & (tile_rows <= BLOCK_Q), 1, tile_wgs)
  pos = jnp.arange(s)
  qc = common.searchsorted_rows(q_end, pos)
  qcs = jnp.minimum(qc, kq - 1)
  q_slot = (jnp.take_along_axis(t_start, qcs, 1) * TILE_Q + pos
            - jnp.take_along_axis(q_off, qcs, 1))
  q_slot = jnp.where(qc < kq, q_slot, -1)

  nch = common.cdiv(k_sizes, chunk)
  key_chunks = _key_chunks(s, kk, chunk)
  key_rows, pch_start = _padded_rows(k_sizes, jnp.cumsum(k_sizes, axis=-1) - k_sizes,
                                     key_chunks, chunk)

  # chunk list of query cluster i: the chunk runs of its exact key clusters, in j order
  cnt = jnp.where(block_map, nch[:, None, :], 0)
  n_chunks = jnp.sum(cnt, axis=-1)
  width = common.cdiv(key_chunks, per_step) * per_step
  nan_chunk = key_chunks
  if chunk_impl == "jnp":
    chunks = chunk_list.chunk_list_reference(cnt, pch_start, width=width, fill=nan_chunk)
  else:
    chunks = chunk_list.chunk_list(cnt, pch_start, width=width, fill=nan_chunk,
                                   interpret=chunk_impl == "interpret")
  return dict(tile_c=tile_c, tile_q0=tile_q0.astype(jnp.int32),
              tile_wgs=tile_wgs.astype(jnp.int32), query_rows=query_rows,
              n_exact=common.cdiv(n_chunks, per_step).astype(jnp.int32), chunks=chunks,
              key_rows=key_rows.astype(jnp.int32), q_slot=q_slot.astype(jnp.int32),
              nan_chunk=nan_chunk)


def _padded_rows(sizes, offsets, num_chunks, chunk):
  """Clusters padded to chunk-row multiples: ([G, num_chunks * chunk] sorted position of
  each padded row (-1 = padding), [G, K] first chunk of each cluster)."""
  k = sizes.shape[-1]
  nch = common.cdiv(sizes, chunk)
  ch_end = jnp.cumsum(nch, axis=-1)
  ch_start = ch_end - nch
  prow = jnp.arange(num_chunks * chunk)
  cl = common.searchsorted_rows(ch_end, prow // chunk)
  cls = jnp.minimum(cl, k - 1)
  within = prow - jnp.take_along_axis(ch_start, cls, 1) * chunk
  rows = jnp.where((cl < k) & (within < jnp.take_along_axis(sizes, cls, 1)),
                   jnp.take_along_axis(offsets, cls, 1) + within, -1)
  return rows.astype(jnp.int32), ch_start


def _heads_first_rows(x, rows, index, heads):
  """Rows `rows` [G, N] (-1: none) of sorted order gathered from x; [G, N, D] (none -> 0).

  x is [G, S, D] or tokens-first [B, S, H, D] (heads = H); index [G, S] maps sorted
  positions to token rows (None: x is already sorted).
  """
  ok = rows >= 0
  rows = jnp.maximum(rows, 0)
  if index is not None:
    rows = jnp.take_along_axis(index, rows, 1)
  if heads is None:
    out = jnp.take_along_axis(x, rows[..., None], 1)
  else:
    b, s, h, d = x.shape
    gi = jnp.arange(b * h)[:, None]
    flat = ((gi // h) * s + rows) * h + gi % h
    out = x.reshape(b * s * h, d)[flat]
  return out, ok


def prepare_mgpu(q, k, v, q_sizes, k_sizes, block_map, k_centroids, v_centroids, *,
                 compensation, q_index=None, kv_index=None, chunk=CHUNK, half_tiles=True,
                 chunk_impl="jnp", k_variance=None, k_radius=None, sm_scale=None):
  """Kernel inputs: (tables, padded queries [G,QR,D], keys, values [G,R,D], statics, layout).

  sm_scale is needed (and used) by "variance" compensation only.
  """
  compensation = common.compensation_mode(compensation, k_variance, k_radius, k_centroids)
  heads = q.shape[2] if q.ndim == 4 else None
  s = q.shape[1]
  g, kq, kk = block_map.shape
  lay = sparse_layout_mgpu(q_sizes, k_sizes, block_map, seq_len=s, chunk=chunk,
                           half_tiles=half_tiles, chunk_impl=chunk_impl)
  q_sorted, _ = _heads_first_rows(q, lay["query_rows"], q_index, heads)
  kp, ok = _heads_first_rows(k, lay["key_rows"], kv_index, heads)
  vp, _ = _heads_first_rows(v, lay["key_rows"], kv_index, heads)
  d = kp.shape[-1]
  kp = jnp.where(ok[..., None], kp, jnp.nan)
  vp = jnp.where(ok[..., None], vp, 0)
  per = HALF_K if compensation == "variance" else BLOCK_K  # centroids per step
  kkp = common.cdiv(kk, per) * per
  pad_c = lambda x: jnp.pad(x, ((0, 0), (0, kkp - kk)) + ((0, 0),) * (x.ndim - 2))
  kc, vc = pad_c(k_centroids.astype(kp.dtype)), pad_c(v_centroids.astype(vp.dtype))
  k_sizes = k_sizes.astype(jnp.int32)
  log_n = jnp.log2(jnp.maximum(k_sizes, 1).astype(jnp.float32))
  bias = jnp.where(~block_map & (k_sizes > 0)[:, None, :], log_n[:, None, :], -jnp.inf)
  bias = jnp.pad(bias, ((0, 0), (0, 0), (0, kkp - kk)), constant_values=-jnp.inf)
  if compensation == "variance":
    # step h: rows [kbar_j ; 0.5 sm_scale var_j] and bias [log2 n_j ; log2(e) sm_scale r_j]
    # for the 64 centroids j of the step (values [vbar_j ; 0])
    steps = kkp // HALF_K
    halves = lambda a, b: jnp.stack([a.reshape(g, steps, HALF_K, -1),
                                     b.reshape(g, steps, HALF_K, -1)], 2).reshape(g, -1, d)
    w = pad_c((0.5 * sm_scale * k_variance.astype(jnp.float32)).astype(kp.dtype))
    kc, vc = halves(kc, w), halves(vc, jnp.zeros_like(vc))
    rr = pad_c((sm_scale * _LOG2E) * k_radius.astype(jnp.float32))
    bias = jnp.stack([bias.reshape(g, kq, steps, HALF_K),
                      jnp.broadcast_to(rr.reshape(g, 1, steps, HALF_K), (g, kq, steps, HALF_K))],
                     3).reshape(g, kq, -1)
  if compensation == "none":
    bias = jnp.full((g, kq, BLOCK_K), -jnp.inf, jnp.float32)
  nan_rows = jnp.full((g, chunk, d), jnp.nan, kp.dtype)
  k_pad = jnp.concatenate([kp, nan_rows, kc], 1)
  v_pad = jnp.concatenate([vp, jnp.zeros_like(nan_rows), vc], 1)
  tables = (lay["tile_c"], lay["tile_q0"], lay["tile_wgs"], lay["n_exact"], lay["chunks"],
            bias)
  statics = kernel_statics(s, kk, compensation=compensation, chunk=chunk)
  return tables, q_sorted, k_pad, v_pad, statics, lay


def kernel_statics(seq_len: int, num_k_clusters: int, *, compensation,
                   chunk: int = CHUNK) -> dict:
  """Static arguments of the kernel (`_call`) and `emulate_kernel` for these sizes."""
  if isinstance(compensation, bool):
    compensation = "mean" if compensation else "none"
  # centroid rows follow the keys and the one NaN chunk (see prepare_mgpu)
  comp_base = (_key_chunks(seq_len, num_k_clusters, chunk) + 1) * chunk
  per = HALF_K if compensation == "variance" else BLOCK_K
  return dict(num_comp=0 if compensation == "none" else common.cdiv(num_k_clusters, per),
              comp_base=comp_base, chunk=chunk, variance=compensation == "variance")


def _finish(out_slots, lay, q, q_index):
  """Slot-space output [G, T*128, D] -> q's layout and order (no cluster -> 0)."""
  heads = q.shape[2] if q.ndim == 4 else None
  g, s = lay["q_slot"].shape
  slots = lay["q_slot"]
  if q_index is not None:  # token row q_index[p] takes sorted position p's slot
    inv = jnp.zeros((g, s), jnp.int32).at[jnp.arange(g)[:, None], q_index].set(
        jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (g, s)))
    slots = jnp.take_along_axis(slots, inv, 1)
  ok = slots >= 0
  rows = jnp.maximum(slots, 0) + jnp.arange(g)[:, None] * out_slots.shape[1]
  if heads is not None:  # gather straight into [B, S, H, D]: no transposed copy
    to_tokens_first = lambda x: x.reshape(g // heads, heads, s).transpose(0, 2, 1)
    rows, ok = to_tokens_first(rows), to_tokens_first(ok)
  out = out_slots.reshape(-1, out_slots.shape[-1])[rows]
  return jnp.where(ok[..., None], out, 0).astype(q.dtype)


def emulate_kernel(tables, q_sorted, k_pad, v_pad, *, num_comp, comp_base, scale, chunk,
                   variance=False):
  """What the kernel computes, tile by tile, in float32 jnp (the CPU check of the tables).

  Returns the slot-space output [G, T * 128, D]. Follows the kernel's data path: padded
  key rows are NaN and masked, compensation steps add the bias row, the rows of an idle
  warpgroup are left 0 (the kernel leaves them unwritten). Small sizes only.
  """
  tile_c, tile_q0, tile_wgs, n_exact, chunks, bias = tables
  g, nt = tile_c.shape
  d = q_sorted.shape[-1]
  f32 = lambda x: x.astype(jnp.float32)
  hi = lax.Precision.HIGHEST

  def tile(gi, t):
    c = jnp.maximum(tile_c[gi, t], 0)
    rows = tile_q0[gi, t] * chunk + jnp.arange(TILE_Q)
    qt = jnp.where((rows < q_sorted.shape[1])[:, None],
                   f32(q_sorted[gi, jnp.minimum(rows, q_sorted.shape[1] - 1)]), 0.)
    slot = jnp.arange(chunks.shape[-1] * chunk)
    step = slot // BLOCK_K
    krow = chunks[gi, c, slot // chunk] * chunk + slot % chunk
    s = jnp.einsum("qd,kd->qk", qt, f32(k_pad[gi, krow]), precision=hi) * scale
    s = jnp.where(jnp.isnan(s) | (step >= n_exact[gi, c])[None, :], -jnp.inf, s)
    vals = f32(v_pad[gi, krow])
    if num_comp:
      crow = comp_base + jnp.arange(num_comp * BLOCK_K)
      kc, vc, b = f32(k_pad[gi, crow]), f32(v_pad[gi, crow]), bias[gi, c]
      if variance:  # steps of [64 centroids ; their 64 pseudo-keys]
        split = lambda x: x.reshape(num_comp, 2, HALF_K, *x.shape[1:])
        (kc, w), (vc, _), (b, rr) = (
            (split(x)[:, 0].reshape(-1, *x.shape[1:]), split(x)[:, 1].reshape(-1, *x.shape[1:]))
            for x in (kc, vc, b))
      sc = jnp.einsum("qd,kd->qk", qt, kc, precision=hi) * scale + b[None, :]
      if variance:
        q_sq = f32((qt * qt).astype(q_sorted.dtype))
        second = jnp.einsum("qd,kd->qk", q_sq, w, precision=hi) * scale
        bound = jnp.sqrt(jnp.sum(qt * qt, 1))[:, None] * rr[None, :]
        sc = sc + jnp.minimum(second, bound)
      s = jnp.concatenate([s, sc], 1)
      vals = jnp.concatenate([vals, vc], 0)
    m = jnp.max(s, axis=1, keepdims=True)
    p = jnp.exp2(s - jnp.where(m == -jnp.inf, 0., m))
    l = p.sum(axis=1, keepdims=True)
    o = jnp.einsum("qk,kd->qd", p, vals, precision=hi) / jnp.where(l == 0, 1., l)
    computed = jnp.arange(TILE_Q) // BLOCK_Q < tile_wgs[gi, t]
    return jnp.where((tile_c[gi, t] >= 0) & computed[:, None], o, 0.)

  out = jax.vmap(lambda gi: jax.vmap(lambda t: tile(gi, t))(jnp.arange(nt)))(jnp.arange(g))
  return out.reshape(g, nt * TILE_Q, d)


@functools.partial(jax.jit, static_argnames=(
    "compensation", "sm_scale", "max_concurrent_steps", "chunk_rows", "half_tiles",
    "emulate"))
def sparse_attention_mgpu(q, k, v, q_sizes, k_sizes, block_map, k_centroids, v_centroids, *,
                          compensation, sm_scale: float, q_index=None, kv_index=None,
                          k_variance=None, k_radius=None,
                          max_concurrent_steps: int = 2, chunk_rows: int = CHUNK,
                          half_tiles: bool = True, emulate: bool = False):
  """Mosaic GPU version of `sparse_attention.sparse_attention` (same arguments and result).

  Args:
    q, k, v: [G, S, D] in cluster-sorted order, or tokens-first [B, S, H, D] (G = B * H)
      in token order read through q_index / kv_index; D a multiple of 64, bf16 or f16.
    q_sizes, k_sizes, block_map, k_centroids, v_centroids, compensation, sm_scale, q_index,
      kv_index, k_variance, k_radius: as in `sparse_attention`.
    max_concurrent_steps: key steps in flight (shared-memory ring depth, >= 2).
    chunk_rows: rows per TMA copy of keys/values (8, 16, 32 or 64); every query and key
      cluster is padded to a multiple of it.
    half_tiles: let the second warpgroup of a tile idle when its 64 rows are padding
      (False: every tile computes 128 rows; for comparisons).
    emulate: run `emulate_kernel` (float32 jnp) instead of the kernel: CPU tests.

  Returns:
    q's shape and dtype, in q_index's token order when given. Positions of no query
    cluster, and queries with nothing to attend, are 0.
  """
  common.check_heads(q, k, v, block_map)
  d = q.shape[-1]
  if not emulate:
    if d % 64:
      raise ValueError(f"head_dim {d} must be a multiple of 64 for the Mosaic GPU kernel")
    if q.dtype not in (jnp.bfloat16, jnp.float16):
      raise ValueError(f"the Mosaic GPU kernel takes bf16 or f16 inputs, got {q.dtype}")
  if max_concurrent_steps < 2:
    raise ValueError("max_concurrent_steps must be >= 2")
  if chunk_rows not in (8, 16, 32, 64):
    raise ValueError(f"chunk_rows must be 8, 16, 32 or 64, got {chunk_rows}")
  smem = ((2 * BLOCK_Q + 2 * max_concurrent_steps * BLOCK_K) * d * q.dtype.itemsize
          + max_concurrent_steps * BLOCK_K * 4)
  if not emulate and smem > _SMEM_BYTES:
    raise ValueError(f"max_concurrent_steps={max_concurrent_steps} with head_dim {d} needs "
                     f"{smem} bytes of shared memory (> {_SMEM_BYTES}); use fewer steps")
  tables, q_sorted, k_pad, v_pad, statics, lay = prepare_mgpu(
      q, k, v, q_sizes, k_sizes, block_map, k_centroids, v_centroids,
      compensation=compensation, q_index=q_index, kv_index=kv_index, chunk=chunk_rows,
      half_tiles=half_tiles, chunk_impl="jnp" if emulate else "pallas", k_variance=k_variance,
      k_radius=k_radius, sm_scale=sm_scale)
  scale = sm_scale * _LOG2E
  if emulate:
    out = emulate_kernel(tables, q_sorted, k_pad, v_pad, scale=scale, **statics)
  else:
    out = _call(tables, q_sorted, k_pad, v_pad, mcs=max_concurrent_steps, scale=scale,
                **statics)
  return _finish(out, lay, q, q_index)
