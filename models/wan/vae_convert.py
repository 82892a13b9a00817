"""diffusers `AutoencoderKLWan` checkpoints (a `vae/` folder) -> `WanVAE`.

The folder holds `config.json` and `diffusion_pytorch_model.safetensors`, or shards listed
by `diffusion_pytorch_model.safetensors.index.json`. The key table is derived from the
model's own parameter paths, whose names are the diffusers ones: `kernel` is `weight`,
and a resample's 2-D conv is index 1 of torch's `resample` Sequential. Every checkpoint key
must map to a parameter and every parameter must have a key, with the torch shape of the
parameter; headers are checked before any tensor is read, then tensors are streamed one by
one (`convert_common.SafetensorsCheckpoint`).
"""

import os
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models import convert_common as cc
from models.wan.vae import RMSNorm, WanVAE, WanVAEConfig

Path_ = cc.Path_


def torch_key(path: Path_) -> str:
  """diffusers state-dict key of an nnx parameter path."""
  parts = [str(p) for p in path]
  if parts[-1] == "kernel":
    parts[-1] = "weight"
  if len(parts) >= 2 and parts[-2] == "resample":
    parts.insert(-1, "1")
  return ".".join(parts)


def key_table(model: WanVAE) -> Dict[str, Tuple[cc.Rule, Tuple[int, ...]]]:
  """diffusers key -> (rule, torch shape) for every parameter of a (possibly abstract)
  model. Kernels are "conv" rules; RMS-norm gammas are stored (C, 1, 1[, 1]) by torch and
  reshaped to (C,)."""
  gamma_shapes = {(*path, "gamma"): node.torch_shape for path, node in nnx.iter_graph(model)
                  if isinstance(node, RMSNorm)}
  table = {}
  for path, spec in cc.param_shapes(model).items():
    if path[-1] == "kernel":
      rule = cc.Rule(path, "conv")
      shape = cc.source_shape("conv", spec.shape)
    else:
      rule = cc.Rule(path, "copy")
      shape = gamma_shapes.get(path, spec.shape)
    table[torch_key(path)] = (rule, tuple(shape))
  return table


def to_state_dict(model: WanVAE) -> Dict[str, np.ndarray]:
  """The model's parameters as a diffusers state dict of NumPy arrays (torch layout)."""
  variables = cc.param_variables(model)
  out = {}
  for key, (rule, shape) in key_table(model).items():
    value = cc.to_torch(rule.kind, np.asarray(variables[rule.target].get_value()))
    out[key] = np.ascontiguousarray(value.reshape(shape))
  return out


def load_config(location: os.PathLike) -> WanVAEConfig:
  """The `WanVAEConfig` of a diffusers `vae/` folder's config.json."""
  return cc.read_component_config(location, "vae", WanVAEConfig.from_diffusers_config)


def load_vae(location: os.PathLike, *, config: Optional[WanVAEConfig] = None,
             dtype: Any = jnp.float32, progress: bool = False,
             device: Optional[jax.Device] = None) -> WanVAE:
  """A `WanVAE` from a local diffusers `AutoencoderKLWan` folder.

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
  model = nnx.eval_shape(lambda: WanVAE(cfg, rngs=nnx.Rngs(0)))
  table = key_table(model)
  rules = {key: rule for key, (rule, _) in table.items()}
  specs = cc.param_shapes(model)
  # check_keys derives the expected torch shape from these through the rule kind.
  shapes = {rule.target: shape if rule.kind == "copy" else specs[rule.target].shape
            for rule, shape in table.values()}
  with cc.SafetensorsCheckpoint(location) as ckpt:
    cc.check_keys(ckpt, rules, shapes, f"the {cfg.describe()}")
    cc.stream_params(model, ckpt, rules, list(rules), device=device, progress=progress,
                     reshape=True)
  return model
