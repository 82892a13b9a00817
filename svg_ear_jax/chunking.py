"""Row chunking that bounds the temporaries of the XLA path (no S x S, no all-heads N x K)."""

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax


def rows_per_chunk(total_rows: int, bytes_per_row: int, budget_mb: int) -> int:
  """How many rows fit `budget_mb` MiB of temporaries (at least 1, at most `total_rows`)."""
  rows = max(1, (budget_mb << 20) // max(1, bytes_per_row))
  return int(min(rows, total_rows))


def map_row_chunks(fn: Callable, xs: Sequence[jax.Array], chunk: int):
  """Applies `fn` to chunks of axis 1 of every array in `xs` and concatenates the results.

  `fn(*chunks)` receives arrays of shape [G, chunk, ...] and returns a pytree of arrays
  of shape [G, chunk, ...]. Rows are padded with zeros to a multiple of `chunk` and the
  padding is cut off again, so `fn` must be row-wise independent.
  """
  n = xs[0].shape[1]
  if chunk >= n:
    return fn(*xs)
  num = -(-n // chunk)
  pad = num * chunk - n

  def split(x):
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    x = x.reshape(x.shape[0], num, chunk, *x.shape[2:])
    return jnp.moveaxis(x, 1, 0)

  out = lax.map(lambda c: fn(*c), tuple(split(x) for x in xs))

  def merge(y):
    y = jnp.moveaxis(y, 0, 1)
    return y.reshape(y.shape[0], num * chunk, *y.shape[3:])[:, :n]

  return jax.tree_util.tree_map(merge, out)
