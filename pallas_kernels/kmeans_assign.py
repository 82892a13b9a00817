"""k-means assignment: fused distance + argmin that streams centroid tiles (flash-kmeans's
FlashAssign), never writing the N x K distance matrix.

d(x, c) = ||c||^2 - 2 x.c (||x||^2 is the same for every centroid). The dot runs in x's
dtype with float32 accumulation (bf16 inputs: bf16 centroids, as the reference kernel), and
at full float32 precision for float32 inputs (TF32 flips argmins). Ties go to the lowest
index, as `jnp.argmin`. Points are [G, N, D] or tokens-first [B, S, H, D] (head
g = b * H + h read in place through strides), optionally only their first `num_rows` rows
(HunyuanVideo's video tokens ahead of its text), so no transposed or sliced copy is made.
The centroid update is elsewhere: cluster_moments.cluster_means walks the cluster-sorted
order (svg_ear_jax.kmeans, update="sorted"), or an XLA segment sum.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import common

_HI = lax.Precision.HIGHEST


def _kernel(x_ref, c_ref, csq_ref, o_ref, *, block_n, block_k, num_points, num_tiles,
            head_dim, precision):
  n0 = pl.program_id(0) * block_n
  dp = c_ref.shape[-1]  # head_dim padded to a power of two (x's extra columns masked off)
  cols = jnp.arange(dp)
  rows = n0 + jnp.arange(block_n)
  ok = rows < num_points
  mask = ok[:, None] if dp == head_dim else ok[:, None] & (cols < head_dim)[None, :]
  x = plgpu.load(x_ref.at[rows[:, None], cols[None, :]], mask=mask, other=0.)
  k0 = jnp.arange(block_k)

  def dist(j):
    # centroids padded to whole tiles: zero rows whose ||c||^2 is +inf, so no mask here
    idx = j * block_k + k0
    c = plgpu.load(c_ref.at[idx[:, None], cols[None, :]])
    c_sq = plgpu.load(csq_ref.at[idx])
    return c_sq[None, :] - 2.0 * plgpu.dot(x, c, trans_b=True, precision=precision)

  def body(j, carry):
    best, arg = carry
    d = dist(j)
    tile_best = d.min(axis=-1)
    tile_arg = jnp.argmin(d, axis=-1).astype(jnp.int32) + j * block_k
    better = tile_best < best  # strict: earlier tiles win ties
    return jnp.where(better, tile_best, best), jnp.where(better, tile_arg, arg)

  init = (jnp.full((block_n,), jnp.inf, jnp.float32), jnp.zeros((block_n,), jnp.int32))
  _, arg = lax.fori_loop(0, num_tiles, body, init)
  plgpu.store(o_ref.at[rows], arg, mask=ok)


@functools.partial(jax.jit, static_argnames=("num_rows", "block_n", "block_k", "num_warps",
                                             "num_stages", "interpret"))
def kmeans_assign(x, centroids, *, num_rows=None, block_n: int = 128, block_k: int = 64,
                  num_warps: int = 4, num_stages: int = 2, interpret: bool = False):
  """Nearest centroid of every point.

  Args:
    x: [G, N, D] points, or tokens-first [B, S, H, D] (G = B * H, head g = b * H + h is
      x[b, :, h, :], read in place) (float32, bfloat16 or float16).
    centroids: [G, K, D] (any float dtype; cast to x's dtype for the dot).
    num_rows: static; only the first num_rows points of every head are assigned
      (default all N / S).
    block_n, block_k: points per program / centroids per tile (powers of two >= 16).
      The defaults were the fastest of 15 tilings on an H100 at Wan 720p (G=40, S=75,600,
      D=128, bf16; `python -m benchmarks.kernels assign`): Q (300 centroids) 0.64 ms,
      K (1000) 1.82 ms, vs 0.71 / 2.04 ms with 3 stages. On an H200 (2026-12-03,
      kernels_h200.md, centroids padded to whole tiles): 0.60 / 1.66 ms; a running best
      per (point, lane) reduced once at the end instead of per tile was slower
      (0.68-0.72 / 1.81 ms at its best tilings).
    interpret: Pallas interpret mode (CPU).

  Returns:
    [G, num_rows] int32 labels.
  """
  g, _, n, d = common.head_rows(x, "x", num_rows)
  if centroids.ndim != 3 or centroids.shape[0] != g or centroids.shape[2] != d:
    raise ValueError(f"centroids must be [G, K, D] with G = {g}, D = {d}, got "
                     f"{centroids.shape}")
  k = centroids.shape[1]
  for name, b in (("block_n", block_n), ("block_k", block_k)):
    common.check_block(name, b)
  c = centroids.astype(x.dtype)
  c_sq = jnp.sum(jnp.square(c.astype(jnp.float32)), -1)
  # The centroids are small: pad them to whole tiles of block_k (zero rows at distance +inf)
  # and to a power-of-two width (x's extra columns are masked in the kernel).
  num_tiles = common.cdiv(k, block_k)
  dp = max(16, common.next_pow2(d))
  c = jnp.pad(c, ((0, 0), (0, num_tiles * block_k - k), (0, dp - d)))
  c_sq = jnp.pad(c_sq, ((0, 0), (0, num_tiles * block_k - k)), constant_values=jnp.inf)
  precision = _HI if x.dtype == jnp.float32 else None
  kernel = functools.partial(_kernel, block_n=block_n, block_k=block_k, num_points=n,
                             num_tiles=num_tiles, head_dim=d, precision=precision)
  return pl.pallas_call(
      kernel, grid=(common.cdiv(n, block_n), g),
      in_specs=[common.head_rows_spec(x, n), common.head_spec(c.shape),
                common.head_spec(c_sq.shape)],
      out_specs=common.head_spec((g, n)),
      out_shape=jax.ShapeDtypeStruct((g, n), jnp.int32), interpret=interpret,
      name="svg_ear_kmeans_assign",
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
  )(x, c, c_sq)


def kmeans_assign_reference(x, centroids, *, num_rows=None):
  """argmin_k ||c_k||^2 - 2 x.c_k with the same dtype rules, in jnp: [G, num_rows] int32
  (x [G, N, D] or [B, S, H, D] as in `kmeans_assign`)."""
  x = common.heads_first(x, num_rows)
  c = centroids.astype(x.dtype)
  c_sq = jnp.sum(jnp.square(c.astype(jnp.float32)), -1)
  precision = _HI if x.dtype == jnp.float32 else None
  dots = jnp.einsum("gnd,gkd->gnk", x, c, precision=precision,
                    preferred_element_type=jnp.float32)
  return jnp.argmin(c_sq[:, None, :] - 2.0 * dots, axis=-1).astype(jnp.int32)
