"""transformers text-encoder checkpoints (HunyuanVideo's `text_encoder/` and
`text_encoder_2/` folders) -> `LlamaEncoder` and `CLIPTextEncoder`, and conversion to
Orbax (`svg-ear-convert llama` / `clip`).

A source folder is a transformers `save_pretrained`: `config.json` plus `model.safetensors`,
or shards listed by `model.safetensors.index.json`; or a folder written by `convert_llama` /
`convert_clip` (marker `svg_ear_jax.json` with format "svg-ear-jax/llama" or
"svg-ear-jax/clip" + config, parameters as Orbax in `params/`; all Llama layers are stored,
and `up_to_hidden_state` restores only those it needs). A pipeline folder holding either in
`text_encoder/` / `text_encoder_2/` is read the same. Every key must map to a parameter or be in
the explicit ignore lists below, and every parameter must have its key with the torch shape;
headers are checked before any tensor is read, then tensors are streamed one by one
(`convert_common.SafetensorsCheckpoint`).

Llama: the `LlamaModel` keys (`embed_tokens.weight`, `layers.{i}.*`, `norm.weight`) are read
under one of the prefixes of `LLAMA_FORMATS`, found from where `embed_tokens.weight` is:
none (`LlamaModel`, diffusers' HunyuanVideo `text_encoder/`, which its conversion script
saves from `AutoModel`), `model.` (`LlamaForCausalLM`), `language_model.model.` or
`model.language_model.` (`LlavaForConditionalGeneration` before / since transformers 4.52,
e.g. the HunyuanVideo-I2V `text_encoder/`; config.json is then the LLaVA one and its
`text_config` is used). Of those saves, the LM head, the vision tower, the projector and
old saves' persisted rotary `inv_freq` buffers are ignored (`LLAMA_IGNORED`); anything else
unknown is an error. With `up_to_hidden_state` only the layers that hidden state needs are
read; the others are still checked.

CLIP: `CLIPTextModel` keys (`embeddings.*`, `encoder.layers.{i}.*`, `final_layer_norm.*`)
under `text_model.` (saves before transformers 5, e.g. every HunyuanVideo `text_encoder_2/`)
or under no prefix (transformers 5 saves), found the same way (`CLIP_FORMATS`); the old
persisted `position_ids` buffer and a `CLIPTextModelWithProjection`'s
`text_projection.weight` are ignored (`CLIP_IGNORED`).

Not supported: torch pickles (`.bin` / `.pth`); use a safetensors save.
"""

import os
import re
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models import convert_common as cc
from models.hunyuan.clip import CLIPTextConfig, CLIPTextEncoder
from models.hunyuan.llama import LlamaConfig, LlamaEncoder, resolve_hidden_state_index

LLAMA_FORMAT = "svg-ear-jax/llama"
CLIP_FORMAT = "svg-ear-jax/clip"
FORMAT_VERSION = 1
# Save class -> prefix of its LlamaModel keys.
LLAMA_FORMATS = {
    "LlamaModel": "",
    "LlamaForCausalLM": "model.",
    "LlavaForConditionalGeneration (transformers < 4.52)": "language_model.model.",
    "LlavaForConditionalGeneration": "model.language_model.",
}
# Prefix -> key prefixes of that save which the encoder does not use.
LLAMA_IGNORED = {
    "": (),
    "model.": ("lm_head.",),
    "language_model.model.": ("language_model.lm_head.", "vision_tower.",
                              "multi_modal_projector.", "image_newline"),
    "model.language_model.": ("lm_head.", "model.vision_tower.", "model.multi_modal_projector.",
                              "model.image_newline"),
}
# Persisted by old transformers versions; recomputed from the config here.
_INV_FREQ = re.compile(r"layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")
CLIP_FORMATS = {
    "CLIPTextModel (transformers < 5)": "text_model.",
    "CLIPTextModel": "",
}
# Prefix -> keys of that save which the encoder does not use.
CLIP_IGNORED = {p: (f"{p}embeddings.position_ids", "text_projection.weight")
                for p in CLIP_FORMATS.values()}
