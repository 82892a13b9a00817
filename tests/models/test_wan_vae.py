"""Wan VAEs (2.1 and 2.2): parity with diffusers `AutoencoderKLWan` (tiny random models,
float32), tiling, the loader and its errors, config validation, chunking without retracing."""

import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from checkpoint_testing import write_safetensors
from models import CheckpointError
from models import convert_common as cc
from models.wan import vae as vae_lib
from models.wan.vae import WanVAE, WanVAEConfig, WanVAETiling
from models.wan.vae_convert import key_table, load_config, load_vae, to_state_dict

safetensors_numpy = pytest.importorskip("safetensors.numpy")
load_file, save_file = safetensors_numpy.load_file, safetensors_numpy.save_file

# diffusers' own tiny config (tests/models/autoencoders/test_models_autoencoder_wan.py).
TINY = dict(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
            temperal_downsample=[False, True, True])
# Exercises what TINY does not: encoder shortcuts, a separate decoder width, two residual
# blocks, time halved at the first resampling.
WIDE = dict(base_dim=4, decoder_base_dim=6, z_dim=16, dim_mult=[1, 2, 1, 2], num_res_blocks=2,
            temperal_downsample=[True, False, True])
# diffusers' Wan2.2 tiny config (tests/pipelines/wan/test_wan_22.py) with a separate decoder
# width and non-trivial latent statistics.
WAN22 = dict(base_dim=3, decoder_base_dim=4, z_dim=48, in_channels=12, out_channels=12,
             is_residual=True, patch_size=2, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
             scale_factor_spatial=16, scale_factor_temporal=4,
             temperal_downsample=[False, True, True],
             latents_mean=[0.1 * ((7 * i) % 11 - 5) for i in range(48)],
             latents_std=[0.5 + 0.05 * ((5 * i) % 13) for i in range(48)])
REL_TOL = 1e-4
SINGLE = "diffusion_pytorch_model.safetensors"
INDEX = "diffusion_pytorch_model.safetensors.index.json"


def _rel(ours, ref) -> float:
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  assert ours.shape == ref.shape
  return float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))


# --- diffusers references -------------------------------------------------------------------

@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """Factory: name ("tiny" / "wide") -> (diffusers model, sharded folder, one-file folder)."""
  torch = pytest.importorskip("torch", reason="parity tests need torch")
  diffusers = pytest.importorskip("diffusers", reason="parity tests need diffusers")
  cache = {}

  def make(name):
    if name not in cache:
      torch.manual_seed(0)
      model = diffusers.AutoencoderKLWan(**{"tiny": TINY, "wide": WIDE, "wan22": WAN22}[name])
      model.eval()
      with torch.no_grad():  # default gammas are all ones: make the norms count
        for key, p in model.named_parameters():
          if key.endswith("gamma"):
            p.copy_(1.0 + 0.3 * torch.randn_like(p))
      sharded = tmp_path_factory.mktemp(f"{name}_sharded")
      model.save_pretrained(sharded, safe_serialization=True, max_shard_size="20KB")
      single = tmp_path_factory.mktemp(f"{name}_single")
      model.save_pretrained(single, safe_serialization=True)
      cache[name] = model, sharded, single
    return cache[name]

  return make


@pytest.fixture(scope="module")
def loaded(reference):
  """Factory: name -> (diffusers model, our WanVAE loaded from the sharded folder)."""
  cache = {}

  def make(name):
    if name not in cache:
      ref, sharded, _ = reference(name)
      cache[name] = ref, load_vae(sharded)
    return cache[name]

  return make


def _torch_stats(ref):
  import torch
  z = ref.config.z_dim
  mean = torch.tensor(ref.config.latents_mean).view(1, z, 1, 1, 1)
  inv_std = 1.0 / torch.tensor(ref.config.latents_std).view(1, z, 1, 1, 1)
  return mean, inv_std


def _torch_decode(ref, latents):
  """What WanPipeline does with its final latents."""
  import torch
  mean, inv_std = _torch_stats(ref)
  with torch.no_grad():
    return ref.decode(latents / inv_std + mean, return_dict=False)[0].numpy()


