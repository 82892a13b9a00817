"""HunyuanVideo checkpoints -> `HunyuanVideoTransformer`: key tables, conversion to Orbax.

Sources are local checkpoints (safetensors, or the original release's torch pickle) in
either layout:
  * diffusers (`HunyuanVideoTransformer3DModel`): `transformer_blocks.0.attn.to_q.weight`,
    `context_embedder.token_refiner...`, `norm_out.linear` rows (scale, shift), ...
  * original HunyuanVideo (`hyvideo` `HYVideoDiffusionTransformer`): `double_blocks.0.img_attn_qkv`
    (fused q, k, v), `single_blocks.0.linear1` (fused q, k, v, mlp), `txt_in...`,
    `final_layer.adaLN_modulation.1` rows (shift, scale); optionally under ComfyUI's
    `model.diffusion_model.` prefix.
The original names are the inverse of diffusers' `convert_hunyuan_video_transformer_to_diffusers`
(diffusers/loaders/single_file_utils.py). A fused original tensor is read as the row blocks
the model needs (`sources.RowSlice`), each straight from the file, so nothing is read twice.
"""

import os
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Tuple, Union

import jax
import jax.numpy as jnp
from flax import nnx

from models import convert_common as cc
from models import parallel
from models.attention import AttentionLike
from models.hunyuan.config import HunyuanConfig
from models.hunyuan.sources import Checkpoint, RowSlice, SlicedCheckpoint, open_checkpoint
from models.hunyuan.transformer import HunyuanVideoTransformer

Layout = Literal["diffusers", "original"]
Variant = Union[None, str, HunyuanConfig]

ORIGINAL_PREFIX = "model.diffusion_model."
MARKER = cc.MARKER
FORMAT = "svg-ear-jax/hunyuan"
FORMAT_VERSION = 1
PARAMS_DIR = "params"
PIPELINE_SUBDIR = "transformer"

parse_dtype = cc.parse_dtype


Source = Union[str, RowSlice]


