"""Video-like attention inputs for quality and speed benchmarks.

`structured(...)` places tokens on a frames x height x width latent grid (Wan's patchified
layout, token index = (f * H + y) * W + x) and builds per-head Q/K/V from
  * object-like segments: a few ellipsoids drifting over time, each with its own feature,
    over a background segment,
  * a smooth space-time field (low-frequency random Fourier features),
  * a little per-token noise,
projected per head with random matrices and a per-head temperature (some heads sharp,
some diffuse, some mostly positional), then 3D RoPE on Q and K exactly as Wan applies it
(head dim split into frame / height / width bands, theta 10000). Everything derives from
`seed` (default 0) through numpy's PCG64, so a workload is reproducible across machines.

`random_qkv(...)` is plain i.i.d. Gaussian Q/K/V, the adversarial case for clustering.
"""

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Grid:
  """Latent token grid: S = frames * height * width."""

  frames: int
  height: int
  width: int

  @property
  def seq_len(self) -> int:
    return self.frames * self.height * self.width

  def coords(self) -> np.ndarray:
    """[S, 3] float (f, y, x) of every token in Wan's token order."""
    f, y, x = np.meshgrid(np.arange(self.frames), np.arange(self.height), np.arange(self.width),
                          indexing="ij")
    return np.stack([f, y, x], -1).reshape(-1, 3).astype(np.float64)


# Wan2.2 latent grids after the (1, 2, 2) patchify: 720p x 81 frames and 480p x 81 frames.
WAN_720P = Grid(21, 45, 80)   # 75,600 tokens
WAN_480P = Grid(21, 30, 52)   # 32,760 tokens
HUNYUAN_720P = Grid(33, 45, 80)  # 118,800 video tokens


def rope_3d(x: np.ndarray, coords: np.ndarray, theta: float = 10000.0) -> np.ndarray:
  """Wan's 3D RoPE on x [S, H, D]: D/2 complex pairs split into frame / height / width bands
  of sizes D/2 - 2*(D//6), D//6, D//6 (diffusers WanRotaryPosEmbed), adjacent-pair layout."""
  s, h, d = x.shape
  band_h = band_w = d // 6
  band_f = d // 2 - band_h - band_w
  angles = []
  for axis, band in zip(range(3), (band_f, band_h, band_w)):
    dim = 2 * band
    freqs = 1.0 / theta ** (np.arange(0, dim, 2)[:band] / dim)
    angles.append(coords[:, axis:axis + 1] * freqs[None, :])
  ang = np.concatenate(angles, -1)  # [S, D/2]
  cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
  xr, xi = x[..., 0::2], x[..., 1::2]
  out = np.empty_like(x)
  out[..., 0::2] = xr * cos - xi * sin
  out[..., 1::2] = xr * sin + xi * cos
  return out


def _segments(grid: Grid, rng: np.random.Generator, num_objects: int) -> np.ndarray:
  """Segment id of every token: 0 = background, 1..num_objects = drifting ellipsoids."""
  c = grid.coords()
  seg = np.zeros(grid.seq_len, np.int64)
  for obj in range(1, num_objects + 1):
    center = rng.uniform([0, 0], [grid.height, grid.width])
    velocity = rng.normal(size=2) * 0.6
    radii = rng.uniform(0.12, 0.3, size=2) * np.array([grid.height, grid.width])
    pos = center[None, :] + c[:, :1] * velocity[None, :]
    inside = (((c[:, 1:] - pos) / radii) ** 2).sum(-1) <= 1.0
    seg[inside] = obj
  return seg


def structured(grid: Grid, heads: int = 4, head_dim: int = 64, *, seed: int = 0,
               num_objects: int = 6, dtype=np.float32, other_weights: float = 0.0,
               weights_seed: int = 1):
  """Video-like (q, k, v), each [1, S, heads, head_dim] numpy arrays.

  Args:
    grid: latent grid; S = grid.seq_len.
    heads, head_dim: H and D.
    seed: the only source of randomness.
    num_objects: drifting object segments besides the background.
    dtype: numpy dtype of the result.
    other_weights: alpha in [0, 1]: the same scene seen through other projection weights,
      each W = ((1 - alpha) W_seed + alpha W') / sqrt((1 - alpha)^2 + alpha^2) with W' drawn
      from `weights_seed` (0 = the plain workload; 1 = unrelated weights). Models a second
      model (Wan2.2's low-noise expert) reading the latents the first one produced.
    weights_seed: seed of W'.
  """
  if not 0.0 <= other_weights <= 1.0:
    raise ValueError(f"other_weights must be in [0, 1], got {other_weights}")
  other = np.random.default_rng(weights_seed)
  mix = lambda w: ((1 - other_weights) * w + other_weights * other.normal(size=w.shape)
                   / np.sqrt(w.shape[0])) / np.hypot(1 - other_weights, other_weights)
  rng = np.random.default_rng(seed)
  c = grid.coords()
  s, width = grid.seq_len, 96
  seg = _segments(grid, rng, num_objects)
  seg_feat = rng.normal(size=(num_objects + 1, width))
  # smooth field: random Fourier features with wavelengths of a few tokens to the full grid
  extent = np.array([grid.frames, grid.height, grid.width], np.float64)
  freqs = rng.normal(size=(3, width // 2)) * (2 * np.pi / np.maximum(extent[:, None], 1)) * 2.0
  phase = rng.uniform(0, 2 * np.pi, size=width // 2)
  proj = c @ freqs + phase
  field = np.concatenate([np.cos(proj), np.sin(proj)], -1) * np.sqrt(2.0)
  noise = rng.normal(size=(s, width))
  q = np.empty((s, heads, head_dim))
  k = np.empty_like(q)
  v = np.empty_like(q)
  for h in range(heads):
    # per-head mix of semantic / positional / noise components and temperature
    w_seg, w_field, w_noise = rng.dirichlet([2.0, 2.0, 0.7]) * np.array([1.6, 1.3, 0.25])
    x = w_seg * seg_feat[seg] + w_field * field + w_noise * noise
    temperature = rng.uniform(0.8, 1.8)
    wq, wk, wv = (mix(rng.normal(size=(width, head_dim)) / np.sqrt(width)) for _ in range(3))
    q[:, h] = x @ wq * temperature
    k[:, h] = x @ wk * temperature + 0.3 * (x @ wq)  # keys correlate with queries
    v[:, h] = x @ wv + 0.2 * rng.normal(size=(s, head_dim))
  q = rope_3d(q, c)
  k = rope_3d(k, c)
  return tuple(a[None].astype(dtype) for a in (q, k, v))


def random_qkv(seq_len: int, heads: int = 4, head_dim: int = 64, *, seed: int = 0,
               dtype=np.float32):
  """I.i.d. standard normal (q, k, v), each [1, S, H, D]."""
  rng = np.random.default_rng(seed)
  return tuple(rng.normal(size=(1, seq_len, heads, head_dim)).astype(dtype) for _ in range(3))
