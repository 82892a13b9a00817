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
- Padding key rows are 0 (their values 0) and carry a bias of -inf: with every exact
  step's keys the producer writes the step's 128 key-slot biases (0, or -inf past each
  chunk's real rows: a table of real rows per chunk) into shared memory, so the logit is
  one FMA (q.k * scale + bias) per element. (TMA cannot copy the 64-byte bias pieces of
  16-row chunks: its shared-memory destinations must be 128-byte aligned.) The first
  version marked padding with NaN keys and tested every logit (q.k != q.k -> -inf: a
  compare and a select per element more, the softmax being the kernel's critical path):
  77.6 -> 76.4 ms on the kernel benchmark in one run (benchmarks/results/kernels_h200.md,
  run 3; a kernel with no mask at all, wrong, ran 70.4 ms: the bias load costs the
  consumers registers and the producer a store and fence per step). A table of real
  rows beside each list entry (two independent loads in the producer instead of a
  dependent one) was not faster (77.0 ms) and is G x Kq x width ints, so the table stays
  per chunk.
- Only a cluster's last chunk can be partial, so each chunk list holds its clusters' full
  chunks first and their partial chunks after them: a warpgroup's first `wg_clean` exact
  steps (81% of them at Wan 720p, 62% at 480p) hold no padding slot and run without the
  bias (no load, no add; the producer writes none where both warpgroups' steps are
  clean): 77.4 -> 74.6 ms at Wan 720p, 18.0 -> 17.3 ms at 480p (kernels_h200.md run 4).
- Exact steps keep the row max of the raw logits (q.k plus the key-slot bias, 0 or -inf
  at any scale) and scale it once per row, so a logit costs one FMA in the exponent's
  argument (exp2(q.k * scale - m)) instead of a multiply and a subtraction, as jax's dense
  Mosaic flash attention does: 71.4 -> 70.8 ms at Wan 720p, 17.0 -> 16.4 ms at 480p on an
  H100 (benchmarks/results/kernels_h100.md, session 17).
- Exact steps run FlashAttention-3's intra-warpgroup pipelining (`overlapped_steps`;
  `overlap_softmax=False`: one step after the other): the q.k wgmma of step i and the
  P.V wgmma of step i - 1 are issued together, and the softmax of step i runs while P.V
  does: 71.9 -> 70.9 ms at Wan 720p, 17.18 -> 17.14 ms at 480p on an H100 (kernels_h100.md,
  session 18). Its first versions ran 29% slower: ptxas serialized every wgmma (warning
  C7513) because a register of P(i - 1) was defined while its P.V wgmma ran; P(i) is cast
  to bf16 after that wgmma's wait.
- Compensation steps read the key/value centroids (appended after the keys) with a
  per-(query cluster, key cluster) bias row: log2 n_j, or -inf where j is exact or empty.
  With "variance" compensation a step covers 64 centroids: its 128 key rows are the 64
  centroids and their 64 pseudo-keys 0.5 sm_scale var_j, so two wgmmas of one shared-memory
  slot give q.kbar and (q*q).w, and the bias row holds the 64 biases and the 64 scaled radii
  of the clamp (no second ring, no extra shared memory; q*q is squared in registers once
  per tile and fed to the wgmma from registers).
- Query tiles are 128 rows of one query cluster (clusters padded to chunk rows in a table
  of the caller's rows: Mosaic must prove every TMA row offset a multiple of 8); rows past
  the cluster are computed and dropped. A half tile (last 64 rows all padding; the tail of
  about half the clusters) is paired with another cluster's half tile in one CTA: each
  warpgroup has its own query cluster, and each exact step's ring slot holds 64 keys of
  either list (the two shortest lists together, and so on, so that little of the lockstep
  is idle). Without pairing the second warpgroup of a half tile idles (it keeps the barrier
  protocol only).
- Queries are read and outputs written in the caller's layout, row by row: a warpgroup
  fetches its 64 row numbers into shared memory, issues 64 one-row TMA copies into an
  unswizzled buffer (a one-row box cannot land in wgmma's swizzled tiles) and moves them
  into the swizzled tile through registers; its output rows go back by 64 one-row TMA
  stores. No sorted copy of Q, no slot buffer, no gather afterwards. For comparisons,
  `sorted_queries=True` reads a sorted padded copy of Q (one copy per warpgroup) and
  `slot_output=True` writes 64-row tiles to a slot buffer that XLA gathers back (the
  first version's data path, with pairing).
- Keys and values have a producer warpgroup each (`split_producers=True`, the default;
  2 x 232 + 2 x 24 registers per thread slot): a key step's 2 x 128 / chunk_rows TMA
  copies are what held the visited rate under the dense kernel's on the H100 (64-row
  chunks came within 1% of it; benchmarks/results/kernels_h100.md), and two issuers halve
  each one's work: 0.3-1.3 ms faster at Wan 720p in five runs, even at 480p
  (kernels_h200.md runs 3, 4). `split_producers=False`: one producer for both.
- The heads run in a loop of kernel calls of at most CALL_HEADS = 10 heads (`call_heads`),
  each writing its heads' rows of one output in place (a jax Ref the kernel writes): the
  sorted copies and chunk lists, sized for the worst case, exist for one call's heads at a
  time. At Wan 720p the whole call takes 3.79 GB instead of 5.43 GB (1.22x the dense
  call's, from 1.75x) for no measurable time up to 4 calls (benchmarks/results/
  kernels_h100.md, attention_h100.md, session 18).
- The grid is (head, tile): the CTAs in flight share one head's keys and values. Tiles are
  not sorted by list length: at Wan 720p the grid is ~28,000 CTAs, ~200 waves of 132, so
  only the last wave's imbalance (< 1% of the call) could be won back.

Costs beyond the Triton kernel: the padded sorted copies of K and V (the whole call
1.22x the dense call's memory at Wan 720p instead of 1.1x; 1.76x in one call of every head,
2.29x with the sorted Q copy and slot buffer of the first version). Hopper only
(sm_90a). Mosaic GPU's interpret mode (jax 0.11) does not run kernels of this shape, so
CPU tests check `emulate_kernel` (the same tables and data path in jnp) and the lowering to
CUDA; the compiled kernel is tested on an H100 / H200 against the float32 reference.
"""

import functools
import math
from typing import NamedTuple

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
_SMEM_LIMIT = 232448  # H100 / H200 per-block shared memory
_SMEM_BYTES = _SMEM_LIMIT - 4096  # less barriers and alignment
BLOCK_Q = 64  # query rows per consumer warpgroup; a tile is two of them
TILE_Q = 2 * BLOCK_Q
# Heads per kernel call (`call_heads`): the sorted copies of K and V and the chunk lists
# exist for one call's heads at a time
CALL_HEADS = 10
BLOCK_K = 128  # key slots per pipeline step
HALF_K = BLOCK_K // 2  # centroids per "variance" compensation step; keys per pair-tile half
# tile modes (sparse_layout_mgpu's tile_mode)
MODE_NONE, MODE_HALF, MODE_FULL, MODE_PAIR = 0, 1, 2, 3
_LOG2E = math.log2(math.e)


class KernelTables(NamedTuple):
  """The kernel's tables (`prepare_mgpu`), in the order of the kernel's first refs. Per
  tile t of T (`sparse_layout_mgpu`) and warpgroup w:

  tile_mode [G, T] int32: MODE_NONE / MODE_HALF / MODE_FULL / MODE_PAIR.
  tile_exact [G, T] int32: the tile's exact key steps.
  wg_c [G, T, 2] int32: warpgroup w's query cluster (-1: none).
  wg_q0 [G, T, 2] int32: its first padded query row, in units of chunk rows.
  wg_n [G, T, 2] int32: its real rows (the first wg_n of its 64).
  chunks [G, Kq, W] int32: each query cluster's key chunk list.
  bias [G, Kq, C] float32: each query cluster's compensation bias rows (128 per step).
  chunk_valid [G, key chunks + 1] int32: real rows of each padded key chunk.
  q_rows [G, QR] int32: the caller's flat row of each padded sorted query row (-1: padding).
  wg_clean [G, T, 2] int32: warpgroup w's leading exact steps without padding slots.
  """
  tile_mode: jax.Array
  tile_exact: jax.Array
  wg_c: jax.Array
  wg_q0: jax.Array
  wg_n: jax.Array
  chunks: jax.Array
  bias: jax.Array
  chunk_valid: jax.Array
  q_rows: jax.Array
  wg_clean: jax.Array


def on_hopper() -> bool:
  """Whether the default device is a Hopper GPU (what this kernel compiles for)."""
  if jax.default_backend() != "gpu":
    return False
  kind = jax.devices()[0].device_kind
  return any(name in kind for name in ("H100", "H200", "H800", "H20", "GH200"))


def _kernel(tile_mode_ref, tile_exact_ref, wg_c_ref, wg_q0_ref, wg_n_ref, chunks_ref,
            bias_ref, chunk_valid_ref, q_rows_ref, wg_clean_ref, q_ref, k_ref, v_ref, out_ref,
            scoped, *, num_comp, comp_base, max_steps, mcs, scale, dtype, chunk, variance,
            split_producers, overlap):
  """One CTA = one query tile (head g, tile t); warpgroups 0, 1 compute 64 rows each,
  warpgroup 2 streams the key steps (exact chunk steps, then compensation steps) through
  an `mcs`-deep shared-memory ring (split_producers: warpgroup 2 the keys and bias rows,
  warpgroup 3 the values, each issuing half of a step's TMA copies). In a pair tile the
  two warpgroups serve two query clusters: each exact step's slot holds 64 keys of each
  one's chunk list (rows 0..63 for warpgroup 0, 64..127 for 1). Tables as in
  `sparse_layout_mgpu`; q_ref and out_ref are the caller's rows flattened to [N, D],
  addressed through q_rows_ref. A step's bias rows (b_smem[slot]) arrive on the keys'
  barrier: an exact step's key-slot biases in row 0 (written by the producer from
  chunk_valid_ref, the real rows of each padded key chunk), a compensation step's bias
  row of each warpgroup's cluster in rows 0 and 1 (copied). The first wg_clean_ref[g, t, w]
  exact steps of warpgroup w hold no padding slot (each list has its full chunks first):
  it adds no bias there, and the producer writes none where both warpgroups' are clean."""
  per_step = BLOCK_K // chunk
  half_step = per_step // 2  # chunks per warpgroup in a pair tile's exact step
  ((qo_smem2, stage2, rows2, k_smem, v_smem, b_smem), (k_bar, v_bar, q_bar, r_bar),
   (k_used, v_used), sched) = scoped
  t = lax.axis_index("tile")
  g = lax.axis_index("head")
  wg = lax.axis_index("wg")
  mode = tile_mode_ref[g, t]
  live = mode > 0
  pair = mode == MODE_PAIR
  n_exact = tile_exact_ref[g, t]
  n_steps = n_exact + num_comp

  # jax.named_scope: the ranges of the in-kernel profiler (`_call(profile_dir=...)`,
  # benchmarks/kernels.py trace); no code without it. Scopes hold straight-line code only
  # (a scope around a cond or loop would open again inside it).
  scope = jax.named_scope

  def schedule_barrier():
    plgpu.barrier_arrive(sched)
    with scope("pingpong"):
      plgpu.barrier_wait(sched)

  @pl.when(wg < 2)
  def _consumer():
    plgpu.set_max_registers(232, action="increase")
    busy = wg < jnp.where(mode == MODE_HALF, 1, 2)  # a half tile's rows 64.. are padding

    def wait_k(i):
      @pl.when(i < n_steps)
      def _():
        with scope("wait_k"):
          plgpu.barrier_wait(k_bar.at[lax.rem(i, jnp.int32(mcs))])

    row_vec = plgpu.Layout.WGMMA.reduce(0)

    def ring(i, width, first):
      """Step i's ring slot and its keys and values [width, D] from row `first`."""
      slot = lax.rem(i, jnp.int32(mcs))
      if width == BLOCK_K:
        return slot, k_smem.at[slot], v_smem.at[slot]
      return slot, k_smem.at[slot, pl.ds(first, width)], v_smem.at[slot, pl.ds(first, width)]

    def qk_across_rendezvous(qo, keys, width):
      """q.k of one step [64, width] float32 (keys: [width, D] of a ring slot): issued,
      the ping-pong rendezvous (the other warpgroup's softmax ends), then waited for."""
      def issue(acc_ref):
        with scope("qk_issue"):
          plgpu.wgmma(acc_ref, qo, keys.transpose((1, 0)))
        schedule_barrier()
        with scope("qk_wait"):
          return acc_ref[...]

      return pl.run_scoped(issue, plgpu.ACC((BLOCK_Q, width), jnp.float32))

    def exact_logits(qk, slot, first, width, masked):
      """An exact step's logits unscaled: q.k, plus the key-slot bias (0, or -inf on
      padding slots; the same at any scale) in a step with padding slots."""
      if not masked:
        return qk
      bias = plgpu.load(b_smem.at[slot, 0, pl.ds(first, width)], layout=row_vec)
      return qk + lax.broadcast_in_dim(bias, qk.shape, [1])

    def online_softmax(s, m_i, l_i, raw, cast=True):
      """One step of the online softmax in base 2: (p in q's dtype (cast=False: float32),
      new running max, new running sum, the factor alpha that rescales the accumulator).
      m is kept scaled; raw: s is unscaled logits, scaled inside the exponent's FMA (the
      row max taken on the raw logits, then scaled: one multiply per row, not per logit)."""
      row_max = s.max(axis=1)
      m_new = jnp.maximum(m_i, row_max * scale if raw else row_max)
      m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)
      alpha = jnp.exp2(m_i - m_use)
      m_b = lax.broadcast_in_dim(m_use, s.shape, [0])
      p = jnp.exp2(s * scale - m_b if raw else s - m_b)
      return p.astype(dtype) if cast else p, m_new, l_i * alpha + p.sum(axis=1), alpha

    def step(i, carry, comp, qo, q_sq=None, split=False, masked=True):
      """Key step i. qo=None: warpgroup 1 of a half tile, which computes nothing but
      keeps every barrier operation of a computing warpgroup, in the same order, so that
      the producer's ring and the ping-pong rendezvous keep their counts. q_sq: (q*q in
      q's dtype, ||q||) of the warpgroup's rows, for "variance" compensation steps.
      split: an exact step of a pair tile (this warpgroup's 64 keys of the slot).
      masked=False: an exact step without padding slots (no bias row)."""
      width = HALF_K if (comp and variance) or split else BLOCK_K
      first = wg * HALF_K if split else 0
      slot, keys, values = ring(i, width, first)
      if qo is None:
        schedule_barrier()
      else:
        acc, m_i, l_i = carry
        acc_type = plgpu.ACC((BLOCK_Q, width), jnp.float32)
        if not (comp and variance):
          qk = qk_across_rendezvous(qo, keys, width)
        else:
          def compute_qk(acc_ref, second_ref):
            with scope("qk_issue"):
              plgpu.wgmma(acc_ref, qo, keys.transpose((1, 0)))
              plgpu.wgmma(second_ref, q_sq[0],
                          k_smem.at[slot, pl.ds(HALF_K, HALF_K)].transpose((1, 0)))
            schedule_barrier()
            with scope("qk_wait"):
              return acc_ref[...], second_ref[...]

          qk, second = pl.run_scoped(compute_qk, acc_type, acc_type)
      if qo is not None:
        with scope("softmax"):
          if comp and variance:
            bias = plgpu.load(b_smem.at[slot, wg, pl.ds(0, HALF_K)], layout=row_vec)
            radius = plgpu.load(b_smem.at[slot, wg, pl.ds(HALF_K, HALF_K)], layout=row_vec)
            bound = (lax.broadcast_in_dim(q_sq[1], qk.shape, [0])
                     * lax.broadcast_in_dim(radius, qk.shape, [1]))
            s = (qk * scale + lax.broadcast_in_dim(bias, qk.shape, [1])
                 + jnp.minimum(second * scale, bound))
          elif comp:  # the cluster's bias row
            bias = plgpu.load(b_smem.at[slot, wg], layout=row_vec)
            s = qk * scale + lax.broadcast_in_dim(bias, qk.shape, [1])
          else:  # raw logits (+ the key rows' bias: 0 or -inf, any scale)
            s = exact_logits(qk, slot, first, width, masked)
      plgpu.barrier_arrive(k_used.at[slot])
      if qo is not None:
        with scope("softmax"):
          p16, m_new, l_i, alpha = online_softmax(s, m_i, l_i, raw=not comp)
          acc *= lax.broadcast_in_dim(alpha, acc.shape, [0])
          acc, l_i, m_new, p16 = lax.optimization_barrier((acc, l_i, m_new, p16))
      plgpu.barrier_arrive(sched)
      with scope("wait_v"):
        plgpu.barrier_wait(v_bar.at[slot])
      with scope("pingpong"):
        plgpu.barrier_wait(sched)
      if qo is None:
        wait_k(i + 1)
      else:
        def compute_pv(acc_ref):
          with scope("pv_issue"):
            plgpu.wgmma(acc_ref, p16, values)
          wait_k(i + 1)  # while the wgmma runs

        acc = pl.run_state(compute_pv)(plgpu.ACC.init(acc))
        carry = acc, m_new, l_i
      plgpu.barrier_arrive(v_used.at[slot])
      return carry

    def end_of_step(i):
      """The barriers that end key step i's softmax (as in `step`): the ping-pong
      rendezvous around the wait for step i's values, then step i + 1's keys."""
      plgpu.barrier_arrive(sched)
      with scope("wait_v"):
        plgpu.barrier_wait(v_bar.at[lax.rem(i, jnp.int32(mcs))])
      with scope("pingpong"):
        plgpu.barrier_wait(sched)
      wait_k(i + 1)

    def overlapped_steps(carry, lo, hi, qo, split, masked):
      """Exact steps lo..hi-1 with the softmax of step i overlapping the P.V wgmma of
      step i - 1 (FlashAttention-3's intra-warpgroup pipelining): each step issues
      q.k of step i and P.V of step i - 1 together, waits for q.k only, and waits for
      P.V after its softmax (then rescales the accumulator). The warpgroup's barrier
      operations per step are `step`'s, the release of step i - 1's values one step
      later. The softmax of step i no longer waits for its own q.k after the ping-pong
      rendezvous (the other warpgroup's wgmmas run meanwhile)."""
      width = HALF_K if split else BLOCK_K
      first = wg * HALF_K if split else 0
      acc_type = plgpu.ACC((BLOCK_Q, width), jnp.float32)
      out_type = plgpu.ACC((BLOCK_Q, qo.shape[-1]), jnp.float32)

      def softmax(qk, slot, m_i, l_i, cast=True):
        s = exact_logits(qk, slot, first, width, masked)
        plgpu.barrier_arrive(k_used.at[slot])
        return online_softmax(s, m_i, l_i, raw=True, cast=cast)

      def segment(carry):
        acc, m_i, l_i = carry
        slot, keys, _ = ring(lo, width, first)

        qk = qk_across_rendezvous(qo, keys, width)
        with scope("softmax"):
          p16, m_i, l_i, alpha = softmax(qk, slot, m_i, l_i)
          acc *= lax.broadcast_in_dim(alpha, acc.shape, [0])
          acc, l_i, m_i, p16 = lax.optimization_barrier((acc, l_i, m_i, p16))
        end_of_step(lo)

        def body(i, c):
          acc, p_prev, m_i, l_i = c
          slot, keys, _ = ring(i, width, first)
          prev, _, values = ring(i - 1, width, first)

          def issue(s_ref, o_ref):
            o_ref[...] = acc
            with scope("qk_issue"):
              plgpu.wgmma(s_ref, qo, keys.transpose((1, 0)))
              plgpu.wgmma(o_ref, p_prev, values)
            schedule_barrier()
            with scope("qk_wait"):
              qk = plgpu.wgmma_accumulator_load(s_ref, wait_n=1)
            with scope("softmax"):
              p, m_new, l_new, alpha = softmax(qk, slot, m_i, l_i, cast=False)
            with scope("pv_wait"):
              plgpu.wgmma_wait(0)
            with scope("softmax"):
              # P(i) is cast to q's dtype only now: LLVM gives it P(i - 1)'s registers
              # (the loop carry), and a definition of them while P(i - 1)'s wgmma is in
              # flight makes ptxas serialize every wgmma of the kernel (warning C7513;
              # keeping P(i - 1) live instead adds copies of it before its wgmma, which
              # do the same). The barrier keeps the cast after the wait.
              p16 = lax.optimization_barrier(p).astype(dtype)
              out = plgpu.wgmma_accumulator_load(o_ref, wait_n=None)
              out = out * lax.broadcast_in_dim(alpha, out.shape, [0])
            return out, p16, m_new, l_new

          acc, p16, m_i, l_i = pl.run_scoped(issue, acc_type, out_type)
          plgpu.barrier_arrive(v_used.at[prev])
          acc, l_i, m_i, p16 = lax.optimization_barrier((acc, l_i, m_i, p16))
          end_of_step(i)
          return acc, p16, m_i, l_i

        acc, p16, m_i, l_i = lax.fori_loop(lo + 1, hi, body, (acc, p16, m_i, l_i))
        last, _, values = ring(hi - 1, width, first)

        def last_pv(o_ref):
          with scope("pv_issue"):
            plgpu.wgmma(o_ref, p16, values)

        acc = pl.run_state(last_pv)(plgpu.ACC.init(acc))
        plgpu.barrier_arrive(v_used.at[last])
        return acc, m_i, l_i

      return lax.cond(lo < hi, segment, lambda c: c, carry)

    def key_steps(carry, qo, split=False):
      exact = functools.partial(step, comp=False, qo=qo, split=split)
      if qo is None:
        carry = lax.fori_loop(0, n_exact, exact, carry)
      else:  # the steps without padding first: no bias row to load and add
        clean = jnp.minimum(wg_clean_ref[g, t, wg], n_exact)
        if overlap:
          carry = overlapped_steps(carry, 0, clean, qo, split, masked=False)
          carry = overlapped_steps(carry, clean, n_exact, qo, split, masked=True)
        else:
          carry = lax.fori_loop(0, clean, functools.partial(exact, masked=False), carry)
          carry = lax.fori_loop(clean, n_exact, exact, carry)
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

    def compute(split):
      qo, stage, rows = qo_smem2.at[wg], stage2.at[wg], rows2.at[wg]
      # the warpgroup's 64 caller rows (-1: padding) into shared memory; offsets written as
      # (x * chunk): Mosaic must prove the TMA source 16-byte aligned
      q_row = wg_q0_ref[g, t, wg] * chunk
      if len(q_ref.shape) == 2 or len(out_ref.shape) == 2:  # rows read or written in place
        with scope("q_rows"):
          plgpu.copy_gmem_to_smem(q_rows_ref.at[g, pl.ds(q_row, BLOCK_Q)], rows,
                                  r_bar.at[wg])
          plgpu.barrier_wait(r_bar.at[wg])
      if len(q_ref.shape) == 3:  # a cluster-sorted padded copy [G, QR, D]: one copy
        with scope("q_load"):
          plgpu.copy_gmem_to_smem(q_ref.at[g, pl.ds(q_row, BLOCK_Q)], qo, q_bar.at[wg])
          plgpu.barrier_wait(q_bar.at[wg])
      else:
        # the caller's rows in place. TMA cannot gather: one row copy each, into an
        # unswizzled buffer (a 1-row box cannot land in the swizzled tiles wgmma reads),
        # then through registers into `qo`. Padding rows load row 0: computed, not written.
        with scope("q_load"):
          for r in range(BLOCK_Q):
            plgpu.copy_gmem_to_smem(q_ref.at[pl.ds(jnp.maximum(rows[r], 0), 1)],
                                    stage.at[pl.ds(r, 1)], q_bar.at[wg])
          plgpu.barrier_wait(q_bar.at[wg])
        with scope("q_restage"):
          qo[...] = plgpu.load(stage, layout=plgpu.Layout.WGMMA)
          plgpu.commit_smem()
      m_i = plgpu.layout_cast(jnp.full((BLOCK_Q,), -jnp.inf, jnp.float32),
                              plgpu.Layout.WGMMA.reduce(1))
      l_i = plgpu.layout_cast(jnp.full((BLOCK_Q,), 0, jnp.float32),
                              plgpu.Layout.WGMMA.reduce(1))
      acc = plgpu.layout_cast(jnp.full((BLOCK_Q, qo.shape[-1]), 0, jnp.float32),
                              plgpu.Layout.WGMMA)
      wait_k(jnp.int32(0))
      pl.when(wg == 1)(schedule_barrier)
      acc, _, l_i = key_steps((acc, m_i, l_i), qo, split)
      pl.when(wg == 0)(schedule_barrier)
      with scope("normalize"):
        l_i = jnp.where(l_i == 0, 1.0, l_i)
        acc /= lax.broadcast_in_dim(l_i, acc.shape, [0])
      if len(out_ref.shape) == 3:  # slot buffer [G, T * 128, D]: one copy, XLA gathers
        with scope("store"):
          qo[...] = acc.astype(dtype)
          plgpu.commit_smem()
          plgpu.copy_smem_to_gmem(qo, out_ref.at[g, pl.ds(t * TILE_Q + wg * BLOCK_Q,
                                                           BLOCK_Q)])
          plgpu.wait_smem_to_gmem(0)
        return
      with scope("store"):
        stage[...] = acc.astype(dtype)
        plgpu.commit_smem()

      # each real row straight to its place in the caller's layout (no slot buffer, no
      # gather); the tile's rows past its cluster are the next cluster's queries
      n_real = wg_n_ref[g, t, wg]

      @pl.loop(0, BLOCK_Q)
      def _(r):
        row = rows[r]

        @pl.when((r < n_real) & (row >= 0))
        def _():
          with scope("store"):
            plgpu.copy_smem_to_gmem(stage.at[pl.ds(r, 1)], out_ref.at[pl.ds(row, 1)])

      with scope("store"):
        plgpu.wait_smem_to_gmem(0)

    pl.when(live & busy & ~pair)(functools.partial(compute, False))
    pl.when(live & busy & pair)(functools.partial(compute, True))

  @pl.when(wg >= 2)
  def _producer():
    # 2 x 232 + 40 = 3 x 168 registers per thread slot, or 2 x 232 + 2 x 24 = 4 x 128
    plgpu.set_max_registers(24 if split_producers else 40, action="decrease")

    c0 = jnp.maximum(wg_c_ref[g, t, 0], 0)
    c1 = jnp.maximum(wg_c_ref[g, t, 1], 0)  # = c0 but in a pair tile
    clean = jnp.minimum(wg_clean_ref[g, t, 0], wg_clean_ref[g, t, 1])  # steps needing no bias

    def sources(i):
      """Step i: (exact, each chunk's first row, each chunk's real rows (exact steps))."""
      exact = i < n_exact
      comp_chunk = comp_base // chunk + (i - n_exact) * per_step
      rows, valid = [], []
      for j in range(per_step):
        # pair tile: chunks [i * half_step, +half_step) of each list, c0's then c1's
        pos = jnp.where(pair, jnp.minimum(i, 2 * max_steps - 1) * half_step + j % half_step,
                        jnp.minimum(i, max_steps - 1) * per_step + j)
        lst = c0 if j < half_step else jnp.where(pair, c1, c0)
        listed = chunks_ref[g, lst, pos]
        rows.append(jnp.where(exact, listed, comp_chunk + j) * chunk)
        valid.append(chunk_valid_ref[g, listed])
      return exact, rows, valid

    def issue_k(i, slot, exact, rows, valid):
      # per_step + 2 arrivals on k_bar per step: the key copies, then the key-slot biases
      # (written here; two plain arrivals) or each warpgroup's bias row (compensation)
      with scope("issue_k"):
        for j, r in enumerate(rows):
          plgpu.copy_gmem_to_smem(k_ref.at[g, pl.ds(r, chunk)],
                                  k_smem.at[slot, pl.ds(j * chunk, chunk)], k_bar.at[slot])

      @pl.when(exact & (i >= clean))
      def _():
        with scope("issue_bias"):
          col = plgpu.broadcasted_iota(jnp.int32, (BLOCK_K,), 0,
                                       layout=plgpu.Layout.WG_STRIDED((BLOCK_K,), vec_size=1))
          end = jnp.where(col < chunk, valid[0], chunk + valid[1])  # slots past the real rows
          for j in range(2, per_step):
            end = jnp.where(col < j * chunk, end, j * chunk + valid[j])
          b_smem[slot, 0] = jnp.where(col < end, 0.0, -jnp.inf).astype(jnp.float32)
          plgpu.commit_smem()  # every thread's stores, before the single-thread arrivals

      @pl.when(exact)
      def _():
        plgpu.barrier_arrive(k_bar.at[slot])
        plgpu.barrier_arrive(k_bar.at[slot])

      @pl.when(~exact)
      def _():
        for w, cw in enumerate((c0, c1)):  # each warpgroup's bias row
          if num_comp:
            plgpu.copy_gmem_to_smem(
                bias_ref.at[g, cw, pl.ds((i - n_exact) * BLOCK_K, BLOCK_K)],
                b_smem.at[slot, w], k_bar.at[slot])

    def issue_v(slot, rows):
      with scope("issue_v"):
        for j, r in enumerate(rows):
          plgpu.copy_gmem_to_smem(v_ref.at[g, pl.ds(r, chunk)],
                                  v_smem.at[slot, pl.ds(j * chunk, chunk)], v_bar.at[slot])

    def produce(keys, values):
      for s in range(mcs):
        @pl.when(s < n_steps)
        def _():
          exact, rows, valid = sources(jnp.int32(s))
          if keys:
            issue_k(jnp.int32(s), s, exact, rows, valid)
          if values:
            issue_v(s, rows)

      @pl.loop(0, jnp.maximum(n_steps - mcs, 0))
      def _(i):
        step = i + mcs
        slot = lax.rem(i, jnp.int32(mcs))
        exact, rows, valid = sources(step)  # loads before the wait hide their latency
        if keys:
          with scope("wait_k_used"):
            plgpu.barrier_wait(k_used.at[slot])
          issue_k(step, slot, exact, rows, valid)
        if values:
          with scope("wait_v_used"):
            plgpu.barrier_wait(v_used.at[slot])
          issue_v(slot, rows)

    if split_producers:
      pl.when(live & (wg == 2))(functools.partial(produce, True, False))
      pl.when(live & (wg == 3))(functools.partial(produce, False, True))
    else:
      pl.when(live)(functools.partial(produce, True, True))


def smem_bytes(d: int, mcs: int, itemsize: int) -> int:
  """Shared memory of the kernel's buffers: query tiles and their staging, the key / value
  ring, the bias rows, the row tables (barriers and Mosaic's own scratch not included)."""
  return ((4 * BLOCK_Q + 2 * mcs * BLOCK_K) * d * itemsize + mcs * 2 * BLOCK_K * 4
          + 2 * BLOCK_Q * 4)


def profile_ranges(d: int, mcs: int, itemsize: int, warpgroups: int) -> int:
  """Profiler ranges per warpgroup that fit beside the kernel's buffers: 16 bytes a range
  (two events of a tag and a clock), 3 header words per warpgroup, the 4 KB `_SMEM_BYTES`
  keeps for barriers and Mosaic's reduction scratch."""
  spare = _SMEM_BYTES - smem_bytes(d, mcs, itemsize)
  return max(spare // warpgroups - 12, 0) // 16


def _call(tables, q_in, k_pad, v_pad, *, num_out, num_comp, comp_base, mcs, scale, chunk,
          variance=False, slot_output=False, split_producers=True, overlap=False,
          out=None, profile_dir=None, profile_space=None):
  """The kernel on prepared inputs (`prepare_mgpu`): output rows [num_out, D] (the caller's
  rows, as q_rows addresses them); rows of no query tile are left unwritten
  (`_clear_uncovered`). q_in: the caller's rows [N, D], or a sorted padded copy.
  out: rows [num_out, D] to write into in place (a jax Ref the kernel writes; jax >= 0.11)
  instead of a new buffer: every row the tables do not address keeps its value.
  slot_output: [G, T * 128, D] tile slots instead (`_from_slots` gathers them).
  split_producers: two producer warpgroups (keys, values); False: one for both.
  profile_dir: write a Chrome trace of the kernel's named scopes (per CTA and warpgroup,
  at most `profile_space` ranges each, later ones dropped) into this folder per call
  (Mosaic GPU's in-kernel profiler; benchmarks/kernels.py trace sums it up). The
  profiler buffers its events in shared memory: None = as many ranges as the shared
  memory the kernel leaves holds (`profile_ranges`)."""
  per_step = BLOCK_K // chunk
  tables = KernelTables(*tables)
  g, num_tiles = tables.tile_mode.shape
  d = q_in.shape[-1]
  dtype = q_in.dtype
  max_steps = tables.chunks.shape[-1] // per_step

  def entry(*refs):
    tiling = plgpu.TilingTransform((8, 64))
    swizzle = plgpu.SwizzleTransform(128)
    smem = (
        plgpu.SMEM((2, BLOCK_Q, d), dtype, transforms=(tiling, swizzle)),
        plgpu.SMEM((2, BLOCK_Q, d), dtype),  # unswizzled staging of row copies
        plgpu.SMEM((2, BLOCK_Q), jnp.int32),
        plgpu.SMEM((mcs, BLOCK_K, d), dtype, transforms=(tiling, swizzle)),
        plgpu.SMEM((mcs, BLOCK_K, d), dtype, transforms=(tiling, swizzle)),
        plgpu.SMEM((mcs, 2, BLOCK_K), jnp.float32),  # bias rows (see _kernel)
    )
    barriers = (
        plgpu.Barrier(num_arrivals=per_step + 2, num_barriers=mcs),  # keys and biases
        plgpu.Barrier(num_arrivals=per_step, num_barriers=mcs),
        plgpu.Barrier(num_arrivals=1 if q_in.ndim == 3 else BLOCK_Q, num_barriers=2),
        plgpu.Barrier(num_barriers=2),
    )
    used = (plgpu.Barrier(num_arrivals=2, num_barriers=mcs),) * 2
    pl.run_scoped(
        lambda *scoped: _kernel(*refs, scoped, num_comp=num_comp, comp_base=comp_base,
                                max_steps=max_steps, mcs=mcs, scale=scale, dtype=dtype,
                                chunk=chunk, variance=variance,
                                split_producers=split_producers, overlap=overlap),
        smem, barriers, used, plgpu.Barrier(num_arrivals=2), collective_axes="wg")

  if profile_dir is not None and profile_space is None:
    profile_space = profile_ranges(d, mcs, q_in.dtype.itemsize, 4 if split_producers else 3)
  out_shape = (g, num_tiles * TILE_Q, d) if slot_output else (num_out, d)
  if out is not None and (out.shape != out_shape or out.dtype != dtype):
    raise ValueError(f"out must be {dtype} {out_shape}, got {out.dtype} {out.shape}")
  call = plgpu.kernel(
      entry, out_type=() if out is not None else jax.ShapeDtypeStruct(out_shape, dtype),
      # the last grid axis varies fastest: the CTAs in flight share one head's keys and
      # values (~40 MB at Wan 720p, L2-resident); heads innermost thrashed L2 (101.7 ms
      # vs 80.0 ms on the kernel benchmark's problem)
      grid=(g, num_tiles), grid_names=("head", "tile"),
      num_threads=4 if split_producers else 3, thread_name="wg",
      compiler_params=plgpu.CompilerParams(
          approx_math=True, **({} if profile_dir is None else dict(
              profile_space=profile_space, profile_dir=profile_dir,
              profile_bounds_check=True))),
  )
  # _kernel's refs: the tables in field order, then the data (the output last, as an
  # output, or as an input the kernel writes)
  if out is None:
    return call(*tables, q_in, k_pad, v_pad)
  out_ref = jax.new_ref(out)
  call(*tables, q_in, k_pad, v_pad, out_ref)
  return jax.freeze(out_ref)


def _key_chunks(seq_len, num_k_clusters, chunk):
  """Chunks of the padded keys: sum_j ceil(n_j / chunk) <= S / chunk + Kk."""
  return common.cdiv(seq_len, chunk) + num_k_clusters


def sparse_layout_mgpu(q_sizes, k_sizes, block_map, *, seq_len: int, chunk: int = CHUNK,
                       half_tiles: bool = True, pair_half_tiles: bool = True,
                       chunk_impl: str = "jnp"):
  """Tables of the Mosaic GPU kernel (shapes static in S, Kq, Kk).

  Query cluster i gets ceil(n_i / 128) tiles of 128 rows (two warpgroups of 64); its last
  tile is a half tile when it has at most 64 real rows. Half tiles either leave their
  second warpgroup idle or, paired, share a CTA with another cluster's half tile: the two
  shortest chunk lists together, and so on, so that the pair's warpgroups (which step in
  lockstep over the longer list) idle little.

  Args:
    q_sizes: [G, Kq] int, query cluster sizes (clusters are consecutive in sorted order).
    k_sizes: [G, Kk] int, key cluster sizes likewise.
    block_map: [G, Kq, Kk] bool, True = key cluster j is exact for query cluster i.
    seq_len: S.
    chunk: key (and query) rows per chunk; clusters are padded to a multiple of it.
    half_tiles: run half tiles on one warpgroup (False: every tile computes 128 rows).
    pair_half_tiles: with half_tiles, pair them (False: the second warpgroup idles).
    chunk_impl: how the chunk lists are built: "jnp" (`chunk_list_reference`), "pallas"
      (the `chunk_list` kernel; GPU) or "interpret" (the kernel in interpret mode).

  Returns:
    dict with, per tile t of T = ceil(S / 128) + Kq (full tiles of every cluster in cluster
    order, then the pair tiles, then none):
      tile_mode [G, T] int32: MODE_NONE, MODE_HALF (warpgroup 1 idles), MODE_FULL or
        MODE_PAIR (the warpgroups serve two clusters, 64 keys each per exact step),
      tile_exact [G, T] int32: the tile's exact key steps (128 slots each; a pair tile's
        longer list, in steps of 64 keys per warpgroup),
      wg_c [G, T, 2] int32: each warpgroup's query cluster (-1: none),
      wg_q0 [G, T, 2] int32: its first row in the padded queries, in units of chunk,
      wg_n [G, T, 2] int32: its real rows (the first wg_n of its 64; 0: it writes none),
      wg_clean [G, T, 2] int32: its leading exact steps with no padding slot (the tile's
        steps: 128 slots, or 64 per warpgroup in a pair tile),
    and per cluster / padded row:
      query_rows [G, QR] int32: sorted query position of each padded query row (-1 =
        padding; query clusters are padded to a multiple of chunk rows too),
      n_exact [G, Kq] int32: 128-slot key steps of each query cluster's chunk list,
      chunks [G, Kq, max_steps * BLOCK_K // chunk] int32: chunk indices (in units of
        `chunk` rows) into the padded keys: the selected clusters' full chunks, then their
        partial last chunks (`fill_chunk` past the list's end),
      key_rows [G, key_chunks * chunk] int32: sorted key position of each padded key row
        (-1 = padding),
    and fill_chunk (the all-padding chunk after the keys; centroid rows follow it).
  """
  if chunk_impl not in ("jnp", "pallas", "interpret"):
    raise ValueError(f"chunk_impl must be 'jnp', 'pallas' or 'interpret', got {chunk_impl!r}")
  g, kq, kk = block_map.shape
  s = seq_len
  per_step = BLOCK_K // chunk
  q_sizes = q_sizes.astype(jnp.int32)
  k_sizes = k_sizes.astype(jnp.int32)
  query_rows, qch_start = _padded_rows(q_sizes, jnp.cumsum(q_sizes, axis=-1) - q_sizes,
                                       common.cdiv(s, chunk) + kq, chunk)

  nch = common.cdiv(k_sizes, chunk)
  key_chunks = _key_chunks(s, kk, chunk)
  key_rows, pch_start = _padded_rows(k_sizes, jnp.cumsum(k_sizes, axis=-1) - k_sizes,
                                     key_chunks, chunk)
  # chunk list of query cluster i: the full chunks of its exact key clusters (j order),
  # then their partial last chunks (j order): its leading key steps hold no padding slot,
  # so the kernel adds no bias there (runs 0..Kk-1 full chunks, Kk..2Kk-1 partial ones)
  full = k_sizes // chunk
  cnt = jnp.concatenate([jnp.where(block_map, full[:, None, :], 0),
                         jnp.where(block_map, (nch - full)[:, None, :], 0)], -1)
  run_start = jnp.concatenate([pch_start, pch_start + full], -1)
  n_chunks = jnp.sum(cnt, axis=-1)
  n_full = jnp.sum(cnt[..., :kk], axis=-1)
  width = common.cdiv(key_chunks, per_step) * per_step
  fill_chunk = key_chunks
  if chunk_impl == "jnp":
    chunks = chunk_list.chunk_list_reference(cnt, run_start, width=width, fill=fill_chunk)
  else:
    chunks = chunk_list.chunk_list(cnt, run_start, width=width, fill=fill_chunk,
                                   interpret=chunk_impl == "interpret")
  n_exact = common.cdiv(n_chunks, per_step).astype(jnp.int32)
  tiles = _query_tiles(q_sizes, qch_start, n_exact, common.cdiv(n_chunks, per_step // 2),
                       n_full, num_tiles=common.cdiv(s, TILE_Q) + kq, chunk=chunk,
                       half_tiles=half_tiles, pair=half_tiles and pair_half_tiles)
  return dict(tiles, query_rows=query_rows, n_exact=n_exact, chunks=chunks,
              key_rows=key_rows.astype(jnp.int32), fill_chunk=fill_chunk)


def _query_tiles(q_sizes, qch_start, n_exact, n_half, n_full, *, num_tiles, chunk,
                 half_tiles, pair):
  """The tile tables of `sparse_layout_mgpu` (n_half: each list's 64-key steps; n_full:
  its leading full chunks)."""
  per_step = BLOCK_K // chunk
  g, kq = q_sizes.shape
  take = lambda a, i: jnp.take_along_axis(a, jnp.clip(i, 0, kq - 1), 1)
  per_tile = TILE_Q // chunk
  nt = common.cdiv(q_sizes, TILE_Q)
  last = q_sizes - (nt - 1) * TILE_Q  # real rows of a cluster's last tile
  is_half = (q_sizes > 0) & (last <= BLOCK_Q) if half_tiles else jnp.zeros_like(q_sizes, bool)
  n_pairs = jnp.zeros((g, 1), jnp.int32)
  paired = jnp.zeros_like(is_half)
  if pair:
    # half tiles by list length; an odd one out (the longest) keeps its idle warpgroup
    order = jnp.argsort(jnp.where(is_half, n_half, jnp.iinfo(jnp.int32).max), axis=1,
                        stable=True).astype(jnp.int32)
    n_pairs = jnp.sum(is_half, axis=1, keepdims=True, dtype=jnp.int32) // 2
    rank = jnp.zeros_like(order).at[jnp.arange(g)[:, None], order].set(
        jnp.broadcast_to(jnp.arange(kq, dtype=jnp.int32), (g, kq)))
    paired = is_half & (rank < 2 * n_pairs)
  m = nt - paired  # tiles of each cluster in the first part
  t_end = jnp.cumsum(m, axis=-1)
  t_start = t_end - m
  t = jnp.arange(num_tiles, dtype=jnp.int32)
  tc = common.searchsorted_rows(t_end, t)
  full = tc < kq
  u = t - take(t_start, tc)  # tile index within its cluster
  rows = take(q_sizes, tc) - u * TILE_Q  # real rows from the tile's first on
  q0 = take(qch_start, tc) + u * per_tile
  mode = jnp.where(full, jnp.where(half_tiles & (rows <= BLOCK_Q), MODE_HALF, MODE_FULL),
                   MODE_NONE)
  wg_c = [jnp.where(full, tc, -1)] * 2
  wg_q0 = [q0, q0 + BLOCK_Q // chunk]
  wg_n = [jnp.where(full, jnp.clip(rows, 0, BLOCK_Q), 0),
          jnp.where(full & (mode == MODE_FULL), jnp.clip(rows - BLOCK_Q, 0, BLOCK_Q), 0)]
  exact = jnp.where(full, take(n_exact, tc), 0)
  wg_clean = [jnp.where(full, take(n_full, tc) // per_step, 0)] * 2
  if pair:
    p = t - t_end[:, -1:]
    is_pair = ~full & (p < n_pairs)
    ca, cb = take(order, 2 * p), take(order, 2 * p + 1)
    half_q0 = lambda c: take(qch_start, c) + (take(nt, c) - 1) * per_tile
    mode = jnp.where(is_pair, MODE_PAIR, mode)
    wg_c = [jnp.where(is_pair, c, w) for c, w in zip((ca, cb), wg_c)]
    wg_q0 = [jnp.where(is_pair, half_q0(c), w) for c, w in zip((ca, cb), wg_q0)]
    wg_n = [jnp.where(is_pair, take(last, c), w) for c, w in zip((ca, cb), wg_n)]
    exact = jnp.where(is_pair, jnp.maximum(take(n_half, ca), take(n_half, cb)), exact)
    wg_clean = [jnp.where(is_pair, take(n_full, c) // (per_step // 2), w)
                for c, w in zip((ca, cb), wg_clean)]
  i32 = lambda a: a.astype(jnp.int32)
  return dict(tile_mode=i32(mode), tile_exact=i32(exact), wg_c=i32(jnp.stack(wg_c, -1)),
              wg_q0=i32(jnp.stack(wg_q0, -1)), wg_n=i32(jnp.stack(wg_n, -1)),
              wg_clean=i32(jnp.stack(wg_clean, -1)))


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


def _flat_rows(rows, index, shape, head0=0):
  """Rows of x.reshape(-1, D) holding sorted positions `rows` [G', N] (-1: none -> -1) of
  heads head0, head0 + 1, ... (G' of them; head0 may be traced).

  x has `shape`: [G, S, D] or tokens-first [B, S, H, D] (head g = b * H + h); index [G', S]
  maps those heads' sorted positions to token rows (None: x is already sorted).
  """
  ok = rows >= 0
  rows = jnp.maximum(rows, 0)
  if index is not None:
    rows = jnp.take_along_axis(index.astype(jnp.int32), rows, 1)
  gi = jnp.arange(rows.shape[0], dtype=jnp.int32)[:, None]
  if not (isinstance(head0, int) and head0 == 0):
    gi = gi + jnp.asarray(head0, jnp.int32)
  if len(shape) == 3:
    flat = gi * shape[1] + rows
  else:
    _, s, h, _ = shape
    flat = ((gi // h) * s + rows) * h + gi % h
  return jnp.where(ok, flat, -1).astype(jnp.int32)


def _heads_first_rows(x, rows, index, head0=0):
  """Rows `rows` [G', N] (-1: none) of sorted order gathered from x; ([G', N, D] with none
  -> row 0's values, [G', N] bool real). x, index, head0 as in `_flat_rows`."""
  flat = _flat_rows(rows, index, x.shape, head0)
  return x.reshape(-1, x.shape[-1])[jnp.maximum(flat, 0)], flat >= 0


def prepare_mgpu(q, k, v, q_sizes, k_sizes, block_map, k_centroids, v_centroids, *,
                 compensation, q_index=None, kv_index=None, chunk=CHUNK, half_tiles=True,
                 pair_half_tiles=True, sorted_queries=False,
                 chunk_impl="jnp", k_variance=None, k_radius=None, sm_scale=None, head0=0):
  """Kernel inputs: (KernelTables, q rows [N, D], padded keys, values [G', R, D], statics,
  layout) for the G' heads head0, head0 + 1, ... of q, k, v (`head0` may be traced) that
  the per-head arguments (q_sizes ... k_radius, q_index, kv_index: [G', ...]) describe.

  Keys and values are sorted by key cluster and padded (padding rows 0), then the fill
  chunk (all padding), then the centroids from row comp_base on; the tables end with each
  cluster's compensation bias row, the real rows of each padded key chunk, chunk_valid
  [G, comp_base // chunk] (a cluster's rows fill its chunks from the first; the kernel
  gives the rest bias -inf), q_rows and wg_clean.

  The queries are q itself flattened to rows (no copy): the last table, q_rows [G, QR],
  holds the row of each padded sorted query row (-1: padding), which the kernel reads and
  writes its output row to; with sorted_queries, a cluster-sorted padded copy [G, QR, D]
  instead, read with one copy per warpgroup (written through q_rows all the same).
  sm_scale is needed (and used) by "variance" compensation only.
  """
  compensation = common.compensation_mode(compensation, k_variance, k_radius, k_centroids)
  s = q.shape[1]
  g, kq, kk = block_map.shape
  lay = sparse_layout_mgpu(q_sizes, k_sizes, block_map, seq_len=s, chunk=chunk,
                           half_tiles=half_tiles, pair_half_tiles=pair_half_tiles,
                           chunk_impl=chunk_impl)
  q_rows = _flat_rows(lay["query_rows"], q_index, q.shape, head0)
  kp, ok = _heads_first_rows(k, lay["key_rows"], kv_index, head0)
  vp, _ = _heads_first_rows(v, lay["key_rows"], kv_index, head0)
  d = kp.shape[-1]
  kp = jnp.where(ok[..., None], kp, 0)
  vp = jnp.where(ok[..., None], vp, 0)
  fill = jnp.zeros((g, chunk, kp.shape[-1]), kp.dtype)
  chunk_valid = jnp.pad(ok.reshape(g, -1, chunk).sum(-1, dtype=jnp.int32), ((0, 0), (0, 1)))
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
  k_pad = jnp.concatenate([kp, fill, kc], 1)
  v_pad = jnp.concatenate([vp, fill.astype(vp.dtype), vc], 1)
  tables = KernelTables(
      tile_mode=lay["tile_mode"], tile_exact=lay["tile_exact"], wg_c=lay["wg_c"],
      wg_q0=lay["wg_q0"], wg_n=lay["wg_n"], chunks=lay["chunks"], bias=bias,
      chunk_valid=chunk_valid, q_rows=q_rows, wg_clean=lay["wg_clean"])
  statics = kernel_statics(s, kk, compensation=compensation, chunk=chunk)
  q_in = (_heads_first_rows(q, lay["query_rows"], q_index, head0)[0] if sorted_queries
          else q.reshape(-1, q.shape[-1]))
  return tables, q_in, k_pad, v_pad, statics, lay


def call_heads(num_heads: int, heads_per_call: int | None = None) -> int:
  """Heads per kernel call of `sparse_attention_mgpu` (G = num_heads in all).

  heads_per_call caps it (>= 1); None: the fewest calls of at most CALL_HEADS heads each,
  of equal size where a divisor of G allows it within twice the fewest calls.
  """
  if heads_per_call is not None:
    if isinstance(heads_per_call, bool) or not isinstance(heads_per_call, int) \
        or heads_per_call < 1:
      raise ValueError(f"heads_per_call must be a positive int or None, got {heads_per_call!r}")
    return min(heads_per_call, num_heads)
  fewest = common.cdiv(num_heads, CALL_HEADS)
  for calls in range(fewest, 2 * fewest + 1):
    if num_heads % calls == 0:
      return num_heads // calls
  return common.cdiv(num_heads, fewest)


def kernel_statics(seq_len: int, num_k_clusters: int, *, compensation,
                   chunk: int = CHUNK) -> dict:
  """Static arguments of the kernel (`_call`) and `emulate_kernel` for these sizes."""
  if isinstance(compensation, bool):
    compensation = "mean" if compensation else "none"
  # centroid rows follow the keys and the fill chunk (see prepare_mgpu)
  comp_base = (_key_chunks(seq_len, num_k_clusters, chunk) + 1) * chunk
  per = HALF_K if compensation == "variance" else BLOCK_K
  return dict(num_comp=0 if compensation == "none" else common.cdiv(num_k_clusters, per),
              comp_base=comp_base, chunk=chunk, variance=compensation == "variance")


def _from_slots(out_slots, tables, query_rows, q_index, shape, chunk):
  """Slot-space output [G, T * 128, D] (slot t * 128 + w * 64 + r: row r of warpgroup w of
  tile t) -> the caller's rows [N, D] (rows of no query cluster: 0). An XLA gather."""
  tables = KernelTables(*tables)
  mode, wg_q0, wg_n = tables.tile_mode, tables.wg_q0, tables.wg_n
  g, nt = mode.shape
  s = shape[1]
  qr = query_rows.shape[1]
  r = jnp.arange(BLOCK_Q, dtype=jnp.int32)
  padded = jnp.minimum(wg_q0[..., None] * chunk + r, qr - 1)  # [G, T, 2, 64]
  pos = jnp.take_along_axis(query_rows, padded.reshape(g, -1), 1)
  written = (r < wg_n[..., None]).reshape(g, -1) & (pos >= 0)
  slot = jnp.broadcast_to(jnp.arange(nt * TILE_Q, dtype=jnp.int32), (g, nt * TILE_Q))
  gi = jnp.arange(g)[:, None]
  q_slot = jnp.full((g, s), -1, jnp.int32).at[gi, jnp.where(written, pos, s)].set(
      slot, mode="drop")  # sorted position -> slot
  flat = _flat_rows(jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (g, s)), q_index, shape)
  src = jnp.where(q_slot >= 0, gi * (nt * TILE_Q) + q_slot, -1)
  # the caller's row flat[g, p] takes sorted position p's slot
  table = jnp.full((math.prod(shape[:-1]),), -1, jnp.int32).at[flat.reshape(-1)].set(
      src.reshape(-1))
  out = out_slots.reshape(-1, out_slots.shape[-1])[jnp.maximum(table, 0)]
  return jnp.where((table >= 0)[:, None], out, 0)


def _clear_uncovered(out, q_sizes, q_index, shape):
  """Zeroes the rows of out [N, D] (q's rows) whose sorted position is in no query cluster:
  no tile writes them. A scatter of the few such rows (usually none), in place."""
  g, s = q_sizes.shape[0], shape[1]
  pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (g, s))
  covered = pos < jnp.sum(q_sizes.astype(jnp.int32), axis=1, keepdims=True)
  rows = _flat_rows(jnp.where(covered, -1, pos), q_index, shape)
  rows = jnp.where(rows >= 0, rows, out.shape[0])  # out of bounds: dropped
  return out.at[rows.reshape(-1)].set(0, mode="drop")


def emulate_kernel(tables, q_flat, k_pad, v_pad, *, num_comp, comp_base, scale, chunk,
                   variance=False, slot_output=False, out=None):
  """What the kernel computes, warpgroup by warpgroup, in float32 jnp (the CPU check of the
  tables).

  Returns the output rows [N, D] like q_flat. Follows the kernel's data path: a
  warpgroup's 64 query rows read through q_rows (padding and rows past the table read row
  0), the chunks of its cluster's list that its tile's exact steps visit (a pair tile's
  64-key steps visit half as many per step), padded key rows masked by their key-row
  bias past the warpgroup's clean steps (none in them), compensation
  steps with its cluster's bias row; it writes its first wg_n rows to their q_rows, and
  every other row is left NaN (the kernel leaves it unwritten), or as in `out` [N, D]
  when given (`_call(out=...)`). slot_output: the slot buffer [G, T * 128, D] instead
  (every row of every warpgroup). Small sizes only.
  """
  (tile_mode, tile_exact, wg_c, wg_q0, wg_n, chunks, bias, chunk_valid, q_rows,
   wg_clean) = KernelTables(*tables)
  g, nt = tile_mode.shape
  qr = q_rows.shape[1]
  d = q_flat.shape[-1]
  per_step = BLOCK_K // chunk
  f32 = lambda x: x.astype(jnp.float32)
  hi = lax.Precision.HIGHEST

  def group_rows(gi, t, w):  # the caller's row of each of the 64 rows; -1: not written
    rows = wg_q0[gi, t, w] * chunk + jnp.arange(BLOCK_Q)
    flat = jnp.where(rows < qr, q_rows[gi, jnp.minimum(rows, qr - 1)], 0)
    mode = tile_mode[gi, t]
    computes = (mode == MODE_FULL) | (mode == MODE_PAIR) | ((mode == MODE_HALF) & (w == 0))
    written = computes & (jnp.arange(BLOCK_Q) < wg_n[gi, t, w])
    return jnp.where(written, flat, -1), flat

  def group(gi, t, w):
    c = jnp.maximum(wg_c[gi, t, w], 0)
    qt = f32(q_flat[jnp.maximum(group_rows(gi, t, w)[1], 0)])
    per = jnp.where(tile_mode[gi, t] == MODE_PAIR, per_step // 2, per_step)
    slot = jnp.arange(chunks.shape[-1] * chunk)
    krow = chunks[gi, c, slot // chunk] * chunk + slot % chunk
    # no bias in the warpgroup's clean steps: wrong tables would let padding rows in
    real = ((slot // chunk < wg_clean[gi, t, w] * per)
            | (slot % chunk < chunk_valid[gi, chunks[gi, c, slot // chunk]]))
    s = (jnp.einsum("qd,kd->qk", qt, f32(k_pad[gi, krow]), precision=hi) * scale
         + jnp.where(real, 0.0, -jnp.inf)[None, :])
    visited = slot // chunk < tile_exact[gi, t] * per
    s = jnp.where(visited[None, :], s, -jnp.inf)
    vals = f32(v_pad[gi, krow])
    if num_comp:
      crow = comp_base + jnp.arange(num_comp * BLOCK_K)
      kc, vc, b = f32(k_pad[gi, crow]), f32(v_pad[gi, crow]), bias[gi, c]
      if variance:  # steps of [64 centroids ; their 64 pseudo-keys]
        split = lambda x: x.reshape(num_comp, 2, HALF_K, *x.shape[1:])
        (kc, w_), (vc, _), (b, rr) = (
            (split(x)[:, 0].reshape(-1, *x.shape[1:]), split(x)[:, 1].reshape(-1, *x.shape[1:]))
            for x in (kc, vc, b))
      sc = jnp.einsum("qd,kd->qk", qt, kc, precision=hi) * scale + b[None, :]
      if variance:
        q_sq = f32((qt * qt).astype(q_flat.dtype))
        second = jnp.einsum("qd,kd->qk", q_sq, w_, precision=hi) * scale
        bound = jnp.sqrt(jnp.sum(qt * qt, 1))[:, None] * rr[None, :]
        sc = sc + jnp.minimum(second, bound)
      s = jnp.concatenate([s, sc], 1)
      vals = jnp.concatenate([vals, vc], 0)
    m = jnp.max(s, axis=1, keepdims=True)
    p = jnp.exp2(s - jnp.where(m == -jnp.inf, 0., m))
    l = p.sum(axis=1, keepdims=True)
    return jnp.einsum("qk,kd->qd", p, vals, precision=hi) / jnp.where(l == 0, 1., l)

  over = lambda f: jax.vmap(lambda gi: jax.vmap(lambda t: jax.vmap(lambda w: f(gi, t, w))(
      jnp.arange(2)))(jnp.arange(nt)))(jnp.arange(g))
  out_rows = over(group).reshape(-1, d)
  if slot_output:
    return out_rows.reshape(g, nt * TILE_Q, d)
  dest = over(lambda gi, t, w: group_rows(gi, t, w)[0]).reshape(-1)
  dest = jnp.where(dest >= 0, dest, q_flat.shape[0])
  base = jnp.full(q_flat.shape, jnp.nan, jnp.float32) if out is None else f32(out)
  return base.at[dest].set(out_rows, mode="drop")


@functools.partial(jax.jit, static_argnames=(
    "compensation", "sm_scale", "max_concurrent_steps", "chunk_rows", "half_tiles",
    "pair_half_tiles", "sorted_queries", "slot_output", "split_producers",
    "overlap_softmax", "heads_per_call", "emulate"))
def sparse_attention_mgpu(q, k, v, q_sizes, k_sizes, block_map, k_centroids, v_centroids, *,
                          compensation, sm_scale: float, q_index=None, kv_index=None,
                          k_variance=None, k_radius=None,
                          max_concurrent_steps: int = 2, chunk_rows: int = CHUNK,
                          half_tiles: bool = True, pair_half_tiles: bool = True,
                          sorted_queries: bool = False, slot_output: bool = False,
                          split_producers: bool = True, overlap_softmax: bool = True,
                          heads_per_call: int | None = None, emulate: bool = False):
  """Mosaic GPU version of `sparse_attention.sparse_attention` (same arguments and result).

  Args:
    q, k, v: [G, S, D] in cluster-sorted order, or tokens-first [B, S, H, D] (G = B * H)
      in token order read through q_index / kv_index; D a multiple of 64, bf16 or f16.
    q_sizes, k_sizes, block_map, k_centroids, v_centroids, compensation, sm_scale, q_index,
      kv_index, k_variance, k_radius: as in `sparse_attention`.
    max_concurrent_steps: key steps in flight (shared-memory ring depth, >= 2).
    chunk_rows: rows per TMA copy of keys/values (8, 16, 32 or 64); every query and key
      cluster is padded to a multiple of it.
    half_tiles: run a tile whose last 64 rows are padding (a half tile) on one
      warpgroup (False: every tile computes 128 rows; for comparisons).
    pair_half_tiles: with half_tiles, pair the half tiles of two query clusters in one
      CTA, one per warpgroup (False: the second warpgroup of a half tile idles).
    sorted_queries: read the queries from a cluster-sorted padded copy (one TMA copy per
      warpgroup, +1 copy of q in memory) instead of row by row in place; for comparisons.
    slot_output: write 64-row tiles to a slot buffer that XLA gathers back into the
      caller's layout (+1 output-sized buffer and a gather) instead of row by row in
      place; for comparisons.
    split_producers: stream keys and values from two producer warpgroups (each issues
      half of a key step's TMA copies; 24 registers each); False: one producer (40
      registers) for both, for comparisons.
    overlap_softmax: overlap each exact step's softmax with the previous step's P.V
      wgmma inside a warpgroup (FlashAttention-3's intra-warpgroup pipelining) on top of
      the ping-pong between warpgroups (False: for comparisons).
    heads_per_call: run the kernel on at most this many heads at a time (its sorted
      copies and chunk lists, most of the call's memory, then exist for those heads only;
      the calls write one output in place, in a loop). None: `call_heads`'s choice (with
      slot_output: one call, the only choice there).
    emulate: run `emulate_kernel` (float32 jnp) instead of the kernel: CPU tests.

  Returns:
    q's shape and dtype, in q_index's token order when given. Positions of no query
    cluster, and queries with nothing to attend, are 0.
  """
  g, _ = common.check_heads(q, k, v, block_map)
  d = q.shape[-1]
  gs = g if slot_output and heads_per_call is None else call_heads(g, heads_per_call)
  if slot_output and gs < g:
    raise ValueError(f"slot_output writes one buffer per call: it needs heads_per_call >= "
                     f"{g} (the heads), got {heads_per_call}")
  if not emulate:
    if d % 64:
      raise ValueError(f"head_dim {d} must be a multiple of 64 for the Mosaic GPU kernel")
    if q.dtype not in (jnp.bfloat16, jnp.float16):
      raise ValueError(f"the Mosaic GPU kernel takes bf16 or f16 inputs, got {q.dtype}")
  if max_concurrent_steps < 2:
    raise ValueError("max_concurrent_steps must be >= 2")
  if chunk_rows not in (8, 16, 32, 64):
    raise ValueError(f"chunk_rows must be 8, 16, 32 or 64, got {chunk_rows}")
  smem = smem_bytes(d, max_concurrent_steps, q.dtype.itemsize)
  if not emulate and smem > _SMEM_BYTES:
    raise ValueError(f"max_concurrent_steps={max_concurrent_steps} with head_dim {d} needs "
                     f"{smem} bytes of shared memory (> {_SMEM_BYTES}); use fewer steps")
  scale = sm_scale * _LOG2E
  per_head = dict(q_sizes=q_sizes, k_sizes=k_sizes, block_map=block_map,
                  k_centroids=k_centroids, v_centroids=v_centroids, q_index=q_index,
                  kv_index=kv_index, k_variance=k_variance, k_radius=k_radius)

  def attend(head0, out):
    """Heads head0 .. head0 + gs - 1 written into out (None: a new buffer)."""
    heads = {n: None if a is None else lax.dynamic_slice_in_dim(a, head0, gs, 0)
             for n, a in per_head.items()} if gs < g else per_head
    tables, q_in, k_pad, v_pad, statics, lay = prepare_mgpu(
        q, k, v, **heads, compensation=compensation, chunk=chunk_rows,
        half_tiles=half_tiles, pair_half_tiles=pair_half_tiles,
        sorted_queries=sorted_queries and not emulate,
        chunk_impl="jnp" if emulate else "pallas", sm_scale=sm_scale, head0=head0)
    if emulate:
      out = emulate_kernel(tables, q_in, k_pad, v_pad, scale=scale, slot_output=slot_output,
                           out=out, **statics)
    else:
      out = _call(tables, q_in, k_pad, v_pad, num_out=q.size // d, mcs=max_concurrent_steps,
                  scale=scale, slot_output=slot_output, split_producers=split_producers,
                  overlap=overlap_softmax, out=out, **statics)
    return out, tables, lay

  out, tables, lay = attend(0, None)
  if gs < g:
    # a loop, not unrolled calls: each call's sorted copies and tables then reuse one
    # buffer; the last call's heads may overlap the one before (rewritten, same values)
    out = lax.fori_loop(1, common.cdiv(g, gs),
                        lambda i, o: attend(jnp.minimum(i * gs, g - gs), o)[0], out)
  if slot_output:
    out = _from_slots(out, tables, lay["query_rows"], q_index, q.shape, chunk_rows)
  else:
    out = _clear_uncovered(out, q_sizes, q_index, q.shape)
  return out.reshape(q.shape).astype(q.dtype)