def key_table(cfg: HunyuanConfig) -> List[Tuple[str, Source, cc.Rule]]:
  """(diffusers key, original key or row slice, rule) for every tensor of a `cfg` model."""
  d = cfg.dim
  table = []

  def tensor(diffusers, original, target, kind="copy", layer=None):
    table.append((diffusers, original, cc.Rule(tuple(target), kind, layer)))

  def linear(diffusers, original, target, layer=None, rows=None):
    for suffix, param, kind in (("weight", "kernel", "linear"), ("bias", "bias", "copy")):
      source = f"{original}.{suffix}"
      if rows is not None:
        source = RowSlice(source, rows)
      tensor(f"{diffusers}.{suffix}", source, (*target, param), kind, layer)

  def fused(parts, original, layer):
    """parts: (diffusers name, target, rows) in the fused tensor's row order."""
    start = 0
    for diffusers, target, size in parts:
      linear(diffusers, original, target, layer, rows=((start, start + size),))
      start += size

  def qkv(diffusers_prefix, names, target_prefix):
    return [(f"{diffusers_prefix}.{n}", (*target_prefix, n), d) for n in names]

  tensor("x_embedder.proj.weight", "img_in.proj.weight", ("x_embedder", "kernel"), "conv")
  tensor("x_embedder.proj.bias", "img_in.proj.bias", ("x_embedder", "bias"))
  ce = "context_embedder"
  for i in (1, 2):
    linear(f"{ce}.time_text_embed.timestep_embedder.linear_{i}",
           f"txt_in.t_embedder.mlp.{2 * i - 2}", (ce, "timestep_embedder", f"linear_{i}"))
    linear(f"{ce}.time_text_embed.text_embedder.linear_{i}", f"txt_in.c_embedder.linear_{i}",
           (ce, "text_embedder", f"linear_{i}"))
  linear(f"{ce}.proj_in", "txt_in.input_embedder", (ce, "proj_in"))
  for n in range(cfg.num_refiner_layers):
    b, o = f"{ce}.token_refiner.refiner_blocks.{n}", f"txt_in.individual_token_refiner.blocks.{n}"
    t = (ce, "refiner_blocks")
    for norm in ("norm1", "norm2"):
      tensor(f"{b}.{norm}.weight", f"{o}.{norm}.weight", (*t, norm, "scale"), "copy", n)
      tensor(f"{b}.{norm}.bias", f"{o}.{norm}.bias", (*t, norm, "bias"), "copy", n)
    fused(qkv(f"{b}.attn", ("to_q", "to_k", "to_v"), (*t, "attn")), f"{o}.self_attn_qkv", n)
    linear(f"{b}.attn.to_out.0", f"{o}.self_attn_proj", (*t, "attn", "to_out"), n)
    linear(f"{b}.ff.net.0.proj", f"{o}.mlp.fc1", (*t, "ff", "linear_1"), n)
    linear(f"{b}.ff.net.2", f"{o}.mlp.fc2", (*t, "ff", "linear_2"), n)
    linear(f"{b}.norm_out.linear", f"{o}.adaLN_modulation.1", (*t, "norm_out", "linear"), n)

  embedders = [("timestep_embedder", "time_in.mlp.0", "time_in.mlp.2"),
               ("text_embedder", "vector_in.in_layer", "vector_in.out_layer")]
  if cfg.guidance_embeds:
    embedders.append(("guidance_embedder", "guidance_in.mlp.0", "guidance_in.mlp.2"))
  for name, *originals in embedders:
    for i, original in enumerate(originals, start=1):
      linear(f"time_text_embed.{name}.linear_{i}", original, (name, f"linear_{i}"))

  for n in range(cfg.num_layers):
    b, o, t = f"transformer_blocks.{n}", f"double_blocks.{n}", ("transformer_blocks",)
    linear(f"{b}.norm1.linear", f"{o}.img_mod.linear", (*t, "norm1", "linear"), n)
    linear(f"{b}.norm1_context.linear", f"{o}.txt_mod.linear", (*t, "norm1_context", "linear"),
           n)
    fused(qkv(f"{b}.attn", ("to_q", "to_k", "to_v"), (*t, "attn")), f"{o}.img_attn_qkv", n)
    fused(qkv(f"{b}.attn", ("add_q_proj", "add_k_proj", "add_v_proj"), (*t, "attn")),
          f"{o}.txt_attn_qkv", n)
    linear(f"{b}.attn.to_out.0", f"{o}.img_attn_proj", (*t, "attn", "to_out"), n)
    linear(f"{b}.attn.to_add_out", f"{o}.txt_attn_proj", (*t, "attn", "to_add_out"), n)
    for norm, original in (("norm_q", "img_attn_q_norm"), ("norm_k", "img_attn_k_norm"),
                           ("norm_added_q", "txt_attn_q_norm"),
                           ("norm_added_k", "txt_attn_k_norm")):
      tensor(f"{b}.attn.{norm}.weight", f"{o}.{original}.weight", (*t, "attn", norm, "scale"),
             "copy", n)
    for ff, mlp in (("ff", "img_mlp"), ("ff_context", "txt_mlp")):
      linear(f"{b}.{ff}.net.0.proj", f"{o}.{mlp}.fc1", (*t, ff, "linear_1"), n)
      linear(f"{b}.{ff}.net.2", f"{o}.{mlp}.fc2", (*t, ff, "linear_2"), n)

  for n in range(cfg.num_single_layers):
    b, o, t = f"single_transformer_blocks.{n}", f"single_blocks.{n}", ("single_transformer_blocks",)
    linear(f"{b}.norm.linear", f"{o}.modulation.linear", (*t, "norm", "linear"), n)
    fused(qkv(f"{b}.attn", ("to_q", "to_k", "to_v"), (*t, "attn"))
          + [(f"{b}.proj_mlp", (*t, "proj_mlp"), cfg.mlp_dim)], f"{o}.linear1", n)
    for norm in ("q", "k"):
      tensor(f"{b}.attn.norm_{norm}.weight", f"{o}.{norm}_norm.weight",
             (*t, "attn", f"norm_{norm}", "scale"), "copy", n)
    linear(f"{b}.proj_out", f"{o}.linear2", (*t, "proj_out"), n)

  # The original stores the head modulation as (shift, scale), diffusers and we as
  # (scale, shift).
  linear("norm_out.linear", "final_layer.adaLN_modulation.1", ("norm_out", "linear"),
         rows=((d, 2 * d), (0, d)))
  linear("proj_out", "final_layer.linear", ("proj_out",))
  return table


