"""Which (query cluster, key cluster) blocks are computed exactly.

All functions work on cluster-level arrays with G = B * H independent problems:
logits [G, Kq, Kk], sizes [G, Kq] / [G, Kk]; they return a bool block map [G, Kq, Kk]
(True = exact). ALGORITHM.md 2(c) (SVG2 top-p) and 2(e) (error-aware routing).
"""

from typing import Callable, Optional

import jax
import jax.numpy as jnp
from jax import lax

from svg_ear_jax.config import SvgEarConfig

_EPS = 1e-8  # the reference's clamp of errors and areas, and its size prior offset


def centroid_logits(q_centroids: jax.Array, k_centroids: jax.Array, scale: float) -> jax.Array:
  """c_ij = q_i . k_j * scale in float32: [G, Kq, D] x [G, Kk, D] -> [G, Kq, Kk]."""
  return jnp.einsum("gqd,gkd->gqk", q_centroids.astype(jnp.float32),
                    k_centroids.astype(jnp.float32), precision=lax.Precision.HIGHEST) * scale


def _descending(x: jax.Array) -> jax.Array:
  return jnp.argsort(-x, axis=-1, stable=True)


def _prefix_mask(x: jax.Array, order: jax.Array, count: jax.Array) -> jax.Array:
  """rank < count scattered back through order = `_descending(x)`, without the scatter.

  The first `count` entries of the stable descending order are those before or at its
  last one t: x_j > x_t, or x_j == x_t and j <= t (ties go by index). One gather per row
  and a compare fused into its consumers, instead of a scatter over [G, Kq, Kk] (two of
  them were ~0.5 ms of a Wan 720p call on an H200, breakdown_h200.md).

  Args:
    x: [..., K] the sorted values (no NaN).
    order: [..., K] `_descending(x)`.
    count: [...] int, 0..K.
  """
  last = jnp.take_along_axis(order, jnp.maximum(count - 1, 0)[..., None], axis=-1)
  x_last = jnp.take_along_axis(x, last, axis=-1)
  j = jnp.arange(x.shape[-1])
  keep = (x > x_last) | ((x == x_last) & (j <= last))
  return keep & (count > 0)[..., None]


def _exclusive_cumsum(x: jax.Array) -> jax.Array:
  c = jnp.cumsum(x, axis=-1)
  return jnp.concatenate([jnp.zeros_like(c[..., :1]), c[..., :-1]], axis=-1)


def top_p_in_order(probs_sorted: jax.Array, top_p: float, floor: int) -> jax.Array:
  """Keep flags of descending-sorted probabilities: position k is kept when the mass before
  it is <= top_p (so the cluster that crosses top_p is kept, and always the first), or
  when k < floor."""
  if top_p >= 1.0:  # everything; a rounded cumsum could otherwise exceed 1 and drop the tail
    return jnp.ones(probs_sorted.shape, bool)
  prev = _exclusive_cumsum(probs_sorted)
  rank = jnp.arange(probs_sorted.shape[-1])
  return (prev <= top_p) | (rank < floor)


def top_k_mask(priority: jax.Array, count: int) -> jax.Array:
  """True at the `count` largest entries of every row (stable on ties)."""
  count = jnp.full(priority.shape[:-1], min(count, priority.shape[-1]), jnp.int32)
  return _prefix_mask(priority, _descending(priority), count)


def greedy_fill(score: jax.Array, cost: jax.Array, budget: jax.Array,
                forced: jax.Array) -> jax.Array:
  """Forced blocks, plus the others by descending score while the cost spent *before* a
  block is below `budget` (the last block may overshoot, as in the reference).

  Args:
    score: [G, Kq, Kk] priority of every block.
    cost: [G, Kq, Kk] area of every block.
    budget: [G, Kq] area to spend on the non-forced blocks.
    forced: [G, Kq, Kk] bool, always kept; ranked last so they never take budget.
  """
  score = jnp.where(forced, -jnp.inf, score)
  order = _descending(score)
  prev = _exclusive_cumsum(jnp.take_along_axis(cost, order, axis=-1))
  # prev grows along the order, so the blocks it keeps are a prefix of it
  count = jnp.sum(prev < budget[..., None], axis=-1, dtype=jnp.int32)
  return forced | _prefix_mask(score, order, count)


