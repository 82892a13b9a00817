"""Helpers of the HunyuanVideo tests: toy config and inputs, NumPy-written checkpoints."""

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from checkpoint_testing import write_safetensors
from models.convert_common import param_variables
from models.hunyuan import HunyuanConfig, HunyuanVideoTransformer
from models.hunyuan.convert import key_table
from models.hunyuan.sources import RowSlice

# diffusers `HunyuanVideoTransformer3DModel` kwargs of the toy size (MODELS.md section 5):
# patch 2 exercises the channel-major unpatchify, sum(rope_axes_dim) == head_dim.
TINY_DIFFUSERS = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=12,
                      num_layers=2, num_single_layers=2, num_refiner_layers=1, patch_size=2,
                      patch_size_t=1, guidance_embeds=True, text_embed_dim=16,
                      pooled_projection_dim=8, rope_axes_dim=(4, 4, 4),
                      image_condition_type=None)
LATENT_FHW = (3, 16, 16)  # -> 3 * 8 * 8 = 192 video tokens
NUM_VIDEO = 192
TEXT_LEN = 10
PROMPT_LEN = (7, 4)  # valid text tokens of samples 0 and 1; the rest is padding
INDEX = "diffusion_pytorch_model.safetensors.index.json"


def tiny_config(**overrides) -> HunyuanConfig:
  return HunyuanConfig.tiny(**overrides)