def rules_for(cfg: HunyuanConfig, layout: Layout,
              prefix: str = "") -> Tuple[Dict[str, cc.Rule], Dict[str, RowSlice]]:
  """(source name -> Rule, source name -> RowSlice for fused sources) in `layout`."""
  rules, slices = {}, {}
  for diffusers, original, rule in key_table(cfg):
    if layout == "diffusers":
      rules[prefix + diffusers] = rule
    elif isinstance(original, RowSlice):
      piece = RowSlice(prefix + original.key, original.rows)
      rules[piece.name] = rule
      slices[piece.name] = piece
    else:
      rules[prefix + original] = rule
  return rules, slices


def detect_layout(keys: List[str], location: Path) -> Tuple[Layout, str]:
  """(layout, key prefix) of a checkpoint from its key names."""
  prefix = ORIGINAL_PREFIX if keys and all(k.startswith(ORIGINAL_PREFIX) for k in keys) else ""
  names = {k[len(prefix):] for k in keys}
  if any(k.startswith(("x_embedder.", "context_embedder.", "transformer_blocks."))
         for k in names):
    return "diffusers", prefix
  if any(k.startswith(("img_in.", "txt_in.", "double_blocks.")) for k in names):
    return "original", prefix
  raise cc.CheckpointError(f"{location}: neither a diffusers nor an original HunyuanVideo "
                           f"checkpoint (keys such as {sorted(names)[:3]})")


def _config_json_dir(location: Path) -> Path:
  return location.parent if location.is_file() else location


def infer_config(ckpt: Checkpoint, layout: Layout, prefix: str, *,
                 rope_axes_dim: Tuple[int, int, int] = (16, 56, 56)) -> HunyuanConfig:
  """The architecture from a diffusers config.json beside the weights, else from tensor
  shapes (which do not give the RoPE split: `rope_axes_dim` is assumed)."""
  raw = cc.read_json(_config_json_dir(ckpt.location) / "config.json")
  if raw is not None:
    try:
      return HunyuanConfig.from_diffusers_config(raw)
    except (TypeError, ValueError) as err:
      raise cc.CheckpointError(f"{ckpt.location}/config.json: {err}") from err
  return _config_from_shapes(ckpt, layout, prefix, rope_axes_dim)


_SHAPE_KEYS = {  # what: (diffusers key, original key)
    "patch": ("x_embedder.proj.weight", "img_in.proj.weight"),
    "head_norm": ("transformer_blocks.0.attn.norm_q.weight",
                  "double_blocks.0.img_attn_q_norm.weight"),
    "mlp": ("transformer_blocks.0.ff.net.0.proj.weight", "double_blocks.0.img_mlp.fc1.weight"),
    "out": ("proj_out.weight", "final_layer.linear.weight"),
    "text": ("context_embedder.proj_in.weight", "txt_in.input_embedder.weight"),
    "pooled": ("time_text_embed.text_embedder.linear_1.weight", "vector_in.in_layer.weight"),
    "freq": ("time_text_embed.timestep_embedder.linear_1.weight", "time_in.mlp.0.weight"),
    "guidance": ("time_text_embed.guidance_embedder.linear_1.weight", "guidance_in.mlp.0.weight"),
}
_BLOCK_PREFIXES = {  # what: (diffusers, original)
    "double": ("transformer_blocks.", "double_blocks."),
    "single": ("single_transformer_blocks.", "single_blocks."),
    "refiner": ("context_embedder.token_refiner.refiner_blocks.",
                "txt_in.individual_token_refiner.blocks."),
}


