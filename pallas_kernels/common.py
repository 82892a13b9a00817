"""Small helpers shared by the kernels: power-of-two padding and tile-size checks."""


def next_pow2(n: int) -> int:
  """Smallest power of two >= n (Triton needs power-of-two tile extents)."""
  return 1 << (max(n, 1) - 1).bit_length()


def check_block(name: str, b: int) -> None:
  """Tile sizes must be powers of two >= 16 (Triton shapes, and the minimum dot extent)."""
  if b < 16 or b & (b - 1):
    raise ValueError(f"{name}={b} must be a power of two >= 16")
