"""Video quality metrics as Sparse-VideoGen reports them: PSNR, SSIM and LPIPS-VGG, in JAX.

Every metric follows SVG's `svg/utils/metric.py` (`compute_quantization_error`): frames are
float in [0, 1] (uint8 frames are divided by 255, like torchvision's `ToTensor`), each metric
is computed per frame in float32 and the per-frame values are averaged over frames.

- PSNR: `10 * log10(1 / MSE)` with the MSE over one frame's H, W, C (data range 1.0); this is
  exactly `dm_pix.psnr` on channels-last frames, which is used. Identical frames give inf.
- SSIM: C1 = 0.01**2, C2 = 0.03**2, local statistics from an 11x11 box (uniform) mean with
  zero padding counted in the average (torch `avg_pool2d(11, stride 1, padding 5)`), map
  averaged over H, W, C. Not `dm_pix.ssim`: even with a box `filter_fn` it clamps the variances
  and the covariance (sigma^2 >= eps^2, |sigma12| <= sigma1 * sigma2), which SVG does not, so
  results would differ in flat regions and identical frames would not give exactly 1.0. The
  SVG formula is written here in jnp instead.
- LPIPS: the `lpips` package's v0.1 "vgg" model, with weights read from local files (nothing
  is downloaded; no weights -> LPIPS is reported as skipped, never as 0). SVG calls it on the
  [0, 1] frames without `normalize=True` (LPIPS expects [-1, 1]); `normalize=False` below
  reproduces that, `normalize=True` is the package's intended use.

Videos are `[F, H, W, C]` (channels last), float or uint8.
"""

import functools
import os
import pathlib
from typing import Dict, NamedTuple, Optional, Tuple, Union

import dm_pix
import jax
import jax.numpy as jnp
import numpy as np

PathLike = Union[str, os.PathLike]

SSIM_WINDOW = 11
SSIM_C1 = 0.01 ** 2
SSIM_C2 = 0.03 ** 2

LPIPS_SKIPPED = "skipped: no VGG weights"
# lpips.pretrained_networks.vgg16: torchvision `features` indices of the 13 convolutions; the
# five LPIPS taps (relu1_2 ... relu5_3) end stages of 2, 2, 3, 3, 3 convolutions, each stage
# after the first starting with a 2x2 max pool.
_VGG16_CONVS = ((0, 3, 64), (2, 64, 64), (5, 64, 128), (7, 128, 128), (10, 128, 256),
                (12, 256, 256), (14, 256, 256), (17, 256, 512), (19, 512, 512), (21, 512, 512),
                (24, 512, 512), (26, 512, 512), (28, 512, 512))
_VGG16_STAGES = (2, 2, 3, 3, 3)
LPIPS_CHANNELS = (64, 128, 256, 512, 512)
# lpips.ScalingLayer (v0.1): (x - shift) / scale.
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)
_LPIPS_NORM_EPS = 1e-10


# ---------------------------------------------------------------------------------------------
# Input checks


def _check_video(x, name: str) -> np.ndarray:
  x = np.asarray(x) if not isinstance(x, jax.Array) else x
  if x.ndim != 4:
    raise ValueError(f"{name} must have shape [F, H, W, C], got {tuple(x.shape)}")
  if min(x.shape) == 0:
    raise ValueError(f"{name} must be non-empty, got shape {tuple(x.shape)}")
  if x.dtype != np.uint8 and not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"{name} must be float in [0, 1] or uint8, got dtype {x.dtype}")
  return x


def _check_pair(a, b) -> Tuple[np.ndarray, np.ndarray]:
  a, b = _check_video(a, "a"), _check_video(b, "b")
  if tuple(a.shape) != tuple(b.shape):
    raise ValueError(f"videos must have the same shape [F, H, W, C], got {tuple(a.shape)} and "
                     f"{tuple(b.shape)}")
  return a, b


def _to_float(x) -> jax.Array:
  if x.dtype == np.uint8:
    return jnp.asarray(x, jnp.float32) / 255.0
  return jnp.asarray(x, jnp.float32)


