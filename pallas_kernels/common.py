"""Small helpers shared by the kernels: ceil division, power-of-two padding, per-head
searchsorted, tile-size and input checks."""

import jax
import jax.numpy as jnp


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
