"""HunyuanVideo VAE: parity with diffusers `AutoencoderKLHunyuanVideo` (tiny random model,
float32) untiled and with its spatial / temporal tiling, the loader and its errors, config
validation, one trace per tile shape."""

import contextlib
import dataclasses
import json
import re
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from checkpoint_testing import write_safetensors
from models import CheckpointError
from models import convert_common as cc
from models.hunyuan import vae as vae_lib
from models.hunyuan.vae import HunyuanVAE, HunyuanVAEConfig, HunyuanVAETiling
from models.hunyuan.vae_convert import key_table, load_config, load_vae, to_state_dict

safetensors_numpy = pytest.importorskip("safetensors.numpy")
load_file, save_file = safetensors_numpy.load_file, safetensors_numpy.save_file

# Two widths (a shortcut conv in each direction), every stage kind: b0 space only, b1 / b2
# space and time, b3 none.
TINY = dict(latent_channels=4, block_out_channels=(8, 8, 16, 16), layers_per_block=1,
            norm_num_groups=4)
REL_TOL = 1e-4
SINGLE = "diffusion_pytorch_model.safetensors"
INDEX = "diffusion_pytorch_model.safetensors.index.json"
SF = vae_lib.SCALING_FACTOR
# enable_tiling(32, 32, 24, 24) in space: 4 x 4 latent tiles every 3, blended over 8 pixels.
SPACE = dict(tile_sample_min_height=32, tile_sample_min_width=32, tile_sample_stride_height=24,
             tile_sample_stride_width=24)
# In time: tiles of 11 // 4 + 1 = 3 latent frames every 8 // 4 = 2, blended over 3 frames. On
# 5 latent frames the tiles are [0, 3), [2, 5) (and [4, 5), which adds nothing): the tile
# shapes of a 3-frame spatially tiled decode, so this compiles nothing new.
TIME = dict(tile_sample_min_num_frames=11, tile_sample_stride_num_frames=8)


def _rel(ours, ref) -> float:
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  assert ours.shape == ref.shape
  return float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))


# --- diffusers reference ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """(diffusers model, sharded folder, one-file folder); skips without torch / diffusers."""
  torch = pytest.importorskip("torch", reason="parity tests need torch")
  diffusers = pytest.importorskip("diffusers", reason="parity tests need diffusers")
  torch.manual_seed(0)
  model = diffusers.AutoencoderKLHunyuanVideo(**TINY).eval()
  with torch.no_grad():  # default GroupNorms are the identity: make them count
    for key, p in model.named_parameters():
      if "norm" in key:
        p.copy_((1.0 if key.endswith("weight") else 0.0) + 0.3 * torch.randn_like(p))
  sharded = tmp_path_factory.mktemp("hunyuan_vae_sharded")
  model.save_pretrained(sharded, safe_serialization=True, max_shard_size="20KB")
  single = tmp_path_factory.mktemp("hunyuan_vae_single")
  model.save_pretrained(single, safe_serialization=True)
  return model, sharded, single


@pytest.fixture(scope="module")
def loaded(reference):
  """(diffusers model, our HunyuanVAE loaded from the sharded folder)."""
  ref, sharded, _ = reference
  return ref, load_vae(sharded)


@contextlib.contextmanager
def _torch_tiling(ref, spatial=False, temporal=True, **sizes):
  """diffusers' tiling state for the block (its defaults: temporal only), restored after."""
  sizes = {**dataclasses.asdict(HunyuanVAETiling()), **sizes}
  del sizes["spatial"], sizes["temporal"]
  names = ["use_tiling", "use_framewise_decoding", "use_framewise_encoding", *sizes]
  saved = {n: getattr(ref, n) for n in names}
  try:
    ref.use_tiling = spatial
    ref.use_framewise_decoding = ref.use_framewise_encoding = temporal
    for name, value in sizes.items():
      setattr(ref, name, value)
    yield
  finally:
    for name, value in saved.items():
      setattr(ref, name, value)