def _per_frame(fn, a, b, frames_per_chunk: int) -> np.ndarray:
  """Applies the jitted `fn([n, H, W, C], [n, H, W, C]) -> [n]` over frame chunks -> [F]."""
  if isinstance(frames_per_chunk, bool) or not isinstance(frames_per_chunk, int) \
     or frames_per_chunk < 1:
    raise ValueError(f"frames_per_chunk must be a positive int, got {frames_per_chunk!r}")
  num = a.shape[0]
  step = min(frames_per_chunk, num)
  out = []
  for start in range(0, num, step):
    xa, xb = _to_float(a[start:start + step]), _to_float(b[start:start + step])
    n = xa.shape[0]
    if n < step:  # pad the tail chunk so every call has one shape (one compilation)
      pad = ((0, step - n), (0, 0), (0, 0), (0, 0))
      xa, xb = jnp.pad(xa, pad), jnp.pad(xb, pad)
    out.append(np.asarray(fn(xa, xb))[:n])
  return np.concatenate(out).astype(np.float64)


def _mean(values: np.ndarray) -> float:
  return float(np.mean(values))


# ---------------------------------------------------------------------------------------------
# MSE / PSNR


@jax.jit
def _mse_frames(a, b):
  return dm_pix.mse(a, b)


@jax.jit
def _psnr_frames(a, b):
  return dm_pix.psnr(a, b)


def mse_per_frame(a, b, *, frames_per_chunk: int = 8) -> np.ndarray:
  """Per-frame mean squared error over H, W, C.

  Args:
    a, b: `[F, H, W, C]` float in [0, 1] or uint8 (divided by 255).
    frames_per_chunk: frames per device call (bounds memory).

  Returns:
    `[F]` float64.
  """
  a, b = _check_pair(a, b)
  return _per_frame(_mse_frames, a, b, frames_per_chunk)


def mse(a, b, *, frames_per_chunk: int = 8) -> float:
  """Mean over frames of the per-frame MSE (SVG's "MSE"); `a, b`: `[F, H, W, C]`."""
  return _mean(mse_per_frame(a, b, frames_per_chunk=frames_per_chunk))


def psnr_per_frame(a, b, *, frames_per_chunk: int = 8) -> np.ndarray:
  """Per-frame PSNR in dB, `10 * log10(1 / MSE)` (data range 1.0; inf for identical frames).

  Args:
    a, b: `[F, H, W, C]` float in [0, 1] or uint8 (divided by 255).
    frames_per_chunk: frames per device call (bounds memory).

  Returns:
    `[F]` float64.
  """
  a, b = _check_pair(a, b)
  return _per_frame(_psnr_frames, a, b, frames_per_chunk)


def psnr(a, b, *, frames_per_chunk: int = 8) -> float:
  """Mean over frames of the per-frame PSNR (SVG's "PSNR"); `a, b`: `[F, H, W, C]`."""
  return _mean(psnr_per_frame(a, b, frames_per_chunk=frames_per_chunk))


# ---------------------------------------------------------------------------------------------
# SSIM


def box_mean(x: jax.Array, window: int = SSIM_WINDOW) -> jax.Array:
  """Mean over a `window` x `window` box with zero padding counted (torch avg_pool2d default).

  Args:
    x: `[N, H, W, C]`.
    window: odd window size.

  Returns:
    `[N, H, W, C]`.
  """
  half = window // 2
  summed = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, window, 1, 1), (1, 1, 1, 1),
                                 ((0, 0), (half, half), (0, 0), (0, 0)))
  summed = jax.lax.reduce_window(summed, 0.0, jax.lax.add, (1, 1, window, 1), (1, 1, 1, 1),
                                 ((0, 0), (0, 0), (half, half), (0, 0)))
  return summed / float(window * window)


def ssim_map(a: jax.Array, b: jax.Array) -> jax.Array:
  """SVG's SSIM map of float frames.

  Args:
    a, b: `[N, H, W, C]` float.

  Returns:
    `[N, H, W, C]`.
  """
  mu1, mu2 = box_mean(a), box_mean(b)
  sigma1_sq = box_mean(a * a) - mu1 ** 2
  sigma2_sq = box_mean(b * b) - mu2 ** 2
  sigma12 = box_mean(a * b) - mu1 * mu2
  return ((2 * mu1 * mu2 + SSIM_C1) * (2 * sigma12 + SSIM_C2)) / (
      (mu1 ** 2 + mu2 ** 2 + SSIM_C1) * (sigma1_sq + sigma2_sq + SSIM_C2))