def _torch_encode(ref, video):
  """What WanImageToVideoPipeline.prepare_latents does with the condition video."""
  import torch
  mean, inv_std = _torch_stats(ref)
  with torch.no_grad():
    mode = ref.encode(video).latent_dist.mode()
  return ((mode - mean) * inv_std).numpy()


@pytest.mark.parametrize("latent_frames", [1, 2, 3])  # 1, 5 and 9 video frames
def test_decode_matches_diffusers(loaded, latent_frames):
  import torch
  ref, ours = loaded("tiny")
  latents = torch.randn(2, 16, latent_frames, 3, 5, generator=torch.Generator().manual_seed(1))

  expected = _torch_decode(ref, latents)
  got = ours.decode(jnp.asarray(latents.numpy()))

  assert got.shape == (2, 3, 4 * (latent_frames - 1) + 1, 24, 40) == expected.shape
  assert np.abs(expected).max() > 0.05  # not a trivially small output
  assert _rel(got, expected) < REL_TOL
  assert float(jnp.abs(got).max()) <= 1.0


@pytest.mark.parametrize("frames", [1, 5, 9])
def test_encode_matches_diffusers(loaded, frames):
  import torch
  ref, ours = loaded("tiny")
  video = torch.rand(2, 3, frames, 24, 40, generator=torch.Generator().manual_seed(2)) * 2 - 1

  expected = _torch_encode(ref, video)
  got = ours.encode(jnp.asarray(video.numpy()))

  assert got.shape == (2, 16, 1 + (frames - 1) // 4, 3, 5) == expected.shape
  assert _rel(got, expected) < REL_TOL


def test_wide_config_matches_diffusers(loaded):
  import torch
  ref, ours = loaded("wide")
  gen = torch.Generator().manual_seed(3)
  latents = torch.randn(1, 16, 3, 2, 3, generator=gen)
  video = torch.rand(1, 3, 9, 16, 24, generator=gen) * 2 - 1

  assert _rel(ours.decode(jnp.asarray(latents.numpy())), _torch_decode(ref, latents)) < REL_TOL
  assert _rel(ours.encode(jnp.asarray(video.numpy())), _torch_encode(ref, video)) < REL_TOL
  # The raw posterior too (logvar clipped as diffusers' DiagonalGaussianDistribution does).
  with torch.no_grad():
    dist = ref.encode(video).latent_dist
  mu, logvar = ours.encode_moments(jnp.asarray(video.numpy()))
  assert _rel(mu, dist.mean.numpy()) < REL_TOL
  assert _rel(logvar, dist.logvar.numpy()) < REL_TOL


def test_tiled_decode_matches_diffusers(loaded):
  import torch
  ref, ours = loaded("tiny")
  tiling = WanVAETiling(tile_sample_min_height=32, tile_sample_min_width=32,
                        tile_sample_stride_height=24, tile_sample_stride_width=24)
  latents = torch.randn(1, 16, 1, 5, 6, generator=torch.Generator().manual_seed(4))
  ref.enable_tiling(32, 32, 24, 24)
  try:
    expected = _torch_decode(ref, latents)
  finally:
    ref.disable_tiling()
  untiled = _torch_decode(ref, latents)
  assert np.abs(expected - untiled).max() > 1e-3  # the tiles really are blended, not exact

  got = ours.decode(jnp.asarray(latents.numpy()), tiling=tiling)

  assert got.shape == expected.shape == (1, 3, 1, 40, 48)
  assert _rel(got, expected) < REL_TOL
  # Below the tile size tiling is off, as in diffusers.
  small = jnp.asarray(np.random.default_rng(5).standard_normal((2, 16, 1, 3, 4), np.float32))
  np.testing.assert_array_equal(ours.decode(small, tiling=tiling), ours.decode(small))


@pytest.mark.parametrize("latent_frames,frames", [(1, 1), (2, 5), (3, 9)])
def test_wan22_matches_diffusers(loaded, latent_frames, frames):
  import torch
  ref, ours = loaded("wan22")
  gen = torch.Generator().manual_seed(6)
  latents = torch.randn(2, 48, latent_frames, 2, 3, generator=gen) * 0.5
  video = torch.rand(2, 3, frames, 32, 48, generator=gen) * 2 - 1

  expected = _torch_decode(ref, latents)
  got = ours.decode(jnp.asarray(latents.numpy()))
  assert got.shape == expected.shape == (2, 3, frames, 32, 48)
  assert (np.abs(expected) < 1).mean() > 0.5  # mostly not clamped
  assert _rel(got, expected) < REL_TOL

  expected = _torch_encode(ref, video)
  got = ours.encode(jnp.asarray(video.numpy()))
  assert got.shape == expected.shape == (2, 48, latent_frames, 2, 3)
  assert _rel(got, expected) < REL_TOL


def test_wan22_tiled_decode_matches_diffusers(loaded):
  import torch
  ref, ours = loaded("wan22")
  latents = torch.randn(1, 48, 1, 5, 6, generator=torch.Generator().manual_seed(7)) * 0.5
  ref.enable_tiling(64, 64, 48, 48)
  try:
    expected = _torch_decode(ref, latents)
  finally:
    ref.disable_tiling()

  got = ours.decode(jnp.asarray(latents.numpy()), tiling=WanVAETiling(64, 64, 48, 48))

  assert got.shape == expected.shape == (1, 3, 1, 80, 96)
  assert _rel(got, expected) < REL_TOL


def test_patchify_matches_diffusers():
  pytest.importorskip("torch")
  pytest.importorskip("diffusers")
  from diffusers.models.autoencoders import autoencoder_kl_wan as ref_lib
  import torch
  x = np.random.default_rng(0).standard_normal((2, 3, 2, 4, 6)).astype(np.float32)
  patched = vae_lib.patchify(jnp.asarray(x), 2)
  np.testing.assert_array_equal(patched, ref_lib.patchify(torch.from_numpy(x), 2).numpy())
  np.testing.assert_array_equal(vae_lib.unpatchify(patched, 2), x)


def test_one_file_and_sharded_load_the_same(reference, loaded):
  ref, _, single = reference("tiny")
  _, ours = loaded("tiny")
  assert not (single / INDEX).exists() and (single / SINGLE).exists()

  other = load_vae(single)

  assert other.config == ours.config == WanVAEConfig.from_diffusers_config(dict(ref.config))
  a, b = to_state_dict(ours), to_state_dict(other)
  assert a.keys() == b.keys() == set(ref.state_dict())
  for key, value in ref.state_dict().items():
    np.testing.assert_array_equal(a[key], value.numpy(), err_msg=key)
    np.testing.assert_array_equal(b[key], value.numpy(), err_msg=key)


# --- checkpoints written with NumPy (no torch needed) ---------------------------------------

def _random_vae(cfg: WanVAEConfig, seed: int = 0) -> WanVAE:
  """A WanVAE with random parameters (filled from NumPy: faster than eager init)."""
  model = nnx.eval_shape(lambda: WanVAE(cfg, rngs=nnx.Rngs(0)))
  rng = np.random.default_rng(seed)
  for path, var in cc.param_variables(model).items():
    shape = var.get_value().shape
    scale = 1.0 if path[-1] == "gamma" else 1.0 / np.sqrt(max(1, np.prod(shape[:-1])))
    base = 1.0 if path[-1] == "gamma" else 0.0
    var.set_value(jnp.asarray(base + scale * rng.standard_normal(shape), jnp.float32))
  return model


def _diffusers_config(cfg: WanVAEConfig) -> dict:
  data = {k: v for k, v in cfg.to_dict().items() if k not in ("param_dtype", "dtype")}
  return {"_class_name": "AutoencoderKLWan", "_diffusers_version": "0.42.1", **data}


def _export(model: WanVAE, folder: Path, shards: int = 1) -> Path:
  """Writes `model` as a diffusers vae/ folder with NumPy (split into `shards` files)."""
  folder.mkdir(parents=True)
  (folder / "config.json").write_text(json.dumps(_diffusers_config(model.config)))
  write_safetensors(dict(sorted(to_state_dict(model).items())), folder, shards, save_file,
                    index_metadata={})
  return folder


SMALL = WanVAEConfig(**TINY)


@pytest.fixture(scope="module")
def small_model():
  return _random_vae(SMALL, seed=7)


@pytest.fixture
def small_folder(small_model, tmp_path):
  return _export(small_model, tmp_path / "vae")


@pytest.mark.parametrize("shards", [1, 3])
def test_numpy_round_trip(small_model, tmp_path, shards):
  folder = _export(small_model, tmp_path / "vae", shards)

  loaded_model = load_vae(tmp_path)  # a pipeline folder: its vae/ is found
  via_class = type(small_model).from_pretrained(folder)
  assert type(via_class).__name__ == "WanVAE" and via_class.config == small_model.config

  assert loaded_model.config == small_model.config
  a, b = to_state_dict(loaded_model), to_state_dict(small_model)
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)
  assert load_vae(folder, dtype="bf16").decoder.conv_in.kernel.get_value().dtype == jnp.bfloat16