def hunyuan_inputs(*, batch: int = 1, timestep: float = 500.0, seed: int = 0):
  """NumPy (hidden_states, timestep, encoder_hidden_states, encoder_attention_mask,
  pooled_projections, guidance); sample b has `PROMPT_LEN[b]` prompt tokens then padding,
  timestep `timestep - 100 b` and guidance 6000 (scale 6)."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((batch, 4, *LATENT_FHW), dtype=np.float32)
  text = rng.standard_normal((batch, TEXT_LEN, 16), dtype=np.float32)
  mask = np.zeros((batch, TEXT_LEN), np.int64)
  for b in range(batch):
    mask[b, :PROMPT_LEN[b % len(PROMPT_LEN)]] = 1
  pooled = rng.standard_normal((batch, 8), dtype=np.float32)
  t = (timestep - 100.0 * np.arange(batch)).astype(np.float32)
  guidance = np.full((batch,), 6000.0, np.float32)
  return x, t, text, mask, pooled, guidance


_FP32_EMBEDDERS = ("timestep_embedder", "guidance_embedder", "text_embedder",
                   "context_embedder.timestep_embedder", "context_embedder.text_embedder")


def is_fp32_island(name: str) -> bool:
  """Whether parameter `name` ("a.b.kernel") stays float32 in a bf16 model: the small
  conditioning embedders and the norm scales / biases (not the adaLN `norm*.linear`)."""
  return name.startswith(_FP32_EMBEDDERS) or (
      ".norm" in name and not name.endswith(("linear.kernel", "linear.bias")))


def rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / np.abs(b).max())


def flat_params(model) -> dict:
  return {path: np.asarray(v.get_value()) for path, v in param_variables(model).items()}


def write_shards(tensors: dict, folder: Path, num_shards: int, save_file) -> None:
  """Sharded safetensors + diffusers-style index, keys dealt round-robin over the shards."""
  write_safetensors(tensors, folder, num_shards, save_file)


def diffusers_config_json(cfg: HunyuanConfig) -> dict:
  return {"_class_name": "HunyuanVideoTransformer3DModel", "in_channels": cfg.in_channels,
          "out_channels": cfg.out_channels, "num_attention_heads": cfg.num_heads,
          "attention_head_dim": cfg.head_dim, "num_layers": cfg.num_layers,
          "num_single_layers": cfg.num_single_layers,
          "num_refiner_layers": cfg.num_refiner_layers, "mlp_ratio": cfg.mlp_ratio,
          "patch_size": cfg.patch_size, "patch_size_t": cfg.patch_size_t, "qk_norm": "rms_norm",
          "guidance_embeds": cfg.guidance_embeds, "text_embed_dim": cfg.text_dim,
          "pooled_projection_dim": cfg.pooled_projection_dim, "rope_theta": cfg.rope_theta,
          "rope_axes_dim": list(cfg.rope_axes_dim), "image_condition_type": None}


def torch_layout_tensors(model: HunyuanVideoTransformer, layout: str = "diffusers") -> dict:
  """The model's weights as a torch-layout state dict (NumPy) in `layout`; fused original
  tensors are assembled from their row slices."""
  params = flat_params(model)
  tensors, fused = {}, {}
  for d_key, o_src, rule in key_table(model.config):
    value = params[rule.target]
    if rule.layer is not None:
      value = value[rule.layer]
    if rule.kind == "linear":
      value = value.T
    elif rule.kind == "conv":
      value = value.transpose(4, 3, 0, 1, 2)
    if layout == "diffusers":
      tensors[d_key] = np.ascontiguousarray(value)
    elif isinstance(o_src, RowSlice):
      rows = fused.setdefault(o_src.key, {})
      start = 0
      for a, b in o_src.rows:
        rows[a] = value[start:start + b - a]
        start += b - a
    else:
      tensors[o_src] = np.ascontiguousarray(value)
  for key, rows in fused.items():
    tensors[key] = np.ascontiguousarray(np.concatenate([rows[a] for a in sorted(rows)]))
  return tensors


def export_numpy_checkpoint(model: HunyuanVideoTransformer, folder: Path, *,
                            layout: str = "diffusers", num_shards: int = 3,
                            config_json: bool = True) -> Path:
  """Writes a JAX model as a sharded torch-layout safetensors checkpoint with NumPy only."""
  from safetensors.numpy import save_file

  write_shards(torch_layout_tensors(model, layout), folder, num_shards, save_file)
  if config_json and layout == "diffusers":
    (folder / "config.json").write_text(json.dumps(diffusers_config_json(model.config)))
  return folder


def write_jax_pipeline(folder: Path, model: HunyuanVideoTransformer, *,
                       shift: float = 7.0) -> Path:
  """A diffusers-layout HunyuanVideo pipeline folder (model_index.json, transformer/,
  scheduler/) written from a JAX model with NumPy only: no torch needed."""
  folder.mkdir(parents=True, exist_ok=True)
  export_numpy_checkpoint(model, folder / "transformer", num_shards=1)
  (folder / "scheduler").mkdir(exist_ok=True)
  (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(
      {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": shift}))
  none = [None, None]
  (folder / "model_index.json").write_text(json.dumps(
      {"_class_name": "HunyuanVideoPipeline",
       "transformer": ["diffusers", "HunyuanVideoTransformer3DModel"],
       "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"], "vae": none,
       "text_encoder": none, "tokenizer": none, "text_encoder_2": none, "tokenizer_2": none}))
  return folder


def random_jax_model(seed: int = 0, attention=None, **overrides) -> HunyuanVideoTransformer:
  """A tiny model with every parameter random, norm scales included (so any mix-up shows).
  Filled from NumPy: eager nnx init is slow on CPU."""
  cfg = tiny_config(**overrides)
  model = nnx.eval_shape(lambda: HunyuanVideoTransformer(cfg, attention=attention))
  rng = np.random.default_rng(seed)
  for var in param_variables(model).values():
    spec = var.get_value()
    var.set_value(jnp.asarray(rng.standard_normal(spec.shape) * 0.3, spec.dtype))
  return model


_FORWARD = nnx.jit(lambda m, *a: m(*a))  # one jitted function: compiles are cached


def jit_forward(model, inputs) -> np.ndarray:
  return np.asarray(_FORWARD(model, *(jnp.asarray(a) for a in inputs)))


def torch_forward(model, inputs) -> np.ndarray:
  import torch

  x, t, text, mask, pooled, guidance = (torch.from_numpy(np.asarray(a)) for a in inputs)
  with torch.no_grad():
    out = model(x, t, text, mask, pooled, guidance, return_dict=False)[0]
  return out.numpy()