@jax.jit
def _ssim_frames(a, b):
  return jnp.mean(ssim_map(a, b), axis=(1, 2, 3))


def ssim_per_frame(a, b, *, frames_per_chunk: int = 8) -> np.ndarray:
  """Per-frame SSIM (11x11 box window, zero padding, C1 = 0.01^2, C2 = 0.03^2, range 1.0).

  Args:
    a, b: `[F, H, W, C]` float in [0, 1] or uint8 (divided by 255).
    frames_per_chunk: frames per device call (bounds memory).

  Returns:
    `[F]` float64; 1.0 for identical frames.
  """
  a, b = _check_pair(a, b)
  return _per_frame(_ssim_frames, a, b, frames_per_chunk)


def ssim(a, b, *, frames_per_chunk: int = 8) -> float:
  """Mean over frames of the per-frame SSIM (SVG's "SSIM"); `a, b`: `[F, H, W, C]`."""
  return _mean(ssim_per_frame(a, b, frames_per_chunk=frames_per_chunk))


# ---------------------------------------------------------------------------------------------
# LPIPS-VGG (lpips v0.1)


class LpipsWeights(NamedTuple):
  """LPIPS-VGG weights (a pytree).

  Attributes:
    convs: 13 `(kernel [3, 3, in, out] (HWIO), bias [out])` pairs of VGG16's `features`.
    heads: 5 linear-head weights `[C]` (C = 64, 128, 256, 512, 512), lpips' `lin0..lin4`.
  """

  convs: Tuple[Tuple[jax.Array, jax.Array], ...]
  heads: Tuple[jax.Array, ...]


def _load_state_dict(path: PathLike, what: str) -> Dict[str, np.ndarray]:
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"{what} file not found: {str(path)!r}")
  suffix = path.suffix.lower()
  if suffix in (".pth", ".pt", ".bin"):
    try:
      import torch
    except ImportError as err:
      raise ImportError(
          f"reading {what} from {str(path)!r} needs torch, which is not installed here; convert "
          "it once where torch exists, e.g. np.savez(OUT.npz, **{k: v.numpy() for k, v in "
          "torch.load(PTH, map_location='cpu').items()}), and pass the .npz (or a "
          ".safetensors) instead") from err
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
      raise ValueError(f"{what} file {str(path)!r} does not hold a state dict "
                       f"(got {type(state).__name__})")
    return {k: v.detach().float().numpy() for k, v in state.items() if hasattr(v, "detach")}
  if suffix == ".safetensors":
    from safetensors.numpy import load_file
    return dict(load_file(str(path)))
  if suffix == ".npz":
    with np.load(str(path)) as data:
      return {k: data[k] for k in data.files}
  raise ValueError(f"{what} must be a .pth/.pt, .safetensors or .npz file, got {str(path)!r}")


def _find(state: Dict[str, np.ndarray], names, what: str, path: PathLike) -> np.ndarray:
  for name in names:
    if name in state:
      return state[name]
    # Tolerate a wrapper prefix such as "module." or "net.".
    hits = [k for k in state if k.endswith("." + name)]
    if len(hits) == 1:
      return state[hits[0]]
  raise ValueError(f"{what} file {str(path)!r} has no {names[0]!r} "
                   f"(keys start: {sorted(state)[:6]})")


