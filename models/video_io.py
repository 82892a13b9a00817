"""Writing and reading mp4 videos (H.264 / yuv420p) with pip-only dependencies.

Encoder choice: imageio-ffmpeg. Its platform wheels bundle a static ffmpeg executable, so
`pip install imageio-ffmpeg` is enough (no system ffmpeg, nothing downloaded at run time), and
it is what diffusers' `export_to_video` and Sparse-VideoGen's metric script (through
`imageio.get_reader`) already use, so our files are encoded and decoded by the same code path
as the reference numbers. Writing runs that bundled executable (`get_ffmpeg_exe()`) on a pipe
of raw RGB frames, rather than `imageio.get_writer` / `imageio_ffmpeg.write_frames`: every
encoder setting is explicit, the frames are never silently resized (imageio's default
`macro_block_size=16` does that), and ffmpeg's exit status is checked (`write_frames` ignores
it, so a failed encode would go unnoticed). Reading goes through imageio's FFMPEG plugin, like
SVG's `load_video`.

Float frames follow diffusers' `output_type="np"` convention: `[F, H, W, 3]` in [0, 1].
"""

import fractions
import math
import numbers
import os
import pathlib
import subprocess
import tempfile
from typing import Literal, Union

import numpy as np

PathLike = Union[str, os.PathLike]
Quantize = Literal["round", "truncate"]

CODEC = "libx264"
PIXEL_FORMAT = "yuv420p"
# libx264's "visually lossless" point; diffusers' export_to_video default quality=5 maps to
# crf 25. Lower is better (0 = lossless luma; chroma is still 4:2:0 subsampled).
DEFAULT_CRF = 18
DEFAULT_PRESET = "medium"
# Float inputs a rounding step outside [0, 1] are clipped; anything further out is an error
# (most likely a [-1, 1] VAE output that was not post-processed).
_FLOAT_SLACK = 1.0 / 255.0


def _check_frames(frames) -> np.ndarray:
  frames = np.asarray(frames)
  if frames.ndim != 4 or frames.shape[-1] != 3:
    raise ValueError(f"frames must have shape [F, H, W, 3] (RGB, channels last), got "
                     f"{frames.shape}")
  if frames.shape[0] == 0 or frames.shape[1] == 0 or frames.shape[2] == 0:
    raise ValueError(f"frames must be non-empty, got shape {frames.shape}")
  if frames.dtype != np.uint8 and not np.issubdtype(frames.dtype, np.floating):
    raise TypeError(f"frames must be uint8 in [0, 255] or float in [0, 1], got dtype "
                    f"{frames.dtype}")
  return frames


def to_uint8(frames, quantize: Quantize = "round") -> np.ndarray:
  """Converts float frames in [0, 1] to uint8 (uint8 frames are returned unchanged).

  Args:
    frames: `[F, H, W, 3]` float in [0, 1] or uint8.
    quantize: "round" -> `round(x * 255)` (diffusers' `numpy_to_pil` and `encode_video`);
      "truncate" -> `floor(x * 255)` (diffusers' `export_to_video`, bit-exact with its files).

  Returns:
    `[F, H, W, 3]` uint8.
  """
  if quantize not in ("round", "truncate"):
    raise ValueError(f"quantize must be 'round' or 'truncate', got {quantize!r}")
  frames = _check_frames(frames)
  if frames.dtype == np.uint8:
    return frames
  if not np.all(np.isfinite(frames)):
    raise ValueError("float frames contain NaN or inf")
  lo, hi = float(frames.min()), float(frames.max())
  if lo < -_FLOAT_SLACK or hi > 1.0 + _FLOAT_SLACK:
    raise ValueError(f"float frames must lie in [0, 1], got values in [{lo:.4g}, {hi:.4g}]"
                     + (" (a [-1, 1] VAE output? map it with x / 2 + 0.5)" if lo < 0 else "")
                     + (" (uint8-range values? pass a uint8 array)" if hi > 2 else ""))
  scaled = np.clip(frames.astype(np.float32), 0.0, 1.0) * 255.0
  scaled = np.round(scaled) if quantize == "round" else np.floor(scaled)
  return scaled.astype(np.uint8)


