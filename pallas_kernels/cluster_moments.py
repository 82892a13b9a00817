"""Per-cluster moments of token-order rows, read through the cluster-sorted order.

For clusters that are consecutive runs of a sorted order (sorted position p of head g is
token index[g, p]; cluster j = positions [off_j, off_j + n_j), off = exclusive cumsum of
the sizes):

  means_j = mean_{t in C_j} x_t                     (`cluster_means`: the Lloyd update),
  second_j = mean_{t in C_j} x_t * x_t              (no centroids), or
  second_j = mean_{t in C_j} (x_t - c_j)^2,  radius_j = max_{t in C_j} ||x_t - c_j||,
  value_means_j = mean_{t in C_j} v_t               (when values are given), and
  ||v_p||^2, <value_means_j, v_p> per sorted position p (value_stats: the EAR probe's
  per-token terms, `error_probe.value_stats`).

These are the k-means centroid update, the key spread (variance and radius about the
centroids, for the variance compensation), the query clusters' second moments and the value
means. In XLA they are scatter-adds by label, which on GPU contend on the atomics of a few
hundred clusters (~1 ms per [40, 75600, 128] pass into 300 clusters); here each program
walks its clusters' rows of the sorted order once, gathering rows of x (and v) through
`index`, and writes each cluster's results once, so no atomics are needed. The value stats
walk each cluster's value rows a second time, right after its mean is known (the rows are
in L2 then), instead of an XLA pass over all of v that gathers a mean per token.

Rows are [G, S, D] or tokens-first [B, S, H, D] (head g = b * H + h read in place through
strides), optionally only the first `num_rows` of every head (the index then points into
those), so no transposed or sliced copy is made.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import common


def _kernel(off_ref, size_ref, idx_ref, x_ref, *refs, block_rows, d, num_clusters,
            clusters_per_program, centred, has_values, first, stats):
  refs = list(refs)
  c_ref = refs.pop(0) if centred else None
  v_ref = refs.pop(0) if has_values else None
  if stats:  # the zeroed buffers the value stats are written into (aliased to outputs)
    refs = refs[2:]
  sec_ref = refs.pop(0)
  rad_ref = refs.pop(0) if centred else None
  vm_ref = refs.pop(0) if has_values else None
  vsq_ref, cross_ref = (refs.pop(0), refs.pop(0)) if stats else (None, None)
  # Triton tiles are powers of two: the extra columns are masked off in every load and
  # store rather than padded in XLA, which would copy x (and v) once more
  dp = common.next_pow2(max(d, 16))
  cols = jnp.arange(dp)
  col_ok = cols < d
  r0 = jnp.arange(block_rows)

  def cluster(j, carry):
    start = off_ref[j]
    n = size_ref[j]
    if centred:
      c = plgpu.load(c_ref.at[j, cols], mask=col_ok, other=0.)

    def tile(t, acc):
      rows = start + t * block_rows + r0
      ok = rows < start + n
      tok = plgpu.load(idx_ref.at[rows], mask=ok, other=0)
      mask = ok[:, None] & col_ok[None, :]
      x = plgpu.load(x_ref.at[tok[:, None], cols[None, :]], mask=mask, other=0.)
      x = x.astype(jnp.float32)
      if centred:
        x = jnp.where(mask, x - c[None, :], 0.)
      sq = x if first else x * x  # first: the plain sum (means), not squares
      acc = dict(acc, sq=acc["sq"] + sq)
      if centred:
        acc["max"] = jnp.maximum(acc["max"], jnp.sum(sq, axis=1))
      if has_values:
        v = plgpu.load(v_ref.at[tok[:, None], cols[None, :]], mask=mask, other=0.)
        acc["v"] = acc["v"] + v.astype(jnp.float32)
      return acc

    # row-wise accumulators, reduced across rows once per cluster rather than per tile
    tile_zero = jnp.zeros((block_rows, dp), jnp.float32)
    acc = dict(sq=tile_zero)
    if centred:
      acc["max"] = jnp.zeros((block_rows,), jnp.float32)
    if has_values:
      acc["v"] = tile_zero
    acc = lax.fori_loop(jnp.int32(0), lax.div(n + block_rows - 1, block_rows), tile, acc)
    inv = 1.0 / jnp.maximum(n, 1).astype(jnp.float32)
    plgpu.store(sec_ref.at[j, cols], jnp.sum(acc["sq"], axis=0) * inv, mask=col_ok)
    if centred:
      rad_ref[j] = jnp.sqrt(jnp.max(acc["max"]))
    if has_values:
      plgpu.store(vm_ref.at[j, cols], jnp.sum(acc["v"], axis=0) * inv, mask=col_ok)
    if stats:  # the values: v, or x itself (first: x's means are the value means)
      vals_ref = v_ref if has_values else x_ref
      mean = jnp.sum(acc["v"] if has_values else acc["sq"], axis=0) * inv

      def stat_tile(t, carry):
        rows = start + t * block_rows + r0
        ok = rows < start + n
        tok = plgpu.load(idx_ref.at[rows], mask=ok, other=0)
        vals = plgpu.load(vals_ref.at[tok[:, None], cols[None, :]],
                          mask=ok[:, None] & col_ok[None, :], other=0.).astype(jnp.float32)
        plgpu.store(vsq_ref.at[rows], jnp.sum(vals * vals, axis=1), mask=ok)
        plgpu.store(cross_ref.at[rows], jnp.sum(vals * mean[None, :], axis=1), mask=ok)
        return carry

      lax.fori_loop(jnp.int32(0), lax.div(n + block_rows - 1, block_rows), stat_tile,
                    jnp.int32(0))
    return carry

  j0 = pl.program_id(0) * clusters_per_program
  j1 = jnp.minimum(j0 + clusters_per_program, num_clusters)
  lax.fori_loop(j0, j1, cluster, jnp.int32(0))


def _is_float(x):
  return jnp.issubdtype(x.dtype, jnp.floating)


def _check(x, sizes, index, centroids, values, num_rows):
  """(G, H, N, D, K) after checking the arguments (x, values: [G, S, D] or [B, S, H, D])."""
  g, h, n, d = common.head_rows(x, "x", num_rows)
  if index.shape != (g, n) or not jnp.issubdtype(index.dtype, jnp.integer):
    raise ValueError(f"index must be [G, N] = {(g, n)} integers, got {index.shape} "
                     f"{index.dtype}")
  if sizes.ndim != 2 or sizes.shape[0] != g or not jnp.issubdtype(sizes.dtype, jnp.integer):
    raise ValueError(f"sizes must be [G, K] integers with G = {g}, got {sizes.shape} "
                     f"{sizes.dtype}")
  k = sizes.shape[1]
  if centroids is not None and (centroids.shape != (g, k, d) or not _is_float(centroids)):
    raise ValueError(f"centroids must be [G, K, D] = {(g, k, d)} floats, got "
                     f"{centroids.shape} {centroids.dtype}")
  if values is not None and (values.shape != x.shape or not _is_float(values)):
    raise ValueError(f"values must be shaped like x {x.shape} and float, got "
                     f"{values.shape} {values.dtype}")
  return g, h, n, d, k


def _walk(x, sizes, index, centroids, values, *, num_rows, first, block_rows, cluster_splits,
          num_warps, num_stages, interpret, stats=False):
  """One pallas_call walking every cluster's sorted rows: (sums-or-squares, radius or None,
  value means or None) per cluster, each divided by the cluster size, and with stats the
  value stats (||v_p||^2, <mean_j, v_p>) [G, N] per sorted position of the values (values,
  or x when first)."""
  g, _, n, d, k = _check(x, sizes, index, centroids, values, num_rows)
  common.check_block("block_rows", block_rows)
  if isinstance(cluster_splits, bool) or not isinstance(cluster_splits, int) or cluster_splits < 1:
    raise ValueError(f"cluster_splits must be an int >= 1, got {cluster_splits!r}")
  per_program = common.cdiv(k, cluster_splits)
  sizes = sizes.astype(jnp.int32)
  offsets = (jnp.cumsum(sizes, -1) - sizes).astype(jnp.int32)
  small = [offsets, sizes, index.astype(jnp.int32)]
  if centroids is not None:
    small.append(centroids.astype(jnp.float32))
  out_shapes = [jax.ShapeDtypeStruct((g, k, d), jnp.float32)]
  if centroids is not None:
    out_shapes.append(jax.ShapeDtypeStruct((g, k), jnp.float32))
  if values is not None:
    out_shapes.append(jax.ShapeDtypeStruct((g, k, d), jnp.float32))
  if stats:
    out_shapes += [jax.ShapeDtypeStruct((g, n), jnp.float32)] * 2
  # each program sees its head's whole arrays: it reads the clusters' rows at data-dependent
  # positions, so there is no rectangular block to hand it
  inputs = small[:3] + [x] + small[3:] + ([values] if values is not None else [])
  in_specs = ([common.head_spec(a.shape) for a in small[:3]] + [common.head_rows_spec(x, n)]
              + [common.head_spec(a.shape) for a in small[3:]]
              + ([common.head_rows_spec(values, n)] if values is not None else []))
  aliases = {}
  if stats:  # positions in no cluster (past sum(sizes)) are never walked: they stay 0
    aliases = {len(inputs): len(out_shapes) - 2, len(inputs) + 1: len(out_shapes) - 1}
    inputs += [jnp.zeros((g, n), jnp.float32)] * 2
    in_specs += [common.head_spec((g, n))] * 2
  kernel = functools.partial(_kernel, block_rows=block_rows, d=d, num_clusters=k,
                             clusters_per_program=per_program,
                             centred=centroids is not None, has_values=values is not None,
                             first=first, stats=stats)
  # cluster ranges vary fastest: the programs in flight share one head's rows in L2
  outs = pl.pallas_call(
      kernel, grid=(common.cdiv(k, per_program), g), in_specs=in_specs,
      out_specs=[common.head_spec(o.shape) for o in out_shapes],
      out_shape=out_shapes, interpret=interpret, input_output_aliases=aliases,
      name="svg_ear_cluster_means" if first else "svg_ear_cluster_moments",
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
  )(*inputs)
  outs = list(outs)
  main = outs.pop(0)
  radius = outs.pop(0) if centroids is not None else None
  value_means = outs.pop(0) if values is not None else None
  return main, radius, value_means, (tuple(outs) if stats else None)


_STATIC = ("num_rows", "block_rows", "cluster_splits", "num_warps", "num_stages", "interpret",
           "value_stats")


@functools.partial(jax.jit, static_argnames=_STATIC)
def cluster_moments(x, sizes, index, *, centroids=None, values=None, num_rows=None,
                    block_rows: int = 32, cluster_splits: int = 128, num_warps: int = 4,
                    num_stages: int = 2, interpret: bool = False, value_stats: bool = False):
  """Per-cluster second moments (about 0 or the centroids), radii and value means.

  Args:
    x: [G, S, D] rows in token order, or tokens-first [B, S, H, D] (G = B * H, head
      g = b * H + h is x[b, :, h, :], read in place) (any float dtype; float32
      accumulation).
    sizes: [G, K] int32 cluster sizes: cluster j is sorted positions
      [off_j, off_j + sizes_j), off = exclusive cumsum. sum(sizes) may be < N (the
      positions past the last cluster are never read) but must not exceed N (not checked:
      traced).
    index: [G, N] int32 permutation: sorted position p is token index[g, p] of x / values
      (N = num_rows).
    centroids: optional [G, K, D] float32 points the second moments and radii are about.
    values: optional float rows shaped like x, in token order (same index), to average per
      cluster in the same pass.
    num_rows: static; only the first num_rows tokens of every head are clustered (default
      all S): index points into them, nothing past them is read.
    block_rows: rows per tile of the walk (power of two >= 16).
    cluster_splits: programs per head; each walks a contiguous range of
      cdiv(K, cluster_splits) clusters. At G = 40, S = 75,600 the default 128 gives
      3 clusters (~750 rows) per program for K = 300 and 8 (~600 rows) for K = 1000, i.e.
      4,000-5,000 programs (~30 per SM on 132 SMs, several waves): enough resident ones
      to hide the latency of the index-dependent gathers, and short enough that uneven
      cluster sizes even out across waves, yet long enough that a program is not mostly
      prologue and per-cluster stores. Not measured: no GPU was at hand; one cluster per
      program (cluster_splits >= K) gives the most programs, fewer splits longer ones.
    num_warps, num_stages: Triton parameters.
    interpret: Pallas interpret mode (CPU).
    value_stats: (with values) also the EAR probe's per-token value terms.

  Returns:
    (second [G, K, D] float32, radius [G, K] float32 or None (None without centroids),
    value_means [G, K, D] float32 or None (None without values)); 0 for empty clusters.
    With value_stats a fourth item, (||v_p||^2, <value_means_j, v_p>) [G, N] float32 each
    per sorted position p in cluster j (0 at positions in no cluster), as
    `error_probe.value_stats` computes them.
  """
  if value_stats and values is None:
    raise ValueError("value_stats needs values")
  out = _walk(x, sizes, index, centroids, values, num_rows=num_rows, first=False,
              block_rows=block_rows, cluster_splits=cluster_splits, num_warps=num_warps,
              num_stages=num_stages, interpret=interpret, stats=value_stats)
  return out if value_stats else out[:3]


@functools.partial(jax.jit, static_argnames=_STATIC)
def cluster_means(x, sizes, index, *, num_rows=None, block_rows: int = 32,
                  cluster_splits: int = 128, num_warps: int = 4, num_stages: int = 2,
                  interpret: bool = False, value_stats: bool = False):
  """Per-cluster means of x (the Lloyd centroid update, or value means), without atomics.

  Args:
    x, sizes, index, num_rows, block_rows, cluster_splits, num_warps, num_stages,
      interpret: as in `cluster_moments` (x [G, S, D] or [B, S, H, D]; index [G, N]).
    value_stats: x are values: also the EAR probe's per-token value terms.

  Returns:
    [G, K, D] float32 means, 0 for empty clusters; with value_stats (means, (||x_p||^2,
    <means_j, x_p>) [G, N] float32 each per sorted position, as in `cluster_moments`).
  """
  means, _, _, stats = _walk(x, sizes, index, None, None, num_rows=num_rows, first=True,
                             block_rows=block_rows, cluster_splits=cluster_splits,
                             num_warps=num_warps, num_stages=num_stages,
                             interpret=interpret, stats=value_stats)
  return (means, stats) if value_stats else means


def _sorted_rows(x, index, num_rows):
  """[G, N, D] float32 rows of x in the sorted order of index."""
  xg = common.heads_first(x, num_rows)
  return jnp.take_along_axis(xg.astype(jnp.float32), index.astype(jnp.int32)[..., None],
                             axis=1)


def cluster_moments_reference(x, sizes, index, *, centroids=None, values=None,
                              num_rows=None):
  """The same (second, radius, value_means) by float32 segment sums over sorted labels."""
  g, _, n, d, k = _check(x, sizes, index, centroids, values, num_rows)
  sizes = sizes.astype(jnp.int32)
  labels = common.searchsorted_rows(jnp.cumsum(sizes, -1), jnp.arange(n))  # K: no cluster
  xs = _sorted_rows(x, index, num_rows)
  if centroids is not None:
    xs = xs - jnp.take_along_axis(centroids.astype(jnp.float32), labels[..., None], axis=1,
                                  mode="clip")
  sq = xs * xs
  seg_sum = jax.vmap(lambda a, lab: jax.ops.segment_sum(a, lab, num_segments=k))
  inv = 1.0 / jnp.maximum(sizes, 1).astype(jnp.float32)[..., None]
  second = seg_sum(sq, labels) * inv
  radius = value_means = None
  if centroids is not None:
    max_sq = jax.vmap(lambda a, lab: jax.ops.segment_max(a, lab, num_segments=k))(
        jnp.sum(sq, -1), labels)
    radius = jnp.where(sizes > 0, jnp.sqrt(jnp.maximum(max_sq, 0.0)), 0.0)
  if values is not None:
    value_means = seg_sum(_sorted_rows(values, index, num_rows), labels) * inv
  return second, radius, value_means


def cluster_means_reference(x, sizes, index, *, num_rows=None):
  """The same means as `cluster_means` by a float32 segment sum over sorted labels."""
  _, _, n, _, k = _check(x, sizes, index, None, None, num_rows)
  sizes = sizes.astype(jnp.int32)
  labels = common.searchsorted_rows(jnp.cumsum(sizes, -1), jnp.arange(n))
  sums = jax.vmap(lambda a, lab: jax.ops.segment_sum(a, lab, num_segments=k))(
      _sorted_rows(x, index, num_rows), labels)
  return sums / jnp.maximum(sizes, 1).astype(jnp.float32)[..., None]
