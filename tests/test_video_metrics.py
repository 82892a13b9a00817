"""PSNR / SSIM / LPIPS of models/video_metrics.py against independent transcriptions.

PSNR and SSIM are checked against a float64 NumPy transcription of Sparse-VideoGen's
svg/utils/metric.py written here; LPIPS-VGG against a small torch re-implementation of the
lpips v0.1 model with random weights (Python 3.11 only, where torch exists).
"""

import json
import sys

import dm_pix
import jax.numpy as jnp
import numpy as np
import pytest

from models import video_metrics as vm

# ffmpeg runs as a subprocess of a (multithreaded) JAX process; it execs at once.
pytestmark = pytest.mark.filterwarnings(r"ignore:os\.fork\(\) was called:RuntimeWarning")

# ---------------------------------------------------------------------------------------------
# NumPy transcription of SVG's formulas (float64, per frame, NCHW-free: means over C, H, W).


def _np_box_mean(x):
  """avg_pool2d(kernel 11, stride 1, padding 5, count_include_pad=True) of [H, W]."""
  padded = np.pad(x, 5)
  c = np.pad(padded, ((1, 0), (1, 0))).cumsum(0).cumsum(1)
  return (c[11:, 11:] - c[:-11, 11:] - c[11:, :-11] + c[:-11, :-11]) / 121.0


def _np_ssim_frame(x, y):
  c1, c2 = 0.01 ** 2, 0.03 ** 2
  maps = []
  for ch in range(x.shape[-1]):
    a, b = x[..., ch], y[..., ch]
    mu1, mu2 = _np_box_mean(a), _np_box_mean(b)
    s11 = _np_box_mean(a * a) - mu1 ** 2
    s22 = _np_box_mean(b * b) - mu2 ** 2
    s12 = _np_box_mean(a * b) - mu1 * mu2
    maps.append(((2 * mu1 * mu2 + c1) * (2 * s12 + c2)) / ((mu1 ** 2 + mu2 ** 2 + c1)
                                                            * (s11 + s22 + c2)))
  return np.mean(maps)


def _np_float(v):
  v = np.asarray(v)
  return v.astype(np.float64) / 255.0 if v.dtype == np.uint8 else v.astype(np.float64)


def np_svg_psnr(a, b):
  a, b = _np_float(a), _np_float(b)
  mse = ((a - b) ** 2).mean(axis=(1, 2, 3))
  with np.errstate(divide="ignore"):
    return np.mean(10 * np.log10(1.0 / mse)), mse.mean()


def np_svg_ssim(a, b):
  a, b = _np_float(a), _np_float(b)
  return np.mean([_np_ssim_frame(x, y) for x, y in zip(a, b)])


def _pair(shape, seed, noise=0.05, dtype="float"):
  rng = np.random.default_rng(seed)
  a = rng.uniform(size=shape)
  # Smooth content plus noise, so SSIM is neither ~0 nor ~1.
  a = 0.5 * a + 0.5 * np.cumsum(a, axis=2) / shape[2]
  b = np.clip(a + noise * rng.standard_normal(shape), 0.0, 1.0)
  if dtype == "uint8":
    return (np.round(a * 255)).astype(np.uint8), (np.round(b * 255)).astype(np.uint8)
  return a.astype(np.float32), b.astype(np.float32)


