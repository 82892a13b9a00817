"""mp4 writing / reading (models/video_io.py) and the `svg-ear-compare` CLI end to end."""

import json
import os
import pathlib
import tomllib

import numpy as np
import pytest

from models import compare_cli, video_metrics
from models.video_io import read_video, to_uint8, write_mp4

# ffmpeg runs as a subprocess of a (multithreaded) JAX process; it execs at once.
pytestmark = [pytest.mark.split_cases,
              pytest.mark.filterwarnings(r"ignore:os\.fork\(\) was called:RuntimeWarning")]


def _smooth_video(frames=6, height=48, width=64, phase=0.0):
  t = np.arange(frames)[:, None, None, None]
  y = np.arange(height)[None, :, None, None]
  x = np.arange(width)[None, None, :, None]
  c = np.arange(3)
  return (0.5 + 0.3 * np.sin(2 * np.pi * (0.5 * x / width + 0.3 * y / height + 0.2 * t / frames
                                          + c / 3 + phase))).astype(np.float32)


def _psnr(a_uint8, b_float):
  mse = ((a_uint8 / 255.0 - b_float) ** 2).mean(axis=(1, 2, 3))
  return np.mean(10 * np.log10(1.0 / mse))


def test_round_trip_float_and_uint8(tmp_path):
  video = _smooth_video()
  path = write_mp4(video, tmp_path / "new" / "dir" / "v.mp4", fps=16, crf=10)
  assert path == tmp_path / "new" / "dir" / "v.mp4"
  decoded = read_video(path)
  assert decoded.dtype == np.uint8 and decoded.shape == video.shape
  assert _psnr(decoded, video) > 35.0
  # Only the final file is left (the temporary file was renamed onto it).
  assert os.listdir(path.parent) == ["v.mp4"]
  as_uint8 = read_video(write_mp4(to_uint8(video), tmp_path / "u.mp4", fps=16, crf=10))
  np.testing.assert_array_equal(as_uint8, decoded)
  # A worse crf is measurably worse: the setting reaches the encoder.
  noisy = np.clip(video + 0.05 * np.random.default_rng(0).standard_normal(video.shape), 0, 1)
  hi = _psnr(read_video(write_mp4(noisy, tmp_path / "hi.mp4", 16, crf=5)), noisy)
  lo = _psnr(read_video(write_mp4(noisy, tmp_path / "lo.mp4", 16, crf=45)), noisy)
  assert hi > lo + 3.0


def test_to_uint8_rounding_and_range():
  x = np.array([0.0, 0.999, 0.6 / 255, 1.0, -0.001, 1.002], np.float32).reshape(1, 1, 2, 3)
  np.testing.assert_array_equal(to_uint8(x).ravel(), [0, 255, 1, 255, 0, 255])
  np.testing.assert_array_equal(to_uint8(x, "truncate").ravel(), [0, 254, 0, 255, 0, 255])
  u = np.arange(6, dtype=np.uint8).reshape(1, 1, 2, 3)
  assert to_uint8(u) is u
  with pytest.raises(ValueError, match=r"\[-1, 1\]"):
    to_uint8(x - 0.5)
  with pytest.raises(ValueError, match="uint8"):
    to_uint8(x * 255)
  with pytest.raises(ValueError, match="NaN"):
    to_uint8(np.full((1, 2, 2, 3), np.nan, np.float32))
  with pytest.raises(ValueError, match="quantize"):
    to_uint8(x, "floor")


def test_odd_sizes(tmp_path):
  video = _smooth_video(frames=2, height=17, width=22)
  with pytest.raises(ValueError, match="even height and width"):
    write_mp4(video, tmp_path / "odd.mp4", 16)
  assert not (tmp_path / "odd.mp4").exists()
  decoded = read_video(write_mp4(video, tmp_path / "pad.mp4", 16, crf=10, pad_to_even=True))
  assert decoded.shape == (2, 18, 22, 3)
  assert _psnr(decoded[:, :17], video) > 30.0


@pytest.mark.parametrize("frames,kwargs,error,match", [
    (np.zeros((4, 8, 3)), {}, ValueError, r"\[F, H, W, 3\]"),
    (np.zeros((1, 8, 8, 4)), {}, ValueError, r"\[F, H, W, 3\]"),
    (np.zeros((0, 8, 8, 3)), {}, ValueError, "non-empty"),
    (np.zeros((1, 8, 8, 3), np.int16), {}, TypeError, "dtype int16"),
    (np.zeros((1, 8, 8, 3)), {"fps": 0}, ValueError, "fps"),
    (np.zeros((1, 8, 8, 3)), {"crf": 60}, ValueError, "crf"),
    (np.zeros((1, 8, 8, 3)), {"name": "v.avi"}, ValueError, r"\.mp4"),
])
def test_write_bad_inputs(tmp_path, frames, kwargs, error, match):
  name = kwargs.pop("name", "v.mp4")
  kwargs.setdefault("fps", 16)
  with pytest.raises(error, match=match):
    write_mp4(frames, tmp_path / name, **kwargs)
  assert os.listdir(tmp_path) == []


