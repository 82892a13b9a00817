"""Batched Euclidean (Lloyd) k-means, one independent clustering per (batch, head).

Follows the reference (ALGORITHM.md 2(a)): random-with-replacement initialisation, Lloyd
iterations, per-head stop once the largest centroid move is below `tol`, empty clusters keep
their centroid, warm start from the previous call's centroids. Return contract: `labels` are
the assignment to the centroids that entered the last iteration, `sizes` their counts, and
`centroids` the means of exactly those clusters (or, when a head stopped on `tol`, the
centroids its labels were computed with, which differ from the means by less than `tol`).

Two centroid updates, the same contract: "segment_sum" (an XLA scatter-add by label; on a
GPU its atomics contend on a few hundred clusters) and "sorted" (a stable argsort of the
labels, then per-cluster means by a walk of the sorted order, e.g. the Pallas kernel
`pallas_kernels.cluster_means`, with no atomics; it also returns that order, which the
later stages reuse). Points are [G, N, D] or tokens-first [B, S, H, D] (head g = b * H + h),
optionally only the first `num_points` rows of every head, so that kernels can read them in
place; the XLA defaults work on a head-major copy.
"""

import dataclasses
from typing import Callable, Optional

import jax
import jax.numpy as jnp
from jax import lax

from svg_ear_jax import chunking, permutation

# labels = assign_fn(x, centroids [G, K, D] f32) -> [G, N] int32, x as given to `kmeans`
AssignFn = Callable[[jax.Array, jax.Array], jax.Array]
# means = mean_fn(x, sizes [G, K] int32, perm [G, N] int32) -> [G, K, D] float32 (0 where
# empty), the clusters being consecutive runs of sizes in the sorted order perm
MeanFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]

UPDATES = ("segment_sum", "sorted")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KMeansResult:
  """Result of `kmeans`.

  Attributes:
    labels: [G, N] int32 cluster of every point.
    centroids: [G, K, D] float32.
    sizes: [G, K] int32 number of points per cluster.
    iterations: [] int32 Lloyd iterations run (the slowest head's).
    perm: [G, N] int32 stable argsort of `labels` (the cluster-sorted order,
      `permutation.cluster_layout(labels, sizes).perm`) from the "sorted" update, else
      None.
  """

  labels: jax.Array
  centroids: jax.Array
  sizes: jax.Array
  iterations: jax.Array
  perm: Optional[jax.Array] = None


def points_shape(x: jax.Array, num_points: Optional[int] = None):
  """(G, N, D) of the points x: [G, S, D] or tokens-first [B, S, H, D] (G = B * H), the
  first N = num_points (default S) rows of every head."""
  if x.ndim not in (3, 4):
    raise ValueError(f"points must be [G, N, D] or [B, S, H, D], got shape {tuple(x.shape)}")
  s = x.shape[1]
  n = s if num_points is None else num_points
  if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= s:
    raise ValueError(f"num_points must be an int in [1, {s}], got {num_points!r}")
  if x.ndim == 4:
    return x.shape[0] * x.shape[2], n, x.shape[3]
  return x.shape[0], n, x.shape[2]


def heads_first(x: jax.Array, num_points: Optional[int] = None) -> jax.Array:
  """[G, N, D] head-major points (head g = b * H + h; a transposed copy for tokens-first
  x, x itself when it is [G, N, D] already)."""
  _, n, d = points_shape(x, num_points)
  if x.ndim == 4:
    b, s, h, _ = x.shape
    x = x.transpose(0, 2, 1, 3).reshape(b * h, s, d)
  return x if n == x.shape[1] else x[:, :n]


def _dot_precision(dtype):
  # TF32 (the GPU default for f32) flips argmins; low-precision inputs keep their own dtype,
  # as the reference's Triton kernel does.
  return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def init_centroids(x: jax.Array, num_clusters: int, key: jax.Array,
                   point_mask: Optional[jax.Array] = None, *,
                   groups: Optional[jax.Array] = None,
                   num_points: Optional[int] = None) -> jax.Array:
  """Cold start: `num_clusters` points drawn uniformly with replacement, per head.

  Args:
    x: [G, N, D] points, or tokens-first [B, S, H, D] (head g = b * H + h).
    num_clusters: K.
    key: PRNG key; head g uses `fold_in(key, groups[g])`.
    point_mask: optional [G, N] bool; only True points are drawn.
    groups: optional [G] int index of each head in the whole clustering it belongs to
      (may be traced); default `arange(G)`. A caller holding a slice of the heads passes
      their global indices, so that each head draws what it would draw unsliced.
    num_points: static; draw from the first num_points rows of every head only (default
      all): the same draw as from those rows alone.

  Returns:
    [G, K, D] float32 centroids.
  """
  g, n, _ = points_shape(x, num_points)
  if groups is None:
    groups = jnp.arange(g)
  elif tuple(groups.shape) != (g,):
    raise ValueError(f"groups must be [G] = ({g},), got {tuple(groups.shape)}")
  keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(groups)
  if point_mask is None:
    idx = jax.vmap(lambda k: jax.random.randint(k, (num_clusters,), 0, n))(keys)
  else:
    logp = jnp.where(point_mask, 0.0, -jnp.inf)
    idx = jax.vmap(lambda k, lp: jax.random.categorical(k, lp, shape=(num_clusters,)))(keys, logp)
  if x.ndim == 4:  # gather the K rows of every head in place: no transposed copy of x
    b, _, h, _ = x.shape
    idx = idx.reshape(b, h, num_clusters)
    rows = x[jnp.arange(b)[:, None, None], idx, jnp.arange(h)[None, :, None]]
    return rows.reshape(g, num_clusters, -1).astype(jnp.float32)
  return jnp.take_along_axis(x, idx[..., None], axis=1).astype(jnp.float32)