def write_mp4(frames, path: PathLike, fps: float, *, crf: int = DEFAULT_CRF,
              preset: str = DEFAULT_PRESET, quantize: Quantize = "round",
              pad_to_even: bool = False) -> pathlib.Path:
  """Encodes `frames` as an H.264 (libx264, yuv420p) mp4 at `path`, atomically.

  The video is written to a temporary file in the destination folder and renamed onto `path`
  only once ffmpeg has finished, so `path` never holds a partial file. Missing parent
  folders are created. An existing file at `path` is replaced.

  Args:
    frames: `[F, H, W, 3]` RGB, float in [0, 1] (clipped, then quantised by `quantize`) or
      uint8.
    path: destination, must end in ".mp4".
    fps: frames per second (> 0); Wan examples use 16 (A14B) / 24 (TI2V-5B), HunyuanVideo 15.
    crf: libx264 constant rate factor in [0, 51], lower is better.
    preset: libx264 speed/size preset ("ultrafast" ... "veryslow"); does not change quality
      at a fixed crf much, only the file size.
    quantize: float -> uint8 rule, see `to_uint8`.
    pad_to_even: yuv420p needs even H and W. False -> odd sizes raise ValueError; True ->
      the last row / column is repeated once (the decoded video is then that larger size).

  Returns:
    The written path.
  """
  path = pathlib.Path(path)
  if path.suffix.lower() != ".mp4":
    raise ValueError(f"path must end in .mp4, got {str(path)!r}")
  if isinstance(fps, bool) or not isinstance(fps, numbers.Real) or not 0 < fps < math.inf:
    raise ValueError(f"fps must be a positive number, got {fps!r}")
  if isinstance(crf, bool) or not isinstance(crf, numbers.Integral) or not 0 <= crf <= 51:
    raise ValueError(f"crf must be an int in [0, 51], got {crf!r}")
  frames = to_uint8(frames, quantize)
  _, height, width, _ = frames.shape
  if height % 2 or width % 2:
    if not pad_to_even:
      raise ValueError(f"{PIXEL_FORMAT} needs an even height and width, got {height}x{width}; "
                       "crop the frames or pass pad_to_even=True")
    frames = np.pad(frames, ((0, 0), (0, height % 2), (0, width % 2), (0, 0)), mode="edge")
    _, height, width, _ = frames.shape

  from imageio_ffmpeg import get_ffmpeg_exe

  rate = fractions.Fraction(float(fps)).limit_denominator(1001 * 1000)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp.mp4", dir=path.parent)
  os.close(fd)
  cmd = [get_ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "error", "-y",
         "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}", "-r", str(rate),
         "-i", "pipe:0", "-an",
         "-c:v", CODEC, "-pix_fmt", PIXEL_FORMAT, "-crf", str(int(crf)), "-preset", preset,
         "-f", "mp4", tmp]
  try:
    proc = subprocess.run(cmd, input=np.ascontiguousarray(frames).tobytes(),
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False)
    if proc.returncode != 0 or os.path.getsize(tmp) == 0:
      err = proc.stderr.decode(errors="replace").strip()[-2000:]
      raise RuntimeError(f"ffmpeg failed to encode {str(path)!r} (exit status "
                         f"{proc.returncode}): {err or 'no output'}")
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise
  return path


def read_video(path: PathLike) -> np.ndarray:
  """Decodes every frame of a video file to RGB.

  Args:
    path: an existing video file (mp4 or anything ffmpeg reads).

  Returns:
    `[F, H, W, 3]` uint8.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"no such video file: {str(path)!r}")
  import imageio.v2 as imageio

  reader = imageio.get_reader(str(path), format="FFMPEG")
  try:
    frames = [np.asarray(frame) for frame in reader]
  finally:
    reader.close()
  if not frames:
    raise ValueError(f"no frames could be decoded from {str(path)!r}")
  video = np.stack(frames)
  if video.dtype != np.uint8 or video.ndim != 4 or video.shape[-1] != 3:
    raise ValueError(f"decoded {str(path)!r} to {video.dtype} {video.shape}, expected uint8 "
                     "[F, H, W, 3]")
  return video