def top_p_budget(priority: jax.Array, cost: jax.Array, top_p: float, floor: int) -> jax.Array:
  """SVG2's budget: the cost of every row's top-p set of `priority` (descending while the
  mass before is <= top_p, plus the `floor` largest), +inf where the set is the whole row
  (so that float32 rounding of the sums never leaves a block out of it): [G, Kq]."""
  order = _descending(priority)
  keep = top_p_in_order(jnp.take_along_axis(priority, order, axis=-1), top_p, floor)
  budget = jnp.sum(jnp.where(keep, jnp.take_along_axis(cost, order, axis=-1), 0.0), axis=-1)
  return jnp.where(jnp.all(keep, axis=-1), jnp.inf, budget)


def forced_then_greedy(priority: jax.Array, num_forced: int, score: jax.Array,
                       cost: jax.Array, budget: Optional[jax.Array] = None,
                       top_p: Optional[float] = None, num_floor: int = 0) -> jax.Array:
  """The `num_forced` largest priorities of every row, then `greedy_fill` of the others by
  score with the budget their cost leaves: [G, Kq, Kk] bool. The routings' last step;
  `pallas_kernels.budget_route` computes the same without a sort (its `fill`).

  Args:
    priority, score, cost: [G, Kq, Kk]; num_forced: static int >= 0.
    budget: [G, Kq], or None for `top_p_budget(priority, cost, top_p, num_floor)`.
  """
  if budget is None:
    budget = top_p_budget(priority, cost, top_p, num_floor)
  forced = top_k_mask(priority, num_forced)
  remaining = jnp.maximum(budget - jnp.sum(jnp.where(forced, cost, 0.0), axis=-1), 0.0)
  return greedy_fill(score, cost, remaining, forced)


# fill(priority, num_forced, score, cost, budget, top_p=None, num_floor=0) -> block map,
# as forced_then_greedy
Fill = Callable[..., jax.Array]


def size_weighted_probs(logits: jax.Array, k_sizes: jax.Array, offset: float = 0.0) -> jax.Array:
  """softmax_j(c_ij + log(n_j + offset)): centroid attention with cluster-size multiplicity."""
  log_n = jnp.log(k_sizes.astype(jnp.float32) + offset)
  return jax.nn.softmax(logits + log_n[:, None, :], axis=-1)


def block_area(q_sizes: jax.Array, k_sizes: jax.Array) -> jax.Array:
  """|Q_i| * n_j as float32: [G, Kq, Kk]."""
  return q_sizes.astype(jnp.float32)[:, :, None] * k_sizes.astype(jnp.float32)[:, None, :]


def fixed_budget(density: float, q_sizes: jax.Array, k_sizes: jax.Array) -> jax.Array:
  """Fixed-density budget: density * |Q_i| * S per query cluster, [G, Kq] float32.

  density = 1 is an unlimited budget, so that float32 rounding of the area sums can never
  leave a block out of "everything".
  """
  if density >= 1.0:
    return jnp.full(q_sizes.shape, jnp.inf, jnp.float32)
  num_keys = jnp.sum(k_sizes, axis=-1, keepdims=True).astype(jnp.float32)
  return density * q_sizes.astype(jnp.float32) * num_keys


