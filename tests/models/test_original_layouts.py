"""Original checkpoint layouts of the VAEs and the UMT5 encoder: Wan's `Wan2.1_VAE.pth` /
`Wan2.2_VAE.pth`, HunyuanVideo's `vae/pytorch_model.pt` + `AutoencoderKLCausal3D`
config.json, and Wan's `models_t5_umt5-xxl-enc-bf16.pth`.

Tiny diffusers / transformers models with random weights are written under the original key
names by this file's own renaming (`wan_original_name`, `hunyuan_original_state`,
`wan_t5_name`: independent of the loaders' tables), with `torch.save`; our loaders read them
back and must reproduce the torch models' decode / encode / hidden states (float32, relative
error < 1e-4), so the mapping is proven by outputs. Then the errors: unknown, missing and
mis-shaped keys, corrupt files, ambiguous folders and architectures, and a missing torch
(simulated). Tests that need torch skip without it.
"""

import json
import re
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from models import convert_common as cc
from models.hunyuan import vae_convert as hy_convert
from models.hunyuan.vae import HunyuanVAE, HunyuanVAEConfig
from models.wan import umt5_convert
from models.wan import vae_convert as wan_convert
from models.wan.umt5 import UMT5Config, UMT5Encoder
from models.wan.vae import WanVAE, WanVAEConfig

REL_TOL = 1e-4

# Wan2.1 (original WanVAE_ of vae2_1.py): two residual blocks per stage (shortcuts in both
# directions), time halved at the first and last resamplings. One base width, as in Wan2.1.
WAN21 = dict(base_dim=4, z_dim=16, dim_mult=[1, 2, 1, 2], num_res_blocks=2,
             temperal_downsample=[True, False, True])
# Wan2.2 (vae2_2.py): residual stages, 2x2 patches, a separate decoder width, Wan2.2's own
# latent statistics (what the loader infers from z_dim 48).
WAN22 = dict(base_dim=4, decoder_base_dim=6, z_dim=48, in_channels=12, out_channels=12,
             is_residual=True, patch_size=2, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
             scale_factor_spatial=16, scale_factor_temporal=4,
             temperal_downsample=[False, True, True],
             latents_mean=list(wan_convert.WAN22_LATENTS_MEAN),
             latents_std=list(wan_convert.WAN22_LATENTS_STD))
HUNYUAN = dict(latent_channels=4, block_out_channels=(8, 8, 16, 16), layers_per_block=1,
               norm_num_groups=4)
UMT5 = dict(vocab_size=160, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
            relative_attention_num_buckets=32, relative_attention_max_distance=128)


def _rel(ours, ref) -> float:
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  assert ours.shape == ref.shape
  return float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))


def _torch():
  return pytest.importorskip("torch", reason="original-layout tests need torch")


def _params(model):
  return {path: np.asarray(var.get_value()) for path, var in cc.param_variables(model).items()}


# --- this file's renaming: diffusers / transformers names -> original names -----------------

_RES = [(".norm1.", ".residual.0."), (".conv1.", ".residual.2."), (".norm2.", ".residual.3."),
        (".conv2.", ".residual.6."), (".conv_shortcut.", ".shortcut.")]


def _res(tail: str) -> str:
  tail = "." + tail
  for a, b in _RES:
    if tail.startswith(a):
      return b[1:] + tail[len(a):]
  return tail[1:]


