"""diffusers `AutoencoderKLHunyuanVideo` checkpoints (a `vae/` folder) -> `HunyuanVAE`.

The folder holds `config.json` and `diffusion_pytorch_model.safetensors`, or shards listed
by `diffusion_pytorch_model.safetensors.index.json`. The key table is derived from the
model's own parameter paths, whose names are the diffusers ones (`kernel` is `weight`): 5-D
kernels are torch Conv3d weights ("conv" rule), 2-D ones the mid-block attention's Linear
weights ("linear" rule). Every checkpoint key must map to a parameter and every parameter
must have a key, with the torch shape of the parameter; headers are checked before any
tensor is read, then tensors are streamed one by one (`convert_common.SafetensorsCheckpoint`).
"""

import os
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models import convert_common as cc
from models.hunyuan.vae import HunyuanVAE, HunyuanVAEConfig

Path_ = cc.Path_


def torch_key(path: Path_) -> str:
  """diffusers state-dict key of an nnx parameter path."""
  parts = [str(p) for p in path]
  if parts[-1] == "kernel":
    parts[-1] = "weight"
  return ".".join(parts)


def key_table(model: HunyuanVAE) -> Dict[str, Tuple[cc.Rule, Tuple[int, ...]]]:
  """diffusers key -> (rule, torch shape) for every parameter of a (possibly abstract)
  model."""
  table = {}
  for path, spec in cc.param_shapes(model).items():
    kind = "copy"
    if path[-1] == "kernel":
      kind = "linear" if len(spec.shape) == 2 else "conv"
    table[torch_key(path)] = (cc.Rule(path, kind), cc.source_shape(kind, spec.shape))
  return table


def to_state_dict(model: HunyuanVAE) -> Dict[str, np.ndarray]:
  """The model's parameters as a diffusers state dict of NumPy arrays (torch layout)."""
  variables = cc.param_variables(model)
  out = {}
  for key, (rule, _) in key_table(model).items():
    value = cc.to_torch(rule.kind, np.asarray(variables[rule.target].get_value()))
    out[key] = np.ascontiguousarray(value)
  return out


def load_config(location: os.PathLike) -> HunyuanVAEConfig:
  """The `HunyuanVAEConfig` of a diffusers `vae/` folder's config.json (or of a pipeline
  folder holding one)."""
  return cc.read_component_config(location, "vae", HunyuanVAEConfig.from_diffusers_config)


def load_vae(location: os.PathLike, *, config: Optional[HunyuanVAEConfig] = None,
             dtype: Any = jnp.float32, progress: bool = False,
             device: Optional[jax.Device] = None) -> HunyuanVAE:
  """A `HunyuanVAE` from a local diffusers `AutoencoderKLHunyuanVideo` folder.

  Args:
    location: the `vae/` folder (or a pipeline folder holding one, or a .safetensors file
      next to its config.json).
    config: architecture to use instead of config.json.
    dtype: weight and compute dtype.
    progress: show a tqdm bar.
    device: where the weights go (default device if None).

  Raises:
    CheckpointError: no or bad config.json; unreadable (truncated, corrupt) file; unknown,
      missing, mis-shaped or non-float key (the message names the key and its file).
  """
  location = cc.component_folder(Path(location), "vae")
  cfg = config if config is not None else load_config(location)
  cfg = cfg.with_dtype(cc.parse_dtype(dtype))
  model = nnx.eval_shape(lambda: HunyuanVAE(cfg, rngs=nnx.Rngs(0)))
  rules = {key: rule for key, (rule, _) in key_table(model).items()}
  specs = cc.param_shapes(model)
  with cc.SafetensorsCheckpoint(location) as ckpt:
    cc.check_keys(ckpt, rules, {path: spec.shape for path, spec in specs.items()},
                  f"the {cfg.describe()}")
    cc.stream_params(model, ckpt, rules, list(rules), device=device, progress=progress)
  return model