def _torch_decode(ref, latents, **tiling):
  """What HunyuanVideoPipeline does with its final latents."""
  import torch
  with _torch_tiling(ref, **tiling), torch.no_grad():
    return ref.decode(latents / ref.config.scaling_factor, return_dict=False)[0].numpy()


def _torch_encode(ref, video, **tiling):
  import torch
  with _torch_tiling(ref, **tiling), torch.no_grad():
    dist = ref.encode(video).latent_dist
  return dist.mode().numpy() * ref.config.scaling_factor, dist.logvar.numpy()


@pytest.mark.parametrize("latent_frames", [1, 2, 3])  # 1, 5 and 9 video frames
def test_decode_matches_diffusers(loaded, latent_frames):
  import torch
  ref, ours = loaded
  latents = torch.randn(2, 4, latent_frames, 3, 5, generator=torch.Generator().manual_seed(1))

  expected = _torch_decode(ref, latents)
  got = ours.decode(jnp.asarray(latents.numpy()))

  assert got.shape == (2, 3, 4 * (latent_frames - 1) + 1, 24, 40) == expected.shape
  assert np.abs(expected).max() > 1.0  # not trivially small, and not clamped
  assert float(jnp.abs(got).max()) > 1.0
  assert _rel(got, expected) < REL_TOL
  # Not scaled is wrong: decode divides by scaling_factor itself.
  assert _rel(got, _torch_decode(ref, latents * SF)) > 1e-2


