"""HunyuanVideo conversion without torch: round trips, Orbax output, and every error case."""

import importlib.util
import json
import re
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from hunyuan_testing import (INDEX, export_numpy_checkpoint, flat_params, is_fp32_island,
                             random_jax_model, tiny_config)
from models import CheckpointError
from models.hunyuan import from_pretrained
from models.hunyuan.convert import convert

safetensors_numpy = pytest.importorskip("safetensors.numpy")
load_file, save_file = safetensors_numpy.load_file, safetensors_numpy.save_file


@pytest.fixture
def checkpoint(tmp_path):
  """Factory: layout -> (random JAX model, fresh 3-shard checkpoint folder of it)."""

  def make(layout: str = "diffusers", seed: int = 0, **overrides):
    model = random_jax_model(seed, **overrides)
    return model, export_numpy_checkpoint(model, tmp_path / f"{layout}_{seed}", layout=layout)

  return make


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


def _convert_fails(folder, tmp_path, match, **kw):
  dst = tmp_path / "out"
  with pytest.raises(CheckpointError, match=match) as info:
    convert(folder, dst, progress=False, **kw)
  _assert_nothing_written(dst)
  return str(info.value)


@pytest.mark.parametrize("layout", ["diffusers", "original"])
def test_source_round_trip(checkpoint, layout):
  model, folder = checkpoint(layout)
  # Without config.json (original layout) the toy RoPE split must come from the variant.
  variant = tiny_config() if layout == "original" else None

  loaded = from_pretrained(folder, dtype=jnp.float32, variant=variant)

  assert loaded.config == model.config
  _assert_same_params(flat_params(loaded), flat_params(model))


def test_shapes_alone_give_the_architecture(checkpoint):
  model, folder = checkpoint(guidance_embeds=False, head_dim=128, num_heads=1,
                             rope_axes_dim=(16, 56, 56))
  (folder / "config.json").unlink()

  assert from_pretrained(folder, dtype=jnp.float32).config == model.config


def test_convert_bf16_then_load(checkpoint, tmp_path):
  model, folder = checkpoint("original")

  dst = convert(folder, tmp_path / "out", dtype="bf16", variant=tiny_config(), progress=False)
  loaded = from_pretrained(dst)

  params, ref = flat_params(loaded), flat_params(model)
  for path, value in params.items():
    name = ".".join(map(str, path))
    assert value.dtype == (np.float32 if is_fp32_island(name) else jnp.bfloat16), name
    np.testing.assert_array_equal(value, ref[path].astype(value.dtype), err_msg=name)
  assert loaded.config.param_dtype == jnp.bfloat16
  assert from_pretrained(dst, dtype="fp32").proj_out.kernel.get_value().dtype == jnp.float32


def test_overwrite_and_existing_destination(checkpoint, tmp_path):
  _, folder = checkpoint()
  dst = convert(folder, tmp_path / "out", dtype="fp32", progress=False)
  with pytest.raises(FileExistsError, match="already exists"):
    convert(folder, dst, progress=False)
  _, other = checkpoint(seed=1)
  convert(other, dst, dtype="fp32", progress=False, overwrite=True)
  _assert_same_params(flat_params(from_pretrained(dst)),
                      flat_params(from_pretrained(other, dtype=jnp.float32)))


# Error cases: each must name the offending key and file, and leave nothing at dst.

def test_unknown_key(checkpoint, tmp_path):
  _, folder = checkpoint()
  key = "transformer_blocks.0.attn.to_q.weight"
  shard = _edit_shard(folder, key, lambda t: t.update({"transformer_blocks.0.attn.extra": t[key]}))
  _edit_index(folder, lambda m: m.update({"transformer_blocks.0.attn.extra": shard.name}))

  msg = _convert_fails(folder, tmp_path, "unknown key 'transformer_blocks.0.attn.extra'")
  assert shard.name in msg


@pytest.mark.parametrize("layout, key", [
    ("diffusers", "single_transformer_blocks.1.proj_mlp.weight"),
    ("original", "single_blocks.1.linear1.weight"),  # fused: named with its row slices
    ("original", "final_layer.adaLN_modulation.1.bias"),
])
def test_missing_key(checkpoint, tmp_path, layout, key):
  _, folder = checkpoint(layout)
  _edit_shard(folder, key, lambda t: t.pop(key))
  _edit_index(folder, lambda m: m.pop(key))

  _convert_fails(folder, tmp_path, f"missing key '{key}", variant=tiny_config())


def test_key_in_index_but_not_in_file(checkpoint, tmp_path):
  _, folder = checkpoint()
  key = "transformer_blocks.1.attn.norm_added_k.weight"
  shard = _edit_shard(folder, key, lambda t: t.pop(key))

  msg = _convert_fails(folder, tmp_path, f"missing key '{key}'")
  assert shard.name in msg


