"""UMT5 text-encoder checkpoints -> `UMT5Encoder`, and conversion to Orbax
(`svg-ear-convert umt5`).

`load_umt5` reads, from local files only:
  * a transformers `UMT5EncoderModel` save (a diffusers Wan `text_encoder/` folder, or a
    pipeline folder holding one): `config.json` plus `model.safetensors`, or shards listed
    by `model.safetensors.index.json`. The embedding is tied: a save holds `shared.weight`,
    `encoder.embed_tokens.weight` or both; either is loaded (`shared.weight` first), the
    other, if present, is only shape-checked, not read.
  * Wan's original `models_t5_umt5-xxl-enc-bf16.pth`: a torch pickle of Wan's own
    `T5Encoder` (wan/modules/t5.py, umt5-xxl with `shared_pos=False`): `token_embedding`,
    `blocks.N.{norm1, attn.{q,k,v,o}, norm2, ffn.{gate.0, fc1, fc2},
    pos_embedding.embedding}`, `norm` (see `ORIGINAL_NAMES`; `gate.0` is transformers'
    `wi_0`, the GELU branch, `fc1` its `wi_1`). The file, or a folder holding exactly one
    `*t5*.pth` (e.g. the original model folder, beside the VAE pickle). The architecture
    is inferred from the tensor shapes (umt5-xxl: vocab 256384, d_model 4096, 64 heads of
    64, d_ff 10240, 24 layers, 32 buckets); the relative-position max distance (128) and
    norm epsilon (1e-6) are Wan's constants. Needs torch (`convert_common.TorchMissingError`
    without it).
  * a folder written by `convert` (marker `svg_ear_jax.json` with format "svg-ear-jax/umt5"
    + config, parameters as Orbax in `params/`); needs no torch.
Every key must map to a parameter and every parameter must have its key, with the torch
shape; headers are checked before any tensor is read, then tensors are streamed one by one.
"""

import os
import re
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models import convert_common as cc
from models.wan.umt5 import UMT5Config, UMT5Encoder

EMBED_KEYS = ("shared.weight", "encoder.embed_tokens.weight")
FORMAT = "svg-ear-jax/umt5"
FORMAT_VERSION = 1
PICKLE_PATTERN = r"t5"  # `*t5*.pth` in a folder: models_t5_umt5-xxl-enc-bf16.pth
# Wan T5Encoder block member -> (transformers layer / module, our target), per block.
ORIGINAL_NAMES = {
    "norm1.weight": ("0.layer_norm.weight", ("attn_norm", "weight"), "copy"),
    "attn.q.weight": ("0.SelfAttention.q.weight", ("attn", "q", "kernel"), "linear"),
    "attn.k.weight": ("0.SelfAttention.k.weight", ("attn", "k", "kernel"), "linear"),
    "attn.v.weight": ("0.SelfAttention.v.weight", ("attn", "v", "kernel"), "linear"),
    "attn.o.weight": ("0.SelfAttention.o.weight", ("attn", "o", "kernel"), "linear"),
    "pos_embedding.embedding.weight": ("0.SelfAttention.relative_attention_bias.weight",
                                       ("attn", "relative_attention_bias"), "copy"),
    "norm2.weight": ("1.layer_norm.weight", ("ffn_norm", "weight"), "copy"),
    "ffn.gate.0.weight": ("1.DenseReluDense.wi_0.weight", ("ffn", "wi_0", "kernel"), "linear"),
    "ffn.fc1.weight": ("1.DenseReluDense.wi_1.weight", ("ffn", "wi_1", "kernel"), "linear"),
    "ffn.fc2.weight": ("1.DenseReluDense.wo.weight", ("ffn", "wo", "kernel"), "linear"),
}
ORIGINAL_EMBED = "token_embedding.weight"
ORIGINAL_NORM = "norm.weight"
WAN_MAX_DISTANCE = 128  # T5RelativeEmbedding(max_dist=128)
WAN_EPS = 1e-6  # T5LayerNorm(eps=1e-6)


def key_table(cfg: UMT5Config) -> Dict[str, cc.Rule]:
  """transformers key -> Rule for every parameter except the (tied) embedding."""
  table = {}
  for i in range(cfg.num_layers):
    for hf, target, kind in ORIGINAL_NAMES.values():
      table[f"encoder.block.{i}.layer.{hf}"] = cc.Rule(("blocks", i, *target), kind)
  table["encoder.final_layer_norm.weight"] = cc.Rule(("final_layer_norm", "weight"))
  return table


def original_key_table(cfg: UMT5Config) -> Dict[str, cc.Rule]:
  """Wan `T5Encoder` key -> Rule for every parameter."""
  table = {ORIGINAL_EMBED: cc.Rule(("embed_tokens", "embedding"))}
  for i in range(cfg.num_layers):
    for name, (_, target, kind) in ORIGINAL_NAMES.items():
      table[f"blocks.{i}.{name}"] = cc.Rule(("blocks", i, *target), kind)
  table[ORIGINAL_NORM] = cc.Rule(("final_layer_norm", "weight"))
  return table