@pytest.mark.parametrize("frames", [1, 5, 9])
def test_encode_matches_diffusers(loaded, frames):
  import torch
  ref, ours = loaded
  video = torch.rand(2, 3, frames, 24, 40, generator=torch.Generator().manual_seed(2)) * 2 - 1

  expected, expected_logvar = _torch_encode(ref, video)
  got = ours.encode(jnp.asarray(video.numpy()))
  mean, logvar = ours.encode_moments(jnp.asarray(video.numpy()))  # same tile: no new trace

  assert got.shape == (2, 4, 1 + (frames - 1) // 4, 3, 5) == expected.shape
  assert _rel(got, expected) < REL_TOL
  np.testing.assert_allclose(mean * SF, got, rtol=1e-6)
  assert _rel(logvar, expected_logvar) < REL_TOL


def test_spatial_tiled_decode_matches_diffusers(loaded):
  import torch
  ref, ours = loaded
  latents = torch.randn(1, 4, 3, 3, 6, generator=torch.Generator().manual_seed(3))
  tiling = HunyuanVAETiling(spatial=True, temporal=False, **SPACE)

  expected = _torch_decode(ref, latents, spatial=True, temporal=False, **SPACE)
  untiled = _torch_decode(ref, latents)
  got = ours.decode(jnp.asarray(latents.numpy()), tiling=tiling)

  assert got.shape == expected.shape == (1, 3, 9, 24, 48)
  assert np.abs(expected - untiled).max() > 1e-2  # the tiles really are blended
  assert _rel(got, expected) < REL_TOL
  # Below the tile size spatial tiling is off, as in diffusers.
  small = jnp.asarray(latents.numpy()[:, :, :, :, :4])
  np.testing.assert_array_equal(ours.decode(small, tiling=tiling),
                                ours.decode(small, tiling=None))


def test_temporal_tiled_decode_matches_diffusers_and_traces_once_per_tile(loaded):
  import torch
  ref, ours = loaded
  traces = vae_lib.TRACE_COUNTS
  # 7 latent frames > 16 / 4: diffusers' default framewise decoding, tiles of 5 and 4
  # latent frames (a third, of 1 frame, adds nothing). A size no other test uses.
  latents = torch.randn(1, 4, 7, 2, 3, generator=torch.Generator().manual_seed(4))

  expected = _torch_decode(ref, latents)
  untiled = _torch_decode(ref, latents, temporal=False)
  before = traces["decode"]
  got = ours.decode(jnp.asarray(latents.numpy()))  # default tiling = diffusers' default
  assert traces["decode"] - before == 2
  again = ours.decode(jnp.asarray(latents.numpy()) + 1.0)
  assert traces["decode"] - before == 2  # same tile shapes: no retrace

  assert got.shape == expected.shape == (1, 3, 25, 16, 24)
  assert np.abs(expected - untiled).max() > 1e-2
  assert _rel(got, expected) < REL_TOL
  assert _rel(again, got) > 1e-2


def test_spatial_and_temporal_tiled_decode_matches_diffusers(loaded):
  import torch
  ref, ours = loaded
  traces = vae_lib.TRACE_COUNTS
  latents = torch.randn(1, 4, 5, 3, 6, generator=torch.Generator().manual_seed(5))
  ours.decode(jnp.asarray(latents.numpy()[:, :, :3]),  # compiled already if run after the above
              tiling=HunyuanVAETiling(spatial=True, temporal=False, **SPACE))
  before = traces["decode"]

  expected = _torch_decode(ref, latents, spatial=True, **SPACE, **TIME)
  spatial_only = _torch_decode(ref, latents, spatial=True, temporal=False, **SPACE)
  got = ours.decode(jnp.asarray(latents.numpy()),
                    tiling=HunyuanVAETiling(spatial=True, **SPACE, **TIME))

  assert traces["decode"] == before  # the same two tile shapes
  assert got.shape == expected.shape == (1, 3, 17, 24, 48)
  assert np.abs(expected - spatial_only).max() > 1e-2
  assert _rel(got, expected) < REL_TOL


def test_tiled_encode_matches_diffusers(loaded):
  import torch
  ref, ours = loaded
  # 21 frames > 8: time tiles of 9 frames every 4 (and a last one of 5, blended over one
  # latent frame), each split into 32- and 24-wide tiles.
  video = torch.rand(1, 3, 21, 24, 48, generator=torch.Generator().manual_seed(6)) * 2 - 1
  sizes = dict(SPACE, tile_sample_min_num_frames=8, tile_sample_stride_num_frames=4)

  expected, _ = _torch_encode(ref, video, spatial=True, **sizes)
  untiled, _ = _torch_encode(ref, video, temporal=False)
  got = ours.encode(jnp.asarray(video.numpy()), tiling=HunyuanVAETiling(spatial=True, **sizes))

  assert got.shape == expected.shape == (1, 4, 6, 3, 6)
  assert np.abs(expected - untiled).max() > 1e-2
  assert _rel(got, expected) < REL_TOL


def test_one_file_and_sharded_load_the_same(reference, loaded):
  ref, _, single = reference
  _, ours = loaded
  assert not (single / INDEX).exists() and (single / SINGLE).exists()

  other = load_vae(single)

  assert other.config == ours.config == HunyuanVAEConfig.from_diffusers_config(dict(ref.config))
  a, b = to_state_dict(ours), to_state_dict(other)
  assert a.keys() == b.keys() == set(ref.state_dict())
  for key, value in ref.state_dict().items():
    np.testing.assert_array_equal(a[key], value.numpy(), err_msg=key)
    np.testing.assert_array_equal(b[key], value.numpy(), err_msg=key)


def test_causal_frame_mask_matches_diffusers():
  pytest.importorskip("torch")
  pytest.importorskip("diffusers")
  import torch
  from diffusers.models.autoencoders import autoencoder_kl_hunyuan_video as ref_lib
  ref = ref_lib.prepare_causal_attention_mask(3, 4, torch.float32, torch.device("cpu"))
  np.testing.assert_array_equal(vae_lib.causal_frame_mask(3, 4), ref.numpy() == 0)


# --- checkpoints written with NumPy (no torch needed) ---------------------------------------

SMALL = HunyuanVAEConfig(**TINY)


def _random_vae(cfg: HunyuanVAEConfig, seed: int = 0) -> HunyuanVAE:
  """A HunyuanVAE with random parameters (filled from NumPy: faster than eager init)."""
  model = nnx.eval_shape(lambda: HunyuanVAE(cfg, rngs=nnx.Rngs(0)))
  rng = np.random.default_rng(seed)
  for _, var in cc.param_variables(model).items():
    shape = var.get_value().shape
    var.set_value(jnp.asarray(rng.standard_normal(shape), jnp.float32))
  return model


def _diffusers_config(cfg: HunyuanVAEConfig) -> dict:
  data = {k: v for k, v in cfg.to_dict().items() if k not in ("param_dtype", "dtype")}
  return {"_class_name": "AutoencoderKLHunyuanVideo", "_diffusers_version": "0.42.1", **data}


def _export(model: HunyuanVAE, folder: Path, shards: int = 1) -> Path:
  """Writes `model` as a diffusers vae/ folder with NumPy (split into `shards` files)."""
  folder.mkdir(parents=True)
  (folder / "config.json").write_text(json.dumps(_diffusers_config(model.config)))
  write_safetensors(dict(sorted(to_state_dict(model).items())), folder, shards, save_file,
                    index_metadata={})
  return folder


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
  assert type(via_class).__name__ == "HunyuanVAE" and via_class.config == small_model.config

  assert loaded_model.config == small_model.config
  a, b = to_state_dict(loaded_model), to_state_dict(small_model)
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)
  bf16 = load_vae(folder, dtype="bf16")
  assert bf16.decoder.conv_in.conv.kernel.get_value().dtype == jnp.bfloat16
  assert bf16.config.dtype == jnp.bfloat16