_PICKLES = (".pth", ".pt", ".bin")


def _linear_rules(src: str, dst: Tuple[Any, ...], bias: bool) -> Dict[str, cc.Rule]:
  rules = {f"{src}.weight": cc.Rule((*dst, "kernel"), "linear")}
  if bias:
    rules[f"{src}.bias"] = cc.Rule((*dst, "bias"))
  return rules


def llama_key_table(cfg: LlamaConfig, prefix: str = "",
                    num_layers: Optional[int] = None) -> Dict[str, cc.Rule]:
  """transformers key (with `prefix`) -> Rule for the embedding, the first `num_layers`
  layers (None: all) and, with all layers, the final norm."""
  n = cfg.num_hidden_layers if num_layers is None else num_layers
  table = {f"{prefix}embed_tokens.weight": cc.Rule(("embed_tokens", "embedding"))}
  for i in range(n):
    src, dst = f"{prefix}layers.{i}", ("layers", i)
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
      table.update(_linear_rules(f"{src}.self_attn.{name}", (*dst, "self_attn", name),
                                 cfg.attention_bias))
    for name in ("gate_proj", "up_proj", "down_proj"):
      table.update(_linear_rules(f"{src}.mlp.{name}", (*dst, "mlp", name), cfg.mlp_bias))
    for name in ("input_layernorm", "post_attention_layernorm"):
      table[f"{src}.{name}.weight"] = cc.Rule((*dst, name, "weight"))
  if n == cfg.num_hidden_layers:
    table[f"{prefix}norm.weight"] = cc.Rule(("norm", "weight"))
  return table


def clip_key_table(cfg: CLIPTextConfig, prefix: str = "text_model.") -> Dict[str, cc.Rule]:
  """transformers `CLIPTextModel` key (with `prefix`, a value of `CLIP_FORMATS`) -> Rule for
  every parameter."""
  table = {
      f"{prefix}embeddings.token_embedding.weight": cc.Rule(("token_embedding", "embedding")),
      f"{prefix}embeddings.position_embedding.weight": cc.Rule(("position_embedding",
                                                                "embedding")),
  }
  for i in range(cfg.num_hidden_layers):
    src, dst = f"{prefix}encoder.layers.{i}", ("layers", i)
    for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
      table.update(_linear_rules(f"{src}.self_attn.{name}", (*dst, "self_attn", name), True))
    for name in ("fc1", "fc2"):
      table.update(_linear_rules(f"{src}.mlp.{name}", (*dst, "mlp", name), True))
    for name in ("layer_norm1", "layer_norm2"):
      for p in ("weight", "bias"):
        table[f"{src}.{name}.{p}"] = cc.Rule((*dst, name, p))
  for p in ("weight", "bias"):
    table[f"{prefix}final_layer_norm.{p}"] = cc.Rule(("final_layer_norm", p))
  return table


def _state_dict(model: nnx.Module, rules: Dict[str, cc.Rule]) -> Dict[str, np.ndarray]:
  variables = cc.param_variables(model)
  return {key: np.ascontiguousarray(cc.to_torch(rule.kind,
                                                np.asarray(variables[rule.target].get_value())))
          for key, rule in rules.items()}


def llama_to_state_dict(model: LlamaEncoder, prefix: str = "") -> Dict[str, np.ndarray]:
  """The model's parameters as a transformers state dict of NumPy arrays (torch layout),
  keys under `prefix` (one of `LLAMA_FORMATS`); only the layers the model holds."""
  return _state_dict(model, llama_key_table(model.cfg, prefix, model.num_layers))


def clip_to_state_dict(model: CLIPTextEncoder,
                       prefix: str = "text_model.") -> Dict[str, np.ndarray]:
  """The model's parameters as a transformers `CLIPTextModel` state dict of NumPy arrays,
  keys under `prefix` (one of `CLIP_FORMATS`)."""
  return _state_dict(model, clip_key_table(model.cfg, prefix))


