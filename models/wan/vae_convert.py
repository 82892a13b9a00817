"""Wan VAE checkpoints -> `WanVAE`, and conversion to Orbax (`svg-ear-convert wan-vae`).

`load_vae` reads, from local files only:
  * diffusers `AutoencoderKLWan` (a `vae/` folder, or a pipeline folder holding one):
    `config.json` plus `diffusion_pytorch_model.safetensors`, or shards listed by
    `diffusion_pytorch_model.safetensors.index.json`. Keys are the model's own parameter
    paths (`kernel` is `weight`; a resample's 2-D conv is index 1 of torch's `resample`
    Sequential).
  * the original Wan releases' torch pickles `Wan2.1_VAE.pth` (z_dim 16: Wan2.1 and the
    Wan2.2 A14B models) and `Wan2.2_VAE.pth` (z_dim 48: TI2V-5B): the file, or a folder
    holding exactly one `*VAE*.pth` (e.g. the original model folder, beside the T5 pickle).
    Keys are those of the original `WanVAE_` modules (wan/modules/vae2_1.py, vae2_2.py):
    `conv1` / `conv2` (= quant_conv / post_quant_conv), `encoder.conv1`, flat
    `encoder.downsamples.N` / `decoder.upsamples.N` lists (Wan2.1) or per-stage
    `encoder.downsamples.i.downsamples.j` / `decoder.upsamples.i.upsamples.j` (Wan2.2),
    residual blocks as `residual.{0,2,3,6}` + `shortcut`, `middle.{0,1,2}`, `head.{0,2}`
    (see `original_key`). The architecture is inferred from the tensor shapes and the
    latent statistics from z_dim (16: Wan2.1's, 48: Wan2.2's; other sizes need `config=`).
    Reading a pickle needs torch (`convert_common.TorchMissingError` without it).
  * a folder written by `convert` (marker `svg_ear_jax.json` with format
    "svg-ear-jax/wan-vae" + config, parameters as Orbax in `params/`); needs no torch.
Every checkpoint key must map to a parameter and every parameter must have a key, with the
torch shape of the parameter; headers are checked before any tensor is read, then tensors
are streamed one by one.
"""

import os
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models import convert_common as cc
from models.wan.vae import RMSNorm, WanVAE, WanVAEConfig

Path_ = cc.Path_

FORMAT = "svg-ear-jax/wan-vae"
FORMAT_VERSION = 1
PICKLE_PATTERN = r"vae"  # `*VAE*.pth` in a folder: Wan2.1_VAE.pth, Wan2.2_VAE.pth

# Latent statistics of the Wan2.2 VAE (z_dim 48), as its `Wan2_2_VAE` wrapper and diffusers'
# Wan2.2 vae/config.json give them. Wan2.1's are `vae.WAN21_LATENTS_MEAN` / `_STD`.
WAN22_LATENTS_MEAN = (
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557, -0.1382, 0.0542,
    0.2813, 0.0891, 0.1570, -0.0098, 0.0375, -0.1825, -0.2246, -0.1207, -0.0698, 0.5109,
    0.2665, -0.2108, -0.2158, 0.2502, -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899,
    -0.2799, -0.1230, -0.0313, -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520, 0.3748,
    0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667)
WAN22_LATENTS_STD = (
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013, 0.8158, 1.0344,
    0.5894, 1.0901, 0.6885, 0.6165, 0.8454, 0.4978, 0.5759, 0.3523, 0.7135, 0.6804,
    0.5833, 1.4146, 0.8986, 0.5659, 0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999,
    0.6866, 0.4093, 0.5709, 0.6065, 0.6415, 0.4944, 0.5726, 1.2042, 0.5458, 1.6887,
    0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744)


