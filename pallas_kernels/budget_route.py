"""Budgeted block selection without a sort: each query cluster's row keeps its `num_forced`
highest-priority blocks, then more blocks by descending score while the cost spent before
a block is below the budget left (SVG-EAR's routing, ALGORITHM.md 2(e); SVG2's fixed
density).

XLA does this with two stable argsorts of every [Kk] row (~0.54 ms each at Wan 720p on an
H200, G * Kq = 12,000 rows of 1000: breakdown_h200.md; `lax.top_k` for the forced ones is
no faster, 0.55 ms). A row's kept set is a prefix of its order, so it is fixed by the last
block it keeps; this kernel finds that block by bisection on the float's bits (32 steps of
a masked count or sum over the row, held in registers), and resolves ties on the value by
index with a cumulative sum, as the stable sort does.

The costs are summed over a row in a tree order instead of the sort's running order, so
where a prefix's float32 sum lands within rounding of the budget the two may keep one
block more or less; with integer costs whose sums are exact (< 2^24) they agree exactly.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import common

_INT_MIN = -2 ** 31
_INT_MAX = 2 ** 31 - 1


def _order_key(x):
  """int32 with the order of float32 x (no NaN; -0.0 equal to +0.0, as in jnp.argsort)."""
  # (not x + 0.0: XLA folds that to x)
  b = lax.bitcast_convert_type(jnp.where(x == 0, 0.0, x), jnp.int32)
  return jnp.where(b >= 0, b, b ^ _INT_MAX)


def _midpoint(lo, hi):
  # floor((lo + hi) / 2) without int32 overflow
  return (lo >> 1) + (hi >> 1) + (lo & hi & 1)


def _bisect(pred, lo, hi):
  """Per row, the boundary of a predicate on int32 thresholds that holds at lo and not at
  hi and flips once in between: (lo, hi) with hi = lo + 1 after 32 halvings of 2^32."""
  def body(_, carry):
    lo, hi = carry
    mid = _midpoint(lo, hi)
    ok = pred(mid)
    return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)
  return lax.fori_loop(0, 32, body, (lo, hi))


def _kernel(p_ref, s_ref, c_ref, b_ref, o_ref, *, block_rows, num_rows, num_cols,
            block_cols, num_forced):
  rows = pl.program_id(0) * block_rows + jnp.arange(block_rows)
  cols = jnp.arange(block_cols)
  row_ok = rows < num_rows
  valid = row_ok[:, None] & (cols < num_cols)[None, :]
  at = lambda ref: ref.at[rows[:, None], cols[None, :]]
  cost = plgpu.load(at(c_ref), mask=valid, other=0.)
  budget = plgpu.load(b_ref.at[rows], mask=row_ok, other=0.)
  lo0 = jnp.full((block_rows,), _INT_MIN, jnp.int32)
  hi0 = jnp.full((block_rows,), _INT_MAX, jnp.int32)
  count = lambda m: jnp.sum(m.astype(jnp.int32), axis=1)

  if num_forced:
    # the num_forced-th largest priority t: the largest threshold with >= num_forced
    # entries at or above it (NaN-free keys are < INT_MAX, so none is at or above hi0)
    pkey = _order_key(plgpu.load(at(p_ref), mask=valid, other=0.))
    m = min(num_forced, num_cols)
    t, _ = _bisect(lambda x: count(valid & (pkey >= x[:, None])) >= m, lo0, hi0)
    above = valid & (pkey > t[:, None])
    tie = valid & (pkey == t[:, None])
    forced = above | (tie & (jnp.cumsum(tie.astype(jnp.int32), axis=1)
                             <= (m - count(above))[:, None]))
  else:
    forced = jnp.zeros(valid.shape, jnp.bool_)
  left = jnp.maximum(budget - jnp.sum(jnp.where(forced, cost, 0.), axis=1), 0.)

  # the others in descending score: block e is kept while the cost before it (every block
  # with a higher score, and those of its score with a lower index) is below `left`. With
  # spent(x) = the cost of the blocks above x, the last kept score u is the smallest with
  # spent(u) < left; then the ties at u go by index.
  eligible = valid & ~forced
  skey = _order_key(plgpu.load(at(s_ref), mask=valid, other=0.))
  spent = lambda x: jnp.sum(jnp.where(eligible & (skey > x[:, None]), cost, 0.), axis=1)
  total = jnp.sum(jnp.where(eligible, cost, 0.), axis=1)
  # spent(INT_MIN) = total >= left there (else everything is kept, below)
  _, u = _bisect(lambda x: spent(x) >= left, lo0, hi0)
  tie = eligible & (skey == u[:, None])
  tie_cost = jnp.where(tie, cost, 0.)
  before = spent(u)[:, None] + jnp.cumsum(tie_cost, axis=1) - tie_cost
  kept = eligible & ((skey > u[:, None]) | (tie & (before < left[:, None])))
  kept = jnp.where((total < left)[:, None], eligible, kept)
  kept = kept & (left > 0.)[:, None]
  plgpu.store(at(o_ref), (forced | kept).astype(jnp.int8), mask=valid)


@functools.partial(jax.jit, static_argnames=("num_forced", "block_rows", "num_warps",
                                             "interpret"))
def budget_route(priority, score, cost, budget, *, num_forced: int, block_rows: int = 1,
                 num_warps: int = 2, interpret: bool = False):
  """Forced top-`num_forced` blocks by priority, then greedy by score under the budget.

  Args:
    priority: [G, R, K] float32: a row's `num_forced` largest are always kept (ties: the
      lower index first).
    score: [G, R, K] float32 order of the other blocks (ties: the lower index first).
    cost: [G, R, K] float32 >= 0 (the block's area).
    budget: [G, R] float32 cost for the row; the forced blocks' cost is spent first, the
      rest goes to the others while the cost before a block is below what is left (the
      last one may overshoot; +inf keeps all).
    num_forced: static, >= 0.
    block_rows: rows per program (a power of two); num_warps: Triton warps. The defaults
      were the fastest on an H200 at Wan 720p (G=40, Kq=300, Kk=1000, 2026-12-04):
      0.24 ms, vs 0.32 ms with 4 rows and 4 warps, 1.29 ms for the XLA sorts
      (`svg_ear_jax.routing.forced_then_greedy`) at that shape.
    interpret: Pallas interpret mode (CPU).

  Returns:
    [G, R, K] bool block map. No NaN may be in priority, score, cost or budget.
  """
  if priority.ndim != 3 or score.shape != priority.shape or cost.shape != priority.shape:
    raise ValueError(f"priority, score, cost must share one [G, R, K] shape, got "
                     f"{priority.shape}, {score.shape}, {cost.shape}")
  if budget.shape != priority.shape[:2]:
    raise ValueError(f"budget must be [G, R] = {priority.shape[:2]}, got {budget.shape}")
  if isinstance(num_forced, bool) or not isinstance(num_forced, int) or num_forced < 0:
    raise ValueError(f"num_forced must be an int >= 0, got {num_forced!r}")
  if block_rows < 1 or block_rows & (block_rows - 1):
    raise ValueError(f"block_rows={block_rows} must be a power of two")
  g, r, k = priority.shape
  f32 = lambda x: x.astype(jnp.float32)
  kernel = functools.partial(_kernel, block_rows=block_rows, num_rows=r, num_cols=k,
                             block_cols=common.next_pow2(k), num_forced=num_forced)
  out = pl.pallas_call(
      kernel, grid=(common.cdiv(r, block_rows), g),
      in_specs=[common.head_spec(priority.shape)] * 3 + [common.head_spec(budget.shape)],
      out_specs=common.head_spec(priority.shape),
      out_shape=jax.ShapeDtypeStruct(priority.shape, jnp.int8), interpret=interpret,
      name="svg_ear_budget_route",
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
  )(f32(priority), f32(score), f32(cost), f32(budget))
  return out != 0


def budget_route_reference(priority, score, cost, budget, *, num_forced: int):
  """`budget_route` by its definition: stable descending sorts, a running sum of the costs
  in score order, and the kept ranks scattered back ([G, R, K] bool)."""
  def by_rank(order, keep):
    return jnp.zeros(keep.shape, bool).at[
        jnp.arange(keep.shape[0])[:, None, None], jnp.arange(keep.shape[1])[None, :, None],
        order].set(keep)

  k = priority.shape[-1]
  rank = jnp.arange(k)
  order = jnp.argsort(-priority, axis=-1, stable=True)
  forced = by_rank(order, jnp.broadcast_to(rank < num_forced, priority.shape))
  left = jnp.maximum(budget - jnp.sum(jnp.where(forced, cost, 0.), axis=-1), 0.)
  order = jnp.argsort(-jnp.where(forced, -jnp.inf, score), axis=-1, stable=True)
  sorted_cost = jnp.take_along_axis(jnp.where(forced, 0., cost), order, axis=-1)
  before = jnp.cumsum(sorted_cost, axis=-1) - sorted_cost
  not_forced = ~jnp.take_along_axis(forced, order, axis=-1)
  return forced | by_rank(order, not_forced & (before < left[..., None]))