def load_llama_config(location: os.PathLike) -> LlamaConfig:
  """The `LlamaConfig` of a transformers Llama or LLaVA save's config.json."""
  return cc.read_component_config(location, "text_encoder", LlamaConfig.from_hf_config)


def load_clip_config(location: os.PathLike) -> CLIPTextConfig:
  """The `CLIPTextConfig` of a transformers `CLIPTextModel` save's config.json."""
  return cc.read_component_config(location, "text_encoder_2", CLIPTextConfig.from_hf_config)


class _Without:
  """A checkpoint's header view without some keys (the ignored ones), for `check_keys`."""

  def __init__(self, ckpt: cc.SafetensorsCheckpoint, drop: Sequence[str]):
    drop = set(drop)
    self.location = ckpt.location
    self.file_of = {k: f for k, f in ckpt.file_of.items() if k not in drop}
    self.shape, self.dtype = ckpt.shape, ckpt.dtype

  def keys(self):
    return list(self.file_of)


def _find_source(location: os.PathLike, name: str, fmt: str) -> Tuple[str, Path]:
  location = Path(location)
  if location.suffix in _PICKLES:
    raise cc.CheckpointError(f"{location}: torch pickles are not supported; pass a "
                             f"transformers {name}/ folder (safetensors)")
  if not location.exists():
    raise cc.CheckpointError(f"{location}: no such file or folder")
  folder = cc.component_folder(location, name)
  if cc.read_marker(folder, fmt, FORMAT_VERSION) is not None:
    return "converted", folder
  return "transformers", folder


def find_llama_source(location: os.PathLike) -> Tuple[str, Path]:
  """("converted" | "transformers", folder or file) of a local Llama checkpoint: `location`
  or the `text_encoder/` of a pipeline folder.

  Raises:
    CheckpointError: no such path; a torch pickle; another component's converted folder.
  """
  return _find_source(location, "text_encoder", LLAMA_FORMAT)


def find_clip_source(location: os.PathLike) -> Tuple[str, Path]:
  """As `find_llama_source`, for CLIP (a pipeline's `text_encoder_2/`)."""
  return _find_source(location, "text_encoder_2", CLIP_FORMAT)


def _check_table(model: nnx.Module, rules: Dict[str, cc.Rule], what: str) -> None:
  targets = {r.target for r in rules.values()}
  specs = set(cc.param_shapes(model))
  if targets != specs:
    raise cc.CheckpointError(
        f"conversion table and {what} disagree: targets without a parameter "
        f"{sorted(map(cc.path_str, targets - specs))[:5]}, parameters without a source "
        f"{sorted(map(cc.path_str, specs - targets))[:5]}")


def _find_prefix(keys: Sequence[str], formats: Dict[str, str], anchor: str, what: str) -> str:
  keys = set(keys)
  found = [p for p in formats.values() if f"{p}{anchor}" in keys]
  if not found:
    raise cc.CheckpointError(
        f"missing key '{anchor}': no known {what} layout holds it (looked under the prefixes "
        f"{list(formats.values())} of {list(formats)})")
  if len(found) > 1:
    raise cc.CheckpointError(f"ambiguous checkpoint: it holds {anchor} under several "
                             f"prefixes {found}")
  return found[0]


def llama_prefix(keys: Sequence[str]) -> str:
  """The prefix (a value of `LLAMA_FORMATS`) under which `keys` hold the LlamaModel.

  Raises:
    CheckpointError: no `embed_tokens.weight` under any known prefix, or under several.
  """
  return _find_prefix(keys, LLAMA_FORMATS, "embed_tokens.weight", "Llama")


def clip_prefix(keys: Sequence[str]) -> str:
  """The prefix (a value of `CLIP_FORMATS`) under which `keys` hold the CLIP text model.

  Raises:
    CheckpointError: no `embeddings.token_embedding.weight` under a known prefix, or under
      several.
  """
  return _find_prefix(keys, CLIP_FORMATS, "embeddings.token_embedding.weight", "CLIP text")