def test_failed_encode_leaves_existing_file_untouched(tmp_path):
  path = write_mp4(_smooth_video(frames=2), tmp_path / "v.mp4", 16)
  before = path.read_bytes()
  with pytest.raises(RuntimeError, match="no-such-preset"):
    write_mp4(_smooth_video(frames=3, phase=0.5), path, 16, preset="no-such-preset")
  assert path.read_bytes() == before
  assert os.listdir(tmp_path) == ["v.mp4"]


def test_read_missing_or_broken(tmp_path):
  with pytest.raises(FileNotFoundError, match="no such video"):
    read_video(tmp_path / "missing.mp4")
  (tmp_path / "junk.mp4").write_bytes(b"not a video")
  with pytest.raises(Exception):
    read_video(tmp_path / "junk.mp4")


def test_script_is_registered():
  pyproject = pathlib.Path(__file__).resolve().parent.parent / "pyproject.toml"
  data = tomllib.loads(pyproject.read_text())
  assert data["project"]["scripts"]["svg-ear-compare"] == "models.compare_cli:main"
  names = " ".join(data["project"]["dependencies"])
  assert "dm-pix" in names and "imageio-ffmpeg" in names


@pytest.fixture(scope="module")
def two_videos(tmp_path_factory):
  root = tmp_path_factory.mktemp("cli")
  a = write_mp4(_smooth_video(frames=4, height=32, width=48), root / "a.mp4", 16)
  noisy = _smooth_video(frames=4, height=32, width=48) + 0.03 * np.random.default_rng(1) \
      .standard_normal((4, 32, 48, 3))
  b = write_mp4(np.clip(noisy, 0, 1), root / "b.mp4", 16)
  return root, a, b


def test_cli_end_to_end(two_videos, capsys):
  root, a, b = two_videos
  out = root / "res" / "m.json"
  assert compare_cli.main([str(a), str(b), "--json", str(out)]) == 0
  text = capsys.readouterr().out
  result = json.loads(out.read_text())
  va, vb = read_video(a), read_video(b)
  assert result["psnr"] == pytest.approx(video_metrics.psnr(va, vb), abs=1e-9)
  assert result["ssim"] == pytest.approx(video_metrics.ssim(va, vb), abs=1e-12)
  assert 20 < result["psnr"] < 60 and 0 < result["ssim"] < 1
  assert result["lpips"] is None and result["frames"] == 4
  assert f"{result['psnr']:.4f} dB" in text and f"{result['ssim']:.6f}" in text
  assert "LPIPS" in text and "skipped: no VGG weights" in text
  # A video against itself.
  assert compare_cli.main([str(a), str(a), "--json", str(out)]) == 0
  text = capsys.readouterr().out
  same = json.loads(out.read_text())
  assert same["psnr"] == "inf" and same["ssim"] == 1.0 and "inf dB" in text


def test_cli_errors(two_videos, tmp_path, capsys):
  root, a, b = two_videos
  assert compare_cli.main([str(a), str(tmp_path / "missing.mp4")]) == 1
  assert "no such video file" in capsys.readouterr().err
  short = write_mp4(_smooth_video(frames=3, height=32, width=48), tmp_path / "short.mp4", 16)
  assert compare_cli.main([str(a), str(short)]) == 1
  assert "frame counts differ: 4" in capsys.readouterr().err
  small = write_mp4(_smooth_video(frames=4, height=32, width=32), tmp_path / "small.mp4", 16)
  assert compare_cli.main([str(a), str(small)]) == 1
  assert "frame sizes differ: 32x48" in capsys.readouterr().err
  assert compare_cli.main([str(a), str(b), "--lpips-vgg", "x.npz"]) == 2
  assert "go together" in capsys.readouterr().err
  assert compare_cli.main([str(a), str(b), "--lpips-vgg", str(tmp_path / "x.npz"),
                           "--lpips-heads", str(tmp_path / "y.npz")]) == 1
  assert "VGG16 weights file not found" in capsys.readouterr().err