@pytest.mark.parametrize("layout, key, expected", [
    ("diffusers", "transformer_blocks.0.attn.add_v_proj.weight", r"' in file .* \(24, 23\)"),
    ("original", "double_blocks.1.txt_attn_qkv.weight", r"' in file .* \(71, 24\).* 72 rows"),
    # A slice of a fused tensor is named with its rows.
    ("original", "single_blocks.0.linear1.weight", r"\[0:24\]' in file .* \(24, 23\)"),
], ids=["diffusers", "fused_rows", "fused_slice"])
def test_wrong_shape(checkpoint, tmp_path, layout, key, expected):
  _, folder = checkpoint(layout)
  cut = (lambda w: w[:-1]) if "qkv" in key else (lambda w: w[:, :-1])
  shard = _edit_shard(folder, key, lambda t: t.update({key: cut(t[key]).copy()}))

  msg = _convert_fails(folder, tmp_path, rf"key '{re.escape(key)}{expected}",
                       variant=tiny_config())
  assert shard.name in msg and "has shape" in msg


def test_wrong_variant(checkpoint, tmp_path):
  _, folder = checkpoint()

  msg = _convert_fails(folder, tmp_path, "wrong variant", variant="t2v-720p")
  assert "num_layers: 2 in the checkpoint, 20 requested" in msg
  _convert_fails(folder, tmp_path, "wrong variant", variant=tiny_config(in_channels=8))


def test_rope_split_not_inferable(checkpoint, tmp_path):
  _, folder = checkpoint("original")
  _convert_fails(folder, tmp_path, "cannot infer rope_axes_dim for head dim 12")


def test_config_json_disagreeing_with_tensors(checkpoint, tmp_path):
  _, folder = checkpoint()
  config = json.loads((folder / "config.json").read_text())
  (folder / "config.json").write_text(json.dumps({**config, "in_channels": 8}))

  _convert_fails(folder, tmp_path, r"key 'x_embedder.proj.weight' in file .* has shape")


def test_truncated_file(checkpoint, tmp_path):
  _, folder = checkpoint("original")
  shard = _shard_of(folder, "double_blocks.0.img_attn_qkv.weight")
  shard.write_bytes(shard.read_bytes()[:-100])

  msg = _convert_fails(folder, tmp_path, "truncated or corrupt", variant=tiny_config())
  assert shard.name in msg


def test_missing_shard_and_bad_index(checkpoint, tmp_path):
  _, folder = checkpoint()
  shard = _shard_of(folder, "proj_out.weight")
  shard.rename(shard.with_suffix(".bak"))
  assert shard.name in _convert_fails(folder, tmp_path, "does not exist")

  (folder / INDEX).write_text("{not json")
  _convert_fails(folder, tmp_path, "cannot read the weight map")


def test_not_a_hunyuan_checkpoint(tmp_path):
  save_file({"blocks.0.attn1.to_q.weight": np.zeros((2, 2), np.float32)},
            str(tmp_path / "wan.safetensors"))
  _convert_fails(tmp_path / "wan.safetensors", tmp_path, "neither a diffusers nor an original")


def test_converted_folder_checks(checkpoint, tmp_path):
  _, folder = checkpoint()
  dst = convert(folder, tmp_path / "out", dtype="fp32", progress=False)

  with pytest.raises(CheckpointError, match="wrong variant"):
    from_pretrained(dst, variant="t2v-720p")
  marker = json.loads((dst / "svg_ear_jax.json").read_text())
  (dst / "svg_ear_jax.json").write_text(json.dumps({**marker, "format": "svg-ear-jax/wan"}))
  with pytest.raises(CheckpointError, match="not a version-1 svg-ear-jax/hunyuan"):
    from_pretrained(dst)
  with pytest.raises(CheckpointError, match="no such file"):
    from_pretrained(tmp_path / "nowhere")
  with pytest.raises(ValueError, match="unknown HunyuanVideo variant"):
    from_pretrained(folder, variant="t2v-540p")


@pytest.mark.skipif(importlib.util.find_spec("torch") is not None,
                    reason="checks the message shown without torch")
def test_torch_pickle_without_torch(tmp_path):
  (tmp_path / "mp_rank_00_model_states.pt").write_bytes(b"PK")
  _convert_fails(tmp_path, tmp_path, "reading a torch pickle needs torch")


def test_cli(checkpoint, tmp_path, capsys):
  from models.cli import main as cli_main
  _, folder = checkpoint("diffusers")
  dst = tmp_path / "cli_out"
  assert cli_main(["hunyuan", str(folder), str(dst), "--dtype", "fp32", "--quiet"]) == 0
  assert "wrote" in capsys.readouterr().out
  restored = from_pretrained(dst)
  assert restored.config.num_layers == tiny_config().num_layers
  assert cli_main(["hunyuan", str(folder), str(dst), "--quiet"]) == 1  # exists
  assert "error" in capsys.readouterr().err