def _state_dict(model: UMT5Encoder, rules: Dict[str, cc.Rule]) -> Dict[str, np.ndarray]:
  variables = cc.param_variables(model)
  return {key: np.ascontiguousarray(cc.to_torch(rule.kind,
                                                np.asarray(variables[rule.target].get_value())))
          for key, rule in rules.items()}


def to_state_dict(model: UMT5Encoder) -> Dict[str, np.ndarray]:
  """The model's parameters as a transformers state dict of NumPy arrays (torch layout),
  the embedding once, as `shared.weight`."""
  return _state_dict(model, {**key_table(model.cfg),
                             EMBED_KEYS[0]: cc.Rule(("embed_tokens", "embedding"))})


def to_original_state_dict(model: UMT5Encoder) -> Dict[str, np.ndarray]:
  """The model's parameters as a Wan `T5Encoder` state dict of NumPy arrays (torch layout)."""
  return _state_dict(model, original_key_table(model.cfg))


def infer_original_config(ckpt: Any) -> UMT5Config:
  """The `UMT5Config` of a Wan `T5Encoder` state dict, from its tensor shapes.

  Raises:
    CheckpointError: keys of another model (e.g. a shared position table: T5, not UMT5), or
      shapes that form no valid config.
  """
  where = ckpt.location
  keys = set(ckpt.keys())
  if "pos_embedding.embedding.weight" in keys:
    raise cc.CheckpointError(f"{where}: one shared relative position table "
                             "('pos_embedding.embedding.weight'): a T5 with shared_pos=True, "
                             "not Wan's UMT5 (one table per block)")

  def shape(key):
    if key not in keys:
      raise cc.CheckpointError(f"missing key '{key}' in {where}: needed to infer the "
                               "architecture of Wan's T5 encoder (or pass config=)")
    return ckpt.shape(key)

  vocab, d_model = shape(ORIGINAL_EMBED)
  buckets, heads = shape("blocks.0.pos_embedding.embedding.weight")
  inner = shape("blocks.0.attn.q.weight")[0]
  if inner % heads:
    raise cc.CheckpointError(f"{where}: attention width {inner} is not a multiple of the "
                             f"{heads} heads of the position table")
  layers = {int(m.group(1)) for k in keys for m in [re.match(r"blocks\.(\d+)\.", k)] if m}
  try:
    return UMT5Config(vocab_size=vocab, d_model=d_model, d_kv=inner // heads,
                      d_ff=shape("blocks.0.ffn.fc1.weight")[0], num_layers=len(layers),
                      num_heads=heads, relative_attention_num_buckets=buckets,
                      relative_attention_max_distance=WAN_MAX_DISTANCE,
                      layer_norm_epsilon=WAN_EPS)
  except ValueError as err:
    raise cc.CheckpointError(f"{where}: tensor shapes give no valid UMT5 config: {err}") \
        from err


def load_config(location: os.PathLike) -> UMT5Config:
  """The `UMT5Config` of a transformers save's config.json."""
  return cc.read_component_config(location, "text_encoder", UMT5Config.from_hf_config)


def find_source(location: os.PathLike) -> Tuple[str, Path]:
  """("converted" | "original" | "transformers", path) of a local UMT5 checkpoint.

  Raises:
    CheckpointError: no such path; a folder with several T5 pickles.
  """
  location = Path(location)
  if not location.exists():
    raise cc.CheckpointError(f"{location}: no such file or folder")
  if location.is_file():
    if location.suffix in cc.PICKLE_SUFFIXES:
      return "original", location
    if location.suffix == ".bin":
      raise cc.CheckpointError(f"{location}: transformers .bin pickles are not supported; "
                               "pass a safetensors save (save_pretrained) or Wan's original "
                               ".pth")
    return "transformers", location
  if cc.read_marker(location, FORMAT, FORMAT_VERSION) is not None:
    return "converted", location
  pickles = cc.find_pickles(location, PICKLE_PATTERN)
  if len(pickles) > 1:
    raise cc.CheckpointError(f"{location}: ambiguous: several T5 checkpoints "
                             f"{[p.name for p in pickles]}; pass the file to load")
  if pickles:
    return "original", pickles[0]
  folder = cc.component_folder(location, "text_encoder")
  if folder != location and cc.read_marker(folder, FORMAT, FORMAT_VERSION) is not None:
    return "converted", folder  # a pipeline folder whose text_encoder/ was converted
  return "transformers", folder


def _what(cfg: UMT5Config) -> str:
  return f"the {cfg.describe()}"


def _abstract(cfg: UMT5Config) -> UMT5Encoder:
  return nnx.eval_shape(lambda: UMT5Encoder(cfg, rngs=nnx.Rngs(0)))


