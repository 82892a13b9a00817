"""Wan conversion without torch: round trips, Orbax output, CLI, and every error case."""

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from models import CheckpointError
from models.cli import main as cli_main
from models.wan import WanConfig, from_pretrained
from models.wan.convert import convert
from wan_testing import flat_params, tiny_config

safetensors_numpy = pytest.importorskip("safetensors.numpy")
load_file, save_file = safetensors_numpy.load_file, safetensors_numpy.save_file

INDEX = "diffusion_pytorch_model.safetensors.index.json"


def _assert_same_params(a: dict, b: dict):
  assert a.keys() == b.keys()
  for path in a:
    np.testing.assert_array_equal(a[path], b[path], err_msg=str(path))


def _shard_of(folder: Path, key: str) -> Path:
  return folder / json.loads((folder / INDEX).read_text())["weight_map"][key]


def _edit_shard(folder: Path, key: str, edit) -> Path:
  """Rewrites the shard holding `key` with `edit(tensors)` applied; returns the shard."""
  shard = _shard_of(folder, key)
  tensors = load_file(str(shard))
  edit(tensors)
  save_file(tensors, str(shard))
  return shard


def _edit_index(folder: Path, edit) -> None:
  index = json.loads((folder / INDEX).read_text())
  edit(index["weight_map"])
  (folder / INDEX).write_text(json.dumps(index))


def _assert_nothing_written(dst: Path):
  assert not dst.exists()
  assert not [p for p in dst.parent.iterdir() if p.name.startswith(f".{dst.name}.")]


@pytest.mark.parametrize("layout", ["diffusers", "original"])
@pytest.mark.parametrize("kind", ["t2v", "i2v", "ti2v"])
def test_source_round_trip(numpy_checkpoint, layout, kind):
  model, folder = numpy_checkpoint(kind, layout)

  loaded = from_pretrained(folder, dtype=jnp.float32)

  assert loaded.config.architecture() == model.config.architecture()
  if layout == "original" or kind != "ti2v":  # diffusers configs only tell 48-ch TI2V apart
    assert loaded.config.model_type == kind
  _assert_same_params(flat_params(loaded), flat_params(model))


def test_convert_bf16_then_load(numpy_checkpoint, tmp_path):
  model, folder = numpy_checkpoint("t2v")

  dst = convert(folder, tmp_path / "out", dtype="bf16", progress=False)
  loaded = from_pretrained(dst)

  params, ref = flat_params(loaded), flat_params(model)
  for path, value in params.items():
    island = path[0] in ("time_embedder", "time_proj", "scale_shift_table") or any(
        "norm" in str(p) or p == "scale_shift_table" for p in path)
    assert value.dtype == (np.float32 if island else jnp.bfloat16), path
    np.testing.assert_array_equal(value, ref[path].astype(value.dtype), err_msg=str(path))
  assert loaded.config.param_dtype == jnp.bfloat16
  # Loading at another dtype casts.
  assert from_pretrained(dst, dtype="fp32").blocks.attn1.to_q.kernel.get_value().dtype == (
      jnp.float32)


def test_cli(numpy_checkpoint, tmp_path, capsys):
  model, folder = numpy_checkpoint("i2v", "original")
  dst = tmp_path / "cli_out"

  assert cli_main(["wan", str(folder), str(dst), "--dtype", "fp32", "--quiet"]) == 0
  _assert_same_params(flat_params(from_pretrained(dst)), flat_params(model))

  assert cli_main(["wan", str(folder), str(dst), "--quiet"]) == 1  # exists
  assert "already exists" in capsys.readouterr().err
  assert cli_main(["wan", str(folder), str(dst), "--quiet", "--overwrite"]) == 0
  assert from_pretrained(dst).config.param_dtype == jnp.bfloat16
  assert cli_main(["wan", str(folder), str(tmp_path / "x"), "--variant", "t2v-a14b",
                   "--quiet"]) == 1
  assert "wrong variant" in capsys.readouterr().err
  _assert_nothing_written(tmp_path / "x")


# Error cases: each must name the offending key and file, and leave nothing at dst.

def _convert_fails(folder, tmp_path, match, **kw):
  dst = tmp_path / "out"
  with pytest.raises(CheckpointError, match=match) as info:
    convert(folder, dst, progress=False, **kw)
  _assert_nothing_written(dst)
  return str(info.value)


def test_unknown_key(numpy_checkpoint, tmp_path):
  _, folder = numpy_checkpoint()
  key = "blocks.0.attn1.to_q.weight"
  shard = _edit_shard(folder, key, lambda t: t.update({"blocks.0.attn1.extra": t[key]}))
  _edit_index(folder, lambda m: m.update({"blocks.0.attn1.extra": shard.name}))

  msg = _convert_fails(folder, tmp_path, "unknown key 'blocks.0.attn1.extra'")
  assert shard.name in msg


def test_key_in_file_but_not_in_index(numpy_checkpoint, tmp_path):
  _, folder = numpy_checkpoint()
  key = "proj_out.bias"
  shard = _edit_shard(folder, key, lambda t: t.update({"stray": t[key]}))

  msg = _convert_fails(folder, tmp_path, "unexpected key 'stray'")
  assert shard.name in msg


def test_missing_key(numpy_checkpoint, tmp_path):
  _, folder = numpy_checkpoint()
  key = "blocks.1.ffn.net.2.weight"
  _edit_shard(folder, key, lambda t: t.pop(key))
  _edit_index(folder, lambda m: m.pop(key))

  _convert_fails(folder, tmp_path, f"missing key '{key}'")