def _config_from_shapes(ckpt, layout: Layout, prefix: str,
                        rope_axes_dim: Tuple[int, int, int]) -> HunyuanConfig:
  col = 0 if layout == "diffusers" else 1

  def shape(what):
    key = prefix + _SHAPE_KEYS[what][col]
    if key not in ckpt.file_of:
      raise cc.CheckpointError(f"missing key '{key}' in checkpoint {ckpt.location} (needed to "
                               "infer the architecture; or pass variant=)")
    return ckpt.shape(key)

  def count(what):
    start = prefix + _BLOCK_PREFIXES[what][col]
    return len({k[len(start):].split(".")[0] for k in ckpt.keys() if k.startswith(start)})

  dim, in_ch, pt, ph, pw = shape("patch")
  head_dim = shape("head_norm")[0]
  if ph != pw or dim % head_dim:
    raise cc.CheckpointError(f"{ckpt.location}: patch {(pt, ph, pw)} / inner dim {dim} / head "
                             f"dim {head_dim} do not form a HunyuanVideo DiT")
  if sum(rope_axes_dim) != head_dim:
    raise cc.CheckpointError(f"{ckpt.location}: cannot infer rope_axes_dim for head dim "
                             f"{head_dim}; pass variant= (a HunyuanConfig) or put the diffusers "
                             "config.json beside the weights")
  guidance_key = prefix + _SHAPE_KEYS["guidance"][col]
  try:
    return HunyuanConfig(
        num_layers=count("double"), num_single_layers=count("single"),
        num_refiner_layers=count("refiner"), num_heads=dim // head_dim, head_dim=head_dim,
        mlp_ratio=shape("mlp")[0] / dim, in_channels=in_ch,
        out_channels=shape("out")[0] // (pt * ph * pw), patch_size=ph, patch_size_t=pt,
        text_dim=shape("text")[1], pooled_projection_dim=shape("pooled")[1],
        guidance_embeds=guidance_key in ckpt.file_of, rope_axes_dim=rope_axes_dim,
        freq_dim=shape("freq")[1])
  except ValueError as err:
    raise cc.CheckpointError(f"{ckpt.location}: tensor shapes give no valid config: {err}") from err


def _variant_config(variant: Variant) -> HunyuanConfig:
  return cc.variant_config(variant, HunyuanConfig)


resolve_variant = cc.resolve_variant


def _abstract_model(cfg: HunyuanConfig, attention: AttentionLike) -> HunyuanVideoTransformer:
  return nnx.eval_shape(lambda: HunyuanVideoTransformer(cfg, attention=attention,
                                                        rngs=nnx.Rngs(0)))


def load_source(location: os.PathLike, *, dtype: Any = jnp.bfloat16, variant: Variant = None,
                attention: AttentionLike = None, progress: bool = True,
                device: Optional[jax.Device] = None) -> HunyuanVideoTransformer:
  """A HunyuanVideo DiT from a local source checkpoint (diffusers or original layout).

  Args:
    location: folder with shards + `*.safetensors.index.json`, or with one
      `.safetensors`, or that file; or a torch pickle (`mp_rank_00_model_states.pt`, needs
      torch) or a folder holding one. A diffusers `config.json` beside it is used when
      present.
    dtype: weight and compute dtype (float32 islands stay float32).
    variant: None (infer), a name of `VARIANTS`, or a `HunyuanConfig` to enforce.
    attention: joint-attention policy (see `AttentionPolicy.coerce`).
    progress: show a progress bar.
    device: where the weights go (default device if None).

  Raises:
    CheckpointError: wrong variant; unknown, missing or mis-shaped key; unreadable file.
  """
  location = Path(location)
  with open_checkpoint(location) as ckpt:
    layout, prefix = detect_layout(ckpt.keys(), location)
    rope = _variant_config(variant).rope_axes_dim if variant is not None else (16, 56, 56)
    found = infer_config(ckpt, layout, prefix, rope_axes_dim=rope)
    cfg = resolve_variant(variant, found, location).with_dtype(parse_dtype(dtype))
    model = _abstract_model(cfg, attention)
    what = f"the {cfg.describe()} ({layout} layout)"
    rules, slices = rules_for(cfg, layout, prefix)
    with SlicedCheckpoint(ckpt, slices, what) as source:
      return cc.load_into(model, source, rules, what=what, progress=progress, device=device)


def _read_marker(folder: Path) -> Optional[Dict[str, Any]]:
  return cc.read_marker(folder, FORMAT, FORMAT_VERSION)


