"""HunyuanVideo VAE checkpoints -> `HunyuanVAE`, and conversion to Orbax
(`svg-ear-convert hunyuan-vae`).

`load_vae` reads, from local files only:
  * diffusers `AutoencoderKLHunyuanVideo` (a `vae/` folder, or a pipeline folder holding
    one): `config.json` plus `diffusion_pytorch_model.safetensors`, or shards listed by
    `diffusion_pytorch_model.safetensors.index.json`.
  * the original release's `hunyuan-video-t2v-720p/vae/`: `pytorch_model.pt` (a torch
    pickle; needs torch, `convert_common.TorchMissingError` without it) beside the
    `config.json` of hyvideo's `AutoencoderKLCausal3D` (`DownEncoderBlockCausal3D` /
    `UpDecoderBlockCausal3D` blocks, `time_compression_ratio`; fields it omits take that
    class's defaults). The tensor names are the diffusers ones: diffusers' conversion
    script (scripts/convert_hunyuan_video_to_diffusers.py, `convert_vae`) renames nothing
    and loads strictly. As hyvideo's `load_vae` does, a "state_dict" wrapper is unwrapped
    and, when keys start with "vae.", only those are used (the prefix removed; the others,
    e.g. training losses, are left out). The file, or a folder holding exactly one pickle,
    or the model folder holding `vae/`.
  * a folder written by `convert` (marker `svg_ear_jax.json` with format
    "svg-ear-jax/hunyuan-vae" + config, parameters as Orbax in `params/`); needs no torch.
The key table is derived from the model's own parameter paths (`kernel` is `weight`): 5-D
kernels are torch Conv3d weights ("conv" rule), 2-D ones the mid-block attention's Linear
weights ("linear" rule). Every checkpoint key must map to a parameter and every parameter
must have a key, with the torch shape of the parameter; headers are checked before any
tensor is read, then tensors are streamed one by one.
"""

import os
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models import convert_common as cc
from models.hunyuan.vae import HunyuanVAE, HunyuanVAEConfig

Path_ = cc.Path_

FORMAT = "svg-ear-jax/hunyuan-vae"
FORMAT_VERSION = 1
ORIGINAL_CLASS = "AutoencoderKLCausal3D"
ORIGINAL_PREFIX = "vae."
# hyvideo's AutoencoderKLCausal3D constructor defaults (used for fields its config omits).
ORIGINAL_DEFAULTS = dict(in_channels=3, out_channels=3,
                         down_block_types=("DownEncoderBlockCausal3D",),
                         up_block_types=("UpDecoderBlockCausal3D",), block_out_channels=(64,),
                         layers_per_block=1, act_fn="silu", latent_channels=4,
                         norm_num_groups=32, scaling_factor=0.18215,
                         spatial_compression_ratio=8, time_compression_ratio=4,
                         mid_block_add_attention=True)
_ORIGINAL_BLOCKS = {"DownEncoderBlockCausal3D": "HunyuanVideoDownBlock3D",
                    "UpDecoderBlockCausal3D": "HunyuanVideoUpBlock3D"}
# Not architecture (tiling sizes, an upcast hint).
_ORIGINAL_IGNORED = ("sample_size", "sample_tsize", "force_upcast")


def torch_key(path: Path_) -> str:
  """diffusers (= original) state-dict key of an nnx parameter path."""
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
  """The model's parameters as a diffusers (= original) state dict of NumPy arrays (torch
  layout)."""
  variables = cc.param_variables(model)
  out = {}
  for key, (rule, _) in key_table(model).items():
    value = cc.to_torch(rule.kind, np.asarray(variables[rule.target].get_value()))
    out[key] = np.ascontiguousarray(value)
  return out


def config_from_original(raw: Mapping[str, Any]) -> HunyuanVAEConfig:
  """A `HunyuanVAEConfig` from the config.json of hyvideo's `AutoencoderKLCausal3D` (its
  constructor defaults for omitted fields; tiling sizes and `_*` bookkeeping ignored).

  Raises:
    ValueError: another class, an unknown block type or field, or an invalid config.
  """
  name = raw.get("_class_name", ORIGINAL_CLASS)
  if name != ORIGINAL_CLASS:
    raise ValueError(f"not an {ORIGINAL_CLASS} config: _class_name={name!r}")
  data = {k: v for k, v in raw.items() if not k.startswith("_") and k not in _ORIGINAL_IGNORED}
  unknown = sorted(set(data) - set(ORIGINAL_DEFAULTS))
  if unknown:
    raise ValueError(f"unknown {ORIGINAL_CLASS} fields {unknown}")
  data = {**ORIGINAL_DEFAULTS, **data}
  for field in ("down_block_types", "up_block_types"):
    bad = [b for b in data[field] if b not in _ORIGINAL_BLOCKS]
    if bad:
      raise ValueError(f"{field}: unknown block types {bad} (known: {sorted(_ORIGINAL_BLOCKS)})")
    data[field] = tuple(_ORIGINAL_BLOCKS[b] for b in data[field])
  data["temporal_compression_ratio"] = data.pop("time_compression_ratio")
  return HunyuanVAEConfig.from_dict(data)


def parse_config(raw: Mapping[str, Any]) -> HunyuanVAEConfig:
  """A diffusers `AutoencoderKLHunyuanVideo` or an original `AutoencoderKLCausal3D`
  config.json dict, told apart by `_class_name`."""
  if raw.get("_class_name") == ORIGINAL_CLASS:
    return config_from_original(raw)
  return HunyuanVAEConfig.from_diffusers_config(raw)