def load_lpips_weights(vgg_path: PathLike, heads_path: PathLike) -> LpipsWeights:
  """Reads LPIPS-VGG weights from local files.

  Args:
    vgg_path: torchvision `vgg16` ImageNet state dict (keys `features.{i}.weight/bias`), as
      `.pth` (needs torch), `.safetensors` or `.npz` with the same keys.
    heads_path: the `lpips` package's `weights/v0.1/vgg.pth` (keys `lin{k}.model.1.weight`,
      shape `[1, C, 1, 1]`), or a `.safetensors` / `.npz` conversion of it.

  Returns:
    `LpipsWeights` (float32).
  """
  vgg = _load_state_dict(vgg_path, "VGG16 weights")
  heads_state = _load_state_dict(heads_path, "LPIPS linear heads")
  convs = []
  for index, c_in, c_out in _VGG16_CONVS:
    kernel = _find(vgg, [f"features.{index}.weight"], "VGG16 weights", vgg_path)
    bias = _find(vgg, [f"features.{index}.bias"], "VGG16 weights", vgg_path)
    if kernel.shape != (c_out, c_in, 3, 3) or bias.shape != (c_out,):
      raise ValueError(f"VGG16 features.{index}: expected weight {(c_out, c_in, 3, 3)} and bias "
                       f"{(c_out,)}, got {kernel.shape} and {bias.shape} (not torchvision vgg16?)")
    convs.append((jnp.asarray(np.transpose(kernel, (2, 3, 1, 0)), jnp.float32),
                  jnp.asarray(bias, jnp.float32)))
  heads = []
  for k, channels in enumerate(LPIPS_CHANNELS):
    names = [f"lin{k}.model.1.weight", f"lins.{k}.model.1.weight", f"lin{k}.model.0.weight",
             f"lins.{k}.model.0.weight"]
    head = _find(heads_state, names, "LPIPS linear heads", heads_path)
    if head.shape not in ((1, channels, 1, 1), (channels,)):
      raise ValueError(f"LPIPS head lin{k}: expected shape (1, {channels}, 1, 1), got "
                       f"{head.shape} (not lpips' v0.1 vgg.pth?)")
    heads.append(jnp.asarray(head.reshape(channels), jnp.float32))
  return LpipsWeights(tuple(convs), tuple(heads))


def _conv3x3(x, kernel, bias):
  y = jax.lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)),
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                   precision=jax.lax.Precision.HIGHEST)
  return y + bias


def _vgg_taps(weights: LpipsWeights, x):
  taps, conv = [], 0
  for stage, num_convs in enumerate(_VGG16_STAGES):
    if stage:
      x = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
    for _ in range(num_convs):
      x = jax.nn.relu(_conv3x3(x, *weights.convs[conv]))
      conv += 1
    taps.append(x)
  return taps


@functools.partial(jax.jit, static_argnames=("normalize",))
def _lpips_frames(weights: LpipsWeights, a, b, normalize: bool):
  if normalize:
    a, b = 2.0 * a - 1.0, 2.0 * b - 1.0
  x = jnp.concatenate([a, b], axis=0)  # one VGG pass for both videos
  x = (x - jnp.asarray(LPIPS_SHIFT, x.dtype)) / jnp.asarray(LPIPS_SCALE, x.dtype)
  n = a.shape[0]
  total = jnp.zeros((n,), jnp.float32)
  for tap, head in zip(_vgg_taps(weights, x), weights.heads):
    tap = tap / (jnp.sqrt(jnp.sum(tap * tap, axis=-1, keepdims=True)) + _LPIPS_NORM_EPS)
    diff = (tap[:n] - tap[n:]) ** 2
    total = total + jnp.mean(jnp.einsum("nhwc,c->nhw", diff,
                                        head, precision=jax.lax.Precision.HIGHEST), axis=(1, 2))
  return total


def lpips_per_frame(a, b, weights: LpipsWeights, *, normalize: bool = False,
                    frames_per_chunk: int = 1) -> np.ndarray:
  """Per-frame LPIPS-VGG (v0.1) distance.

  Args:
    a, b: `[F, H, W, 3]` float or uint8 (divided by 255), H and W >= 16.
    weights: from `load_lpips_weights`.
    normalize: False -> frames are fed as they are ([0, 1]), as SVG does; True -> mapped to
      [-1, 1] first (`lpips(..., normalize=True)`).
    frames_per_chunk: frames per device call (VGG activations of a 720p frame are ~1 GB).

  Returns:
    `[F]` float64.
  """
  if not isinstance(weights, LpipsWeights):
    raise TypeError(f"weights must be LpipsWeights (see load_lpips_weights), got "
                    f"{type(weights).__name__}")
  a, b = _check_pair(a, b)
  if a.shape[-1] != 3:
    raise ValueError(f"LPIPS needs RGB frames [F, H, W, 3], got {tuple(a.shape)}")
  if a.shape[1] < 16 or a.shape[2] < 16:
    raise ValueError(f"LPIPS-VGG needs H, W >= 16 (four 2x2 poolings), got {tuple(a.shape)}")
  fn = functools.partial(_lpips_frames, weights, normalize=bool(normalize))
  return _per_frame(fn, a, b, frames_per_chunk)