def test_key_table_names_and_layouts(small_model):
  table = key_table(small_model)
  assert len(table) == 180  # all of diffusers state_dict() (see the load tests)
  expected = {
      "encoder.conv_in.conv.weight": ("conv", (8, 3, 3, 3, 3)),
      "encoder.down_blocks.0.downsamplers.0.conv.conv.weight": ("conv", (8, 8, 3, 3, 3)),
      "encoder.down_blocks.2.resnets.0.conv_shortcut.conv.weight": ("conv", (16, 8, 1, 1, 1)),
      "encoder.mid_block.attentions.0.to_q.weight": ("linear", (16, 16)),
      "decoder.mid_block.attentions.0.to_out.0.bias": ("copy", (16,)),
      "decoder.mid_block.attentions.0.group_norm.weight": ("copy", (16,)),
      "decoder.up_blocks.2.upsamplers.0.conv.conv.weight": ("conv", (8, 8, 3, 3, 3)),
      "decoder.conv_norm_out.bias": ("copy", (8,)),
      "quant_conv.weight": ("conv", (8, 8, 1, 1, 1)),
      "post_quant_conv.bias": ("copy", (4,)),
  }
  for key, (kind, shape) in expected.items():
    assert (table[key][0].kind, table[key][1]) == (kind, shape), key
  assert "encoder.down_blocks.3.downsamplers.0.conv.conv.weight" not in table  # last stage
  assert "decoder.up_blocks.3.upsamplers.0.conv.conv.weight" not in table


def _rewrite(folder: Path, edit) -> None:
  tensors = load_file(str(folder / SINGLE))
  edit(tensors)
  save_file(tensors, str(folder / SINGLE))


def test_missing_key(small_folder):
  _rewrite(small_folder, lambda t: t.pop("decoder.mid_block.attentions.0.to_k.bias"))
  with pytest.raises(CheckpointError,
                     match=r"missing key 'decoder\.mid_block\.attentions\.0\.to_k\.bias'"):
    load_vae(small_folder)


def test_unexpected_key(small_folder):
  _rewrite(small_folder, lambda t: t.update({"decoder.extra.weight": np.zeros(3, np.float32)}))
  with pytest.raises(CheckpointError, match=r"unknown key 'decoder\.extra\.weight'"):
    load_vae(small_folder)


@pytest.mark.parametrize("key,shape", [
    ("encoder.conv_norm_out.weight", (8,)),
    ("decoder.conv_out.conv.weight", (3, 8, 3, 3, 1)),
    ("encoder.mid_block.attentions.0.to_v.weight", (16, 8)),
])
def test_wrong_shape(small_folder, key, shape):
  _rewrite(small_folder, lambda t: t.update({key: np.zeros(shape, np.float32)}))
  with pytest.raises(CheckpointError, match=re.escape(f"key '{key}' ") + ".* has shape " +
                     re.escape(str(shape))):
    load_vae(small_folder)


