"""`svg-ear-convert wan-vae | hunyuan-vae | umt5 | llama | clip`: conversion to Orbax
folders (marker + config + parameters) that the loaders read back bit-exactly, dtypes,
--overwrite, atomicity on failure, usage errors, Llama's partial restore. Sources are
written with NumPy (no torch needed), except the original torch pickles (skipped without
torch)."""

import json
import re
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import convert_common as cc
from models.cli import main as cli_main
from models.hunyuan import text_convert
from models.hunyuan import vae_convert as hy_convert
from models.hunyuan.clip import CLIPTextConfig, CLIPTextEncoder
from models.hunyuan.llama import LlamaConfig, LlamaEncoder
from models.hunyuan.vae import HunyuanVAE, HunyuanVAEConfig
from models.wan import umt5_convert
from models.wan import vae_convert as wan_convert
from models.wan.umt5 import UMT5Config, UMT5Encoder
from models.wan.vae import WanVAE, WanVAEConfig

safetensors_numpy = pytest.importorskip("safetensors.numpy")

WAN = WanVAEConfig(base_dim=3, z_dim=16, dim_mult=(1, 1, 1, 1), num_res_blocks=1)
HUNYUAN = HunyuanVAEConfig(latent_channels=4, block_out_channels=(8, 8, 16, 16),
                           layers_per_block=1, norm_num_groups=4)
UMT5 = UMT5Config(vocab_size=160, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
LLAMA = LlamaConfig(vocab_size=160, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                    num_attention_heads=4, num_key_value_heads=2, rope_theta=500000.0)
CLIP = CLIPTextConfig(vocab_size=160, hidden_size=32, intermediate_size=48,
                      num_hidden_layers=2, num_attention_heads=4, eos_token_id=2)


def _random(cls, cfg, seed=0):
  """An abstract model filled with NumPy random values (faster than eager init)."""
  model = nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0)))
  rng = np.random.default_rng(seed)
  for path, var in cc.param_variables(model).items():
    spec = var.get_value()
    base = 1.0 if path[-1] in ("gamma", "weight", "scale") else 0.0
    var.set_value(jnp.asarray(base + 0.3 * rng.standard_normal(spec.shape), spec.dtype))
  return model


def _arch(cfg) -> dict:
  return {k: v for k, v in cfg.to_dict().items() if k not in ("param_dtype", "dtype")}


def _write(folder: Path, config: dict, state: dict, name: str) -> Path:
  folder.mkdir(parents=True)
  (folder / "config.json").write_text(json.dumps(config))
  safetensors_numpy.save_file(state, str(folder / name))
  return folder


# subcommand -> (loader, model class, writer of a diffusers/transformers source folder)
def _wan_source(folder):
  model = _random(WanVAE, WAN, 1)
  return _write(folder, {"_class_name": "AutoencoderKLWan", **_arch(WAN)},
                wan_convert.to_state_dict(model), "diffusion_pytorch_model.safetensors")


def _hunyuan_source(folder):
  model = _random(HunyuanVAE, HUNYUAN, 2)
  return _write(folder, {"_class_name": "AutoencoderKLHunyuanVideo", **_arch(HUNYUAN)},
                hy_convert.to_state_dict(model), "diffusion_pytorch_model.safetensors")


def _umt5_source(folder):
  model = _random(UMT5Encoder, UMT5, 3)
  return _write(folder, {"model_type": "umt5", **_arch(UMT5)},
                umt5_convert.to_state_dict(model), "model.safetensors")


def _llama_source(folder):
  model = _random(LlamaEncoder, LLAMA, 7)
  return _write(folder, {"model_type": "llama", **_arch(LLAMA)},
                text_convert.llama_to_state_dict(model), "model.safetensors")


def _clip_source(folder):
  model = _random(CLIPTextEncoder, CLIP, 8)
  return _write(folder, {"model_type": "clip_text_model", **_arch(CLIP)},
                text_convert.clip_to_state_dict(model), "model.safetensors")


COMMANDS = {
    "wan-vae": (wan_convert.load_vae, WanVAE, _wan_source, wan_convert.FORMAT),
    "hunyuan-vae": (hy_convert.load_vae, HunyuanVAE, _hunyuan_source, hy_convert.FORMAT),
    "umt5": (umt5_convert.load_umt5, UMT5Encoder, _umt5_source, umt5_convert.FORMAT),
    "llama": (text_convert.load_llama, LlamaEncoder, _llama_source, text_convert.LLAMA_FORMAT),
    "clip": (text_convert.load_clip, CLIPTextEncoder, _clip_source, text_convert.CLIP_FORMAT),
}
ORIGINAL_PICKLES = ("wan-vae", "hunyuan-vae", "umt5")  # the commands with a .pth source


def _assert_same_params(a, b, dtype=None):
  pa, pb = cc.param_variables(a), cc.param_variables(b)
  assert pa.keys() == pb.keys()
  for path in pa:
    x, y = pa[path].get_value(), pb[path].get_value()
    assert x.dtype == y.dtype and (dtype is None or x.dtype == dtype), path
    np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32),
                                  err_msg=cc.path_str(path))