SHAPES = [(3, 17, 23, 3), (2, 8, 5, 1), (4, 32, 48, 3), (1, 11, 11, 3)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", ["float", "uint8"])
def test_psnr_ssim_match_numpy_transcription(shape, dtype):
  a, b = _pair(shape, seed=sum(shape), dtype=dtype)
  want_psnr, want_mse = np_svg_psnr(a, b)
  assert vm.psnr(a, b) == pytest.approx(want_psnr, abs=1e-4)
  assert vm.mse(a, b) == pytest.approx(want_mse, rel=1e-5)
  assert vm.ssim(a, b) == pytest.approx(np_svg_ssim(a, b), abs=2e-6)
  per_frame = vm.ssim_per_frame(a, b)
  assert per_frame.shape == (shape[0],)
  np.testing.assert_allclose(per_frame, [_np_ssim_frame(x, y) for x, y in
                                         zip(_np_float(a), _np_float(b))], atol=2e-6)


def test_gaussian_window_ssim_would_fail_the_comparison():
  # dm-pix's default SSIM (Gaussian, 'valid') is a different number: the tolerance above is
  # tight enough to tell the two definitions apart.
  a, b = _pair((2, 32, 48, 3), seed=1)
  gaussian = float(jnp.mean(dm_pix.ssim(jnp.asarray(a), jnp.asarray(b))))
  assert abs(gaussian - np_svg_ssim(a, b)) > 1e-3


def test_dm_pix_ssim_with_box_filter_agrees_up_to_its_clamping():
  a, b = _pair((2, 20, 24, 3), seed=2)
  ours = vm.ssim_per_frame(a, b)
  theirs = np.asarray(dm_pix.ssim(jnp.asarray(a), jnp.asarray(b), filter_fn=vm.box_mean))
  np.testing.assert_allclose(ours, theirs, atol=1e-5)


@pytest.mark.parametrize("dtype", ["float", "uint8"])
def test_identical_videos(dtype):
  a, _ = _pair((3, 18, 22, 3), seed=3, dtype=dtype)
  assert vm.psnr(a, a.copy()) == float("inf")
  assert np.all(vm.psnr_per_frame(a, a) == np.inf)
  assert vm.ssim(a, a.copy()) == 1.0
  assert vm.mse(a, a) == 0.0
  flat = np.full((2, 16, 16, 3), 0.25, np.float32)
  assert vm.ssim(flat, flat) == 1.0


def test_uint8_is_divided_by_255_and_chunking_does_not_matter():
  a, b = _pair((5, 16, 20, 3), seed=4, dtype="uint8")
  fa, fb = a.astype(np.float32) / 255.0, b.astype(np.float32) / 255.0
  assert vm.ssim(a, b) == pytest.approx(vm.ssim(fa, fb), abs=1e-7)
  assert vm.psnr(a, fb) == pytest.approx(vm.psnr(fa, fb), abs=1e-6)
  for chunk in (1, 2, 3, 8):
    np.testing.assert_allclose(vm.ssim_per_frame(a, b, frames_per_chunk=chunk),
                               vm.ssim_per_frame(a, b), atol=2e-6)
    np.testing.assert_allclose(vm.psnr_per_frame(a, b, frames_per_chunk=chunk),
                               vm.psnr_per_frame(a, b), atol=1e-5)


def test_bad_inputs_raise():
  a = np.zeros((2, 8, 8, 3), np.float32)
  with pytest.raises(ValueError, match="same shape"):
    vm.psnr(a, np.zeros((3, 8, 8, 3), np.float32))
  with pytest.raises(ValueError, match=r"\[F, H, W, C\]"):
    vm.ssim(a[0], a[0])
  with pytest.raises(ValueError, match="non-empty"):
    vm.ssim(a[:0], a[:0])
  with pytest.raises(TypeError, match="dtype int32"):
    vm.psnr(a.astype(np.int32), a.astype(np.int32))
  with pytest.raises(ValueError, match="frames_per_chunk"):
    vm.psnr(a, a, frames_per_chunk=0)


def test_compare_videos_without_lpips_weights_reports_skipped():
  a, b = _pair((2, 16, 16, 3), seed=5)
  result = vm.compare_videos(a, b)
  assert result["lpips"] is None and result["lpips_skipped"] == "skipped: no VGG weights"
  assert result["psnr"] == pytest.approx(vm.psnr(a, b))
  assert (result["frames"], result["height"], result["width"]) == (2, 16, 16)


# ---------------------------------------------------------------------------------------------
# LPIPS-VGG


# One frame size for every LPIPS test: one compilation per `normalize`.
LPIPS_SHAPE = (2, 32, 32, 3)


def _random_lpips_state(seed=0):
  rng = np.random.default_rng(seed)
  vgg = {}
  for index, c_in, c_out in vm._VGG16_CONVS:
    std = np.sqrt(2.0 / (9 * c_in))
    vgg[f"features.{index}.weight"] = (std * rng.standard_normal((c_out, c_in, 3, 3))).astype(
        np.float32)
    vgg[f"features.{index}.bias"] = (0.05 * rng.standard_normal(c_out)).astype(np.float32)
  # torchvision's state dict also holds the classifier; the loader ignores it.
  vgg["classifier.6.bias"] = np.zeros(10, np.float32)
  heads = {f"lin{k}.model.1.weight": rng.uniform(0, 1, (1, c, 1, 1)).astype(np.float32)
           for k, c in enumerate(vm.LPIPS_CHANNELS)}
  return vgg, heads


@pytest.fixture(scope="module")
def lpips_files(tmp_path_factory):
  from safetensors.numpy import save_file

  root = tmp_path_factory.mktemp("lpips")
  vgg, heads = _random_lpips_state()
  np.savez(root / "vgg16.npz", **vgg)
  np.savez(root / "heads.npz", **heads)
  save_file(vgg, str(root / "vgg16.safetensors"))
  save_file(heads, str(root / "heads.safetensors"))
  return root, vgg, heads


@pytest.fixture(scope="module")
def lpips_weights(lpips_files):
  root, _, _ = lpips_files
  return vm.load_lpips_weights(root / "vgg16.npz", root / "heads.npz")


def _torch_lpips(vgg, heads, a, b, normalize):
  """lpips.LPIPS(net='vgg', version='0.1') forward, re-written with torch.nn.functional."""
  import torch
  import torch.nn.functional as F

  def tensor(v):
    return torch.from_numpy(np.ascontiguousarray(v)).float()

  def taps(x):
    out, conv = [], 0
    for stage, n in enumerate((2, 2, 3, 3, 3)):
      if stage:
        x = F.max_pool2d(x, 2, 2)
      for _ in range(n):
        index = vm._VGG16_CONVS[conv][0]
        x = F.relu(F.conv2d(x, tensor(vgg[f"features.{index}.weight"]),
                            tensor(vgg[f"features.{index}.bias"]), padding=1))
        conv += 1
      out.append(x)
    return out

  shift = torch.tensor([-.030, -.088, -.188])[None, :, None, None]
  scale = torch.tensor([.458, .448, .450])[None, :, None, None]
  x0 = tensor(a).permute(0, 3, 1, 2)
  x1 = tensor(b).permute(0, 3, 1, 2)
  if normalize:
    x0, x1 = 2 * x0 - 1, 2 * x1 - 1
  with torch.no_grad():
    f0, f1 = taps((x0 - shift) / scale), taps((x1 - shift) / scale)
    total = 0
    for k in range(5):
      n0 = f0[k] / (torch.sqrt(torch.sum(f0[k] ** 2, dim=1, keepdim=True)) + 1e-10)
      n1 = f1[k] / (torch.sqrt(torch.sum(f1[k] ** 2, dim=1, keepdim=True)) + 1e-10)
      lin = F.conv2d((n0 - n1) ** 2, tensor(heads[f"lin{k}.model.1.weight"]))
      total = total + lin.mean(dim=(2, 3), keepdim=True)
  return total.reshape(-1).numpy()


@pytest.mark.parametrize("normalize", [False, True])
def test_lpips_matches_torch_reimplementation(lpips_files, lpips_weights, tmp_path, normalize):
  torch = pytest.importorskip("torch")
  root, vgg, heads = lpips_files
  a, b = _pair(LPIPS_SHAPE, seed=6, noise=0.1)
  want = _torch_lpips(vgg, heads, a, b, normalize)
  got = vm.lpips_per_frame(a, b, lpips_weights, normalize=normalize)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
  assert np.all(want > 1e-2)
  # The .pth files a user has (torch.save of state dicts) load to the same weights.
  torch.save({k: torch.from_numpy(v) for k, v in vgg.items()}, tmp_path / "vgg16.pth")
  torch.save({k: torch.from_numpy(v) for k, v in heads.items()}, tmp_path / "vgg.pth")
  from_pth = vm.load_lpips_weights(tmp_path / "vgg16.pth", tmp_path / "vgg.pth")
  np.testing.assert_allclose(vm.lpips_per_frame(a, b, from_pth, normalize=normalize), want,
                             rtol=1e-4, atol=1e-6)


def test_lpips_properties_and_formats(lpips_files, lpips_weights):
  root, _, _ = lpips_files
  a, b = _pair(LPIPS_SHAPE, seed=7, noise=0.1)
  # Not exactly 0: XLA's fused channel norms may round differently per batch element.
  np.testing.assert_allclose(vm.lpips_per_frame(a, a, lpips_weights), [0.0, 0.0], atol=1e-12)
  d = vm.lpips(a, b, lpips_weights)
  assert d > 0
  assert vm.lpips(a, b, lpips_weights, normalize=True) != pytest.approx(d, rel=1e-3)
  from_st = vm.load_lpips_weights(root / "vgg16.safetensors", root / "heads.safetensors")
  assert vm.lpips(a, b, from_st) == pytest.approx(d, rel=1e-6)
  ua, ub = (np.round(a * 255).astype(np.uint8), np.round(b * 255).astype(np.uint8))
  assert vm.lpips(ua, ub, lpips_weights) == pytest.approx(
      vm.lpips(ua / np.float32(255), ub / np.float32(255), lpips_weights), rel=1e-5)
  result = vm.compare_videos(a, b, lpips_weights=lpips_weights)
  assert result["lpips"] == pytest.approx(d, rel=1e-6) and result["lpips_skipped"] is None


def test_lpips_bad_inputs_and_weights(lpips_files, lpips_weights, tmp_path, monkeypatch):
  root, vgg, heads = lpips_files
  a = np.zeros((1, 16, 16, 3), np.float32)
  with pytest.raises(ValueError, match=">= 16"):
    vm.lpips(a[:, :8], a[:, :8], lpips_weights)
  with pytest.raises(ValueError, match="RGB"):
    vm.lpips(a[..., :1], a[..., :1], lpips_weights)
  with pytest.raises(TypeError, match="LpipsWeights"):
    vm.lpips(a, a, None)
  with pytest.raises(FileNotFoundError, match="VGG16"):
    vm.load_lpips_weights(tmp_path / "nope.pth", root / "heads.npz")
  bad = dict(heads)
  del bad["lin3.model.1.weight"]
  np.savez(tmp_path / "bad_heads.npz", **bad)
  with pytest.raises(ValueError, match="lin3.model.1.weight"):
    vm.load_lpips_weights(root / "vgg16.npz", tmp_path / "bad_heads.npz")
  bad = dict(vgg)
  bad["features.5.weight"] = bad["features.5.weight"][:, :32]
  np.savez(tmp_path / "bad_vgg.npz", **bad)
  with pytest.raises(ValueError, match="features.5"):
    vm.load_lpips_weights(tmp_path / "bad_vgg.npz", root / "heads.npz")
  (tmp_path / "w.ckpt").write_bytes(b"x")
  with pytest.raises(ValueError, match=".safetensors or .npz"):
    vm.load_lpips_weights(tmp_path / "w.ckpt", root / "heads.npz")
  # No torch (Python 3.12 here, simulated on 3.11): a .pth is a clear ImportError.
  (tmp_path / "vgg16.pth").write_bytes(b"not read")
  monkeypatch.setitem(sys.modules, "torch", None)
  with pytest.raises(ImportError, match="needs torch"):
    vm.load_lpips_weights(tmp_path / "vgg16.pth", root / "heads.npz")


def test_cli_with_lpips_weights(lpips_files, lpips_weights, tmp_path, capsys):
  from models.compare_cli import main
  from models.video_io import read_video, write_mp4

  root, _, _ = lpips_files
  a, b = _pair(LPIPS_SHAPE, seed=8, noise=0.05)
  write_mp4(a, tmp_path / "a.mp4", 8)
  write_mp4(b, tmp_path / "b.mp4", 8)
  out = tmp_path / "m.json"
  assert main([str(tmp_path / "a.mp4"), str(tmp_path / "b.mp4"), "--lpips-vgg",
               str(root / "vgg16.npz"), "--lpips-heads", str(root / "heads.npz"),
               "--json", str(out)]) == 0
  text = capsys.readouterr().out
  result = json.loads(out.read_text())
  want = vm.lpips(read_video(tmp_path / "a.mp4"), read_video(tmp_path / "b.mp4"), lpips_weights)
  assert result["lpips"] == pytest.approx(want, rel=1e-6)
  assert f"{want:.6f}" in text and "skipped" not in text