def wan_original_name(key: str, num_res_blocks: int, residual: bool) -> str:
  """The inverse of diffusers' `convert_vae` (Wan2.1) / `convert_vae_22` (Wan2.2) renaming."""
  n = num_res_blocks
  for pattern, repl in [(r"quant_conv\.(.*)", r"conv1.\1"), (r"post_quant_conv\.(.*)", r"conv2.\1"),
                        (r"(\w+)\.conv_in\.(.*)", r"\1.conv1.\2"),
                        (r"(\w+)\.norm_out\.(.*)", r"\1.head.0.\2"),
                        (r"(\w+)\.conv_out\.(.*)", r"\1.head.2.\2"),
                        (r"(\w+)\.mid_block\.attentions\.0\.(.*)", r"\1.middle.1.\2")]:
    if re.fullmatch(pattern, key):
      return re.sub(pattern, repl, key)
  m = re.fullmatch(r"(\w+)\.mid_block\.resnets\.(\d)\.(.*)", key)
  if m:
    return f"{m[1]}.middle.{2 * int(m[2])}.{_res(m[3])}"
  if residual:
    m = re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key)
    if m:
      return f"encoder.downsamples.{m[1]}.downsamples.{m[2]}.{_res(m[3])}"
    m = re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsampler\.(.*)", key)
    if m:
      return f"encoder.downsamples.{m[1]}.downsamples.{n}.{m[2]}"
    m = re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key)
    if m:
      return f"decoder.upsamples.{m[1]}.upsamples.{m[2]}.{_res(m[3])}"
    m = re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsampler\.(.*)", key)
    if m:
      return f"decoder.upsamples.{m[1]}.upsamples.{n + 1}.{m[2]}"
  else:
    m = re.fullmatch(r"encoder\.down_blocks\.(\d+)\.(.*)", key)
    if m:
      return f"encoder.downsamples.{m[1]}.{_res(m[2])}"
    m = re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key)
    if m:  # n + 1 residual blocks and an upsampler per stage, one flat list
      return f"decoder.upsamples.{int(m[1]) * (n + 2) + int(m[2])}.{_res(m[3])}"
    m = re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.*)", key)
    if m:
      return f"decoder.upsamples.{int(m[1]) * (n + 2) + n + 1}.{m[2]}"
  raise AssertionError(f"no original name for {key}")


def wan_t5_name(key: str) -> str:
  """transformers UMT5EncoderModel key -> Wan T5Encoder key (None: the tied embedding copy)."""
  if key == "shared.weight":
    return "token_embedding.weight"
  if key == "encoder.final_layer_norm.weight":
    return "norm.weight"
  m = re.fullmatch(r"encoder\.block\.(\d+)\.layer\.(\d)\.(.*)", key)
  assert m, key
  member = {"0.layer_norm.weight": "norm1.weight", "1.layer_norm.weight": "norm2.weight",
            "0.SelfAttention.relative_attention_bias.weight": "pos_embedding.embedding.weight",
            "1.DenseReluDense.wi_0.weight": "ffn.gate.0.weight",
            "1.DenseReluDense.wi_1.weight": "ffn.fc1.weight",
            "1.DenseReluDense.wo.weight": "ffn.fc2.weight"}.get(f"{m[2]}.{m[3]}")
  if member is None:
    a = re.fullmatch(r"0\.SelfAttention\.([qkvo])\.weight", f"{m[2]}.{m[3]}")
    assert a, key
    member = f"attn.{a[1]}.weight"
  return f"blocks.{m[1]}.{member}"


# --- tiny torch references (module scope: built once) ----------------------------------------