@pytest.mark.parametrize("command", list(COMMANDS))
def test_round_trip(command, tmp_path, capsys):
  load, cls, make_source, fmt = COMMANDS[command]
  src = make_source(tmp_path / "src")
  dst = tmp_path / "out"

  assert cli_main([command, str(src), str(dst), "--dtype", "fp32"]) == 0  # with a bar
  out = capsys.readouterr()
  assert f"wrote {dst}" in out.out and "tensor" in out.err
  marker = json.loads((dst / cc.MARKER).read_text())
  assert marker["format"] == fmt and marker["version"] == 1
  assert (dst / cc.PARAMS_DIR).is_dir()
  direct = load(src)
  restored = cls.from_pretrained(dst)  # float32 by default, like the sources
  _assert_same_params(restored, direct, jnp.float32)
  config = (lambda m: m.config) if command.endswith("vae") else (lambda m: m.cfg)
  assert config(restored) == config(direct)
  if command.endswith("vae"):  # what the pipelines read for the latent geometry
    read = (wan_convert if command == "wan-vae" else hy_convert).read_config
    assert read(dst) == read(src) == config(direct)

  assert cli_main([command, str(src), str(dst), "--quiet"]) == 1  # exists
  assert "already exists" in capsys.readouterr().err
  assert cli_main([command, str(src), str(dst), "--quiet", "--overwrite",
                   "--dtype", "bf16"]) == 0
  _assert_same_params(load(dst, dtype=None), load(src, dtype="bf16"))  # as stored: bf16
  assert not list(tmp_path.glob(".out.*"))  # no temporary or old folders left


def test_default_dtypes(tmp_path):
  for command, dtype in (("wan-vae", jnp.float32), ("umt5", jnp.bfloat16)):
    load, _, make_source, _ = COMMANDS[command]
    src = make_source(tmp_path / f"{command}_src")
    assert cli_main([command, str(src), str(tmp_path / command), "--quiet"]) == 0
    model = load(tmp_path / command, dtype=None)
    kernels = [v.get_value().dtype for p, v in cc.param_variables(model).items()
               if p[-1] == "kernel"]
    assert set(kernels) == {jnp.dtype(dtype)}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_failure_leaves_nothing(command, tmp_path, capsys):
  _, _, make_source, _ = COMMANDS[command]
  src = make_source(tmp_path / "src")
  weights = next(src.glob("*.safetensors"))
  weights.write_bytes(weights.read_bytes()[:200])
  dst = tmp_path / "out"
  assert cli_main([command, str(src), str(dst), "--quiet"]) == 1
  assert "truncated or corrupt" in capsys.readouterr().err
  assert not dst.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["src"]

  assert cli_main([command, str(tmp_path / "absent"), str(dst), "--quiet"]) == 1
  assert "no such file or folder" in capsys.readouterr().err
  assert not dst.exists()


def test_converted_folder_checks(tmp_path):
  src = _wan_source(tmp_path / "src")
  dst = wan_convert.convert(src, tmp_path / "out", progress=False)
  with pytest.raises(cc.CheckpointError, match="wrong variant: .*z_dim: 16 in the checkpoint, "
                     "48 requested"):
    wan_convert.load_vae(dst, config=WanVAEConfig(**{**_arch(WAN), "z_dim": 48,
                                                      "latents_mean": [0.0] * 48,
                                                      "latents_std": [1.0] * 48}))
  # Another component's converted folder is refused by name.
  with pytest.raises(cc.CheckpointError, match=re.escape(hy_convert.FORMAT)):
    hy_convert.load_vae(dst)
  with pytest.raises(cc.CheckpointError, match=re.escape(umt5_convert.FORMAT)):
    umt5_convert.load_umt5(dst)
  umt5_dst = umt5_convert.convert(_umt5_source(tmp_path / "t5"), tmp_path / "t5_out",
                                  progress=False)
  with pytest.raises(cc.CheckpointError, match="wrong variant: .* holds a UMT5 encoder "
                     r"\(2 layers.*num_layers: 2 in the checkpoint, 3 requested"):
    umt5_convert.load_umt5(umt5_dst, config=UMT5.replace(num_layers=3))
  # A converted folder inside a pipeline folder's vae/ is found like a diffusers one.
  pipeline = tmp_path / "pipeline"
  pipeline.mkdir()
  hy_dst = hy_convert.convert(_hunyuan_source(tmp_path / "hy"), pipeline / "vae",
                              progress=False)
  _assert_same_params(HunyuanVAE.from_pretrained(pipeline), HunyuanVAE.from_pretrained(hy_dst))
  wan_convert.convert(dst, pipeline / "vae_wan" / "vae", progress=False)  # from converted
  _assert_same_params(WanVAE.from_pretrained(pipeline / "vae_wan"), WanVAE.from_pretrained(dst))