def test_key_table_names_and_layouts(small_model):
  table = key_table(small_model)
  # 2.1 upsamplers halve the channels (3 // 2).
  assert table["decoder.up_blocks.0.upsamplers.0.resample.1.weight"][1] == (1, 3, 3, 3)
  assert table["decoder.up_blocks.0.upsamplers.0.time_conv.weight"][1] == (6, 3, 3, 1, 1)
  assert table["decoder.mid_block.attentions.0.norm.gamma"][1] == (3, 1, 1)
  assert table["decoder.mid_block.attentions.0.to_qkv.weight"][1] == (9, 3, 1, 1)
  assert table["encoder.down_blocks.0.norm1.gamma"][1] == (3, 1, 1, 1)
  assert table["decoder.up_blocks.1.resnets.0.conv_shortcut.weight"][1] == (3, 1, 1, 1, 1)
  assert "encoder.down_blocks.3.time_conv.weight" in table  # the first downsample3d
  assert "encoder.down_blocks.1.time_conv.weight" not in table  # a downsample2d


def _rewrite(folder: Path, edit) -> None:
  tensors = load_file(str(folder / SINGLE))
  edit(tensors)
  save_file(tensors, str(folder / SINGLE))


def test_missing_key(small_folder):
  _rewrite(small_folder, lambda t: t.pop("decoder.conv_in.bias"))
  with pytest.raises(CheckpointError, match=r"missing key 'decoder\.conv_in\.bias'"):
    load_vae(small_folder)


