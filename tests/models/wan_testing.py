"""Helpers of the Wan tests: toy configs and inputs, NumPy-written checkpoints, comparisons."""

import json
from pathlib import Path
from typing import Optional

import jax.numpy as jnp
import numpy as np
from flax import nnx

from checkpoint_testing import write_safetensors
from models.convert_common import param_variables
from models.wan import WanConfig, WanTransformer
from models.wan.convert import key_table

# diffusers `WanTransformer3DModel` kwargs of the toy size: head_dim 16 gives the unequal
# RoPE split (8, 4, 4) that the real (44, 42, 42) has.
TINY_DIFFUSERS = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16,
                      text_dim=16, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
                      qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=32)
# Channel layouts: T2V-A14B-like, I2V-A14B-like (2C + 4 in), TI2V-5B-like.
CHANNELS = {"t2v": (4, 4), "i2v": (12, 4), "ti2v": (8, 8)}
LATENT_FHW = (3, 16, 16)  # -> 3 * 8 * 8 = 192 tokens
NUM_TOKENS = 192
TEXT_LEN = 12


def tiny_config(kind: str, **overrides) -> WanConfig:
  c_in, c_out = CHANNELS[kind]
  return WanConfig.tiny(**{**dict(in_channels=c_in, out_channels=c_out, model_type=kind),
                           **overrides})


def tiny_diffusers_transformer(kind: str, seed: int):
  """A diffusers `WanTransformer3DModel` of the toy size with N(0, 0.3^2) weights (needs
  torch and diffusers: callers importorskip them)."""
  import diffusers
  import torch

  c_in, c_out = CHANNELS[kind]
  torch.manual_seed(seed)
  model = diffusers.WanTransformer3DModel(**TINY_DIFFUSERS, in_channels=c_in,
                                          out_channels=c_out).eval()
  with torch.no_grad():
    for _, p in model.named_parameters():
      p.copy_(torch.randn_like(p) * 0.3)
  return model


def wan_inputs(kind: str, *, batch: int = 1, timestep: float = 500.0, seed: int = 0):
  """NumPy (hidden_states, timestep, encoder_hidden_states); sample b is at timestep
  `timestep - 100 b`. TI2V gets per-token timesteps with the first latent frame at t=0, as
  in its image-to-video mode."""
  rng = np.random.default_rng(seed)
  c_in = CHANNELS[kind][0]
  x = rng.standard_normal((batch, c_in, *LATENT_FHW), dtype=np.float32)
  ctx = rng.standard_normal((batch, TEXT_LEN, 16), dtype=np.float32)
  t = (timestep - 100.0 * np.arange(batch)).astype(np.float32)
  if kind == "ti2v":
    t = np.repeat(t[:, None], NUM_TOKENS, axis=1)
    t[:, :NUM_TOKENS // LATENT_FHW[0]] = 0.0
  return x, t, ctx


def rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / np.abs(b).max())


def flat_params(model) -> dict:
  return {path: np.asarray(v.get_value()) for path, v in param_variables(model).items()}


def write_shards(tensors: dict, folder: Path, num_shards: int, save_file) -> None:
  """Sharded safetensors + diffusers-style index, keys dealt round-robin over the shards."""
  write_safetensors(tensors, folder, num_shards, save_file)


def export_numpy_checkpoint(model: WanTransformer, folder: Path, *, layout: str = "diffusers",
                            num_shards: int = 3) -> Path:
  """Writes a JAX model as a torch-layout safetensors checkpoint with NumPy only."""
  from safetensors.numpy import save_file

  cfg = model.config
  params = flat_params(model)
  tensors = {}
  for d_key, o_key, rule in key_table(cfg):
    value = params[rule.target]
    if rule.layer is not None:
      value = value[rule.layer]
    if rule.kind == "linear":
      value = value.T
    elif rule.kind == "conv":
      value = value.transpose(4, 3, 0, 1, 2)
    tensors[d_key if layout == "diffusers" else o_key] = np.ascontiguousarray(value)
  write_shards(tensors, folder, num_shards, save_file)
  if layout == "diffusers":
    config = {"_class_name": "WanTransformer3DModel", "patch_size": list(cfg.patch_size),
              "num_attention_heads": cfg.num_heads, "attention_head_dim": cfg.head_dim,
              "in_channels": cfg.in_channels, "out_channels": cfg.out_channels,
              "text_dim": cfg.text_dim, "freq_dim": cfg.freq_dim, "ffn_dim": cfg.ffn_dim,
              "num_layers": cfg.num_layers, "cross_attn_norm": cfg.cross_attn_norm,
              "qk_norm": "rms_norm_across_heads", "eps": cfg.eps, "image_dim": None,
              "added_kv_proj_dim": None, "rope_max_seq_len": cfg.rope_max_seq_len}
  else:
    config = {"_class_name": "WanModel", "dim": cfg.dim, "eps": cfg.eps, "ffn_dim": cfg.ffn_dim,
              "freq_dim": cfg.freq_dim, "in_dim": cfg.in_channels, "model_type": cfg.model_type,
              "num_heads": cfg.num_heads, "num_layers": cfg.num_layers,
              "out_dim": cfg.out_channels, "text_len": 512, "text_dim": cfg.text_dim}
  (folder / "config.json").write_text(json.dumps(config))
  return folder