def test_key_in_index_but_not_in_file(numpy_checkpoint, tmp_path):
  _, folder = numpy_checkpoint()
  key = "blocks.1.attn2.norm_k.weight"
  shard = _edit_shard(folder, key, lambda t: t.pop(key))

  msg = _convert_fails(folder, tmp_path, f"missing key '{key}'")
  assert shard.name in msg


def test_wrong_shape(numpy_checkpoint, tmp_path):
  _, folder = numpy_checkpoint()
  key = "blocks.0.attn2.to_v.weight"
  shard = _edit_shard(folder, key, lambda t: t.update({key: t[key][:, :-1].copy()}))

  msg = _convert_fails(folder, tmp_path, rf"key '{key}' in file .* has shape \(32, 31\)")
  assert shard.name in msg and "(32, 32)" in msg


@pytest.mark.parametrize("layout", ["diffusers", "original"])
def test_wrong_variant(numpy_checkpoint, tmp_path, layout):
  _, folder = numpy_checkpoint("i2v", layout)

  msg = _convert_fails(folder, tmp_path, "wrong variant", variant=tiny_config("t2v"))
  assert "in_channels: 12 in the checkpoint, 4 requested" in msg
  _convert_fails(folder, tmp_path, "wrong variant", variant="i2v-a14b")


def test_wrong_variant_without_config_json(numpy_checkpoint, tmp_path):
  _, folder = numpy_checkpoint("i2v")
  (folder / "config.json").unlink()

  assert from_pretrained(folder, variant=tiny_config("i2v")).config.in_channels == 12
  _convert_fails(folder, tmp_path, "in_channels: 12 in the checkpoint, 4 requested",
                 variant=tiny_config("t2v"))


def test_config_json_disagreeing_with_tensors(numpy_checkpoint, tmp_path):
  _, folder = numpy_checkpoint("t2v")
  config = json.loads((folder / "config.json").read_text())
  (folder / "config.json").write_text(json.dumps({**config, "in_channels": 12}))

  _convert_fails(folder, tmp_path, r"key 'patch_embedding.weight' in file .* has shape")


def test_truncated_file(numpy_checkpoint, tmp_path):
  _, folder = numpy_checkpoint()
  shard = _shard_of(folder, "proj_out.weight")
  data = shard.read_bytes()
  shard.write_bytes(data[:len(data) - 100])

  msg = _convert_fails(folder, tmp_path, "truncated or corrupt")
  assert shard.name in msg


def test_garbage_file(numpy_checkpoint, tmp_path):
  _, folder = numpy_checkpoint()
  shard = _shard_of(folder, "proj_out.weight")
  shard.write_bytes(b"\x00" * 64)

  assert shard.name in _convert_fails(folder, tmp_path, "truncated or corrupt")


def test_missing_shard_and_bad_index(numpy_checkpoint, tmp_path):
  _, folder = numpy_checkpoint()
  shard = _shard_of(folder, "proj_out.weight")
  shard.rename(shard.with_suffix(".bak"))
  assert shard.name in _convert_fails(folder, tmp_path, "does not exist")

  (folder / INDEX).write_text("{not json")
  _convert_fails(folder, tmp_path, "cannot read the weight map")


def test_failure_late_in_a_pair_leaves_nothing(numpy_checkpoint, tmp_path):
  """The high-noise expert converts fine, the low-noise one is truncated."""
  _, high = numpy_checkpoint("t2v", seed=0)
  _, low = numpy_checkpoint("t2v", seed=1)
  root = tmp_path / "pair"
  root.mkdir()
  high.rename(root / "high_noise_model")
  low.rename(root / "low_noise_model")
  shard = _shard_of(root / "low_noise_model", "proj_out.weight")
  shard.write_bytes(shard.read_bytes()[:-8])

  msg = _convert_fails(root, tmp_path, "truncated or corrupt")
  assert "low_noise_model" in msg


def test_pair_in_original_layout(numpy_checkpoint, tmp_path):
  high_model, high = numpy_checkpoint("i2v", "original", seed=0)
  low_model, low = numpy_checkpoint("i2v", "original", seed=1)
  root = tmp_path / "pair"
  root.mkdir()
  high.rename(root / "high_noise_model")
  low.rename(root / "low_noise_model")

  pair = from_pretrained(convert(root, tmp_path / "out", dtype="fp32", progress=False))

  assert pair.boundary_ratio == 0.9  # I2V default: no model_index.json
  _assert_same_params(flat_params(pair.high_noise), flat_params(high_model))
  _assert_same_params(flat_params(pair.low_noise), flat_params(low_model))


def test_converted_folder_checks(numpy_checkpoint, tmp_path):
  _, folder = numpy_checkpoint("t2v")
  dst = convert(folder, tmp_path / "out", dtype="fp32", progress=False)

  with pytest.raises(CheckpointError, match="wrong variant"):
    from_pretrained(dst, variant="ti2v-5b")
  marker = json.loads((dst / "svg_ear_jax.json").read_text())
  (dst / "svg_ear_jax.json").write_text(json.dumps({**marker, "version": 99}))
  with pytest.raises(CheckpointError, match="not a version-1"):
    from_pretrained(dst)
  with pytest.raises(CheckpointError, match="no such file"):
    from_pretrained(tmp_path / "nowhere")


def test_unknown_variant_name(numpy_checkpoint):
  _, folder = numpy_checkpoint("t2v")
  with pytest.raises(ValueError, match="unknown Wan variant"):
    from_pretrained(folder, variant="t2v-1.3b")
  assert isinstance(WanConfig.from_diffusers_config({}), WanConfig)
