"""transformers `UMT5EncoderModel` checkpoints (a diffusers Wan `text_encoder/` folder) ->
`UMT5Encoder`.

The folder is a transformers `save_pretrained`: `config.json` plus `model.safetensors`, or
shards listed by `model.safetensors.index.json`. The embedding is tied: a save holds
`shared.weight`, `encoder.embed_tokens.weight` or both; either is loaded (`shared.weight`
first), the other, if present, is only shape-checked, not read. Every other key must map
to a parameter and every parameter must have its key, with the torch shape; headers are
checked before any tensor is read, then tensors are streamed one by one
(`convert_common.SafetensorsCheckpoint`).

Not supported: Wan's original `models_t5_umt5-xxl-enc-bf16.pth` (a torch pickle of Wan's
own `T5Encoder` with different key names, not documented in PIPELINE.md 4.1); use the
diffusers `text_encoder/` folder.
"""

import os
from pathlib import Path
from typing import Any, Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models import convert_common as cc
from models.wan.umt5 import UMT5Config, UMT5Encoder

EMBED_KEYS = ("shared.weight", "encoder.embed_tokens.weight")


def key_table(cfg: UMT5Config) -> Dict[str, cc.Rule]:
  """transformers key -> Rule for every parameter except the (tied) embedding."""
  table = {}
  for i in range(cfg.num_layers):
    src, dst = f"encoder.block.{i}.layer", ("blocks", i)
    for name in ("q", "k", "v", "o"):
      table[f"{src}.0.SelfAttention.{name}.weight"] = cc.Rule((*dst, "attn", name, "kernel"),
                                                              "linear")
    table[f"{src}.0.SelfAttention.relative_attention_bias.weight"] = cc.Rule(
        (*dst, "attn", "relative_attention_bias"))
    table[f"{src}.0.layer_norm.weight"] = cc.Rule((*dst, "attn_norm", "weight"))
    for name in ("wi_0", "wi_1", "wo"):
      table[f"{src}.1.DenseReluDense.{name}.weight"] = cc.Rule((*dst, "ffn", name, "kernel"),
                                                               "linear")
    table[f"{src}.1.layer_norm.weight"] = cc.Rule((*dst, "ffn_norm", "weight"))
  table["encoder.final_layer_norm.weight"] = cc.Rule(("final_layer_norm", "weight"))
  return table


def to_state_dict(model: UMT5Encoder) -> Dict[str, np.ndarray]:
  """The model's parameters as a transformers state dict of NumPy arrays (torch layout),
  the embedding once, as `shared.weight`."""
  variables = cc.param_variables(model)
  rules = {**key_table(model.cfg), EMBED_KEYS[0]: cc.Rule(("embed_tokens", "embedding"))}
  out = {}
  for key, rule in rules.items():
    value = cc.to_torch(rule.kind, np.asarray(variables[rule.target].get_value()))
    out[key] = np.ascontiguousarray(value)
  return out


def load_config(location: os.PathLike) -> UMT5Config:
  """The `UMT5Config` of a transformers save's config.json."""
  return cc.read_component_config(location, "text_encoder", UMT5Config.from_hf_config)


def load_umt5(location: os.PathLike, *, config: Optional[UMT5Config] = None,
              dtype: Any = jnp.float32, progress: bool = False,
              device: Optional[jax.Device] = None) -> UMT5Encoder:
  """A `UMT5Encoder` from a local transformers `UMT5EncoderModel` save.

  Args:
    location: the `text_encoder/` folder (or a pipeline folder holding one, or a
      .safetensors file next to its config.json).
    config: architecture to use instead of config.json.
    dtype: weight and compute dtype ("bf16", "fp32", "fp16" or a dtype; fp16 keeps `wo` in
      float32, as transformers does).
    progress: show a tqdm bar.
    device: where the weights go (default device if None).

  Raises:
    CheckpointError: no or bad config.json; a `.pth` file; unreadable (truncated, corrupt)
      file; unknown, missing, mis-shaped or non-float key (the message names the key and its
      file).
  """
  location = Path(location)
  if location.suffix in (".pth", ".pt", ".bin"):
    raise cc.CheckpointError(
        f"{location}: torch pickles (e.g. Wan's original models_t5_umt5-xxl-enc-bf16.pth) are "
        "not supported; pass a diffusers/transformers text_encoder/ folder (safetensors)")
  location = cc.component_folder(location, "text_encoder")
  cfg = config if config is not None else load_config(location)
  cfg = cfg.replace(dtype=cc.parse_dtype(dtype))
  model = nnx.eval_shape(lambda: UMT5Encoder(cfg, rngs=nnx.Rngs(0)))
  specs = cc.param_shapes(model)
  what = (f"the UMT5 encoder ({cfg.num_layers} layers, d_model {cfg.d_model}, vocab "
          f"{cfg.vocab_size})")
  rules = key_table(cfg)
  embed = ("embed_tokens", "embedding")
  unfilled = set(specs) - {r.target for r in rules.values()} - {embed}
  if unfilled:
    raise cc.CheckpointError(f"conversion table and {what} disagree: parameters without a "
                             f"source {sorted(map(cc.path_str, unfilled))[:5]}")
  with cc.SafetensorsCheckpoint(location) as ckpt:
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