def assign_xla(x: jax.Array, centroids: jax.Array, *, chunk_mb: int = 512) -> jax.Array:
  """Nearest centroid of every point, chunked over points so N x K stays bounded.

  Args:
    x: [G, N, D] points.
    centroids: [G, K, D] float32.
    chunk_mb: bound on the f32 distance temporaries of one chunk, all heads together.

  Returns:
    [G, N] int32 labels (lowest index on ties).
  """
  g, n, _ = x.shape
  k = centroids.shape[1]
  c = centroids.astype(x.dtype) if x.dtype != jnp.float32 else centroids
  c_sq = jnp.sum(jnp.square(c.astype(jnp.float32)), axis=-1)  # [G, K]
  precision = _dot_precision(x.dtype)

  def one_chunk(xc):
    dots = jnp.einsum("gnd,gkd->gnk", xc, c, precision=precision,
                      preferred_element_type=jnp.float32)
    return jnp.argmin(c_sq[:, None, :] - 2.0 * dots, axis=-1).astype(jnp.int32)

  rows = chunking.rows_per_chunk(n, 3 * 4 * g * k, chunk_mb)
  return chunking.map_row_chunks(one_chunk, (x,), rows)


def cluster_sums(x: jax.Array, labels: jax.Array, num_clusters: int):
  """Per-cluster f32 sums and counts: ([G, K, D], [G, K] int32)."""
  def one(xh, lh):
    s = jax.ops.segment_sum(xh.astype(jnp.float32), lh, num_segments=num_clusters)
    cnt = jax.ops.segment_sum(jnp.ones_like(lh), lh, num_segments=num_clusters)
    return s, cnt
  return jax.vmap(one)(x, labels)


def cluster_means(x: jax.Array, labels: jax.Array, num_clusters: int,
                  fallback: Optional[jax.Array] = None, counts: Optional[jax.Array] = None):
  """Means of the points of each cluster: ([G, K, D] f32, sizes [G, K] int32).

  Empty clusters get `fallback` (their previous centroid) or zeros when it is None.
  `counts`: [G, K] sizes of these labels when already known (e.g. a KMeansResult's), so
  that they are not counted again.
  """
  sums, own_counts = cluster_sums(x, labels, num_clusters)
  counts = own_counts if counts is None else counts
  means = sums / jnp.maximum(counts, 1)[..., None].astype(jnp.float32)
  empty = (counts == 0)[..., None]
  means = jnp.where(empty, 0.0 if fallback is None else fallback, means)
  return means, counts


def sorted_means_xla(x: jax.Array, sizes: jax.Array, perm: jax.Array) -> jax.Array:
  """A `MeanFn` in XLA (for tests and CPU): [G, K, D] float32 means of [G, N, D] points
  whose clusters are consecutive runs of `sizes` in the sorted order `perm`, 0 when empty."""
  k = sizes.shape[1]
  xs = permutation.permute(x.astype(jnp.float32), perm)
  labels = permutation.labels_of_rows(sizes, x.shape[1])  # K past the last cluster: dropped
  sums = jax.vmap(lambda a, lab: jax.ops.segment_sum(a, lab, num_segments=k,
                                                     indices_are_sorted=True))(xs, labels)
  return sums / jnp.maximum(sizes, 1)[..., None].astype(jnp.float32)


def _segment_sum_update(x, labels, num_clusters, fallback):
  means, sizes = cluster_means(x, labels, num_clusters, fallback=fallback)
  return means, sizes, None


def _sorted_update(x, labels, num_clusters, fallback, mean_fn):
  lay = permutation.sort_by_label(labels, num_clusters)
  means = mean_fn(x, lay.sizes, lay.perm)
  means = jnp.where((lay.sizes == 0)[..., None], fallback, means)
  return means, lay.sizes, lay.perm