def _latent_stats(z_dim: int) -> Optional[Dict[str, Tuple[float, ...]]]:
  from models.wan import vae as vae_lib

  if z_dim == 16:
    return dict(latents_mean=vae_lib.WAN21_LATENTS_MEAN, latents_std=vae_lib.WAN21_LATENTS_STD)
  if z_dim == 48:
    return dict(latents_mean=WAN22_LATENTS_MEAN, latents_std=WAN22_LATENTS_STD)
  return None


# --- key tables ---------------------------------------------------------------------------------

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


# diffusers residual-block member -> index in the original `residual` Sequential
# (RMS_norm, SiLU, CausalConv3d, RMS_norm, SiLU, Dropout, CausalConv3d), or `shortcut`.
_RESIDUAL = {"norm1": "residual.0", "conv1": "residual.2", "norm2": "residual.3",
             "conv2": "residual.6", "conv_shortcut": "shortcut"}
_MIDDLE = {("resnets", "0"): "0", ("attentions", "0"): "1", ("resnets", "1"): "2"}
_HEAD = {"norm_out": "head.0", "conv_out": "head.2"}


def _residual(parts: List[str]) -> List[str]:
  if parts[0] not in _RESIDUAL:
    raise KeyError(parts[0])
  return _RESIDUAL[parts[0]].split(".") + parts[1:]


def original_key(key: str, cfg: WanVAEConfig) -> str:
  """The original Wan (`WanVAE_` of wan/modules/vae2_1.py or vae2_2.py) key of a diffusers
  `AutoencoderKLWan` key of a `cfg` model (the inverse of diffusers' `convert_vae` /
  `convert_vae_22`, for any number of stages and residual blocks)."""
  parts = key.split(".")
  try:
    if parts[0] in ("quant_conv", "post_quant_conv"):
      return ".".join(["conv1" if parts[0] == "quant_conv" else "conv2"] + parts[1:])
    side, name, rest = parts[0], parts[1], parts[2:]
    if side not in ("encoder", "decoder"):
      raise KeyError(side)
    if name == "conv_in":
      out = ["conv1"] + rest
    elif name in _HEAD:
      out = _HEAD[name].split(".") + rest
    elif name == "mid_block":
      inner = rest[2:]
      if rest[0] == "resnets":
        inner = _residual(inner)
      out = ["middle", _MIDDLE[rest[0], rest[1]]] + inner
    elif name in ("down_blocks", "up_blocks"):
      out = _stage_key(name, rest, cfg)
    else:
      raise KeyError(name)
  except (KeyError, IndexError, ValueError) as err:
    raise ValueError(f"no original Wan VAE name for diffusers key {key!r} ({err})") from err
  return ".".join([side] + out)


def _stage_key(name: str, rest: List[str], cfg: WanVAEConfig) -> List[str]:
  """down_blocks / up_blocks keys -> original downsamples / upsamples keys."""
  n_res = cfg.num_res_blocks
  orig = "downsamples" if name == "down_blocks" else "upsamples"
  if cfg.is_residual:  # Wan2.2: one Down_/Up_ResidualBlock per stage, each a Sequential
    stage, member = rest[0], rest[1]
    if member == "resnets":
      return [orig, stage, orig, rest[2]] + _residual(rest[3:])
    if member in ("downsampler", "upsampler"):  # after the stage's residual blocks
      last = n_res if name == "down_blocks" else n_res + 1
      return [orig, stage, orig, str(last)] + rest[2:]
    raise KeyError(member)
  if name == "down_blocks":  # Wan2.1 encoder: the same flat list
    inner = rest[1:]
    if inner[0] in _RESIDUAL:
      inner = _residual(inner)
    elif inner[0] not in ("resample", "time_conv"):
      raise KeyError(inner[0])
    return [orig, rest[0]] + inner
  # Wan2.1 decoder: a flat list of n_res + 1 residual blocks then an upsampler per stage.
  stage, member = int(rest[0]), rest[1]
  if member == "resnets":
    return [orig, str(stage * (n_res + 2) + int(rest[2]))] + _residual(rest[3:])
  if member == "upsamplers" and rest[2] == "0":
    return [orig, str(stage * (n_res + 2) + n_res + 1)] + rest[3:]
  raise KeyError(member)