def lpips(a, b, weights: LpipsWeights, *, normalize: bool = False,
          frames_per_chunk: int = 1) -> float:
  """Mean over frames of `lpips_per_frame` (SVG's "LPIPS"); `a, b`: `[F, H, W, 3]`."""
  return _mean(lpips_per_frame(a, b, weights, normalize=normalize,
                               frames_per_chunk=frames_per_chunk))


# ---------------------------------------------------------------------------------------------
# Whole comparisons


def compare_videos(a, b, *, lpips_weights: Optional[LpipsWeights] = None,
                   lpips_normalize: bool = False, frames_per_chunk: int = 8) -> Dict:
  """All SVG metrics of two videos.

  Args:
    a, b: `[F, H, W, C]` float in [0, 1] or uint8 (C = 3 for LPIPS).
    lpips_weights: None -> LPIPS is not computed and reported as skipped.
    lpips_normalize: see `lpips_per_frame`.
    frames_per_chunk: frames per device call for MSE / PSNR / SSIM.

  Returns:
    dict with "frames", "height", "width", "mse", "psnr", "ssim" (floats, means over frames)
    and "lpips" (float, or None with the reason in "lpips_skipped").
  """
  a, b = _check_pair(a, b)
  result = {
      "frames": int(a.shape[0]), "height": int(a.shape[1]), "width": int(a.shape[2]),
      "mse": mse(a, b, frames_per_chunk=frames_per_chunk),
      "psnr": psnr(a, b, frames_per_chunk=frames_per_chunk),
      "ssim": ssim(a, b, frames_per_chunk=frames_per_chunk),
      "lpips": None, "lpips_skipped": LPIPS_SKIPPED,
  }
  if lpips_weights is not None:
    result["lpips"] = lpips(a, b, lpips_weights, normalize=lpips_normalize)
    result["lpips_skipped"] = None
  return result


def compare_video_files(path_a: PathLike, path_b: PathLike, *,
                        lpips_vgg: Optional[PathLike] = None,
                        lpips_heads: Optional[PathLike] = None,
                        lpips_normalize: bool = False) -> Dict:
  """`compare_videos` of two video files, decoded the way SVG decodes them (uint8 / 255).

  Args:
    path_a, path_b: existing video files (mp4).
    lpips_vgg, lpips_heads: both or neither; see `load_lpips_weights`.
    lpips_normalize: see `lpips_per_frame`.

  Returns:
    the `compare_videos` dict plus "path_a" and "path_b".
  """
  from models.video_io import read_video

  for path in (path_a, path_b):
    if not pathlib.Path(path).is_file():
      raise FileNotFoundError(f"no such video file: {str(path)!r}")
  if (lpips_vgg is None) != (lpips_heads is None):
    raise ValueError("LPIPS needs both the VGG16 weights and the linear-head weights "
                     "(give both paths or neither)")
  weights = load_lpips_weights(lpips_vgg, lpips_heads) if lpips_vgg is not None else None
  a, b = read_video(path_a), read_video(path_b)
  if a.shape[0] != b.shape[0]:
    raise ValueError(f"frame counts differ: {a.shape[0]} in {str(path_a)!r}, {b.shape[0]} in "
                     f"{str(path_b)!r}")
  if a.shape[1:] != b.shape[1:]:
    raise ValueError(f"frame sizes differ: {a.shape[1]}x{a.shape[2]} in {str(path_a)!r}, "
                     f"{b.shape[1]}x{b.shape[2]} in {str(path_b)!r}")
  result = compare_videos(a, b, lpips_weights=weights, lpips_normalize=lpips_normalize)
  result.update(path_a=str(path_a), path_b=str(path_b))
  return result

