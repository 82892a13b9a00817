"""Budgeted block selection without a sort: each query cluster's row keeps its `num_forced`
highest-priority blocks, then more blocks by descending score while the cost spent before
a block is below the budget left (SVG-EAR's routing, ALGORITHM.md 2(e); SVG2's fixed
density). The budget is given, or it is the cost of the row's top-p set of priority
(SVG-EAR's default, density None), found the same way.

XLA does this with stable argsorts of every [Kk] row (~0.54 ms each at Wan 720p on an
H200, G * Kq = 12,000 rows of 1000: breakdown_h200.md; `lax.top_k` for the forced ones is
no faster, 0.55 ms): two with a given budget, three with the top-p one. A row's kept set
is a prefix of its order, so it is fixed by the last block it keeps; this kernel finds that
block by bisection on the float's bits (32 steps of a masked count or sum over the row,
held in registers), and resolves ties on the value by index with a cumulative sum, as the
stable sort does.

The costs are summed over a row in a tree order instead of the sort's running order, so
where a prefix's float32 sum lands within rounding of the budget the two may keep one
block more or less; with integer costs whose sums are exact (< 2^24) they agree exactly.
"""

import functools
from typing import Optional

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


def _bisect(pred, num_rows):
  """Per row, the boundary of a predicate on int32 thresholds that holds at INT_MIN and
  not at INT_MAX and flips once in between: (lo, hi) with hi = lo + 1 after 32 halvings
  of 2^32."""
  def body(_, carry):
    lo, hi = carry
    mid = _midpoint(lo, hi)
    ok = pred(mid)
    return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)
  return lax.fori_loop(0, 32, body, (jnp.full((num_rows,), _INT_MIN, jnp.int32),
                                     jnp.full((num_rows,), _INT_MAX, jnp.int32)))


def _top(key, valid, m):
  """The m largest keys of every row (ties: the lower index), m >= 1 static."""
  count = lambda x: jnp.sum(x.astype(jnp.int32), axis=1)
  # the m-th largest t: the largest threshold with >= m keys at or above it (NaN-free
  # keys are < INT_MAX, so none is at or above INT_MAX)
  t, _ = _bisect(lambda x: count(valid & (key >= x[:, None])) >= m, key.shape[0])
  above = valid & (key > t[:, None])
  tie = valid & (key == t[:, None])
  return above | (tie & (jnp.cumsum(tie.astype(jnp.int32), axis=1)
                         <= (m - count(above))[:, None]))


def _prefix(key, weight, eligible, limit, strict):
  """The eligible entries in descending key order (ties: the lower index) while the weight
  before each is below `limit` [rows] (strict) or at most it: a prefix of the order.

  With spent(x) = the weight of the entries above x, the last key kept u is the smallest
  with spent(u) < limit (<=); the ties at u then go by index through a cumsum.
  """
  def ok(a):  # a: [rows] or [rows, cols]
    lim = limit if a.ndim == 1 else limit[:, None]
    return a < lim if strict else a <= lim
  spent = lambda x: jnp.sum(jnp.where(eligible & (key > x[:, None]), weight, 0.), axis=1)
  # spent(INT_MIN) is the whole weight, which fails ok() there unless all is kept (below);
  # spent(INT_MAX) = 0 passes it unless nothing is
  _, u = _bisect(lambda x: ~ok(spent(x)), key.shape[0])
  tie = eligible & (key == u[:, None])
  tie_weight = jnp.where(tie, weight, 0.)
  before = spent(u)[:, None] + jnp.cumsum(tie_weight, axis=1) - tie_weight
  kept = eligible & ((key > u[:, None]) | (tie & ok(before)))
  everything = ok(jnp.sum(jnp.where(eligible, weight, 0.), axis=1))
  nothing = ~ok(jnp.zeros_like(limit))
  return jnp.where(everything[:, None], eligible, kept) & ~nothing[:, None]


def _kernel(p_ref, s_ref, c_ref, *refs, block_rows, num_rows, num_cols, block_cols,
            num_forced, top_p, num_floor):
  o_ref = refs[-1]
  rows = pl.program_id(0) * block_rows + jnp.arange(block_rows)
  cols = jnp.arange(block_cols)
  row_ok = rows < num_rows
  valid = row_ok[:, None] & (cols < num_cols)[None, :]
  at = lambda ref: ref.at[rows[:, None], cols[None, :]]
  cost = plgpu.load(at(c_ref), mask=valid, other=0.)
  if num_forced or top_p is not None:
    priority = plgpu.load(at(p_ref), mask=valid, other=0.)
    pkey = _order_key(priority)

  if top_p is None:
    budget = plgpu.load(refs[0].at[rows], mask=row_ok, other=0.)
  elif top_p >= 1.0:
    budget = jnp.full((block_rows,), jnp.inf, jnp.float32)
  else:
    # the top-p set: descending priority while the mass before is <= top_p, and the
    # num_floor first; its cost is the budget, +inf when it is the whole row
    kept = _prefix(pkey, priority, valid, jnp.full((block_rows,), top_p, jnp.float32),
                   strict=False)
    if num_floor:
      kept = kept | _top(pkey, valid, min(num_floor, num_cols))
    budget = jnp.sum(jnp.where(kept, cost, 0.), axis=1)
    whole = jnp.sum(kept.astype(jnp.int32), axis=1) == num_cols
    budget = jnp.where(whole, jnp.inf, budget)

  if num_forced:
    forced = _top(pkey, valid, min(num_forced, num_cols))
  else:
    forced = jnp.zeros(valid.shape, jnp.bool_)
  left = jnp.maximum(budget - jnp.sum(jnp.where(forced, cost, 0.), axis=1), 0.)
  # the others in descending score while the cost before each is below what is left
  skey = _order_key(plgpu.load(at(s_ref), mask=valid, other=0.))
  kept = _prefix(skey, cost, valid & ~forced, left, strict=True)
  plgpu.store(at(o_ref), (forced | kept).astype(jnp.int8), mask=valid)