def random_jax_model(kind: str, seed: int = 0, **overrides) -> WanTransformer:
  """A tiny model with every parameter random, norm scales and tables included (so any
  mix-up shows). Filled from NumPy: eager nnx init is slow on CPU."""
  cfg = tiny_config(kind, **overrides)
  model = nnx.eval_shape(lambda: WanTransformer(cfg))
  rng = np.random.default_rng(seed)
  for var in param_variables(model).values():
    spec = var.get_value()
    var.set_value(jnp.asarray(rng.standard_normal(spec.shape) * 0.3, spec.dtype))
  return model


def torch_forward(model, x, t, ctx) -> np.ndarray:
  import torch

  with torch.no_grad():
    out = model(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(ctx),
                return_dict=False)[0]
  return out.numpy()


def _latent_stats(z: int) -> dict:
  return dict(latents_mean=[0.1 * ((7 * i) % 11 - 5) for i in range(z)],
              latents_std=[0.5 + 0.05 * ((5 * i) % 13) for i in range(z)])


def tiny_diffusers_vae(kind: str, seed: int):
  """A tiny diffusers AutoencoderKLWan whose z_dim is the tiny DiT `kind`'s latent channels:
  Wan2.1-style (scale 8) for t2v / i2v, Wan2.2-style (patch 2, scale 16) for ti2v, with
  non-trivial norm gammas and latent statistics (needs torch and diffusers)."""
  import diffusers
  import torch

  z = CHANNELS[kind][1]
  if kind == "ti2v":
    kw = dict(base_dim=3, decoder_base_dim=4, z_dim=z, in_channels=12, out_channels=12,
              is_residual=True, patch_size=2, scale_factor_spatial=16)
  else:
    kw = dict(base_dim=3, z_dim=z)
  torch.manual_seed(seed)
  vae = diffusers.AutoencoderKLWan(**kw, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                   temperal_downsample=[False, True, True],
                                   **_latent_stats(z)).eval()
  with torch.no_grad():
    for key, p in vae.named_parameters():
      if key.endswith("gamma"):
        p.copy_(1.0 + 0.3 * torch.randn_like(p))
  return vae


def unipc_flow_scheduler(shift: float = 3.0):
  import diffusers

  return diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction",
                                           use_flow_sigmas=True, flow_shift=shift)


def tiny_text_pipeline(folder: Path, tokenizer_folder: Path):
  """A diffusers WanPipeline with a tiny UMT5 (d_model = the DiT's text_dim 16), the local
  tokenizer saved at `tokenizer_folder`, a tiny VAE and one DiT, saved at `folder`; returns
  the pipeline (needs torch, diffusers and transformers)."""
  import diffusers
  import torch
  import transformers

  torch.manual_seed(0)
  umt5 = transformers.UMT5EncoderModel(transformers.UMT5Config(
      vocab_size=160, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=4,
      feed_forward_proj="gated-gelu", dropout_rate=0.0)).eval()
  pipe = diffusers.WanPipeline(
      tokenizer=transformers.AutoTokenizer.from_pretrained(str(tokenizer_folder)),
      text_encoder=umt5, vae=tiny_diffusers_vae("t2v", 4), scheduler=unipc_flow_scheduler(),
      transformer=tiny_diffusers_transformer("t2v", 0))
  pipe.set_progress_bar_config(disable=True)
  pipe.save_pretrained(folder)
  return pipe


def write_jax_pipeline(folder: Path, model: WanTransformer, *, shift: float = 3.0,
                       model_2: Optional[WanTransformer] = None,
                       boundary_ratio: Optional[float] = None) -> Path:
  """A diffusers-layout Wan pipeline folder (model_index.json, transformer/ (+
  transformer_2/ with `model_2`, A14B-style), scheduler/) written from JAX models with NumPy
  only: no torch needed."""
  folder.mkdir(parents=True, exist_ok=True)
  export_numpy_checkpoint(model, folder / "transformer", num_shards=1)
  if model_2 is not None:
    export_numpy_checkpoint(model_2, folder / "transformer_2", num_shards=1)
  (folder / "scheduler").mkdir(exist_ok=True)
  (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(
      {"_class_name": "UniPCMultistepScheduler", "prediction_type": "flow_prediction",
       "use_flow_sigmas": True, "flow_shift": shift}))
  (folder / "model_index.json").write_text(json.dumps(
      {"_class_name": "WanPipeline", "transformer": ["diffusers", "WanTransformer3DModel"],
       "scheduler": ["diffusers", "UniPCMultistepScheduler"], "vae": [None, None],
       "text_encoder": [None, None], "tokenizer": [None, None],
       "transformer_2": ([None, None] if model_2 is None
                         else ["diffusers", "WanTransformer3DModel"]),
       "boundary_ratio": boundary_ratio, "expand_timesteps": False}))
  return folder