def test_text_encoders_in_a_pipeline_folder(tmp_path, monkeypatch):
  """A HunyuanVideo pipeline folder whose text_encoder/ and text_encoder_2/ were converted
  (bf16 by default): the pipeline loads them, Llama with only the layers hidden_states[-3]
  needs; each loader refuses the other's folder and another depth."""
  from hunyuan_testing import tiny_config
  from models.hunyuan import convert as dit_convert
  from models.hunyuan.pipeline import HunyuanVideoPipeline
  from models.hunyuan.transformer import HunyuanVideoTransformer

  pipeline = tmp_path / "pipeline"
  llama_src = _llama_source(tmp_path / "llama")
  clip_src = _clip_source(tmp_path / "clip")
  for command, src, dst in (("llama", llama_src, "text_encoder"),
                            ("clip", clip_src, "text_encoder_2")):
    assert cli_main([command, str(src), str(pipeline / dst), "--quiet"]) == 0
    marker = json.loads((pipeline / dst / cc.MARKER).read_text())
    assert marker["config"]["dtype"] == "bfloat16"  # the default
  # The DiT is not under test: an abstract one stands in for its checkpoint.
  dit = nnx.eval_shape(lambda: HunyuanVideoTransformer(tiny_config()))
  monkeypatch.setattr(dit_convert, "from_pretrained", lambda *args, **kw: dit)
  (pipeline / "transformer").mkdir()
  (pipeline / "scheduler").mkdir()
  (pipeline / "scheduler" / "scheduler_config.json").write_text(json.dumps(
      {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 7.0}))
  (pipeline / "model_index.json").write_text(json.dumps(
      {name: ["x", "y"] for name in ("transformer", "scheduler", "text_encoder",
                                     "text_encoder_2")}))
  pipe = HunyuanVideoPipeline.from_pretrained(pipeline)  # text encoders in bf16
  part = pipe.parts.get("text_encoder", "the test")
  assert part.num_layers == LLAMA.num_hidden_layers - 2 and part.norm is None
  _assert_same_params(part, text_convert.load_llama(llama_src, dtype="bf16",
                                                    up_to_hidden_state=-3), jnp.bfloat16)
  assert pipe.parts.get("text_encoder_2", "the test").cfg == CLIP.with_dtype(jnp.bfloat16)
  with pytest.raises(cc.CheckpointError, match=re.escape(text_convert.CLIP_FORMAT)):
    text_convert.load_llama(pipeline / "text_encoder_2")
  with pytest.raises(cc.CheckpointError, match="wrong variant: .*num_hidden_layers: 3 in the "
                     "checkpoint, 4 requested"):
    text_convert.load_llama(pipeline, config=LLAMA.replace(num_hidden_layers=4))


def test_usage_errors(capsys):
  with pytest.raises(SystemExit) as info:
    cli_main(["wan-vae", "a", "b", "--variant", "x"])
  assert info.value.code == 2
  with pytest.raises(SystemExit):
    cli_main(["umt5", "a", "b", "--dtype", "int8"])
  capsys.readouterr()
  with pytest.raises(SystemExit):
    cli_main(["--help"])
  help_text = capsys.readouterr().out
  assert all(c in help_text for c in COMMANDS), help_text


# --- original torch pickles -----------------------------------------------------------------

def _save_torch(state: dict, path: Path) -> Path:
  import torch
  path.parent.mkdir(parents=True, exist_ok=True)
  torch.save({k: torch.from_numpy(np.array(v)) for k, v in state.items()}, path)
  return path


@pytest.mark.parametrize("command", ORIGINAL_PICKLES)
def test_original_pickle_converts(command, tmp_path):
  pytest.importorskip("torch", reason="original torch pickles need torch")
  load, cls, _, _ = COMMANDS[command]
  if command == "wan-vae":
    src = _save_torch(wan_convert.to_original_state_dict(_random(WanVAE, WAN, 4)),
                      tmp_path / "Wan2.1-T2V" / "Wan2.1_VAE.pth").parent
  elif command == "umt5":
    src = _save_torch(umt5_convert.to_original_state_dict(_random(UMT5Encoder, UMT5, 5)),
                      tmp_path / "Wan2.1-T2V" / "models_t5_umt5-xxl-enc-bf16.pth").parent
  else:
    src = tmp_path / "hunyuan-video-t2v-720p"
    _save_torch(hy_convert.to_state_dict(_random(HunyuanVAE, HUNYUAN, 6)),
                src / "vae" / "pytorch_model.pt")
    n = len(HUNYUAN.block_out_channels)
    (src / "vae" / "config.json").write_text(json.dumps({
        "_class_name": "AutoencoderKLCausal3D", "block_out_channels": [8, 8, 16, 16],
        "down_block_types": ["DownEncoderBlockCausal3D"] * n,
        "up_block_types": ["UpDecoderBlockCausal3D"] * n, "latent_channels": 4,
        "layers_per_block": 1, "norm_num_groups": 4, "scaling_factor": 0.476986,
        "sample_size": 256, "sample_tsize": 64, "time_compression_ratio": 4}))
  dst = tmp_path / "out"
  assert cli_main([command, str(src), str(dst), "--dtype", "fp32", "--quiet"]) == 0
  _assert_same_params(cls.from_pretrained(dst), load(src), jnp.float32)