def original_key_table(model: WanVAE) -> Dict[str, Tuple[cc.Rule, Tuple[int, ...]]]:
  """Original Wan key -> (rule, torch shape) for every parameter of a (possibly abstract)
  model."""
  cfg = model.config
  return {original_key(key, cfg): value for key, value in key_table(model).items()}


def _state_dict(model: WanVAE, table) -> Dict[str, np.ndarray]:
  variables = cc.param_variables(model)
  out = {}
  for key, (rule, shape) in table.items():
    value = cc.to_torch(rule.kind, np.asarray(variables[rule.target].get_value()))
    out[key] = np.ascontiguousarray(value.reshape(shape))
  return out


def to_state_dict(model: WanVAE) -> Dict[str, np.ndarray]:
  """The model's parameters as a diffusers state dict of NumPy arrays (torch layout)."""
  return _state_dict(model, key_table(model))


def to_original_state_dict(model: WanVAE) -> Dict[str, np.ndarray]:
  """The model's parameters as an original Wan (`Wan2.x_VAE.pth`) state dict of NumPy
  arrays (torch layout)."""
  return _state_dict(model, original_key_table(model))


# --- the architecture of an original checkpoint ----------------------------------------------

def infer_original_config(ckpt: Any) -> WanVAEConfig:
  """The `WanVAEConfig` of an original Wan VAE state dict, from its tensor shapes (float32).

  Raises:
    CheckpointError: the keys are not those of an original Wan VAE, the shapes form no
      valid config, or z_dim has no known latent statistics (not 16 or 48: pass config=).
  """
  keys = set(ckpt.keys())
  where = ckpt.location

  def shape(key):
    if key not in keys:
      raise cc.CheckpointError(f"missing key '{key}' in {where}: needed to infer the "
                               "architecture of an original Wan VAE (or pass config=)")
    return ckpt.shape(key)

  z_dim = shape("conv2.weight")[0]
  base_dim, in_channels = shape("encoder.conv1.weight")[:2]
  out_channels = shape("decoder.head.2.weight")[0]
  is_residual = any(k.startswith("encoder.downsamples.0.downsamples.") for k in keys)
  pattern = (r"encoder\.downsamples\.(\d+)\.downsamples\.(\d+)\." if is_residual
             else r"encoder\.downsamples\.(\d+)\.")
  layers: Dict[Tuple[int, ...], set] = {}
  for key in keys:
    m = re.match(pattern, key)
    if m:
      layers.setdefault(tuple(int(g) for g in m.groups()), set()).add(key[m.end():])
  if is_residual:
    stages = [[layers[k] for k in sorted(layers) if k[0] == i]
              for i in range(1 + max((k[0] for k in layers), default=-1))]
  else:
    stages, current = [], []
    for index in sorted(layers):
      current.append(layers[index])
      if "resample.1.weight" in layers[index]:
        stages.append(current)
        current = []
    stages.append(current)

  dim_mult, temporal = [], []
  num_res_blocks = None
  for i, stage in enumerate(stages):
    resnets = [j for j, names in enumerate(stage) if "residual.2.weight" in names]
    if not resnets:
      raise cc.CheckpointError(f"{where}: encoder stage {i} has no residual block; not an "
                               "original Wan VAE checkpoint (or pass config=)")
    if num_res_blocks is None:
      num_res_blocks = len(resnets)
    first = (f"encoder.downsamples.{i}.downsamples.{resnets[0]}." if is_residual else
             f"encoder.downsamples.{sum(len(s) for s in stages[:i]) + resnets[0]}.")
    first += "residual.2.weight"
    width = shape(first)[0]
    if width % base_dim:
      raise cc.CheckpointError(f"{where}: stage width {width} is not a multiple of the base "
                               f"width {base_dim}; pass config=")
    dim_mult.append(width // base_dim)
    if i != len(stages) - 1:
      temporal.append("time_conv.weight" in stage[-1])
  dec_width = shape("decoder.conv1.weight")[0]
  if dec_width % dim_mult[-1]:
    raise cc.CheckpointError(f"{where}: decoder width {dec_width} is not a multiple of "
                             f"dim_mult[-1]={dim_mult[-1]}; pass config=")
  stats = _latent_stats(z_dim)
  if stats is None:
    raise cc.CheckpointError(
        f"{where}: ambiguous checkpoint: z_dim {z_dim} is neither Wan2.1's 16 nor Wan2.2's "
        "48, so its latent statistics are unknown; pass config= (a WanVAEConfig)")
  patch = None
  if in_channels != 3:
    p = int(round((in_channels / 3) ** 0.5))
    if 3 * p * p != in_channels:
      raise cc.CheckpointError(f"{where}: encoder input channels {in_channels} are not "
                               "3 x p x p; pass config=")
    patch = p
  try:
    return WanVAEConfig(
        base_dim=base_dim, decoder_base_dim=dec_width // dim_mult[-1], z_dim=z_dim,
        dim_mult=tuple(dim_mult), num_res_blocks=num_res_blocks,
        temperal_downsample=tuple(temporal), is_residual=is_residual,
        in_channels=in_channels, out_channels=out_channels, patch_size=patch,
        scale_factor_spatial=2 ** (len(dim_mult) - 1) * (patch or 1),
        scale_factor_temporal=2 ** sum(temporal), **stats)
  except ValueError as err:
    raise cc.CheckpointError(f"{where}: tensor shapes give no valid Wan VAE config: "
                             f"{err}") from err


# --- sources ------------------------------------------------------------------------------------

def load_config(location: os.PathLike) -> WanVAEConfig:
  """The `WanVAEConfig` of a diffusers `vae/` folder's config.json."""
  return cc.read_component_config(location, "vae", WanVAEConfig.from_diffusers_config)


def find_source(location: os.PathLike) -> Tuple[str, Path]:
  """("converted" | "original" | "diffusers", path) of a local Wan VAE checkpoint.

  Raises:
    CheckpointError: no such path; a folder with several VAE pickles, or with one beside a
      `vae/` subfolder.
  """
  location = Path(location)
  if not location.exists():
    raise cc.CheckpointError(f"{location}: no such file or folder")
  if location.is_file():
    return ("original" if location.suffix in cc.PICKLE_SUFFIXES else "diffusers"), location
  if cc.read_marker(location, FORMAT, FORMAT_VERSION) is not None:
    return "converted", location
  pickles = cc.find_pickles(location, PICKLE_PATTERN)
  if len(pickles) > 1:
    raise cc.CheckpointError(f"{location}: ambiguous: several VAE checkpoints "
                             f"{[p.name for p in pickles]}; pass the file to load")
  if pickles:
    if (location / "vae").is_dir():
      raise cc.CheckpointError(f"{location}: ambiguous: holds both {pickles[0].name} and a "
                               "vae/ folder; pass the one to load")
    return "original", pickles[0]
  folder = cc.component_folder(location, "vae")
  if folder != location and cc.read_marker(folder, FORMAT, FORMAT_VERSION) is not None:
    return "converted", folder  # a pipeline folder whose vae/ was converted
  return "diffusers", folder


def _stream(model: WanVAE, ckpt: Any, table, what: str, progress: bool,
            device: Optional[jax.Device]) -> WanVAE:
  rules = {key: rule for key, (rule, _) in table.items()}
  specs = cc.param_shapes(model)
  # check_keys derives the expected torch shape from these through the rule kind.
  shapes = {rule.target: shape if rule.kind == "copy" else specs[rule.target].shape
            for rule, shape in table.values()}
  cc.check_keys(ckpt, rules, shapes, what)
  cc.stream_params(model, ckpt, rules, list(rules), device=device, progress=progress,
                   reshape=True)
  return model


def _abstract(cfg: WanVAEConfig) -> WanVAE:
  return nnx.eval_shape(lambda: WanVAE(cfg, rngs=nnx.Rngs(0)))


def load_vae(location: os.PathLike, *, config: Optional[WanVAEConfig] = None,
             dtype: Any = jnp.float32, progress: bool = False,
             device: Optional[jax.Device] = None) -> WanVAE:
  """A `WanVAE` from a local checkpoint: diffusers folder, original `Wan2.x_VAE.pth`, or a
  folder written by `convert` (see the module docstring).

  Args:
    location: the `vae/` folder (or a pipeline folder holding one, or a .safetensors file
      next to its config.json); an original `.pth` file or a folder holding exactly one
      `*VAE*.pth`; or a converted folder.
    config: architecture to use instead of config.json / the inferred one / the stored one
      (for a converted folder it must have the stored architecture).
    dtype: weight and compute dtype; None: float32, or as stored for a converted folder.
    progress: show a tqdm bar.
    device: where the weights go (default device if None).

  Raises:
    CheckpointError: no or bad config.json; an ambiguous folder or architecture; unreadable
      (truncated, corrupt) file; unknown, missing, mis-shaped or non-float key (the message
      names the key and its file); a pickle without torch (`TorchMissingError`).
  """
  kind, path = find_source(location)
  if kind == "converted":
    return load_converted(path, config=config, dtype=dtype, device=device)
  dtype = jnp.float32 if dtype is None else dtype
  if kind == "original":
    with cc.TorchPickleCheckpoint(path) as ckpt:
      cfg = config if config is not None else infer_original_config(ckpt)
      model = _abstract(cfg.with_dtype(cc.parse_dtype(dtype)))
      return _stream(model, ckpt, original_key_table(model),
                     f"the {cfg.describe()} (original Wan layout)", progress, device)
  cfg = config if config is not None else load_config(path)
  model = _abstract(cfg.with_dtype(cc.parse_dtype(dtype)))
  with cc.SafetensorsCheckpoint(path) as ckpt:
    return _stream(model, ckpt, key_table(model), f"the {cfg.describe()}", progress, device)


def read_config(location: os.PathLike) -> Optional[WanVAEConfig]:
  """The `WanVAEConfig` of any source `load_vae` reads, without reading weights: a converted
  folder's stored config or config.json; None for an original `.pth` (its architecture is
  only in its tensor shapes, which need torch to read)."""
  kind, path = find_source(location)
  if kind == "converted":
    return cc.converted_config(path, FORMAT, FORMAT_VERSION, WanVAEConfig)[1]
  if kind == "original":
    return None
  return load_config(path)


# --- converted folders --------------------------------------------------------------------------

def load_converted(folder: os.PathLike, *, config: Optional[WanVAEConfig] = None,
                   dtype: Any = None, device: Optional[jax.Device] = None) -> WanVAE:
  """A `WanVAE` from a folder written by `convert` (dtype None: as stored)."""
  folder, cfg = cc.converted_config(folder, FORMAT, FORMAT_VERSION, WanVAEConfig, config,
                                    dtype)
  return cc.restore_params(_abstract(cfg), folder / cc.PARAMS_DIR, device=device)


def convert(src: os.PathLike, dst: os.PathLike, *, dtype: Any = jnp.float32,
            config: Optional[WanVAEConfig] = None, overwrite: bool = False,
            progress: bool = True) -> Path:
  """Converts a local Wan VAE checkpoint (any source `load_vae` reads) to a folder that
  `load_vae` / `WanVAE.from_pretrained` read without torch (`convert_common.convert_source`:
  on the host CPU, nothing left at `dst` on error). Returns `dst` as an absolute path."""
  return cc.convert_source(load_vae, find_source, src, dst, FORMAT, FORMAT_VERSION,
                           lambda model: model.config.to_dict(), overwrite=overwrite,
                           config=config, dtype=dtype, progress=progress)
