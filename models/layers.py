"""Layers shared by the DiT ports: fp32 norms, timestep sinusoids, 3-D RoPE, adaLN modulation.

Every norm and every RoPE rotation is computed in float32 whatever the compute dtype, as
the reference implementations do; results are cast back to the caller's dtype.
"""

import math
from typing import Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Dtype = jnp.dtype


class LayerNorm(nnx.Module):
  """LayerNorm over the last axis, computed in float32 (diffusers `FP32LayerNorm`).

  Returns float32: callers cast where the reference does.
  """

  def __init__(self, dim: int, *, eps: float = 1e-6, affine: bool = False):
    self.eps = eps
    if affine:
      self.scale = nnx.Param(jnp.ones((dim,), jnp.float32))
      self.bias = nnx.Param(jnp.zeros((dim,), jnp.float32))
    else:
      self.scale = self.bias = None

  def __call__(self, x: jax.Array) -> jax.Array:  # [..., D] -> [..., D] f32
    x = x.astype(jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    y = (x - mean) * jax.lax.rsqrt(var + self.eps)
    if self.scale is not None:
      y = y * self.scale[...] + self.bias[...]
    return y


class RMSNorm(nnx.Module):
  """RMSNorm over the last axis with a learned scale, computed in float32, output in x.dtype."""

  def __init__(self, dim: int, *, eps: float = 1e-6):
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((dim,), jnp.float32))

  def __call__(self, x: jax.Array) -> jax.Array:  # [..., D] -> [..., D]
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + self.eps)
    return (y * self.scale[...]).astype(x.dtype)


def modulate(normed: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
  """adaLN: `normed * (1 + scale) + shift`, all float32 (shapes broadcast)."""
  return normed * (1.0 + scale) + shift


def timestep_embedding(t: jax.Array, dim: int, *, max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal embedding `[cos, sin]` with frequencies max_period^(-i / (dim/2)).

  Matches diffusers `Timesteps(dim, flip_sin_to_cos=True, downscale_freq_shift=0)`, op for
  op in float32.

  Args:
    t: [N] timesteps (any real dtype).
    dim: even embedding width.

  Returns:
    [N, dim] float32.
  """
  half = dim // 2
  exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half
  args = t.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def rope_axis_dims(head_dim: int) -> Tuple[int, int, int]:
  """Per-axis (t, h, w) rotary widths of Wan: h = w = 2 * (head_dim // 6), t takes the rest."""
  hw = 2 * (head_dim // 6)
  return head_dim - 2 * hw, hw, hw


def rope_tables(grid: Sequence[int], axis_dims: Sequence[int],
                theta: float = 10000.0) -> Tuple[np.ndarray, np.ndarray]:
  """cos/sin of a 3-D rotary embedding over a raster-ordered (f, h, w) token grid.

  Built in float64 with NumPy at trace time (the tables are constants under `jit`), then
  rounded to float32, as diffusers does.

  Args:
    grid: (F, H, W) token grid; tokens are ordered f -> h -> w.
    axis_dims: even rotary widths per axis, summing to the head dim.
    theta: RoPE base.

  Returns:
    (cos, sin), each [F * H * W, sum(axis_dims) // 2] float32: one angle per channel pair.
  """
  angles = []
  for axis, (n, dim) in enumerate(zip(grid, axis_dims)):
    freqs = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    ang = np.outer(np.arange(n, dtype=np.float64), freqs)  # [n, dim/2]
    shape = [1, 1, 1, dim // 2]
    shape[axis] = n
    angles.append(np.broadcast_to(ang.reshape(shape), (*grid, dim // 2)))
  angles = np.concatenate(angles, axis=-1).reshape(math.prod(grid), -1)
  return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates interleaved channel pairs (x[2i], x[2i+1]) by the table angles, in float32.

  Args:
    x: [B, L, H, D].
    cos, sin: [L, D // 2] float32.

  Returns:
    [B, L, H, D] in x.dtype.
  """
  pairs = x.astype(jnp.float32).reshape(*x.shape[:-1], x.shape[-1] // 2, 2)
  x1, x2 = pairs[..., 0], pairs[..., 1]
  c, s = cos[None, :, None, :], sin[None, :, None, :]
  out = jnp.stack([x1 * c - x2 * s, x1 * s + x2 * c], axis=-1)
  return out.reshape(x.shape).astype(x.dtype)


def matmul_precision(dtype: Dtype) -> Optional[jax.lax.Precision]:
  """HIGHEST for float32 compute, so that float32 means float32 on GPU too (not TF32, as
  in the PyTorch references); the backend default otherwise."""
  return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def linear(in_features: int, out_features: int, *, dtype: Dtype, param_dtype: Dtype,
           rngs: nnx.Rngs) -> nnx.Linear:
  """`nnx.Linear` with bias; kernels are (in, out), the transpose of torch's weight."""
  return nnx.Linear(in_features, out_features, use_bias=True, dtype=dtype,
                    param_dtype=param_dtype, precision=matmul_precision(dtype), rngs=rngs)


class MLP(nnx.Module):
  """linear_1 -> activation ("silu" or "gelu_tanh") -> linear_2 (DiT embedders and FFNs)."""

  def __init__(self, d_in: int, d_hidden: int, d_out: int, *, activation: str, dtype,
               param_dtype, rngs: nnx.Rngs):
    if activation not in ("silu", "gelu_tanh"):
      raise ValueError(f"MLP activation must be 'silu' or 'gelu_tanh', got {activation!r}")
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.activation = activation
    self.linear_1 = linear(d_in, d_hidden, **kw)
    self.linear_2 = linear(d_hidden, d_out, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    h = self.linear_1(x)
    h = jax.nn.silu(h) if self.activation == "silu" else jax.nn.gelu(h, approximate=True)
    return self.linear_2(h)
