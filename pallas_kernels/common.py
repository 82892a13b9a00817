"""Small helpers shared by the kernels: ceil division, power-of-two padding, per-head
searchsorted, tile-size and input checks, per-head block specs."""

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl


def cdiv(a, b):
  """Ceil of a / b for ints or integer arrays."""
  return -(-a // b)


def next_pow2(n: int) -> int:
  """Smallest power of two >= n (Triton needs power-of-two tile extents)."""
  return 1 << (max(n, 1) - 1).bit_length()


def searchsorted_rows(ends, x):
  """[G, N] int32: per head g, searchsorted(ends[g], x, side="right") for one [N] x.

  With ends = cumsum(sizes) this is the cluster of each sorted position (K past the end).
  """
  return jax.vmap(lambda e: jnp.searchsorted(e, x, side="right"))(ends).astype(jnp.int32)


def check_block(name: str, b: int) -> None:
  """Tile sizes must be powers of two >= 16 (Triton shapes, and the minimum dot extent)."""
  if b < 16 or b & (b - 1):
    raise ValueError(f"{name}={b} must be a power of two >= 16")


def check_heads(q, k, v, block_map):
  """(G, H) of attention inputs after checking them: q, k, v share a [G, S, D] shape (H is
  None) or a tokens-first [B, S, H, D] one (G = B * H), and block_map [G, ...] matches."""
  if q.ndim not in (3, 4) or k.shape != q.shape or v.shape != q.shape:
    raise ValueError(f"q, k, v shapes differ or are neither [G, S, D] nor [B, S, H, D]: "
                     f"{q.shape}, {k.shape}, {v.shape}")
  g, h = (q.shape[0] * q.shape[2], q.shape[2]) if q.ndim == 4 else (q.shape[0], None)
  if block_map.shape[0] != g:
    raise ValueError(f"block_map has {block_map.shape[0]} heads, q has {g}")
  return g, h


def compensation_mode(compensation, k_variance, k_radius, k_centroids) -> str:
  """"none" / "mean" / "variance" (booleans: True = "mean", False = "none"), after checking
  that "variance" comes with k_variance [G, Kk, D] and k_radius [G, Kk] like k_centroids."""
  if isinstance(compensation, bool):
    compensation = "mean" if compensation else "none"
  if compensation not in ("none", "mean", "variance"):
    raise ValueError(f"compensation must be 'none', 'mean' or 'variance', got {compensation!r}")
  if compensation == "variance":
    if k_variance is None or k_radius is None:
      raise ValueError("compensation='variance' needs k_variance and k_radius")
    if k_variance.shape != k_centroids.shape or k_radius.shape != k_centroids.shape[:-1]:
      raise ValueError(f"k_variance {k_variance.shape} / k_radius {k_radius.shape} do not "
                       f"match k_centroids {k_centroids.shape}")
  return compensation


def head_rows(x, name: str = "x", num_rows=None):
  """(G, H, N, D) of per-head rows after checking them: x is [G, S, D] (H is None) or
  tokens-first [B, S, H, D] (G = B * H, head g = b * H + h reads x[b, :, h, :]); the
  kernels see the first N = num_rows (default S) rows of every head."""
  if x.ndim not in (3, 4) or not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"{name} must be a [G, S, D] or [B, S, H, D] float array, got "
                     f"{x.shape} {x.dtype}")
  s = x.shape[1]
  if num_rows is None:
    num_rows = s
  if isinstance(num_rows, bool) or not isinstance(num_rows, int) or not 1 <= num_rows <= s:
    raise ValueError(f"num_rows must be an int in [1, S={s}], got {num_rows!r}")
  if x.ndim == 4:
    return x.shape[0] * x.shape[2], x.shape[2], num_rows, x.shape[3]
  return x.shape[0], None, num_rows, x.shape[2]


def head_rows_spec(x, num_rows: int):
  """BlockSpec of head g's first `num_rows` rows of x ([G, S, D] or [B, S, H, D]) for the
  program whose last grid index is g: the kernel sees an [N, D] ref; tokens-first heads
  are read through strides (row stride H * D), so no transposed or sliced copy is made."""
  if x.ndim == 4:
    h, d = x.shape[2], x.shape[3]
    return pl.BlockSpec((None, num_rows, None, d),
                        lambda *idx: (idx[-1] // h, 0, idx[-1] % h, 0))
  return pl.BlockSpec((None, num_rows, x.shape[2]), lambda *idx: (idx[-1], 0, 0))


def head_spec(shape):
  """BlockSpec of head g's whole slice of a head-major [G, ...] array (last grid index g)."""
  n = len(shape)
  return pl.BlockSpec((None,) + tuple(shape[1:]), lambda *idx: (idx[-1],) + (0,) * (n - 1))


def heads_first(x, num_rows=None):
  """Head-major [G, N, D] copy of the first num_rows rows of x ([G, S, D] or
  [B, S, H, D]): for the jnp references (the kernels read x in place)."""
  _, _, n, d = head_rows(x, "x", num_rows)
  if x.ndim == 4:
    b, s, h, _ = x.shape
    x = x.transpose(0, 2, 1, 3).reshape(b * h, s, d)
  return x[:, :n]
