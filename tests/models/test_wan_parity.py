"""Wan DiT vs diffusers `WanTransformer3DModel`: conversion from both key layouts, fp32 parity."""

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models.wan import WanExpertPair, WanTransformer, from_pretrained
from models.wan.convert import convert
from wan_testing import (flat_params, rel_err, tiny_config, torch_forward, wan_inputs,
                         write_shards)

torch = pytest.importorskip("torch", reason="parity tests need torch")
pytest.importorskip("diffusers", reason="parity tests need diffusers")
save_file = pytest.importorskip("safetensors.torch").save_file

KINDS = ("t2v", "i2v", "ti2v")
TOL = 1e-4

# diffusers -> original names: the inverse of diffusers' TRANSFORMER_KEYS_RENAME_DICT
# (single_file_utils.convert_wan_transformer_to_diffusers), written independently of the
# converter's table and checked against diffusers below.
_TO_ORIGINAL = (
    ("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
    ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
    ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
    ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
    ("condition_embedder.time_proj", "time_projection.1"),
    (".attn1.", ".self_attn."),
    (".attn2.", ".cross_attn."),
    (".to_out.0.", ".o."),
    (".to_q.", ".q."),
    (".to_k.", ".k."),
    (".to_v.", ".v."),
    ("ffn.net.0.proj", "ffn.0"),
    ("ffn.net.2", "ffn.2"),
    (".norm2.", ".norm3."),
    (".scale_shift_table", ".modulation"),
)


def _original_key(key: str) -> str:
  if key == "scale_shift_table":
    return "head.modulation"
  if key.startswith("proj_out."):
    return "head.head." + key[len("proj_out."):]
  for new, old in _TO_ORIGINAL:
    key = key.replace(new, old)
  return key


def _original_state_dict(model) -> dict:
  from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

  state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
  original = {_original_key(k): v for k, v in state.items()}
  back = convert_wan_transformer_to_diffusers(dict(original))
  assert sorted(back) == sorted(state), "test inverse table disagrees with diffusers"
  assert all(torch.equal(back[k], state[k]) for k in state)
  return original


def _forward(model, x, t, ctx):
  return np.asarray(nnx.jit(lambda m, *a: m(*a))(model, jnp.asarray(x), jnp.asarray(t),
                                                 jnp.asarray(ctx)))


@pytest.mark.parametrize("kind", KINDS)
def test_diffusers_checkpoint_matches_pytorch(diffusers_wan, kind):
  torch_model, folder = diffusers_wan(kind)
  assert len(list(folder.glob("*.safetensors"))) >= 2
  assert (folder / "diffusion_pytorch_model.safetensors.index.json").is_file()

  model = from_pretrained(folder, dtype=jnp.float32)

  assert isinstance(model, WanTransformer)
  assert model.config.architecture() == tiny_config(kind).architecture()
  x, t, ctx = wan_inputs(kind, batch=2)
  assert rel_err(_forward(model, x, t, ctx), torch_forward(torch_model, x, t, ctx)) < TOL


@pytest.mark.parametrize("kind", KINDS)
def test_original_layout_gives_identical_params(diffusers_wan, tmp_path, kind):
  torch_model, folder = diffusers_wan(kind)
  cfg = tiny_config(kind)
  write_shards(_original_state_dict(torch_model), tmp_path, 3, save_file)
  (tmp_path / "config.json").write_text(json.dumps({
      "_class_name": "WanModel", "dim": cfg.dim, "eps": 1e-6, "ffn_dim": cfg.ffn_dim,
      "freq_dim": cfg.freq_dim, "in_dim": cfg.in_channels, "model_type": cfg.model_type,
      "num_heads": cfg.num_heads, "num_layers": cfg.num_layers, "out_dim": cfg.out_channels,
      "text_len": 512, "text_dim": cfg.text_dim}))

  from_original = flat_params(from_pretrained(tmp_path, dtype=jnp.float32))
  from_diffusers = flat_params(from_pretrained(folder, dtype=jnp.float32))

  assert from_original.keys() == from_diffusers.keys()
  for path, value in from_diffusers.items():
    np.testing.assert_array_equal(from_original[path], value, err_msg=str(path))


def test_single_prefixed_original_file_without_config(diffusers_wan, tmp_path):
  """ComfyUI-style single file (`model.diffusion_model.` prefix), no config.json."""
  torch_model, _ = diffusers_wan("t2v")
  state = {"model.diffusion_model." + k: v for k, v in _original_state_dict(torch_model).items()}
  save_file(state, str(tmp_path / "wan.safetensors"))

  model = from_pretrained(tmp_path / "wan.safetensors", dtype=jnp.float32,
                          variant=tiny_config("t2v"))

  x, t, ctx = wan_inputs("t2v")
  assert rel_err(_forward(model, x, t, ctx), torch_forward(torch_model, x, t, ctx)) < TOL


def _pair_folder(diffusers_wan, root, kind="t2v"):
  for sub, seed in (("transformer", 0), ("transformer_2", 1)):
    shutil.copytree(diffusers_wan(kind, seed)[1], root / sub)
  (root / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline",
                                                     "boundary_ratio": 0.875}))
  return root


def test_expert_pair_from_diffusers_folder(diffusers_wan, tmp_path):
  root = _pair_folder(diffusers_wan, tmp_path)
  high_torch, low_torch = diffusers_wan("t2v", 0)[0], diffusers_wan("t2v", 1)[0]

  pair = from_pretrained(root, dtype=jnp.float32)

  assert isinstance(pair, WanExpertPair)
  assert pair.boundary_timestep == 875.0
  for t_value, torch_model in ((900.0, high_torch), (875.0, high_torch), (100.0, low_torch)):
    x, t, ctx = wan_inputs("t2v", timestep=t_value)
    out = np.asarray(pair(jnp.asarray(x), t, jnp.asarray(ctx)))
    assert rel_err(out, torch_forward(torch_model, x, t, ctx)) < TOL, t_value


@pytest.mark.parametrize("kind", ["t2v", "ti2v"])
def test_converted_orbax_checkpoint_matches_pytorch(diffusers_wan, tmp_path, kind):
  torch_model, folder = diffusers_wan(kind)

  dst = convert(folder, tmp_path / "flax", dtype="fp32", progress=False)
  model = from_pretrained(dst)

  assert model.config.param_dtype == jnp.float32
  x, t, ctx = wan_inputs(kind)
  assert rel_err(_forward(model, x, t, ctx), torch_forward(torch_model, x, t, ctx)) < TOL


def test_converted_expert_pair(diffusers_wan, tmp_path):
  root = _pair_folder(diffusers_wan, tmp_path / "src")

  pair = from_pretrained(convert(root, tmp_path / "flax", dtype="fp32", progress=False))

  assert isinstance(pair, WanExpertPair) and pair.boundary_ratio == 0.875
  x, t, ctx = wan_inputs("t2v", timestep=100.0)
  out = np.asarray(pair(jnp.asarray(x), t, jnp.asarray(ctx)))
  assert rel_err(out, torch_forward(diffusers_wan("t2v", 1)[0], x, t, ctx)) < TOL


def test_bf16_model_close_to_pytorch_fp32(diffusers_wan):
  torch_model, folder = diffusers_wan("t2v")

  model = from_pretrained(folder)  # bf16 by default

  x, t, ctx = wan_inputs("t2v")
  out = _forward(model, x, t, ctx)
  assert out.dtype == jnp.bfloat16
  assert rel_err(out.astype(np.float32), torch_forward(torch_model, x, t, ctx)) < 5e-2
