"""Cluster-contiguous token order: permutation, sizes, offsets and the inverse (ALGORITHM 2(b))."""

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

# Key type of the label argsorts (`argsort_labels`): "int32" as the labels are, or "narrow":
# uint16 where the labels fit (< 65,536 of them), the same stable order from a 16-bit
# radix sort, about half the digit passes of a 32-bit one. XLA's GPU sort rewriter also
# picks CUB's radix sort by key width and size: on Hopper it sorts [40, 32,760] int32 rows
# (Wan 480p) with its own sort but uint16 ones with CUB. Not yet timed on a GPU, so "int32"
# stays the default until it is (`benchmarks.breakdown --sort-keys narrow int32`). Read
# when a call is traced.
LABEL_SORT_KEYS = "int32"
LABEL_SORT_KEYS_CHOICES = ("int32", "narrow")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ClusterLayout:
  """Where each cluster's tokens sit once sorted by label.

  Attributes:
    perm: [G, S] int32; permuted row s holds token perm[s] (stable argsort of the labels).
    sizes: [G, K] int32 tokens per cluster.
    offsets: [G, K] int32 first permuted row of each cluster (exclusive cumsum of sizes).
  """

  perm: jax.Array
  sizes: jax.Array
  offsets: jax.Array


def cluster_layout(labels: jax.Array, sizes: jax.Array,
                   perm: Optional[jax.Array] = None) -> ClusterLayout:
  """Layout of labels [G, S] with cluster sizes [G, K]: cluster c occupies
  [offsets[c], offsets[c] + sizes[c]) of the permuted order.

  perm: the stable argsort of these labels when already known (e.g. `KMeansResult.perm`
  of the sort-based k-means update), so that it is not sorted again.
  """
  if perm is None:
    # labels in [0, K] (K: in no cluster), K = sizes' clusters
    perm = argsort_labels(labels, sizes.shape[-1] + 1)
  perm = perm.astype(jnp.int32)
  sizes = sizes.astype(jnp.int32)
  return ClusterLayout(perm=perm, sizes=sizes, offsets=jnp.cumsum(sizes, axis=-1) - sizes)


def sort_by_label(labels: jax.Array, num_clusters: int) -> ClusterLayout:
  """Layout of labels [G, S] in [0, K] (label K: in no cluster, sorted last), its sizes
  [G, K] counted from the sorted labels by binary search rather than a scatter-add (whose
  atomics contend on a GPU). The permutation is `cluster_layout`'s (stable argsort)."""
  perm = argsort_labels(labels, num_clusters + 1)
  sorted_labels = jnp.take_along_axis(labels.astype(jnp.int32), perm, axis=-1)
  ids = jnp.arange(num_clusters, dtype=jnp.int32)
  ends = jax.vmap(lambda row: jnp.searchsorted(row, ids, side="right",
                                               method="scan_unrolled"))(sorted_labels)
  ends = ends.astype(jnp.int32)
  offsets = jnp.concatenate([jnp.zeros_like(ends[:, :1]), ends[:, :-1]], axis=-1)
  return ClusterLayout(perm=perm, sizes=ends - offsets, offsets=offsets)


def argsort_labels(labels: jax.Array, num_labels: int) -> jax.Array:
  """Stable argsort [G, S] int32 of labels [G, S] (ints in [0, num_labels), static bound),
  its keys per LABEL_SORT_KEYS."""
  if LABEL_SORT_KEYS not in LABEL_SORT_KEYS_CHOICES:
    raise ValueError(f"permutation.LABEL_SORT_KEYS must be one of {LABEL_SORT_KEYS_CHOICES}, "
                     f"got {LABEL_SORT_KEYS!r}")
  if LABEL_SORT_KEYS == "narrow" and num_labels <= 1 << 16:
    labels = labels.astype(jnp.uint16)
  return jnp.argsort(labels, axis=-1, stable=True).astype(jnp.int32)


def permute(x: jax.Array, perm: jax.Array) -> jax.Array:
  """Gathers rows: out[g, s] = x[g, perm[g, s]] for x [G, S, ...]."""
  idx = perm.reshape(perm.shape + (1,) * (x.ndim - 2))
  return jnp.take_along_axis(x, idx, axis=1)


def inverse_permutation(perm: jax.Array) -> jax.Array:
  """inv [G, S] int32 with inv[g, perm[g, s]] = s."""
  rows = jnp.arange(perm.shape[-1], dtype=jnp.int32)
  return jax.vmap(lambda p: jnp.zeros_like(p).at[p].set(rows))(perm)


def unpermute(x_perm: jax.Array, perm: jax.Array) -> jax.Array:
  """Inverse of `permute`: out[g, perm[g, s]] = x_perm[g, s]."""
  return permute(x_perm, inverse_permutation(perm))


def labels_of_rows(sizes: jax.Array, num_rows: int) -> jax.Array:
  """Cluster id of every permuted row: [G, S] int32 from sizes [G, K]."""
  ends = jnp.cumsum(sizes, axis=-1)
  rows = jnp.arange(num_rows, dtype=ends.dtype)
  return jax.vmap(lambda e: jnp.searchsorted(e, rows, side="right"))(ends).astype(jnp.int32)