def load_converted(folder: os.PathLike, *, dtype: Any = None, variant: Variant = None,
                   attention: AttentionLike = None,
                   device: Optional[jax.Device] = None) -> HunyuanVideoTransformer:
  """A HunyuanVideo DiT from a folder written by `convert` (dtype None: as stored)."""
  folder = Path(folder)
  marker = _read_marker(folder)
  if marker is None:
    raise cc.CheckpointError(f"{folder}: not a converted HunyuanVideo model (no {MARKER})")
  cfg = cc.stored_config(marker, HunyuanConfig, folder, variant, dtype)
  return cc.restore_params(_abstract_model(cfg, attention), folder / PARAMS_DIR, device=device)


def _source_dir(root: Path) -> Path:
  # A diffusers pipeline folder keeps the DiT in transformer/.
  sub = root / PIPELINE_SUBDIR
  if root.is_dir() and not any(root.glob("*.safetensors*")) and sub.is_dir():
    return sub
  return root


def from_pretrained(path: os.PathLike, *, dtype: Any = None, variant: Variant = None,
                    attention: AttentionLike = None, progress: bool = False,
                    device: Optional[jax.Device] = None,
                    mesh: Optional[jax.sharding.Mesh] = None) -> HunyuanVideoTransformer:
  """A HunyuanVideo DiT from a local folder or file. Nothing is downloaded.

  `path` may be a source checkpoint (diffusers or original layout; safetensors shards, a
  single file, the original `mp_rank_00_model_states.pt`, or a diffusers pipeline folder
  with `transformer/`) or a folder written by `convert` / `svg-ear-convert hunyuan`.

  Args:
    path: local folder or file.
    dtype: weight/compute dtype; None -> as stored for converted folders, bfloat16 for
      source checkpoints.
    variant: None (inferred from config.json or shapes), a name ("t2v-720p") or a
      `HunyuanConfig`; a checkpoint of another architecture is an error.
    attention: joint-attention policy: None / "dense", an `SvgEarConfig`, or an
      `AttentionPolicy` (e.g. with `dense_layers`).
    progress: show a progress bar while converting source weights.
    device: where the weights go (default device if None).
    mesh: a mesh with a "seq" axis (and optionally "data") to run the forward Ulysses
      sequence-parallel over (`set_mesh(mesh)`: the weights loaded as above, then
      replicated on the mesh; see models/parallel.py); None: the single-device model.
  """
  root = Path(path)
  if not root.exists():
    raise cc.CheckpointError(f"{root}: no such file or folder")
  kw = dict(variant=variant, attention=attention, device=device)
  if root.is_dir() and _read_marker(root) is not None:
    return parallel.with_mesh(load_converted(root, dtype=dtype, **kw), mesh)
  dtype = jnp.bfloat16 if dtype is None else dtype
  model = load_source(_source_dir(root), dtype=dtype, progress=progress, **kw)
  return parallel.with_mesh(model, mesh)


def convert(src: os.PathLike, dst: os.PathLike, *, dtype: Any = jnp.bfloat16,
            variant: Variant = None, overwrite: bool = False, progress: bool = True) -> Path:
  """Converts a local source checkpoint to an Orbax folder loadable by `from_pretrained`.

  The output is built in a temporary folder beside `dst` and renamed at the end; on any
  error nothing is left at `dst`. Conversion runs on the host CPU.

  Args:
    src: source checkpoint folder or file (see `from_pretrained`).
    dst: output folder; must not exist unless `overwrite`.
    dtype: weight dtype of the output (float32 islands stay float32).
    variant: as in `from_pretrained`.
    overwrite: replace an existing `dst` (only once the new one is complete).
    progress: show a progress bar.

  Returns:
    `dst` as an absolute path.
  """
  src, dst = Path(src), Path(dst).absolute()
  if not src.exists():
    raise cc.CheckpointError(f"{src}: no such file or folder")
  cpu = jax.local_devices(backend="cpu")[0]
  with cc.atomic_directory(dst, overwrite=overwrite) as tmp:
    model = load_source(_source_dir(src), dtype=dtype, variant=variant, progress=progress,
                        device=cpu)
    cc.write_json(tmp / MARKER, {"format": FORMAT, "version": FORMAT_VERSION,
                                 "config": model.config.to_dict()})
    cc.save_params(model, tmp / PARAMS_DIR)
  return dst