@functools.partial(jax.jit, static_argnames=("num_forced", "top_p", "num_floor", "block_rows",
                                             "num_warps", "interpret"))
def budget_route(priority, score, cost, budget=None, *, num_forced: int,
                 top_p: Optional[float] = None, num_floor: int = 0, block_rows: int = 1,
                 num_warps: int = 2, interpret: bool = False):
  """Forced top-`num_forced` blocks by priority, then greedy by score under the budget.

  Args:
    priority: [G, R, K] float32: a row's `num_forced` largest are always kept (ties: the
      lower index first).
    score: [G, R, K] float32 order of the other blocks (ties: the lower index first).
    cost: [G, R, K] float32 >= 0 (the block's area).
    budget: [G, R] float32 cost for the row; the forced blocks' cost is spent first, the
      rest goes to the others while the cost before a block is below what is left (the
      last one may overshoot; +inf keeps all). None: the cost of the row's top-p set of
      priority (SVG2's budget: descending priority while the mass before is <= top_p,
      plus the `num_floor` largest; +inf when the set is the whole row).
    num_forced: static, >= 0.
    top_p, num_floor: static, the top-p budget's (only with budget None).
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
  if (budget is None) == (top_p is None):
    raise ValueError("give either a budget or top_p (the top-p budget), not both or neither")
  if budget is not None and budget.shape != priority.shape[:2]:
    raise ValueError(f"budget must be [G, R] = {priority.shape[:2]}, got {budget.shape}")
  if top_p is not None and not 0.0 <= top_p:
    raise ValueError(f"top_p must be >= 0, got {top_p!r}")
  for name, n in (("num_forced", num_forced), ("num_floor", num_floor)):
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
      raise ValueError(f"{name} must be an int >= 0, got {n!r}")
  if block_rows < 1 or block_rows & (block_rows - 1):
    raise ValueError(f"block_rows={block_rows} must be a power of two")
  g, r, k = priority.shape
  f32 = lambda x: x.astype(jnp.float32)
  kernel = functools.partial(_kernel, block_rows=block_rows, num_rows=r, num_cols=k,
                             block_cols=common.next_pow2(k), num_forced=num_forced,
                             top_p=None if top_p is None else float(top_p),
                             num_floor=num_floor)
  args = [f32(priority), f32(score), f32(cost)] + ([] if budget is None else [f32(budget)])
  out = pl.pallas_call(
      kernel, grid=(common.cdiv(r, block_rows), g),
      in_specs=[common.head_spec(priority.shape)] * 3
      + ([] if budget is None else [common.head_spec(budget.shape)]),
      out_specs=common.head_spec(priority.shape),
      out_shape=jax.ShapeDtypeStruct(priority.shape, jnp.int8), interpret=interpret,
      name="svg_ear_budget_route",
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
  )(*args)
  return out != 0


def budget_route_reference(priority, score, cost, budget=None, *, num_forced: int,
                           top_p: Optional[float] = None, num_floor: int = 0):
  """`budget_route` by its definition: stable descending sorts, running sums in sort
  order, and the kept ranks scattered back ([G, R, K] bool)."""
  def by_rank(order, keep):
    return jnp.zeros(keep.shape, bool).at[
        jnp.arange(keep.shape[0])[:, None, None], jnp.arange(keep.shape[1])[None, :, None],
        order].set(keep)

  k = priority.shape[-1]
  rank = jnp.arange(k)
  order = jnp.argsort(-priority, axis=-1, stable=True)
  if budget is None:
    mass = jnp.take_along_axis(priority, order, axis=-1)
    keep = ((jnp.cumsum(mass, axis=-1) - mass <= top_p) | (rank < num_floor)
            if top_p < 1.0 else jnp.ones(priority.shape, bool))
    budget = jnp.sum(jnp.where(by_rank(order, keep), cost, 0.), axis=-1)
    budget = jnp.where(jnp.all(keep, axis=-1), jnp.inf, budget)
  forced = by_rank(order, jnp.broadcast_to(rank < num_forced, priority.shape))
  left = jnp.maximum(budget - jnp.sum(jnp.where(forced, cost, 0.), axis=-1), 0.)
  order = jnp.argsort(-jnp.where(forced, -jnp.inf, score), axis=-1, stable=True)
  sorted_cost = jnp.take_along_axis(jnp.where(forced, 0., cost), order, axis=-1)
  before = jnp.cumsum(sorted_cost, axis=-1) - sorted_cost
  not_forced = ~jnp.take_along_axis(forced, order, axis=-1)
  return forced | by_rank(order, not_forced & (before < left[..., None]))