def test_unexpected_key(small_folder):
  _rewrite(small_folder, lambda t: t.update({"decoder.extra.weight": np.zeros(3, np.float32)}))
  with pytest.raises(CheckpointError, match=r"unknown key 'decoder\.extra\.weight'"):
    load_vae(small_folder)


@pytest.mark.parametrize("key,shape", [("encoder.norm_out.gamma", (3,)),
                                       ("decoder.conv_out.weight", (3, 3, 3, 3, 2))])
def test_wrong_shape(small_folder, key, shape):
  _rewrite(small_folder, lambda t: t.update({key: np.zeros(shape, np.float32)}))
  with pytest.raises(CheckpointError, match=re.escape(f"key '{key}' ") + ".* has shape " +
                     re.escape(str(shape))):
    load_vae(small_folder)


def test_truncated_file(small_folder):
  path = small_folder / SINGLE
  data = path.read_bytes()
  path.write_bytes(data[:len(data) - 100])
  with pytest.raises(CheckpointError, match="truncated or corrupt"):
    load_vae(small_folder)


def test_corrupt_file(small_folder):
  (small_folder / SINGLE).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
  with pytest.raises(CheckpointError, match="truncated or corrupt"):
    load_vae(small_folder)


def test_missing_shard(small_model, tmp_path):
  folder = _export(small_model, tmp_path / "vae", shards=2)
  (folder / "diffusion_pytorch_model-00002-of-00002.safetensors").unlink()
  with pytest.raises(CheckpointError, match="does not exist"):
    load_vae(folder)


