"""Causal 3-D convolution with an explicit frame cache, for chunked (streaming) video VAEs.

Layout is channels-last: activations `[B, T, H, W, C]`, kernels `(kT, kH, kW, C_in, C_out)`
(torch's Conv3d weight `(C_out, C_in, kT, kH, kW)` transposed, `convert_common`'s "conv").

A causal conv sees `context = 2 * pad_t` frames before each output position and none after.
Run over a video in chunks, those frames come from the previous chunk: `step` returns the
output together with the last `context` frames of the (time-padded) input, which the
caller passes back in with the next chunk. The state is a plain array that goes in and comes
out (no hidden Python state), so a jitted chunk function can carry it, and it has the same
shape for every chunk, so that function is traced once for all chunks after the first.

For zero padding (Wan) this equals diffusers' `feat_cache` scheme with CACHE_T = 2: a chunk
of one frame after a one-frame chunk sees [zero, previous, current], exactly as there. For
replicate padding (HunyuanVideo) the start-of-video cache repeats the first frame, which is
what the unchunked conv would have seen.
"""

from typing import Literal, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
from flax import nnx

from models.layers import matmul_precision

CACHE_T = 2  # frames of left context of a kT = 3 causal conv, the only kind that caches
PadMode = Literal["zeros", "replicate"]
IntOr3 = Union[int, Sequence[int]]


def _triple(v: IntOr3, name: str) -> Tuple[int, int, int]:
  t = (v, v, v) if isinstance(v, int) else tuple(int(x) for x in v)
  if len(t) != 3 or min(t) < 0:
    raise ValueError(f"CausalConv3d {name}={v!r}: expected an int or 3 ints >= 0")
  return t


class CausalConv3d(nnx.Module):
  """Conv3d padded by `2 * pad_t` frames on the left only (torch `WanCausalConv3d`).

  Spatial padding is symmetric (`pad_h`, `pad_w` on both sides). Parameters: `kernel`
  `(kT, kH, kW, C_in, C_out)` and `bias` `(C_out,)`.
  """

  def __init__(self, in_channels: int, out_channels: int, kernel_size: IntOr3, *,
               stride: IntOr3 = 1, padding: IntOr3 = 0, pad_mode: PadMode = "zeros",
               dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    if pad_mode not in ("zeros", "replicate"):
      raise ValueError(f"CausalConv3d pad_mode must be 'zeros' or 'replicate', got {pad_mode!r}")
    self.kernel_size = _triple(kernel_size, "kernel_size")
    self.stride = _triple(stride, "stride")
    self.padding = _triple(padding, "padding")
    if min(self.kernel_size) < 1 or min(self.stride) < 1:
      raise ValueError(f"CausalConv3d kernel_size={kernel_size!r} and stride={stride!r} must be "
                       ">= 1")
    self.pad_mode = pad_mode
    self.dtype = jnp.dtype(dtype)
    self.in_channels, self.out_channels = in_channels, out_channels
    shape = (*self.kernel_size, in_channels, out_channels)
    self.kernel = nnx.Param(nnx.initializers.lecun_normal()(rngs.params(), shape, param_dtype))
    self.bias = nnx.Param(jnp.zeros((out_channels,), param_dtype))

  @property
  def context(self) -> int:
    """Frames of left context each output needs (the length of this conv's cache)."""
    return 2 * self.padding[0]

  def _time_pad(self, x: jax.Array, cache: Optional[jax.Array]) -> jax.Array:
    n = self.context
    if n == 0:
      return x
    if cache is None:
      if self.pad_mode == "zeros":
        front = jnp.zeros((x.shape[0], n, *x.shape[2:]), x.dtype)
      else:
        front = jnp.repeat(x[:, :1], n, axis=1)
    else:
      if cache.shape[1] != n or cache.shape[0] != x.shape[0] or cache.shape[2:] != x.shape[2:]:
        raise ValueError(f"CausalConv3d cache shape {cache.shape} does not fit input {x.shape} "
                         f"(expected {n} cached frames)")
      front = cache.astype(x.dtype)
    return jnp.concatenate([front, x], axis=1)

  def _conv(self, padded: jax.Array) -> jax.Array:
    _, ph, pw = self.padding
    if self.pad_mode == "replicate" and (ph or pw):
      padded = jnp.pad(padded, ((0, 0), (0, 0), (ph, ph), (pw, pw), (0, 0)), mode="edge")
      spatial = ((0, 0), (0, 0))
    else:
      spatial = ((ph, ph), (pw, pw))
    y = jax.lax.conv_general_dilated(
        padded.astype(self.dtype), self.kernel[...].astype(self.dtype), self.stride,
        ((0, 0), *spatial), dimension_numbers=("NDHWC", "DHWIO", "NDHWC"),
        precision=matmul_precision(self.dtype))
    return y + self.bias[...].astype(self.dtype)

  def __call__(self, x: jax.Array, cache: Optional[jax.Array] = None) -> jax.Array:
    """x: [B, T, H, W, C_in]; cache: [B, context, H, W, C_in] frames before x, or None at
    the start of the video -> [B, T', H', W', C_out]."""
    return self._conv(self._time_pad(x, cache))

  def step(self, x: jax.Array,
           cache: Optional[jax.Array] = None) -> Tuple[jax.Array, jax.Array]:
    """One chunk of a streamed video: (output, cache for the next chunk).

    Args:
      x: [B, T, H, W, C_in], any T >= 1.
      cache: [B, context, H, W, C_in] from the previous chunk's `step`, None for the first.

    Returns:
      (`self(x, cache)`, the last `context` frames of [cache-or-padding, x]).
    """
    if self.context == 0:
      raise ValueError("CausalConv3d.step: a conv without time padding keeps no cache")
    padded = self._time_pad(x, cache)
    return self._conv(padded), padded[:, -self.context:]