def topp_route(logits: jax.Array, q_sizes: jax.Array, k_sizes: jax.Array,
               cfg: SvgEarConfig, fill: Fill = forced_then_greedy) -> jax.Array:
  """SVG2 selection by centroid attention mass (ALGORITHM 2(c)).

  With `cfg.density=None`: the top-p set of softmax_j(c_ij + log n_j) plus the first
  `cfg.num_budget_floor` clusters. With a fixed density: the `cfg.num_guaranteed` (at least
  one) most probable clusters, then more by probability while the area budget lasts.
  """
  probs = size_weighted_probs(logits, k_sizes)
  if cfg.density is None:
    order = _descending(probs)
    keep = top_p_in_order(jnp.take_along_axis(probs, order, axis=-1), cfg.top_p,
                          cfg.num_budget_floor)  # a prefix of the order
    return _prefix_mask(probs, order, jnp.sum(keep, axis=-1, dtype=jnp.int32))
  return fill(probs, max(1, cfg.num_guaranteed), probs, block_area(q_sizes, k_sizes),
              fixed_budget(cfg.density, q_sizes, k_sizes))


def ear_scores(log_err: jax.Array, q_sizes: jax.Array, k_sizes: jax.Array,
               gamma: float) -> jax.Array:
  """Error-to-area score log(max(E, 1e-8)) - gamma * log(max(area, 1e-8)), [G, Kq, Kk].

  `log_err` is log E_ij in absolute natural-log units (-inf for E = 0). The reference
  exponentiates first, which overflows float32 once a logit exceeds ~44; in the log domain
  the result is the same wherever the reference is finite.
  """
  log_area = jnp.log(jnp.maximum(block_area(q_sizes, k_sizes), _EPS))
  return jnp.maximum(log_err, jnp.log(_EPS)) - gamma * log_area


def ear_route(logits: jax.Array, log_err: jax.Array, q_sizes: jax.Array, k_sizes: jax.Array,
              cfg: SvgEarConfig, fill: Fill = forced_then_greedy) -> jax.Array:
  """Error-aware routing (ALGORITHM 2(e)).

  Budget per query cluster: the area of the SVG2 top-p set of softmax(c + log(n + 1e-8))
  with a floor of `cfg.num_budget_floor` clusters (or the fixed-density budget). The
  `cfg.num_guaranteed` most probable clusters are always exact; the remaining budget goes
  to the other clusters in order of error-to-area score, greedily.
  """
  probs = size_weighted_probs(logits, k_sizes, offset=_EPS)
  score = ear_scores(log_err, q_sizes, k_sizes, cfg.gamma)
  area = block_area(q_sizes, k_sizes)
  if cfg.density is None:
    return fill(probs, cfg.num_guaranteed, score, area, None, top_p=cfg.top_p,
                num_floor=cfg.num_budget_floor)
  return fill(probs, cfg.num_guaranteed, score, area,
              fixed_budget(cfg.density, q_sizes, k_sizes))


def route(cfg: SvgEarConfig, logits: jax.Array, q_sizes: jax.Array, k_sizes: jax.Array,
          log_err: Optional[jax.Array] = None, fill: Fill = forced_then_greedy) -> jax.Array:
  """Block map [G, Kq, Kk] bool for `cfg.routing` ("ear" needs `log_err`); `fill` does the
  budgeted step of "ear" and of a fixed-density "topp"."""
  if cfg.routing == "dense":
    return jnp.ones(logits.shape, bool)
  if cfg.routing == "topp":
    return topp_route(logits, q_sizes, k_sizes, cfg, fill)
  if log_err is None:
    raise ValueError("routing='ear' needs the error estimate log_err")
  return ear_route(logits, log_err, q_sizes, k_sizes, cfg, fill)


def block_density(block_map: jax.Array, q_sizes: jax.Array, k_sizes: jax.Array) -> jax.Array:
  """Fraction of the query x key area computed exactly: [G] float32."""
  area = block_area(q_sizes, k_sizes)
  total = jnp.sum(q_sizes, -1).astype(jnp.float32) * jnp.sum(k_sizes, -1).astype(jnp.float32)
  return jnp.sum(jnp.where(block_map, area, 0.0), axis=(1, 2)) / total