def test_config_json_errors(small_folder):
  config = json.loads((small_folder / "config.json").read_text())
  (small_folder / "config.json").write_text(json.dumps({**config, "bogus_field": 1}))
  with pytest.raises(CheckpointError, match="bogus_field"):
    load_config(small_folder)
  (small_folder / "config.json").write_text(json.dumps({**config, "_class_name": "AutoencoderKL"}))
  with pytest.raises(CheckpointError, match="AutoencoderKLWan"):
    load_vae(small_folder)
  (small_folder / "config.json").unlink()
  with pytest.raises(CheckpointError, match="no config.json"):
    load_vae(small_folder)
  assert load_vae(small_folder, config=SMALL).config == SMALL


def test_wan22_round_trip(tmp_path):
  cfg = WanVAEConfig(**WAN22)
  model = _random_vae(cfg, seed=3)
  folder = _export(model, tmp_path / "vae")
  config = json.loads((folder / "config.json").read_text())
  (folder / "config.json").write_text(json.dumps({**config, "clip_output": False}))

  loaded_model = load_vae(folder)

  assert loaded_model.config == cfg
  a, b = to_state_dict(loaded_model), to_state_dict(model)
  assert a.keys() == b.keys()
  assert "decoder.up_blocks.0.upsampler.resample.1.weight" in a
  assert "encoder.down_blocks.1.downsampler.time_conv.weight" in a
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.mark.parametrize("changes,match", [
    (dict(temperal_downsample=(False, True)), "one entry per resampling"),
    (dict(latents_mean=(0.0,) * 15), "z_dim=16"),
    (dict(latents_std=(0.0,) * 16), "latents_std must be > 0"),
    (dict(scale_factor_spatial=16), "scale_factor_spatial"),
    (dict(num_res_blocks=0), "num_res_blocks"),
    (dict(dim_mult=3), "expected a sequence"),
    (dict(attn_scales=(1.0,)), "attn_scales"),
    (dict(patch_size=2, scale_factor_spatial=16), "multiples of patch_size"),
])
def test_config_validation(changes, match):
  with pytest.raises(ValueError, match=match):
    SMALL.replace(**changes)


def test_config_round_trip():
  cfg = WanVAEConfig()
  assert cfg.decoder_base_dim == 96 and cfg.latents_std[-1] == 1.9160
  assert WanVAEConfig.from_diffusers_config(_diffusers_config(cfg)) == cfg
  assert cfg.variant_name() == "wan2.1"


# --- chunking --------------------------------------------------------------------------------

def test_chunk_functions_trace_once(small_model):
  traces = vae_lib.TRACE_COUNTS
  # A spatial size no other test uses, so these shapes are new to the jit cache.
  latents = jax.random.normal(jax.random.key(0), (1, 16, 4, 2, 1))

  before = traces["decode"]
  video = small_model.decode(latents[:, :, :2])
  assert traces["decode"] - before == 2  # the first chunk, then the steady state
  long_video = small_model.decode(latents)  # 2 more chunks: no new trace
  assert traces["decode"] - before == 2
  assert long_video.shape == (1, 3, 13, 16, 8)
  # Causal: the first 5 frames do not depend on the later latents.
  np.testing.assert_allclose(long_video[:, :, :5], video, rtol=1e-6, atol=1e-6)

  before = traces["encode"]
  small_model.encode(long_video[:, :, :5])
  assert traces["encode"] - before == 2
  latent = small_model.encode(long_video)
  assert traces["encode"] - before == 2
  assert latent.shape == (1, 16, 4, 2, 1)


def test_input_checks(small_model):
  with pytest.raises(ValueError, match="4k \\+ 1"):
    small_model.encode(jnp.zeros((1, 3, 4, 8, 8)))
  with pytest.raises(ValueError, match="expected \\[B, 16"):
    small_model.decode(jnp.zeros((1, 4, 2, 2, 2)))
