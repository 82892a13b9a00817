"""Wan2.2 checkpoints -> `WanTransformer`: key tables, variant checks, conversion to Orbax.

Sources are local safetensors checkpoints in either layout:
  * diffusers (`WanTransformer3DModel`): `blocks.0.attn1.to_q.weight`, `proj_out`, ...
  * original Wan2.2 (`WanModel`): `blocks.0.self_attn.q.weight`, `head.head`,
    `time_embedding.0`, ... (optionally under ComfyUI's `model.diffusion_model.` prefix).
The original names are the inverse of diffusers' `convert_wan_transformer_to_diffusers`
(diffusers/loaders/single_file_utils.py), restricted to the Wan2.2 DiT (no image branch).
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
from models.wan.config import WanConfig
from models.wan.transformer import WanTransformer

Layout = Literal["diffusers", "original"]
Variant = Union[None, str, WanConfig]

ORIGINAL_PREFIX = "model.diffusion_model."
MARKER = cc.MARKER
FORMAT = "svg-ear-jax/wan"
FORMAT_VERSION = 1
PARAMS_DIR = "params"
# Subfolders of a two-expert A14B checkpoint, high-noise first.
PAIR_DIRS = {"diffusers": ("transformer", "transformer_2"),
             "original": ("high_noise_model", "low_noise_model")}

parse_dtype = cc.parse_dtype


def key_table(cfg: WanConfig) -> List[Tuple[str, str, cc.Rule]]:
  """(diffusers key, original key, rule) for every tensor of a `cfg` checkpoint."""
  table = []

  def tensor(diffusers, original, target, kind="copy", layer=None):
    table.append((diffusers, original, cc.Rule(tuple(target), kind, layer)))

  def linear(diffusers, original, target, layer=None):
    tensor(f"{diffusers}.weight", f"{original}.weight", (*target, "kernel"), "linear", layer)
    tensor(f"{diffusers}.bias", f"{original}.bias", (*target, "bias"), "copy", layer)

  tensor("patch_embedding.weight", "patch_embedding.weight", ("patch_embedding", "kernel"),
         "conv")
  tensor("patch_embedding.bias", "patch_embedding.bias", ("patch_embedding", "bias"))
  for i in (1, 2):
    linear(f"condition_embedder.time_embedder.linear_{i}", f"time_embedding.{2 * i - 2}",
           ("time_embedder", f"linear_{i}"))
    linear(f"condition_embedder.text_embedder.linear_{i}", f"text_embedding.{2 * i - 2}",
           ("text_embedder", f"linear_{i}"))
  linear("condition_embedder.time_proj", "time_projection.1", ("time_proj",))

  for n in range(cfg.num_layers):
    b = f"blocks.{n}"  # scanned: every block parameter is stacked, layer n at index n
    for attn, orig_attn in (("attn1", "self_attn"), ("attn2", "cross_attn")):
      for proj, orig_proj in (("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "o")):
        linear(f"{b}.{attn}.{proj}", f"{b}.{orig_attn}.{orig_proj}",
               ("blocks", attn, proj.split(".")[0]), n)
      for norm in ("norm_q", "norm_k"):
        tensor(f"{b}.{attn}.{norm}.weight", f"{b}.{orig_attn}.{norm}.weight",
               ("blocks", attn, norm, "scale"), "copy", n)
    if cfg.cross_attn_norm:  # diffusers norm2 is the original norm3.
      tensor(f"{b}.norm2.weight", f"{b}.norm3.weight", ("blocks", "norm2", "scale"), "copy", n)
      tensor(f"{b}.norm2.bias", f"{b}.norm3.bias", ("blocks", "norm2", "bias"), "copy", n)
    linear(f"{b}.ffn.net.0.proj", f"{b}.ffn.0", ("blocks", "ffn", "linear_1"), n)
    linear(f"{b}.ffn.net.2", f"{b}.ffn.2", ("blocks", "ffn", "linear_2"), n)
    tensor(f"{b}.scale_shift_table", f"{b}.modulation", ("blocks", "scale_shift_table"),
           "copy", n)

  linear("proj_out", "head.head", ("proj_out",))
  tensor("scale_shift_table", "head.modulation", ("scale_shift_table",))
  return table


def rules_for(cfg: WanConfig, layout: Layout, prefix: str = "") -> Dict[str, cc.Rule]:
  """Source key -> Rule in the given layout."""
  col = 0 if layout == "diffusers" else 1
  return {prefix + row[col]: row[2] for row in key_table(cfg)}


def detect_layout(keys: List[str], location: Path) -> Tuple[Layout, str]:
  """(layout, key prefix) of a checkpoint from its key names."""
  prefix = ORIGINAL_PREFIX if keys and all(k.startswith(ORIGINAL_PREFIX) for k in keys) else ""
  names = {k[len(prefix):] for k in keys}
  if any(k.startswith("condition_embedder.") or ".attn1." in k for k in names):
    return "diffusers", prefix
  if any(k.startswith(("time_embedding.", "head.")) or ".self_attn." in k for k in names):
    return "original", prefix
  raise cc.CheckpointError(f"{location}: neither a diffusers nor an original Wan checkpoint "
                           f"(keys such as {sorted(names)[:3]})")


def _config_json_dir(location: Path) -> Path:
  return location.parent if location.is_file() else location


def infer_config(ckpt: cc.SafetensorsCheckpoint, layout: Layout, prefix: str, *,
                 head_dim: int = 128) -> WanConfig:
  """The architecture from config.json beside the weights, else from tensor shapes (which
  do not give the head count: `head_dim` is assumed)."""
  raw = cc.read_json(_config_json_dir(ckpt.location) / "config.json")
  if raw is not None:
    try:
      if raw.get("_class_name") == "WanModel" or "dim" in raw:
        return WanConfig.from_original_config(raw)
      return WanConfig.from_diffusers_config(raw)
    except (TypeError, ValueError) as err:
      raise cc.CheckpointError(f"{ckpt.location}/config.json: {err}") from err
  return _config_from_shapes(ckpt, layout, prefix, head_dim)


def _config_from_shapes(ckpt, layout: Layout, prefix: str, head_dim: int) -> WanConfig:
  names = {
      "diffusers": ("proj_out", "blocks.0.ffn.net.0.proj",
                    "condition_embedder.text_embedder.linear_1",
                    "condition_embedder.time_embedder.linear_1", "blocks.0.norm2.weight"),
      "original": ("head.head", "blocks.0.ffn.0", "text_embedding.0", "time_embedding.0",
                   "blocks.0.norm3.weight"),
  }[layout]
  head, ffn, text, time, cross_norm = (prefix + n for n in names)

  def shape(key):
    if key not in ckpt.file_of:
      raise cc.CheckpointError(f"missing key '{key}' in checkpoint {ckpt.location} (needed to "
                               "infer the architecture; or pass variant=)")
    return ckpt.shape(key)

  dim, in_ch, *patch = shape(prefix + "patch_embedding.weight")
  out_features = shape(head + ".weight")[0]
  patch_volume = patch[0] * patch[1] * patch[2]
  blocks = {int(k[len(prefix):].split(".")[1]) for k in ckpt.keys()
            if k[len(prefix):].startswith("blocks.")}
  if dim % head_dim:
    raise cc.CheckpointError(f"{ckpt.location}: inner dim {dim} is not a multiple of the head "
                             f"dim {head_dim}; pass variant= (a WanConfig) to give the heads")
  return WanConfig(
      num_layers=len(blocks), num_heads=dim // head_dim, head_dim=head_dim,
      ffn_dim=shape(ffn + ".weight")[0], in_channels=in_ch,
      out_channels=out_features // patch_volume, text_dim=shape(text + ".weight")[1],
      freq_dim=shape(time + ".weight")[1], patch_size=tuple(patch),
      cross_attn_norm=cross_norm in ckpt.file_of,
      model_type="i2v" if in_ch == 2 * (out_features // patch_volume) + 4 else (
          "ti2v" if in_ch == 48 else "t2v"))


def _variant_config(variant: Variant) -> WanConfig:
  return cc.variant_config(variant, WanConfig)


resolve_variant = cc.resolve_variant


def _abstract_model(cfg: WanConfig, attention: AttentionLike) -> WanTransformer:
  return nnx.eval_shape(lambda: WanTransformer(cfg, attention=attention, rngs=nnx.Rngs(0)))


def load_source(location: os.PathLike, *, dtype: Any = jnp.bfloat16, variant: Variant = None,
                attention: AttentionLike = None, progress: bool = True,
                device: Optional[jax.Device] = None) -> WanTransformer:
  """One Wan DiT from a local safetensors checkpoint (diffusers or original layout).

  Args:
    location: folder with shards + `*.safetensors.index.json`, or with one
      `.safetensors`, or that file; a `config.json` beside it is used when present.
    dtype: weight and compute dtype (float32 islands stay float32).
    variant: None (infer), a name of `VARIANTS`, or a `WanConfig` to enforce.
    attention: self-attention policy (see `AttentionPolicy.coerce`).
    progress: show a progress bar.
    device: where the weights go (default device if None).

  Raises:
    CheckpointError: wrong variant; unknown, missing or mis-shaped key; unreadable file.
  """
  location = Path(location)
  with cc.SafetensorsCheckpoint(location) as ckpt:
    layout, prefix = detect_layout(ckpt.keys(), location)
    head_dim = _variant_config(variant).head_dim if variant is not None else 128
    found = infer_config(ckpt, layout, prefix, head_dim=head_dim)
    cfg = resolve_variant(variant, found, location)
    cfg = cfg.with_dtype(parse_dtype(dtype))
    model = _abstract_model(cfg, attention)
    what = f"the {cfg.describe()} ({layout} layout)"
    return cc.load_into(model, ckpt, rules_for(cfg, layout, prefix), what=what,
                        progress=progress, device=device)


def _write_converted(model: WanTransformer, folder: Path) -> None:
  folder.mkdir(parents=True, exist_ok=True)
  cc.write_json(folder / MARKER, {"format": FORMAT, "version": FORMAT_VERSION, "kind": "single",
                                  "config": model.config.to_dict()})
  cc.save_params(model, folder / PARAMS_DIR)


def _read_marker(folder: Path) -> Optional[Dict[str, Any]]:
  return cc.read_marker(folder, FORMAT, FORMAT_VERSION)


def load_converted(folder: os.PathLike, *, dtype: Any = None, variant: Variant = None,
                   attention: AttentionLike = None,
                   device: Optional[jax.Device] = None) -> WanTransformer:
  """One Wan DiT from a folder written by `convert` (dtype None: as stored)."""
  folder = Path(folder)
  marker = _read_marker(folder)
  if marker is None or marker.get("kind") != "single":
    raise cc.CheckpointError(f"{folder}: not a converted single Wan model (no {MARKER})")
  cfg = cc.stored_config(marker, WanConfig, folder, variant, dtype)
  return cc.restore_params(_abstract_model(cfg, attention), folder / PARAMS_DIR, device=device)


def _boundary_ratio(root: Path, cfg: WanConfig) -> float:
  index = cc.read_json(root / "model_index.json") or {}
  if index.get("boundary_ratio") is not None:
    return float(index["boundary_ratio"])
  if cfg.boundary_ratio is not None:
    return cfg.boundary_ratio
  return 0.9 if cfg.model_type == "i2v" else 0.875


def _pair_dirs(root: Path) -> Optional[Tuple[Path, Path]]:
  for high, low in PAIR_DIRS.values():
    if (root / high).is_dir() and (root / low).is_dir():
      return root / high, root / low
  return None


def _single_source_dir(root: Path) -> Path:
  # A diffusers pipeline folder (e.g. TI2V-5B) keeps its only DiT in transformer/.
  sub = root / PAIR_DIRS["diffusers"][0]
  if root.is_dir() and not any(root.glob("*.safetensors*")) and sub.is_dir():
    return sub
  return root


def from_pretrained(path: os.PathLike, *, dtype: Any = None, variant: Variant = None,
                    attention: AttentionLike = None, progress: bool = False,
                    device: Optional[jax.Device] = None,
                    mesh: Optional[jax.sharding.Mesh] = None):
  """A Wan2.2 DiT, or the two-expert A14B pair, from a local folder.

  `path` may be a source checkpoint (diffusers or original layout; for A14B a folder with
  `transformer/` + `transformer_2/` or `high_noise_model/` + `low_noise_model/`) or a folder
  written by `convert` / `svg-ear-convert wan`. Nothing is downloaded.

  Args:
    path: local folder (or a single .safetensors file).
    dtype: weight/compute dtype; None -> as stored for converted folders, bfloat16 for
      source checkpoints.
    variant: None (inferred from config.json or shapes), a name ("t2v-a14b", "i2v-a14b",
      "ti2v-5b") or a `WanConfig`; a checkpoint of another architecture is an error.
    attention: self-attention policy: None / "dense", an `SvgEarConfig`, or an
      `AttentionPolicy` (e.g. with `dense_layers`).
    progress: show a progress bar while converting source weights.
    device: where the weights go (default device if None).
    mesh: a mesh with a "seq" axis (and optionally "data") to run the forward Ulysses
      sequence-parallel over (`set_mesh(mesh)`: the weights loaded as above, then
      replicated on the mesh; see models/parallel.py); None: the single-device model.

  Returns:
    `WanTransformer`, or `WanExpertPair` for a two-expert folder.
  """
  from models.wan.experts import WanExpertPair

  root = Path(path)
  if not root.exists():
    raise cc.CheckpointError(f"{root}: no such file or folder")
  kw = dict(variant=variant, attention=attention, device=device)
  marker = _read_marker(root) if root.is_dir() else None
  if marker is not None:
    if marker.get("kind") == "pair":
      high_dir, low_dir = (root / marker["experts"][k] for k in ("high_noise", "low_noise"))
      high = load_converted(high_dir, dtype=dtype, **kw)
      low = load_converted(low_dir, dtype=dtype, **kw)
      return parallel.with_mesh(WanExpertPair(high, low, float(marker["boundary_ratio"])), mesh)
    return parallel.with_mesh(load_converted(root, dtype=dtype, **kw), mesh)
  dtype = jnp.bfloat16 if dtype is None else dtype
  pair = _pair_dirs(root) if root.is_dir() else None
  if pair is not None:
    high = load_source(pair[0], dtype=dtype, progress=progress, **kw)
    low = load_source(pair[1], dtype=dtype, progress=progress, **kw)
    return parallel.with_mesh(WanExpertPair(high, low, _boundary_ratio(root, high.config)), mesh)
  model = load_source(_single_source_dir(root), dtype=dtype, progress=progress, **kw)
  return parallel.with_mesh(model, mesh)


def convert(src: os.PathLike, dst: os.PathLike, *, dtype: Any = jnp.bfloat16,
            variant: Variant = None, overwrite: bool = False, progress: bool = True) -> Path:
  """Converts a local source checkpoint (single model or A14B pair) to an Orbax folder.

  The output is built in a temporary folder beside `dst` and renamed at the end; on any
  error nothing is left at `dst`. Conversion runs on the host CPU.

  Args:
    src: source checkpoint folder (see `from_pretrained`).
    dst: output folder; must not exist unless `overwrite`.
    dtype: weight dtype of the output (float32 islands stay float32).
    variant: as in `from_pretrained`.
    overwrite: replace an existing `dst` (only once the new one is complete).
    progress: show progress bars.

  Returns:
    `dst` as an absolute path.
  """
  src, dst = Path(src), Path(dst).absolute()
  if not src.exists():
    raise cc.CheckpointError(f"{src}: no such file or folder")
  cpu = jax.local_devices(backend="cpu")[0]
  kw = dict(dtype=dtype, variant=variant, progress=progress, device=cpu)
  pair = _pair_dirs(src) if src.is_dir() else None
  with cc.atomic_directory(dst, overwrite=overwrite) as tmp:
    if pair is None:
      _write_converted(load_source(_single_source_dir(src), **kw), tmp)
    else:
      names = PAIR_DIRS["diffusers"]
      high = load_source(pair[0], **kw)
      _write_converted(high, tmp / names[0])
      ratio = _boundary_ratio(src, high.config)
      del high
      _write_converted(load_source(pair[1], **kw), tmp / names[1])
      cc.write_json(tmp / MARKER, {
          "format": FORMAT, "version": FORMAT_VERSION, "kind": "pair", "boundary_ratio": ratio,
          "experts": {"high_noise": names[0], "low_noise": names[1]}})
  return dst