def _layers_needed(cfg: LlamaConfig, up_to_hidden_state: Optional[int]) -> int:
  if up_to_hidden_state is None:
    return cfg.num_hidden_layers
  return resolve_hidden_state_index(up_to_hidden_state, cfg.num_hidden_layers)


def load_llama(location: os.PathLike, *, config: Optional[LlamaConfig] = None,
               dtype: Any = jnp.float32, up_to_hidden_state: Optional[int] = None,
               progress: bool = False, device: Optional[jax.Device] = None) -> LlamaEncoder:
  """A `LlamaEncoder` from a local transformers Llama (or LLaVA) save.

  Args:
    location: the `text_encoder/` folder (or a pipeline folder holding one, or a
      .safetensors file next to its config.json), or a converted folder.
    config: architecture to use instead of config.json / the stored one (for a converted
      folder it must have the stored architecture).
    dtype: weight and compute dtype ("bf16", "fp32", "fp16" or a dtype); None: float32, or
      as stored for a converted folder.
    up_to_hidden_state: read only what `hidden_states[i]` needs (e.g. -3 for HunyuanVideo:
      the last two layers and the final norm are checked but not read); None: everything.
    progress: show a tqdm bar.
    device: where the weights go (default device if None).

  Raises:
    CheckpointError: no or bad config.json; a torch pickle; unreadable (truncated, corrupt)
      file; unknown, missing, mis-shaped or non-float key (the message names the key and its
      file); a converted folder of another component or architecture.
  """
  kind, location = find_llama_source(location)
  if kind == "converted":
    return load_llama_converted(location, config=config, dtype=dtype,
                                up_to_hidden_state=up_to_hidden_state, device=device)
  dtype = jnp.float32 if dtype is None else dtype
  cfg = config if config is not None else load_llama_config(location)
  cfg = cfg.replace(dtype=cc.parse_dtype(dtype))
  keep = _layers_needed(cfg, up_to_hidden_state)
  full = nnx.eval_shape(lambda: LlamaEncoder(cfg, rngs=nnx.Rngs(0)))
  model = nnx.eval_shape(lambda: LlamaEncoder(cfg, rngs=nnx.Rngs(0), num_layers=keep))
  what = f"the {cfg.describe()}"
  _check_table(full, llama_key_table(cfg), what)
  with cc.SafetensorsCheckpoint(location) as ckpt:
    prefix = llama_prefix(ckpt.keys())
    rules = llama_key_table(cfg, prefix)
    ignored = [k for k in ckpt.keys() if k.startswith(LLAMA_IGNORED[prefix])
               or (k.startswith(prefix) and _INV_FREQ.match(k[len(prefix):]))]
    specs = cc.param_shapes(full)
    cc.check_keys(_Without(ckpt, ignored), rules, {p: s.shape for p, s in specs.items()}, what)
    to_read = list(llama_key_table(cfg, prefix, keep))
    cc.stream_params(model, ckpt, rules, to_read, device=device, progress=progress)
  return model


def load_clip(location: os.PathLike, *, config: Optional[CLIPTextConfig] = None,
              dtype: Any = jnp.float32, progress: bool = False,
              device: Optional[jax.Device] = None) -> CLIPTextEncoder:
  """A `CLIPTextEncoder` from a local transformers `CLIPTextModel` save.

  Args:
    location: the `text_encoder_2/` folder (or a pipeline folder holding one, or a
      .safetensors file next to its config.json), or a converted folder.
    config: architecture to use instead of config.json / the stored one (for a converted
      folder it must have the stored architecture).
    dtype: weight and compute dtype ("bf16", "fp32", "fp16" or a dtype); None: float32, or
      as stored for a converted folder.
    progress: show a tqdm bar.
    device: where the weights go (default device if None).

  Raises:
    CheckpointError: as `load_llama`.
  """
  kind, location = find_clip_source(location)
  if kind == "converted":
    return load_clip_converted(location, config=config, dtype=dtype, device=device)
  dtype = jnp.float32 if dtype is None else dtype
  cfg = config if config is not None else load_clip_config(location)
  cfg = cfg.replace(dtype=cc.parse_dtype(dtype))
  model = _abstract_clip(cfg)
  what = f"the {cfg.describe()}"
  _check_table(model, clip_key_table(cfg), what)
  with cc.SafetensorsCheckpoint(location) as ckpt:
    prefix = clip_prefix(ckpt.keys())
    rules = clip_key_table(cfg, prefix)
    ignored = [k for k in ckpt.keys() if k in CLIP_IGNORED[prefix]]
    specs = cc.param_shapes(model)
    cc.check_keys(_Without(ckpt, ignored), rules, {p: s.shape for p, s in specs.items()}, what)
    cc.stream_params(model, ckpt, rules, list(rules), device=device, progress=progress)
  return model


