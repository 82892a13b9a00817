"""Layout changes and tile blending shared by the video VAEs (Wan, HunyuanVideo).

The blends are diffusers' `blend_v` / `blend_h` / `blend_t`: the first `extent` rows (or
columns, or frames) of a tile fade in linearly from the last ones of its neighbour, so
that tiled decoding matches diffusers' tiled decoding.
"""

from typing import List

import jax
import jax.numpy as jnp
import numpy as np


def to_channels_last(x: jax.Array) -> jax.Array:
  """[B, C, T, H, W] -> [B, T, H, W, C]."""
  return jnp.transpose(x, (0, 2, 3, 4, 1))


def to_channels_first(x: jax.Array) -> jax.Array:
  """[B, T, H, W, C] -> [B, C, T, H, W]."""
  return jnp.transpose(x, (0, 4, 1, 2, 3))


def blend(a: jax.Array, b: jax.Array, extent: int, axis: int) -> jax.Array:
  """b with its first `extent` entries along `axis` (negative: -1 width, -2 height,
  -3 frames) faded in from a's last ones: diffusers' blend_h / blend_v / blend_t."""
  e = min(a.shape[axis], b.shape[axis], extent)
  if e <= 0:
    return b
  ramp = np.arange(e, dtype=np.float64) / e
  shape = (e,) + (1,) * (-axis - 1)
  wa = (1.0 - ramp).astype(np.float32).reshape(shape)
  wb = ramp.astype(np.float32).reshape(shape)
  head = (slice(None),) * (b.ndim + axis)
  mixed = (a[head + (slice(-e, None),)] * wa.astype(a.dtype)
           + b[head + (slice(None, e),)] * wb.astype(b.dtype))
  return b.at[head + (slice(None, e),)].set(mixed)


def blend_tiles(rows: List[List[jax.Array]], blend_height: int, blend_width: int,
                stride_height: int, stride_width: int) -> jax.Array:
  """diffusers' spatial tile merge: each tile [..., h, w] blended with the (already
  blended) tile above and to its left, cropped to the stride, tiles concatenated."""
  blended: List[List[jax.Array]] = []
  out_rows = []
  for i, row in enumerate(rows):
    blended.append([])
    crops = []
    for j, tile in enumerate(row):
      if i > 0:
        tile = blend(blended[i - 1][j], tile, blend_height, axis=-2)
      if j > 0:
        tile = blend(blended[i][j - 1], tile, blend_width, axis=-1)
      blended[i].append(tile)
      crops.append(tile[..., :stride_height, :stride_width])
    out_rows.append(jnp.concatenate(crops, axis=-1))
  return jnp.concatenate(out_rows, axis=-2)


def blend_frames(tiles: List[jax.Array], extent: int, stride: int) -> jax.Array:
  """diffusers' temporal merge of [B, C, T, H, W] tiles: each tile blended with the
  (already blended) previous one, the first cropped to stride + 1 frames, later ones to
  stride, concatenated."""
  out, prev = [], None
  for i, tile in enumerate(tiles):
    if prev is not None:
      tile = blend(prev, tile, extent, axis=-3)
    prev = tile
    out.append(tile[:, :, :stride + (1 if i == 0 else 0)])
  return jnp.concatenate(out, axis=2)