@pytest.fixture(scope="module")
def wan_refs(tmp_path_factory):
  """name ("wan21" / "wan22") -> (diffusers AutoencoderKLWan, folder holding the original
  pickle beside a decoy T5 pickle)."""
  torch = _torch()
  diffusers = pytest.importorskip("diffusers", reason="parity tests need diffusers")
  out = {}
  for name, kw, file in (("wan21", WAN21, "Wan2.1_VAE.pth"), ("wan22", WAN22, "Wan2.2_VAE.pth")):
    torch.manual_seed(0)
    model = diffusers.AutoencoderKLWan(**kw).eval()
    with torch.no_grad():  # default gammas are all ones: make the norms count
      for key, p in model.named_parameters():
        if key.endswith("gamma"):
          p.copy_(1.0 + 0.3 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp(name)
    state = {wan_original_name(k, kw["num_res_blocks"], kw.get("is_residual", False)): v
             for k, v in model.state_dict().items()}
    assert len(state) == len(model.state_dict())
    torch.save(state, folder / file)
    (folder / "models_t5_umt5-xxl-enc-bf16.pth").write_bytes(b"not read")
    out[name] = model, folder
  return out


def _wan_stats(ref):
  import torch
  z = ref.config.z_dim
  mean = torch.tensor(ref.config.latents_mean).view(1, z, 1, 1, 1)
  return mean, 1.0 / torch.tensor(ref.config.latents_std).view(1, z, 1, 1, 1)


@pytest.mark.parametrize("name", ["wan21", "wan22"])
def test_wan_vae_original_matches_diffusers(wan_refs, name):
  import torch
  ref, folder = wan_refs[name]
  ours = WanVAE.from_pretrained(folder)  # the folder: its one *VAE*.pth is found
  assert ours.config == WanVAEConfig.from_diffusers_config(dict(ref.config))  # all inferred

  gen = torch.Generator().manual_seed(1)
  s = ref.config.scale_factor_spatial
  latents = torch.randn(1, ref.config.z_dim, 2, 2, 3, generator=gen)
  video = torch.rand(1, 3, 5, 2 * s, 3 * s, generator=gen) * 2 - 1
  mean, inv_std = _wan_stats(ref)
  with torch.no_grad():
    want_video = ref.decode(latents / inv_std + mean, return_dict=False)[0].numpy()
    want_latents = ((ref.encode(video).latent_dist.mode() - mean) * inv_std).numpy()
  got_video = ours.decode(jnp.asarray(latents.numpy()))
  got_latents = ours.encode(jnp.asarray(video.numpy()))
  assert np.abs(want_video).max() > 0.05
  assert _rel(got_video, want_video) < REL_TOL
  assert _rel(got_latents, want_latents) < REL_TOL


def test_wan_vae_original_file_and_dtype(wan_refs):
  ref, folder = wan_refs["wan21"]
  pth = folder / "Wan2.1_VAE.pth"
  a = wan_convert.load_vae(pth)
  b = wan_convert.load_vae(pth, dtype="bf16")
  assert b.config.param_dtype == jnp.bfloat16
  # The table the loader used, written back, gives the same tensors under the same names.
  import torch
  stored = torch.load(pth, weights_only=True)
  written = wan_convert.to_original_state_dict(a)
  assert written.keys() == stored.keys()
  for key, value in stored.items():
    np.testing.assert_array_equal(written[key], value.numpy(), err_msg=key)


def _wan_state(name, wan_refs):
  import torch
  _, folder = wan_refs[name]
  file = "Wan2.1_VAE.pth" if name == "wan21" else "Wan2.2_VAE.pth"
  return dict(torch.load(folder / file, weights_only=True))


def _save(state, path: Path) -> Path:
  import torch
  path.parent.mkdir(parents=True, exist_ok=True)
  torch.save(state, path)
  return path


def test_wan_vae_original_errors(wan_refs, tmp_path):
  torch = _torch()
  state = _wan_state("wan21", wan_refs)
  load = wan_convert.load_vae

  extra = _save({**state, "decoder.extra.weight": torch.zeros(1)}, tmp_path / "a" / "Wan2.1_VAE.pth")
  with pytest.raises(cc.CheckpointError, match=r"unknown key 'decoder\.extra\.weight'.*Wan2\.1"):
    load(extra)
  missing = {k: v for k, v in state.items() if k != "decoder.head.0.gamma"}
  with pytest.raises(cc.CheckpointError, match=r"missing key 'decoder\.head\.0\.gamma'"):
    load(_save(missing, tmp_path / "b" / "Wan2.1_VAE.pth"))
  shaped = {**state, "decoder.middle.1.proj.bias": torch.zeros(5)}
  with pytest.raises(cc.CheckpointError,
                     match=r"key 'decoder\.middle\.1\.proj\.bias' .* has shape \(5,\)"):
    load(_save(shaped, tmp_path / "c" / "Wan2.1_VAE.pth"))
  with pytest.raises(cc.CheckpointError, match="missing key 'conv2.weight'.*infer"):
    load(_save({k: v for k, v in state.items() if k != "conv2.weight"}, tmp_path / "d.pth"))
  ints = {**state, "conv2.bias": torch.zeros(16, dtype=torch.int32)}
  with pytest.raises(cc.CheckpointError, match=r"'conv2\.bias' .* dtype"):
    load(_save(ints, tmp_path / "e.pth"))
  with pytest.raises(cc.CheckpointError, match=r"'conv2\.bias' .* is a str, not a tensor"):
    load(_save({**state, "conv2.bias": "x"}, tmp_path / "f.pth"))

  data = (wan_refs["wan21"][1] / "Wan2.1_VAE.pth").read_bytes()
  corrupt = tmp_path / "g" / "Wan2.1_VAE.pth"
  corrupt.parent.mkdir()
  corrupt.write_bytes(data[:len(data) // 2])
  with pytest.raises(cc.CheckpointError, match="truncated or corrupt"):
    load(corrupt.parent)

  both = tmp_path / "both"
  _save(state, both / "Wan2.1_VAE.pth")
  _save(_wan_state("wan22", wan_refs), both / "Wan2.2_VAE.pth")
  with pytest.raises(cc.CheckpointError, match=r"ambiguous: several VAE checkpoints"):
    load(both)
  (both / "Wan2.2_VAE.pth").unlink()
  (both / "vae").mkdir()
  with pytest.raises(cc.CheckpointError, match=r"ambiguous: holds both Wan2\.1_VAE\.pth and "
                     "a vae/ folder"):
    load(both)
  # An explicit config of another architecture: the keys then do not fit.
  with pytest.raises(cc.CheckpointError, match="missing key|unknown key|has shape"):
    load(both / "Wan2.1_VAE.pth", config=WanVAEConfig(**{**WAN21, "num_res_blocks": 1}))


def test_wan_vae_unknown_z_dim_needs_config(tmp_path):
  torch = _torch()
  from flax import nnx
  cfg = WanVAEConfig(**{**WAN21, "z_dim": 4, "latents_mean": [0.1] * 4,
                        "latents_std": [0.9] * 4})
  model = nnx.eval_shape(lambda: WanVAE(cfg, rngs=nnx.Rngs(0)))
  rng = np.random.default_rng(3)
  for var in cc.param_variables(model).values():
    var.set_value(jnp.asarray(rng.standard_normal(var.get_value().shape), jnp.float32))
  state = {k: torch.from_numpy(v.copy())
           for k, v in wan_convert.to_original_state_dict(model).items()}
  path = _save(state, tmp_path / "custom_vae.pth")
  with pytest.raises(cc.CheckpointError, match=r"ambiguous checkpoint: z_dim 4 .* pass config="):
    wan_convert.load_vae(path)
  loaded = wan_convert.load_vae(path, config=cfg)
  for path_, value in _params(model).items():
    np.testing.assert_array_equal(_params(loaded)[path_], value)


# --- HunyuanVideo -------------------------------------------------------------------------------

def hunyuan_original_config(cfg: dict) -> dict:
  """hyvideo's `AutoencoderKLCausal3D` config.json for the diffusers kwargs `cfg`."""
  n = len(cfg["block_out_channels"])
  return {"_class_name": "AutoencoderKLCausal3D", "_diffusers_version": "0.4.2",
          "act_fn": "silu", "block_out_channels": list(cfg["block_out_channels"]),
          "down_block_types": ["DownEncoderBlockCausal3D"] * n,
          "up_block_types": ["UpDecoderBlockCausal3D"] * n, "in_channels": 3,
          "out_channels": 3, "latent_channels": cfg["latent_channels"],
          "layers_per_block": cfg["layers_per_block"], "norm_num_groups": cfg["norm_num_groups"],
          "sample_size": 256, "sample_tsize": 64, "scaling_factor": 0.476986,
          "time_compression_ratio": 4, "mid_block_add_attention": True}


@pytest.fixture(scope="module")
def hunyuan_ref(tmp_path_factory):
  """(diffusers AutoencoderKLHunyuanVideo, original model folder holding vae/)."""
  torch = _torch()
  diffusers = pytest.importorskip("diffusers", reason="parity tests need diffusers")
  torch.manual_seed(0)
  model = diffusers.AutoencoderKLHunyuanVideo(**HUNYUAN).eval()
  with torch.no_grad():  # default GroupNorms are the identity: make them count
    for key, p in model.named_parameters():
      if "norm" in key:
        p.copy_((1.0 if key.endswith("weight") else 0.0) + 0.3 * torch.randn_like(p))
  root = tmp_path_factory.mktemp("hunyuan-video-t2v-720p")
  vae = root / "vae"
  vae.mkdir()
  (vae / "config.json").write_text(json.dumps(hunyuan_original_config(HUNYUAN)))
  # As a training checkpoint: a "state_dict" wrapper, keys under "vae.", other entries.
  state = {f"vae.{k}": v for k, v in model.state_dict().items()}
  state["loss.logvar"] = torch.zeros(())
  torch.save({"state_dict": state, "epoch": 3}, vae / "pytorch_model.pt")
  return model, root


def test_hunyuan_vae_original_matches_diffusers(hunyuan_ref, tmp_path):
  import torch
  ref, root = hunyuan_ref
  ours = HunyuanVAE.from_pretrained(root)  # the model folder: vae/ is found
  assert ours.config == HunyuanVAEConfig.from_diffusers_config(dict(ref.config))

  gen = torch.Generator().manual_seed(1)
  latents = torch.randn(1, 4, 2, 3, 5, generator=gen)
  video = torch.rand(1, 3, 5, 24, 40, generator=gen) * 2 - 1
  sf = ref.config.scaling_factor
  with torch.no_grad():
    want_video = ref.decode(latents / sf, return_dict=False)[0].numpy()
    want_latents = ref.encode(video).latent_dist.mode().numpy() * sf
  assert _rel(ours.decode(jnp.asarray(latents.numpy())), want_video) < REL_TOL
  assert _rel(ours.encode(jnp.asarray(video.numpy())), want_latents) < REL_TOL

  # A plain state dict (no wrapper, no prefix), given as the file, loads the same tensors.
  plain = tmp_path / "vae"
  plain.mkdir()
  (plain / "config.json").write_text((root / "vae" / "config.json").read_text())
  torch.save(ref.state_dict(), plain / "pytorch_model.pt")
  other = hy_convert.load_vae(plain / "pytorch_model.pt")
  for path, value in _params(ours).items():
    np.testing.assert_array_equal(_params(other)[path], value)


def test_hunyuan_original_config():
  raw = hunyuan_original_config(dict(latent_channels=16, block_out_channels=[128, 256, 512, 512],
                                     layers_per_block=2, norm_num_groups=32))
  assert hy_convert.config_from_original(raw) == HunyuanVAEConfig()  # the released VAE
  assert hy_convert.parse_config(raw) == HunyuanVAEConfig()
  # Omitted fields take AutoencoderKLCausal3D's defaults, not diffusers'.
  small = hy_convert.config_from_original({"_class_name": "AutoencoderKLCausal3D",
                                           "block_out_channels": [32] * 4,
                                           "down_block_types": ["DownEncoderBlockCausal3D"] * 4,
                                           "up_block_types": ["UpDecoderBlockCausal3D"] * 4})
  assert (small.latent_channels, small.scaling_factor, small.layers_per_block) == (4, 0.18215, 1)
  with pytest.raises(ValueError, match="unknown block types"):
    hy_convert.config_from_original({**raw, "down_block_types": ["DownBlock2D"] * 4})
  with pytest.raises(ValueError, match="unknown AutoencoderKLCausal3D fields"):
    hy_convert.config_from_original({**raw, "bogus": 1})


def test_hunyuan_vae_original_errors(hunyuan_ref, tmp_path):
  torch = _torch()
  ref, root = hunyuan_ref
  state = dict(ref.state_dict())
  config = (root / "vae" / "config.json").read_text()

  def folder(name, sd, cfg=config):
    d = tmp_path / name
    d.mkdir()
    if cfg is not None:
      (d / "config.json").write_text(cfg)
    torch.save(sd, d / "pytorch_model.pt")
    return d

  with pytest.raises(cc.CheckpointError, match=r"unknown key 'loss\.logvar'"):
    hy_convert.load_vae(folder("a", {**state, "loss.logvar": torch.zeros(())}))
  key = "decoder.conv_out.conv.bias"
  with pytest.raises(cc.CheckpointError, match=f"missing key '{re.escape(key)}'"):
    hy_convert.load_vae(folder("b", {k: v for k, v in state.items() if k != key}))
  with pytest.raises(cc.CheckpointError, match=f"key '{re.escape(key)}' .* has shape"):
    hy_convert.load_vae(folder("c", {**state, key: torch.zeros(7)}))
  with pytest.raises(cc.CheckpointError, match="no config.json"):
    hy_convert.load_vae(folder("d", state, cfg=None))
  bad = json.dumps({**json.loads(config), "up_block_types": ["UpBlock"] * 4})
  with pytest.raises(cc.CheckpointError, match="unknown block types"):
    hy_convert.load_vae(folder("e", state, cfg=bad))
  d = folder("f", state)
  (d / "pytorch_model.pt").write_bytes((d / "pytorch_model.pt").read_bytes()[:1000])
  with pytest.raises(cc.CheckpointError, match="truncated or corrupt"):
    hy_convert.load_vae(d)
  torch.save(state, d / "other.pt")
  with pytest.raises(cc.CheckpointError, match="ambiguous: several torch checkpoints"):
    hy_convert.load_vae(d)


# --- UMT5 ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def umt5_ref(tmp_path_factory):
  """(transformers UMT5EncoderModel, folder holding Wan's pickle (float32) beside a decoy VAE
  pickle)."""
  torch = _torch()
  transformers = pytest.importorskip("transformers", reason="parity tests need transformers")
  torch.manual_seed(0)
  cfg = transformers.UMT5Config(**UMT5, feed_forward_proj="gated-gelu", dropout_rate=0.0)
  model = transformers.UMT5EncoderModel(cfg).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("layer_norm.weight"):
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
  folder = tmp_path_factory.mktemp("wan_original")
  state = {wan_t5_name(k): v for k, v in model.state_dict().items()
           if k != "encoder.embed_tokens.weight"}
  torch.save(state, folder / "models_t5_umt5-xxl-enc-bf16.pth")
  (folder / "Wan2.1_VAE.pth").write_bytes(b"not read")
  return model, folder


def test_umt5_original_matches_transformers(umt5_ref):
  import torch
  model, folder = umt5_ref
  ours = UMT5Encoder.from_pretrained(folder)
  assert ours.cfg == UMT5Config(**UMT5)  # inferred from the shapes
  rng = np.random.default_rng(0)
  # 150 tokens: distances past max_distance (128) use the clamped last bucket.
  ids = rng.integers(1, UMT5["vocab_size"], (2, 150)).astype(np.int32)
  mask = np.ones((2, 150), np.int32)
  mask[1, 40:] = 0
  with torch.no_grad():
    want = model(input_ids=torch.from_numpy(ids).long(),
                 attention_mask=torch.from_numpy(mask).long()).last_hidden_state.numpy()
  got = np.asarray(ours(jnp.asarray(ids), jnp.asarray(mask)))
  keep = mask.astype(bool)
  assert _rel(got[keep], want[keep]) < REL_TOL


def test_umt5_original_bf16(umt5_ref, tmp_path):
  """Wan's file is bfloat16: read bit-exactly (then cast to the requested dtype)."""
  torch = _torch()
  model, folder = umt5_ref
  state = torch.load(folder / "models_t5_umt5-xxl-enc-bf16.pth", weights_only=True)
  path = _save({k: v.to(torch.bfloat16) for k, v in state.items()},
               tmp_path / "models_t5_umt5-xxl-enc-bf16.pth")
  f32 = umt5_convert.load_umt5(path)
  bf16 = umt5_convert.load_umt5(path, dtype="bf16")
  want = state["blocks.1.ffn.fc1.weight"].to(torch.bfloat16).float().numpy().T
  np.testing.assert_array_equal(np.asarray(f32.blocks[1].ffn.wi_1.kernel.get_value()), want)
  got = bf16.blocks[1].ffn.wi_1.kernel.get_value()
  assert got.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(got, np.float32), want)
  written = umt5_convert.to_original_state_dict(f32)
  assert written.keys() == state.keys()


def test_umt5_original_errors(umt5_ref, tmp_path):
  torch = _torch()
  model, folder = umt5_ref
  state = dict(torch.load(folder / "models_t5_umt5-xxl-enc-bf16.pth", weights_only=True))
  load = umt5_convert.load_umt5
  with pytest.raises(cc.CheckpointError, match=r"unknown key 'blocks\.0\.extra\.weight'"):
    load(_save({**state, "blocks.0.extra.weight": torch.zeros(2)}, tmp_path / "a.pth"))
  key = "blocks.1.ffn.gate.0.weight"
  with pytest.raises(cc.CheckpointError, match=f"missing key '{re.escape(key)}'"):
    load(_save({k: v for k, v in state.items() if k != key}, tmp_path / "b.pth"))
  with pytest.raises(cc.CheckpointError, match=f"key '{re.escape(key)}' .* has shape"):
    load(_save({**state, key: torch.zeros(64, 31)}, tmp_path / "c.pth"))
  shared = {**state, "pos_embedding.embedding.weight": torch.zeros(32, 4)}
  with pytest.raises(cc.CheckpointError, match="shared_pos=True, not Wan's UMT5"):
    load(_save(shared, tmp_path / "d.pth"))
  bad = tmp_path / "e" / "models_t5_umt5-xxl-enc-bf16.pth"
  bad.parent.mkdir()
  bad.write_bytes(b"PK\x03\x04 not a zip")
  with pytest.raises(cc.CheckpointError, match="truncated or corrupt"):
    load(bad.parent)
  (bad.parent / "umt5_copy.pth").write_bytes(b"")
  with pytest.raises(cc.CheckpointError, match="ambiguous: several T5 checkpoints"):
    load(bad.parent)
  # A deeper explicit config misses the third block.
  with pytest.raises(cc.CheckpointError, match=r"missing key 'blocks\.2\."):
    load(folder / "models_t5_umt5-xxl-enc-bf16.pth", config=UMT5Config(**{**UMT5,
                                                                         "num_layers": 3}))


# --- without torch ------------------------------------------------------------------------------

@pytest.mark.parametrize("load, name", [
    (wan_convert.load_vae, "Wan2.2_VAE.pth"),
    (hy_convert.load_vae, "pytorch_model.pt"),
    (umt5_convert.load_umt5, "models_t5_umt5-xxl-enc-bf16.pth"),
])
def test_pickle_without_torch(monkeypatch, tmp_path, load, name):
  monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
  (tmp_path / name).write_bytes(b"whatever")
  (tmp_path / "config.json").write_text(json.dumps(hunyuan_original_config(HUNYUAN)))
  with pytest.raises(cc.TorchMissingError, match=re.escape(str(tmp_path / name)) +
                     ".*needs PyTorch.*convert the file on a machine with torch") as info:
    load(tmp_path)
  assert isinstance(info.value, ImportError) and isinstance(info.value, cc.CheckpointError)
