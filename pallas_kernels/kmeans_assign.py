"""k-means assignment: fused distance + argmin that streams centroid tiles (flash-kmeans's
FlashAssign), never writing the N x K distance matrix.

d(x, c) = ||c||^2 - 2 x.c (||x||^2 is the same for every centroid). The dot runs in x's
dtype with float32 accumulation (bf16 inputs: bf16 centroids, as the reference kernel), and
at full float32 precision for float32 inputs (TF32 flips argmins). Ties go to the lowest
index, as `jnp.argmin`. The centroid update stays a segment sum in XLA
(svg_ear_jax.kmeans.cluster_means): it is one pass over the points and deterministic.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import common

_HI = lax.Precision.HIGHEST


def _kernel(x_ref, c_ref, csq_ref, o_ref, *, block_n, block_k, num_points, num_clusters,
            precision):
  n0 = pl.program_id(0) * block_n
  d = x_ref.shape[-1]
  cols = jnp.arange(d)
  rows = n0 + jnp.arange(block_n)
  ok = rows < num_points
  x = plgpu.load(x_ref.at[rows[:, None], cols[None, :]], mask=ok[:, None], other=0.)
  k0 = jnp.arange(block_k)

  def body(j, carry):
    best, arg = carry
    idx = j * block_k + k0
    valid = idx < num_clusters
    c = plgpu.load(c_ref.at[idx[:, None], cols[None, :]], mask=valid[:, None], other=0.)
    c_sq = plgpu.load(csq_ref.at[idx], mask=valid, other=0.)
    dist = c_sq[None, :] - 2.0 * plgpu.dot(x, c, trans_b=True, precision=precision)
    dist = jnp.where(valid[None, :], dist, jnp.inf)
    tile_best = dist.min(axis=-1)
    tile_arg = jnp.argmin(dist, axis=-1).astype(jnp.int32) + j * block_k
    better = tile_best < best  # strict: earlier tiles win ties
    return jnp.where(better, tile_best, best), jnp.where(better, tile_arg, arg)

  init = (jnp.full((block_n,), jnp.inf, jnp.float32), jnp.zeros((block_n,), jnp.int32))
  _, arg = lax.fori_loop(0, -(-num_clusters // block_k), body, init)
  plgpu.store(o_ref.at[rows], arg, mask=ok)



@functools.partial(jax.jit, static_argnames=("block_n", "block_k", "num_warps", "num_stages",
                                             "interpret"))
def kmeans_assign(x, centroids, *, block_n: int = 128, block_k: int = 64, num_warps: int = 4,
                  num_stages: int = 2, interpret: bool = False):
  """Nearest centroid of every point.

  Args:
    x: [G, N, D] points (float32, bfloat16 or float16).
    centroids: [G, K, D] (any float dtype; cast to x's dtype for the dot).
    block_n, block_k: points per program / centroids per tile (powers of two >= 16).
      The defaults were the fastest of 15 tilings on an H100 at Wan 720p (G=40, S=75,600,
      D=128, bf16; `python -m benchmarks.kernels assign`): Q (300 centroids) 0.64 ms,
      K (1000) 1.82 ms, vs 0.71 / 2.04 ms with 3 stages.
    interpret: Pallas interpret mode (CPU).

  Returns:
    [G, N] int32 labels.
  """
  g, n, d = x.shape
  k = centroids.shape[1]
  for name, b in (("block_n", block_n), ("block_k", block_k)):
    common.check_block(name, b)
  c = centroids.astype(x.dtype)
  c_sq = jnp.sum(jnp.square(c.astype(jnp.float32)), -1)
  dp = max(16, common.next_pow2(d))
  if dp != d:
    pad = lambda a: jnp.pad(a, ((0, 0), (0, 0), (0, dp - d)))
    x, c = pad(x), pad(c)
  precision = _HI if x.dtype == jnp.float32 else None
  kernel = functools.partial(_kernel, block_n=block_n, block_k=block_k, num_points=n,
                             num_clusters=k, precision=precision)
  spec = lambda a: pl.BlockSpec((None,) + a.shape[1:],
                                lambda i, h, _n=a.ndim: (h,) + (0,) * (_n - 1))
  return pl.pallas_call(
      kernel, grid=(-(-n // block_n), g), in_specs=[spec(x), spec(c), spec(c_sq)],
      out_specs=pl.BlockSpec((None, n), lambda i, h: (h, 0)),
      out_shape=jax.ShapeDtypeStruct((g, n), jnp.int32), interpret=interpret,
      name="svg_ear_kmeans_assign",
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
  )(x, c, c_sq)


def kmeans_assign_reference(x, centroids):
  """argmin_k ||c_k||^2 - 2 x.c_k with the same dtype rules, in jnp: [G, N] int32."""
  c = centroids.astype(x.dtype)
  c_sq = jnp.sum(jnp.square(c.astype(jnp.float32)), -1)
  precision = _HI if x.dtype == jnp.float32 else None
  dots = jnp.einsum("gnd,gkd->gnk", x, c, precision=precision,
                    preferred_element_type=jnp.float32)
  return jnp.argmin(c_sq[:, None, :] - 2.0 * dots, axis=-1).astype(jnp.int32)