# --- converted folders --------------------------------------------------------------------------

def _abstract_clip(cfg: CLIPTextConfig) -> CLIPTextEncoder:
  return nnx.eval_shape(lambda: CLIPTextEncoder(cfg, rngs=nnx.Rngs(0)))


def load_llama_converted(folder: os.PathLike, *, config: Optional[LlamaConfig] = None,
                         dtype: Any = None, up_to_hidden_state: Optional[int] = None,
                         device: Optional[jax.Device] = None) -> LlamaEncoder:
  """A `LlamaEncoder` from a folder written by `convert_llama` (dtype None: as stored);
  with `up_to_hidden_state`, only the layers that hidden state needs are read."""
  folder, cfg = cc.converted_config(folder, LLAMA_FORMAT, FORMAT_VERSION, LlamaConfig,
                                     config, dtype)
  keep = _layers_needed(cfg, up_to_hidden_state)
  model = nnx.eval_shape(lambda: LlamaEncoder(cfg, rngs=nnx.Rngs(0), num_layers=keep))
  return cc.restore_params(model, folder / cc.PARAMS_DIR, device=device,
                           partial=keep < cfg.num_hidden_layers)


def load_clip_converted(folder: os.PathLike, *, config: Optional[CLIPTextConfig] = None,
                        dtype: Any = None,
                        device: Optional[jax.Device] = None) -> CLIPTextEncoder:
  """A `CLIPTextEncoder` from a folder written by `convert_clip` (dtype None: as stored)."""
  folder, cfg = cc.converted_config(folder, CLIP_FORMAT, FORMAT_VERSION, CLIPTextConfig,
                                     config, dtype)
  return cc.restore_params(_abstract_clip(cfg), folder / cc.PARAMS_DIR, device=device)


def convert_llama(src: os.PathLike, dst: os.PathLike, *, dtype: Any = jnp.bfloat16,
                  config: Optional[LlamaConfig] = None, overwrite: bool = False,
                  progress: bool = True) -> Path:
  """Converts a local Llama / LLaVA save (any source `load_llama` reads; every layer) to a
  folder that `load_llama` / `LlamaEncoder.from_pretrained` read without torch
  (`convert_common.convert_source`: on the host CPU, nothing left at `dst` on error).
  bfloat16 by default: the pipeline runs the encoder in its DiT dtype (HunyuanVideo: fp16).
  Returns `dst` as an absolute path."""
  return cc.convert_source(load_llama, find_llama_source, src, dst, LLAMA_FORMAT,
                           FORMAT_VERSION, lambda model: model.cfg.to_dict(),
                           overwrite=overwrite, config=config, dtype=dtype, progress=progress)


def convert_clip(src: os.PathLike, dst: os.PathLike, *, dtype: Any = jnp.bfloat16,
                 config: Optional[CLIPTextConfig] = None, overwrite: bool = False,
                 progress: bool = True) -> Path:
  """As `convert_llama`, for a `CLIPTextModel` save (any source `load_clip` reads)."""
  return cc.convert_source(load_clip, find_clip_source, src, dst, CLIP_FORMAT,
                           FORMAT_VERSION, lambda model: model.cfg.to_dict(),
                           overwrite=overwrite, config=config, dtype=dtype, progress=progress)