def _check_table(specs, rules, what):
  targets = {r.target for r in rules.values()}
  if targets != set(specs):
    raise cc.CheckpointError(
        f"conversion table and {what} disagree: targets without a parameter "
        f"{sorted(map(cc.path_str, targets - set(specs)))[:5]}, parameters without a source "
        f"{sorted(map(cc.path_str, set(specs) - targets))[:5]}")


def load_umt5(location: os.PathLike, *, config: Optional[UMT5Config] = None,
              dtype: Any = jnp.float32, progress: bool = False,
              device: Optional[jax.Device] = None) -> UMT5Encoder:
  """A `UMT5Encoder` from a local checkpoint: transformers save, Wan's original `.pth`, or a
  folder written by `convert` (see the module docstring).

  Args:
    location: the `text_encoder/` folder (or a pipeline folder holding one, or a
      .safetensors file next to its config.json); Wan's `.pth` or a folder holding exactly
      one `*t5*.pth`; or a converted folder.
    config: architecture to use instead of config.json / the inferred one / the stored one
      (for a converted folder it must have the stored architecture).
    dtype: weight and compute dtype ("bf16", "fp32", "fp16" or a dtype; fp16 keeps `wo` in
      float32, as transformers does); None: float32, or as stored for a converted folder.
    progress: show a tqdm bar.
    device: where the weights go (default device if None).

  Raises:
    CheckpointError: no or bad config.json; a transformers `.bin`; unreadable (truncated,
      corrupt) file; unknown, missing, mis-shaped or non-float key (the message names the
      key and its file); a pickle without torch (`TorchMissingError`).
  """
  kind, path = find_source(location)
  if kind == "converted":
    return load_converted(path, config=config, dtype=dtype, device=device)
  dtype = jnp.float32 if dtype is None else dtype
  if kind == "original":
    with cc.TorchPickleCheckpoint(path) as ckpt:
      cfg = config if config is not None else infer_original_config(ckpt)
      cfg = cfg.replace(dtype=cc.parse_dtype(dtype))
      model = _abstract(cfg)
      specs = cc.param_shapes(model)
      rules = original_key_table(cfg)
      what = f"{_what(cfg)} (original Wan layout)"
      _check_table(specs, rules, what)
      cc.check_keys(ckpt, rules, {p: s.shape for p, s in specs.items()}, what)
      cc.stream_params(model, ckpt, rules, list(rules), device=device, progress=progress)
    return model
  cfg = config if config is not None else load_config(path)
  cfg = cfg.replace(dtype=cc.parse_dtype(dtype))
  model = _abstract(cfg)
  specs = cc.param_shapes(model)
  what = _what(cfg)
  rules = key_table(cfg)
  embed = ("embed_tokens", "embedding")
  _check_table(specs, {**rules, EMBED_KEYS[0]: cc.Rule(embed)}, what)
  with cc.SafetensorsCheckpoint(path) as ckpt:
    present = [k for k in EMBED_KEYS if k in ckpt.file_of]
    if not present:
      raise cc.CheckpointError(f"missing key '{EMBED_KEYS[0]}' (or its tied copy "
                               f"'{EMBED_KEYS[1]}'): no file of checkpoint {ckpt.location} "
                               "holds the token embedding")
    for key in present:
      rules[key] = cc.Rule(embed)
    cc.check_keys(ckpt, rules, {p: s.shape for p, s in specs.items()}, what)
    to_read = [k for k in rules if k not in EMBED_KEYS] + present[:1]
    cc.stream_params(model, ckpt, rules, to_read, device=device, progress=progress)
  return model


def load_converted(folder: os.PathLike, *, config: Optional[UMT5Config] = None,
                   dtype: Any = None, device: Optional[jax.Device] = None) -> UMT5Encoder:
  """A `UMT5Encoder` from a folder written by `convert` (dtype None: as stored)."""
  folder, cfg = cc.converted_config(folder, FORMAT, FORMAT_VERSION, UMT5Config, config,
                                    dtype)
  return cc.restore_params(_abstract(cfg), folder / cc.PARAMS_DIR, device=device)


def convert(src: os.PathLike, dst: os.PathLike, *, dtype: Any = jnp.bfloat16,
            config: Optional[UMT5Config] = None, overwrite: bool = False,
            progress: bool = True) -> Path:
  """Converts a local UMT5 checkpoint (any source `load_umt5` reads) to a folder that
  `load_umt5` / `UMT5Encoder.from_pretrained` read without torch
  (`convert_common.convert_source`: on the host CPU, nothing left at `dst` on error).
  Returns `dst` as an absolute path."""
  return cc.convert_source(load_umt5, find_source, src, dst, FORMAT, FORMAT_VERSION,
                           lambda model: model.cfg.to_dict(), overwrite=overwrite,
                           config=config, dtype=dtype, progress=progress)