def load_config(location: os.PathLike) -> HunyuanVAEConfig:
  """The `HunyuanVAEConfig` of a `vae/` folder's config.json (diffusers or original), of a
  pipeline / model folder holding one, or of the folder of a checkpoint file."""
  return cc.read_component_config(location, "vae", parse_config)


def find_source(location: os.PathLike) -> Tuple[str, Path]:
  """("converted" | "original" | "diffusers", path) of a local HunyuanVideo VAE checkpoint.

  Raises:
    CheckpointError: no such path, or a folder with several torch pickles and no
      safetensors.
  """
  location = Path(location)
  if not location.exists():
    raise cc.CheckpointError(f"{location}: no such file or folder")
  if location.is_file():
    return ("original" if location.suffix in cc.PICKLE_SUFFIXES else "diffusers"), location
  if cc.read_marker(location, FORMAT, FORMAT_VERSION) is not None:
    return "converted", location
  folder = cc.component_folder(location, "vae")
  if folder != location and cc.read_marker(folder, FORMAT, FORMAT_VERSION) is not None:
    return "converted", folder
  if not any(folder.glob("*.safetensors*")):
    pickles = cc.find_pickles(folder, "")
    if len(pickles) > 1:
      raise cc.CheckpointError(f"{folder}: ambiguous: several torch checkpoints "
                               f"{[p.name for p in pickles]}; pass the file to load")
    if pickles:
      return "original", pickles[0]
  return "diffusers", folder


def _original_view(ckpt: cc.TorchPickleCheckpoint):
  """hyvideo's rule: keys under "vae." (prefix removed) if there are any, else all."""
  if any(k.startswith(ORIGINAL_PREFIX) for k in ckpt.keys()):
    return cc.PrefixView(ckpt, ORIGINAL_PREFIX)
  return ckpt


def _abstract(cfg: HunyuanVAEConfig) -> HunyuanVAE:
  return nnx.eval_shape(lambda: HunyuanVAE(cfg, rngs=nnx.Rngs(0)))


def _stream(model: HunyuanVAE, ckpt: Any, what: str, progress: bool,
            device: Optional[jax.Device]) -> HunyuanVAE:
  rules = {key: rule for key, (rule, _) in key_table(model).items()}
  specs = cc.param_shapes(model)
  cc.check_keys(ckpt, rules, {path: spec.shape for path, spec in specs.items()}, what)
  cc.stream_params(model, ckpt, rules, list(rules), device=device, progress=progress)
  return model


def load_vae(location: os.PathLike, *, config: Optional[HunyuanVAEConfig] = None,
             dtype: Any = jnp.float32, progress: bool = False,
             device: Optional[jax.Device] = None) -> HunyuanVAE:
  """A `HunyuanVAE` from a local checkpoint: diffusers folder, original
  `pytorch_model.pt` + config.json, or a folder written by `convert` (see the module
  docstring).

  Args:
    location: the `vae/` folder (or a pipeline / model folder holding one, or a checkpoint
      file next to its config.json), or a converted folder.
    config: architecture to use instead of config.json / the stored one (for a converted
      folder it must have the stored architecture).
    dtype: weight and compute dtype; None: float32, or as stored for a converted folder.
    progress: show a tqdm bar.
    device: where the weights go (default device if None).

  Raises:
    CheckpointError: no or bad config.json; unreadable (truncated, corrupt) file; unknown,
      missing, mis-shaped or non-float key (the message names the key and its file); a
      pickle without torch (`TorchMissingError`).
  """
  kind, path = find_source(location)
  if kind == "converted":
    return load_converted(path, config=config, dtype=dtype, device=device)
  dtype = jnp.float32 if dtype is None else dtype
  cfg = config if config is not None else load_config(path)
  model = _abstract(cfg.with_dtype(cc.parse_dtype(dtype)))
  if kind == "original":
    with cc.TorchPickleCheckpoint(path) as ckpt:
      return _stream(model, _original_view(ckpt), f"the {cfg.describe()} (original layout)",
                     progress, device)
  with cc.SafetensorsCheckpoint(path) as ckpt:
    return _stream(model, ckpt, f"the {cfg.describe()}", progress, device)


def read_config(location: os.PathLike) -> HunyuanVAEConfig:
  """The `HunyuanVAEConfig` of any source `load_vae` reads, without reading weights: a converted
  folder's stored config, or config.json (diffusers or original)."""
  kind, path = find_source(location)
  if kind == "converted":
    return cc.converted_config(path, FORMAT, FORMAT_VERSION, HunyuanVAEConfig)[1]
  return load_config(path)


def load_converted(folder: os.PathLike, *, config: Optional[HunyuanVAEConfig] = None,
                   dtype: Any = None, device: Optional[jax.Device] = None) -> HunyuanVAE:
  """A `HunyuanVAE` from a folder written by `convert` (dtype None: as stored)."""
  folder, cfg = cc.converted_config(folder, FORMAT, FORMAT_VERSION, HunyuanVAEConfig, config,
                                    dtype)
  return cc.restore_params(_abstract(cfg), folder / cc.PARAMS_DIR, device=device)


def convert(src: os.PathLike, dst: os.PathLike, *, dtype: Any = jnp.float32,
            config: Optional[HunyuanVAEConfig] = None, overwrite: bool = False,
            progress: bool = True) -> Path:
  """Converts a local HunyuanVideo VAE checkpoint (any source `load_vae` reads) to a folder
  that `load_vae` / `HunyuanVAE.from_pretrained` read without torch
  (`convert_common.convert_source`: on the host CPU, nothing left at `dst` on error).
  Returns `dst` as an absolute path."""
  return cc.convert_source(load_vae, find_source, src, dst, FORMAT, FORMAT_VERSION,
                           lambda model: model.config.to_dict(), overwrite=overwrite,
                           config=config, dtype=dtype, progress=progress)