def kmeans(x: jax.Array, init: jax.Array, *, max_iters: int, tol: float,
           assign_fn: Optional[AssignFn] = None, update: str = "segment_sum",
           mean_fn: Optional[MeanFn] = None, chunk_mb: int = 512,
           point_mask: Optional[jax.Array] = None,
           num_points: Optional[int] = None) -> KMeansResult:
  """Lloyd iterations from `init`, each head stopping on its own once converged.

  Args:
    x: [G, N, D] points, or tokens-first [B, S, H, D] (G = B * H, head g = b * H + h is
      x[b, :, h, :]) (any float dtype; sums and centroids are float32).
    init: [G, K, D] initial centroids (cold: `init_centroids`; warm: the previous call's).
    max_iters: iteration cap (>= 1).
    tol: a head stops once max_k ||c_new - c_old||_2 < tol.
    assign_fn: assignment implementation, called with x as given (default: chunked XLA
      `assign_xla` on a head-major copy).
    update: centroid update, "segment_sum" (XLA scatter-add by label) or "sorted" (stable
      argsort of the labels, then `mean_fn` walks the sorted order; the result carries it
      as `perm`). Same contract, equal up to float rounding of the sums.
    mean_fn: the "sorted" update's per-cluster means, called with x as given (default:
      `sorted_means_xla` on a head-major copy).
    chunk_mb: memory bound of the default assignment.
    point_mask: optional [G, N] bool; False points get the label K (outside every cluster)
      and take no part in sizes or centroids.
    num_points: static; cluster only the first num_points rows of every head (default
      all); assign_fn / mean_fn must read x the same way (they are given the whole x).

  Returns:
    KMeansResult (see the module docstring for the contract).
  """
  if max_iters < 1:
    raise ValueError(f"kmeans needs max_iters >= 1, got {max_iters}")
  if update not in UPDATES:
    raise ValueError(f"update must be one of {UPDATES}, got {update!r}")
  g, n, d = points_shape(x, num_points)
  if init.ndim != 3 or init.shape[0] != g or init.shape[2] != d:
    raise ValueError(f"init must be [G, K, D] with G = {g}, D = {d}, got {tuple(init.shape)}")
  if point_mask is not None and tuple(point_mask.shape) != (g, n):
    raise ValueError(f"point_mask must be [G, N] = {(g, n)}, got {tuple(point_mask.shape)}")
  k = init.shape[1]
  sorted_update = update == "sorted"
  # the XLA defaults read a head-major copy (made once, outside the loop); kernels given
  # as assign_fn / mean_fn read x as it is
  if assign_fn is None or not sorted_update or mean_fn is None:
    xg = heads_first(x, num_points)
  if assign_fn is None:
    assign_fn = lambda _, cen: assign_xla(xg, cen, chunk_mb=chunk_mb)
  if sorted_update:
    means = mean_fn if mean_fn is not None else lambda _, sz, p: sorted_means_xla(xg, sz, p)
    update_fn = lambda lab, cen: _sorted_update(x, lab, k, cen, means)
  else:
    update_fn = lambda lab, cen: _segment_sum_update(xg, lab, k, cen)

  def body(carry):
    it, cen, labels, sizes, perm, done = carry
    new_labels = assign_fn(x, cen)
    if point_mask is not None:
      new_labels = jnp.where(point_mask, new_labels, k)
    new_cen, new_sizes, new_perm = update_fn(new_labels, cen)
    shift = jnp.max(jnp.linalg.norm(new_cen - cen, axis=-1), axis=-1)  # [G]
    converged = shift < tol
    active = ~done
    labels = jnp.where(active[:, None], new_labels, labels)
    sizes = jnp.where(active[:, None], new_sizes, sizes)
    if sorted_update:
      perm = jnp.where(active[:, None], new_perm, perm)
    cen = jnp.where((active & ~converged)[:, None, None], new_cen, cen)
    return it + 1, cen, labels, sizes, perm, done | converged

  def cond(carry):
    it, *_, done = carry
    return (it < max_iters) & ~jnp.all(done)

  zeros = jnp.zeros((g, n), jnp.int32)
  carry = (jnp.int32(0), init.astype(jnp.float32), zeros, jnp.zeros((g, k), jnp.int32),
           zeros if sorted_update else None, jnp.zeros((g,), bool))
  it, cen, labels, sizes, perm, _ = lax.while_loop(cond, body, carry)
  return KMeansResult(labels=labels, centroids=cen, sizes=sizes, iterations=it, perm=perm)


def inertia(x: jax.Array, labels: jax.Array, centroids: jax.Array) -> jax.Array:
  """Sum of squared distances of points to their assigned centroid, per head: [G] f32."""
  assigned = jnp.take_along_axis(centroids, labels[..., None], axis=1)
  return jnp.sum(jnp.square(x.astype(jnp.float32) - assigned), axis=(1, 2))
