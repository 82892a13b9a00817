"""Batched Euclidean (Lloyd) k-means, one independent clustering per (batch, head).

Follows the reference (ALGORITHM.md 2(a)): random-with-replacement initialisation, Lloyd
iterations, per-head stop once the largest centroid move is below `tol`, empty clusters keep
their centroid, warm start from the previous call's centroids. Return contract: `labels` are
the assignment to the centroids that entered the last iteration, `sizes` their counts, and
`centroids` the means of exactly those clusters (or, when a head stopped on `tol`, the
centroids its labels were computed with, which differ from the means by less than `tol`).
"""

import dataclasses
from typing import Callable, Optional

import jax
import jax.numpy as jnp
from jax import lax

from svg_ear_jax import chunking

# labels = assign_fn(x [G, N, D], centroids [G, K, D] f32) -> [G, N] int32
AssignFn = Callable[[jax.Array, jax.Array], jax.Array]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KMeansResult:
  """Result of `kmeans`.

  Attributes:
    labels: [G, N] int32 cluster of every point.
    centroids: [G, K, D] float32.
    sizes: [G, K] int32 number of points per cluster.
    iterations: [] int32 Lloyd iterations run (the slowest head's).
  """

  labels: jax.Array
  centroids: jax.Array
  sizes: jax.Array
  iterations: jax.Array


def _dot_precision(dtype):
  # TF32 (the GPU default for f32) flips argmins; low-precision inputs keep their own dtype,
  # as the reference's Triton kernel does.
  return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def init_centroids(x: jax.Array, num_clusters: int, key: jax.Array,
                   point_mask: Optional[jax.Array] = None, *,
                   groups: Optional[jax.Array] = None) -> jax.Array:
  """Cold start: `num_clusters` points drawn uniformly with replacement, per head.

  Args:
    x: [G, N, D] points.
    num_clusters: K.
    key: PRNG key; head g uses `fold_in(key, groups[g])`.
    point_mask: optional [G, N] bool; only True points are drawn.
    groups: optional [G] int index of each head in the whole clustering it belongs to
      (may be traced); default `arange(G)`. A caller holding a slice of the heads passes
      their global indices, so that each head draws what it would draw unsliced.

  Returns:
    [G, K, D] float32 centroids.
  """
  g, n, _ = x.shape
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


def kmeans(x: jax.Array, init: jax.Array, *, max_iters: int, tol: float,
           assign_fn: Optional[AssignFn] = None, chunk_mb: int = 512,
           point_mask: Optional[jax.Array] = None) -> KMeansResult:
  """Lloyd iterations from `init`, each head stopping on its own once converged.

  Args:
    x: [G, N, D] points (any float dtype; sums and centroids are float32).
    init: [G, K, D] initial centroids (cold: `init_centroids`; warm: the previous call's).
    max_iters: iteration cap (>= 1).
    tol: a head stops once max_k ||c_new - c_old||_2 < tol.
    assign_fn: assignment implementation (default: chunked XLA `assign_xla`).
    chunk_mb: memory bound of the default assignment.
    point_mask: optional [G, N] bool; False points get the label K (outside every cluster)
      and take no part in sizes or centroids.

  Returns:
    KMeansResult (see the module docstring for the contract).
  """
  if max_iters < 1:
    raise ValueError(f"kmeans needs max_iters >= 1, got {max_iters}")
  g, n, _ = x.shape
  k = init.shape[1]
  if assign_fn is None:
    assign_fn = lambda pts, cen: assign_xla(pts, cen, chunk_mb=chunk_mb)

  def body(carry):
    it, cen, labels, sizes, done = carry
    new_labels = assign_fn(x, cen)
    if point_mask is not None:
      new_labels = jnp.where(point_mask, new_labels, k)
    new_cen, new_sizes = cluster_means(x, new_labels, k, fallback=cen)
    shift = jnp.max(jnp.linalg.norm(new_cen - cen, axis=-1), axis=-1)  # [G]
    converged = shift < tol
    active = ~done
    labels = jnp.where(active[:, None], new_labels, labels)
    sizes = jnp.where(active[:, None], new_sizes, sizes)
    cen = jnp.where((active & ~converged)[:, None, None], new_cen, cen)
    return it + 1, cen, labels, sizes, done | converged

  def cond(carry):
    it, _, _, _, done = carry
    return (it < max_iters) & ~jnp.all(done)

  carry = (jnp.int32(0), init.astype(jnp.float32), jnp.zeros((g, n), jnp.int32),
           jnp.zeros((g, k), jnp.int32), jnp.zeros((g,), bool))
  it, cen, labels, sizes, _ = lax.while_loop(cond, body, carry)
  return KMeansResult(labels=labels, centroids=cen, sizes=sizes, iterations=it)


def inertia(x: jax.Array, labels: jax.Array, centroids: jax.Array) -> jax.Array:
  """Sum of squared distances of points to their assigned centroid, per head: [G] f32."""
  assigned = jnp.take_along_axis(centroids, labels[..., None], axis=1)
  return jnp.sum(jnp.square(x.astype(jnp.float32) - assigned), axis=(1, 2))