def test_truncated_file(small_folder):
  path = small_folder / SINGLE
  data = path.read_bytes()
  path.write_bytes(data[:len(data) - 100])
  with pytest.raises(CheckpointError, match=re.escape(SINGLE) + ".*truncated or corrupt"):
    load_vae(small_folder)


def test_missing_shard(small_model, tmp_path):
  folder = _export(small_model, tmp_path / "vae", shards=2)
  (folder / "diffusion_pytorch_model-00002-of-00002.safetensors").unlink()
  with pytest.raises(CheckpointError, match="00002-of-00002.safetensors, which does not exist"):
    load_vae(folder)


def test_config_json_errors(small_folder):
  config = json.loads((small_folder / "config.json").read_text())
  (small_folder / "config.json").write_text(json.dumps({**config, "bogus_field": 1}))
  with pytest.raises(CheckpointError, match="bogus_field"):
    load_config(small_folder)
  (small_folder / "config.json").write_text(json.dumps({**config, "_class_name": "AutoencoderKL"}))
  with pytest.raises(CheckpointError, match="AutoencoderKLHunyuanVideo"):
    load_vae(small_folder)
  (small_folder / "config.json").unlink()
  with pytest.raises(CheckpointError, match="no config.json"):
    load_vae(small_folder)
  assert load_vae(small_folder, config=SMALL).config == SMALL


@pytest.mark.parametrize("changes,match", [
    (dict(block_out_channels=(8, 8, 16)), r"need 3 x 'HunyuanVideoDownBlock3D'"),
    (dict(up_block_types=("UpDecoderBlock2D",) * 4), "HunyuanVideoUpBlock3D"),
    (dict(norm_num_groups=3), "does not divide"),
    (dict(temporal_compression_ratio=8), "only 4"),
    (dict(spatial_compression_ratio=32), "give 16 / 4"),
    (dict(block_out_channels=(8, 8), down_block_types=("HunyuanVideoDownBlock3D",) * 2,
          up_block_types=("HunyuanVideoUpBlock3D",) * 2), "give 4 / 2"),
    (dict(layers_per_block=0), "layers_per_block"),
    (dict(act_fn="gelu"), "silu"),
    (dict(scaling_factor=0.0), "scaling_factor"),
    (dict(block_out_channels=16), "expected a sequence"),
])
def test_config_validation(changes, match):
  with pytest.raises(ValueError, match=match):
    SMALL.replace(**changes)


def test_config_round_trip():
  cfg = HunyuanVAEConfig()
  assert cfg.scaling_factor == 0.476986 and cfg.block_out_channels == (128, 256, 512, 512)
  assert HunyuanVAEConfig.from_diffusers_config(_diffusers_config(cfg)) == cfg
  assert HunyuanVAEConfig.from_dict(cfg.to_dict()) == cfg
  assert cfg.variant_name() == "hunyuan-video"
  assert vae_lib.stage_factors(cfg) == [(1, 2), (2, 2), (2, 2), (1, 1)]


def test_tiling_validation():
  with pytest.raises(ValueError, match="strides must not exceed"):
    HunyuanVAETiling(tile_sample_min_num_frames=8, tile_sample_stride_num_frames=12)
  with pytest.raises(ValueError, match="at least one latent"):
    HunyuanVAETiling(tile_sample_stride_num_frames=2).latent_sizes(8, 4)
  with pytest.raises(ValueError, match="must be a bool"):
    HunyuanVAETiling(spatial=1)


def test_input_checks(small_model):
  with pytest.raises(ValueError, match=r"expected \[B, 4, F, H, W\]"):
    small_model.decode(jnp.zeros((1, 16, 2, 2, 2)))
  with pytest.raises(ValueError, match=r"expected \[B, 3, F, H, W\]"):
    small_model.encode(jnp.zeros((1, 3, 8, 8)))
