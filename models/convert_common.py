"""PyTorch checkpoints -> flax.nnx models and Orbax checkpoints (model-agnostic).

Sources are local safetensors files (`SafetensorsCheckpoint`) or torch pickles
(`TorchPickleCheckpoint`: `.pth` / `.pt` state dicts, memory-mapped, read with torch only
then; `TorchMissingError` without it); both offer the same header-then-stream interface.
Converted folders are a marker (`MARKER`: format, version, config) plus the parameters as
an Orbax checkpoint (`write_converted`, `convert_component` / `convert_source`,
`restore_params`).

A model port supplies a table `{source key: Rule}` built from its config; this module
opens the local checkpoint (one file or index-listed shards), checks the table against the
file headers before reading any data (unknown, missing and mis-shaped keys are errors
naming the key and its file), then streams tensor by tensor into an abstract
(`nnx.eval_shape`) model. Weights of scanned layers are written slice by slice into one
`[num_layers, ...]` host buffer per parameter, handed to the device once complete, so the
host never holds a second copy of the model. Outputs are written to a temporary sibling
folder and renamed into place at the end: nothing is left behind on failure.
"""

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Literal, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Path_ = Tuple[Any, ...]  # an nnx state path, e.g. ("blocks", "attn1", "to_q", "kernel")
Kind = Literal["linear", "conv", "copy"]

INDEX_SUFFIX = ".safetensors.index.json"


class CheckpointError(ValueError):
  """A checkpoint that does not fit the model: the message names the key and the file."""


@dataclasses.dataclass(frozen=True)
class Rule:
  """Where one source tensor goes.

  Attributes:
    target: nnx path of the parameter.
    kind: "linear" (torch (out, in) -> kernel (in, out)), "conv" (torch (O, I, *k) ->
      (*k, I, O)) or "copy".
    layer: index on the leading axis of a scanned (stacked) parameter, None if unstacked.
  """

  target: Path_
  kind: Kind = "copy"
  layer: Optional[int] = None


def to_flax(kind: Kind, tensor: np.ndarray) -> np.ndarray:
  """Applies a rule's layout change to a torch-layout tensor (a view, no copy)."""
  if kind == "linear":
    return tensor.T
  if kind == "conv":
    return tensor.transpose(*range(2, tensor.ndim), 1, 0)
  return tensor


def to_torch(kind: Kind, array: np.ndarray) -> np.ndarray:
  """The inverse of `to_flax`: a flax-layout array in the rule's torch layout (a view)."""
  if kind == "linear":
    return array.T
  if kind == "conv":
    return array.transpose(array.ndim - 1, array.ndim - 2, *range(array.ndim - 2))
  return array


def source_shape(kind: Kind, flax_shape: Tuple[int, ...]) -> Tuple[int, ...]:
  """The torch-layout shape that `to_flax(kind, .)` turns into `flax_shape`."""
  if kind == "linear":
    return tuple(reversed(flax_shape))
  if kind == "conv":
    return (flax_shape[-1], flax_shape[-2], *flax_shape[:-2])
  return tuple(flax_shape)


def path_str(path: Path_) -> str:
  return ".".join(str(p) for p in path)


class SafetensorsCheckpoint:
  """A local safetensors checkpoint: a folder with shards listed by a `*.safetensors.index.json`
  weight map, a folder with a single `*.safetensors`, or a file path.

  Opening validates every file header (a truncated or corrupt file is a `CheckpointError`
  naming it) and reads no tensor data; `read` streams one tensor.
  """

  def __init__(self, location: os.PathLike):
    self.location = Path(location)
    self._stack = contextlib.ExitStack()
    self._handles: Dict[Path, Any] = {}
    self.file_of: Dict[str, Path] = {}
    try:
      self._open()
    except BaseException:
      self.close()
      raise

  def _open(self):
    loc = self.location
    if loc.is_file():
      files = {loc: None}
    elif loc.is_dir():
      indexes = sorted(loc.glob("*" + INDEX_SUFFIX))
      singles = sorted(p for p in loc.glob("*.safetensors") if p.is_file())
      if len(indexes) > 1:
        raise CheckpointError(f"{loc}: several safetensors indexes {[p.name for p in indexes]}")
      if indexes:
        files = self._files_from_index(indexes[0])
      elif len(singles) == 1:
        files = {singles[0]: None}
      elif singles:
        raise CheckpointError(f"{loc}: several .safetensors files {[p.name for p in singles]} "
                              f"and no {INDEX_SUFFIX} listing them")
      else:
        raise CheckpointError(f"{loc}: no .safetensors file")
    else:
      raise CheckpointError(f"{loc}: no such file or folder")

    for path, listed in files.items():
      handle = self._open_file(path)
      keys = list(handle.keys())
      for key in keys:
        if listed is not None and key not in listed:
          raise CheckpointError(f"unexpected key '{key}' in file {path}: the index does not "
                                "list it there")
        if key in self.file_of:
          raise CheckpointError(f"key '{key}' is stored twice: in {self.file_of[key]} and {path}")
        self.file_of[key] = path
      if listed is not None:
        absent = sorted(set(listed) - set(keys))
        if absent:
          raise CheckpointError(f"missing key '{absent[0]}': the index lists it in file {path}, "
                                f"which does not hold it ({len(absent)} such keys)")

  def _files_from_index(self, index: Path) -> Dict[Path, List[str]]:
    try:
      weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as err:
      raise CheckpointError(f"cannot read the weight map of index {index}: {err}") from err
    files: Dict[Path, List[str]] = {}
    for key, name in weight_map.items():
      files.setdefault(index.parent / name, []).append(key)
    for path in files:
      if not path.is_file():
        raise CheckpointError(f"index {index} lists file {path.name}, which does not exist")
    return files

  def _open_file(self, path: Path):
    from safetensors import safe_open

    try:
      # "flax" rather than "numpy": NumPy has no bfloat16.
      handle = self._stack.enter_context(safe_open(str(path), framework="flax"))
    except Exception as err:  # SafetensorError is not importable by a stable name.
      raise CheckpointError(f"cannot read safetensors file {path} (truncated or corrupt?): "
                            f"{err}") from err
    self._handles[path] = handle
    return handle

  def keys(self) -> List[str]:
    return list(self.file_of)

  def shape(self, key: str) -> Tuple[int, ...]:
    return tuple(self._handles[self.file_of[key]].get_slice(key).get_shape())

  def dtype(self, key: str) -> str:
    return self._handles[self.file_of[key]].get_slice(key).get_dtype()

  def read(self, key: str) -> np.ndarray:
    """One tensor as a host NumPy array (bfloat16 via ml_dtypes)."""
    path = self.file_of[key]
    try:
      with jax.default_device(jax.local_devices(backend="cpu")[0]):
        return np.asarray(self._handles[path].get_tensor(key))
    except Exception as err:
      raise CheckpointError(f"cannot read key '{key}' from file {path}: {err}") from err

  def close(self) -> None:
    self._stack.close()

  def __enter__(self) -> "SafetensorsCheckpoint":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")


def check_keys(ckpt: SafetensorsCheckpoint, rules: Mapping[str, Rule],
               flax_shapes: Mapping[Path_, Tuple[int, ...]], what: str) -> None:
  """Checks the checkpoint against the rule table from headers alone.

  Args:
    ckpt: the opened checkpoint.
    rules: every source key the model expects.
    flax_shapes: shape of each target parameter (stacked ones include the layer axis).
    what: model description for messages.

  Raises:
    CheckpointError: on an unknown, missing, mis-shaped or non-float key.
  """
  present = ckpt.keys()
  unknown = [k for k in present if k not in rules]
  if unknown:
    raise CheckpointError(
        f"unknown key '{unknown[0]}' in file {ckpt.file_of[unknown[0]]}: not a parameter of "
        f"{what} ({len(unknown)} unknown keys: {unknown[:5]}{'...' if len(unknown) > 5 else ''})")
  missing = [k for k in rules if k not in ckpt.file_of]
  if missing:
    raise CheckpointError(
        f"missing key '{missing[0]}': {what} needs it but no file of checkpoint "
        f"{ckpt.location} holds it ({len(missing)} missing keys)")
  for key, rule in rules.items():
    shape = flax_shapes[rule.target]
    if rule.layer is not None:
      shape = shape[1:]
    expected = source_shape(rule.kind, shape)
    got = ckpt.shape(key)
    if got != expected:
      raise CheckpointError(f"key '{key}' in file {ckpt.file_of[key]} has shape {got}, but "
                            f"{what} expects {expected}")
    if ckpt.dtype(key) not in _FLOAT_DTYPES:
      raise CheckpointError(f"key '{key}' in file {ckpt.file_of[key]} has dtype "
                            f"{ckpt.dtype(key)}, expected a float type")


def param_variables(model: nnx.Module) -> Dict[Path_, nnx.Param]:
  """Every `nnx.Param` of a model by path (the model's own variables: setting their value
  updates the model)."""
  return {tuple(path): var for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def param_shapes(model: nnx.Module) -> Dict[Path_, jax.ShapeDtypeStruct]:
  """Shape and dtype of every `nnx.Param` of a (possibly abstract) model, by path."""
  out = {}
  for path, var in param_variables(model).items():
    value = var.get_value()
    out[path] = jax.ShapeDtypeStruct(value.shape, value.dtype)
  return out


def load_into(model: nnx.Module, ckpt: SafetensorsCheckpoint, rules: Mapping[str, Rule], *,
              what: str, progress: bool = True,
              device: Optional[jax.Device] = None) -> nnx.Module:
  """Fills an abstract model (`nnx.eval_shape`) from a checkpoint, in place.

  Every rule target must be a parameter of the model and every parameter a target; each
  tensor is cast to its parameter's dtype (the model decides what stays float32).

  Args:
    model: module whose `nnx.Param`s are `ShapeDtypeStruct`s.
    ckpt: opened source checkpoint.
    rules: source key -> Rule, covering all the checkpoint's keys.
    what: model description for error messages.
    progress: show a tqdm bar.
    device: where parameters go (default: the default device).

  Returns:
    `model`, now holding arrays.
  """
  from tqdm import tqdm

  shapes = param_shapes(model)
  targets = {r.target for r in rules.values()}
  if targets != set(shapes):
    stray = sorted(map(path_str, targets - set(shapes)))
    unfilled = sorted(map(path_str, set(shapes) - targets))
    raise CheckpointError(f"conversion table and {what} disagree: targets without a "
                          f"parameter {stray[:5]}, parameters without a source {unfilled[:5]}")
  check_keys(ckpt, rules, {p: s.shape for p, s in shapes.items()}, what)

  by_target: Dict[Path_, List[Tuple[str, Rule]]] = {}
  for key, rule in rules.items():
    by_target.setdefault(rule.target, []).append((key, rule))
  variables = param_variables(model)
  device = device or jax.devices()[0]
  bar = tqdm(total=len(rules), desc=f"converting {ckpt.location.name}", unit="tensor",
             disable=not progress)
  with bar:
    for target, sources in by_target.items():
      spec = shapes[target]
      stacked = sources[0][1].layer is not None
      if stacked:
        buf = np.empty(spec.shape, spec.dtype)
        seen = set()
        for key, rule in sources:
          buf[rule.layer] = to_flax(rule.kind, ckpt.read(key)).astype(spec.dtype)
          seen.add(rule.layer)
          bar.update()
        if seen != set(range(spec.shape[0])):
          raise CheckpointError(f"{what}: parameter {path_str(target)} got layers "
                                f"{sorted(seen)} of {spec.shape[0]}")
      else:
        (key, rule), = sources
        buf = to_flax(rule.kind, ckpt.read(key)).astype(spec.dtype)
        bar.update()
      variables[target].set_value(jax.device_put(buf, device))
      del buf
  return model


@contextlib.contextmanager
def atomic_directory(dst: os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
  """Yields an empty temporary folder beside `dst`, renamed to `dst` if the block succeeds.

  On any exception the temporary folder is removed and `dst` is untouched.

  Raises:
    FileExistsError: `dst` exists and `overwrite` is False.
  """
  dst = Path(dst).absolute()
  if dst.exists() and not overwrite:
    raise FileExistsError(f"{dst} already exists (pass overwrite=True / --overwrite)")
  dst.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
  try:
    yield tmp
    if dst.exists():
      old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
      os.replace(dst, old / dst.name)
      os.replace(tmp, dst)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.replace(tmp, dst)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def _str_keys(tree: Any) -> Any:
  # Orbax names leaves by their dict keys; nnx uses ints for list indices.
  if isinstance(tree, Mapping):
    return {str(k): _str_keys(v) for k, v in tree.items()}
  return tree


def save_params(model: nnx.Module, directory: os.PathLike) -> None:
  """Writes the model's `nnx.Param`s to a new Orbax checkpoint folder `directory`."""
  import orbax.checkpoint as ocp

  tree = _str_keys(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(Path(directory).absolute(), tree)
  checkpointer.wait_until_finished()
  checkpointer.close()


def restore_params(model: nnx.Module, directory: os.PathLike, *,
                   device: Optional[jax.Device] = None, partial: bool = False) -> nnx.Module:
  """Fills an abstract model's `nnx.Param`s from `save_params` output, casting each to
  the parameter's dtype; shapes and names must match exactly, except that with `partial`
  the model may hold a subset of the stored parameters (e.g. a prefix of the layers): the
  others are not read."""
  import orbax.checkpoint as ocp

  directory = Path(directory).absolute()
  device = device or jax.devices()[0]
  sharding = jax.sharding.SingleDeviceSharding(device)
  checkpointer = ocp.StandardCheckpointer()
  try:
    stored = checkpointer.metadata(directory).item_metadata.tree
  except Exception as err:
    raise CheckpointError(f"cannot read the Orbax checkpoint {directory}: {err}") from err
  shapes = param_shapes(model)
  stored_flat = {tuple(str(k) for k in path): leaf for path, leaf in _flatten(stored)}
  wanted = {tuple(str(k) for k in path): path for path in shapes}
  extra = sorted(".".join(p) for p in set(stored_flat) - set(wanted))
  absent = sorted(".".join(p) for p in set(wanted) - set(stored_flat))
  if absent or (extra and not partial):
    raise CheckpointError(f"Orbax checkpoint {directory} does not match the model: unexpected "
                          f"{extra[:5]}, missing {absent[:5]}")
  abstract = {}
  for key in wanted:
    leaf, want = stored_flat[key], shapes[wanted[key]]
    if tuple(leaf.shape) != want.shape:
      raise CheckpointError(f"parameter {'.'.join(key)} in {directory} has shape "
                            f"{tuple(leaf.shape)}, the model expects {want.shape}")
    abstract[key] = jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)
  if extra:  # StandardCheckpointer restores whole trees only
    checkpointer.close()
    checkpointer = ocp.PyTreeCheckpointer()
    target = _unflatten(abstract)
    restored = checkpointer.restore(directory, args=ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True))
  else:
    restored = checkpointer.restore(directory, _unflatten(abstract))
  checkpointer.close()
  variables = param_variables(model)
  for key, value in _flatten(restored):
    path = wanted[tuple(key)]
    variables[path].set_value(value.astype(shapes[path].dtype))
  return model


def _flatten(tree: Any, prefix: Tuple[str, ...] = ()) -> Iterator[Tuple[Tuple[str, ...], Any]]:
  if isinstance(tree, Mapping):
    for k, v in tree.items():
      yield from _flatten(v, prefix + (str(k),))
  else:
    yield prefix, tree


def _unflatten(flat: Mapping[Tuple[str, ...], Any]) -> Dict[str, Any]:
  out: Dict[str, Any] = {}
  for path, value in flat.items():
    node = out
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = value
  return out


def read_json(path: os.PathLike) -> Optional[Dict[str, Any]]:
  """A JSON file as a dict, None if absent; a malformed file is a `CheckpointError`."""
  path = Path(path)
  if not path.is_file():
    return None
  try:
    data = json.loads(path.read_text())
  except (OSError, ValueError) as err:
    raise CheckpointError(f"cannot parse {path}: {err}") from err
  if not isinstance(data, dict):
    raise CheckpointError(f"{path}: expected a JSON object")
  return data


def write_json(path: os.PathLike, data: Mapping[str, Any]) -> None:
  Path(path).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")



MARKER = "svg_ear_jax.json"  # marks a converted (Orbax) folder

_DTYPES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp32": "float32", "float32": "float32",
           "f32": "float32", "fp16": "float16", "float16": "float16", "f16": "float16"}


def parse_dtype(dtype: Any) -> np.dtype:
  """"bf16" / "fp32" / "fp16" (or long names, or a dtype) -> a JAX dtype."""
  if isinstance(dtype, str):
    if dtype.lower() not in _DTYPES:
      raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)}")
    return jnp.dtype(_DTYPES[dtype.lower()])
  return jnp.dtype(dtype)


def read_marker(folder: Path, fmt: str, version: int) -> Optional[Dict[str, Any]]:
  """The converted-folder marker of `folder` (None if absent); another format or version is
  a `CheckpointError`."""
  marker = read_json(folder / MARKER)
  if marker is not None and (marker.get("format") != fmt or marker.get("version") != version):
    raise CheckpointError(f"{folder / MARKER}: not a version-{version} {fmt} checkpoint "
                          f"({marker.get('format')} v{marker.get('version')})")
  return marker


def check_variant(found: Any, wanted: Any, name: str, location: Path) -> None:
  """Raises "wrong variant" naming the fields where config `found` (from the checkpoint)
  differs from `wanted`; both have `architecture()` and `describe()`."""
  got, want = found.architecture(), wanted.architecture()
  diffs = [f"{k}: {got[k]} in the checkpoint, {want[k]} requested" for k in want
           if got[k] != want[k]]
  if diffs:
    raise CheckpointError(f"wrong variant: {location} holds a {found.describe()}, not the "
                          f"requested {name} ({'; '.join(diffs)})")


def variant_config(variant: Any, config_cls: type) -> Any:
  """The config a `variant` argument names: a name of `config_cls.variants()` or an instance."""
  variants = config_cls.variants()
  if isinstance(variant, str):
    if variant not in variants:
      raise ValueError(f"unknown {config_cls.FAMILY} variant {variant!r}; known: "
                       f"{sorted(variants)}")
    return variants[variant]()
  if isinstance(variant, config_cls):
    return variant
  raise TypeError(f"variant must be None, a name or a {config_cls.__name__}, got {variant!r}")


def resolve_variant(variant: Any, found: Any, location: Path) -> Any:
  """The config to build: `found` (variant=None) or the requested one, which must match.

  Raises:
    CheckpointError: "wrong variant", naming the differing fields.
  """
  if variant is None:
    return found
  wanted = variant_config(variant, type(found))
  name = variant if isinstance(variant, str) else wanted.variant_name() or "custom"
  check_variant(found, wanted, name, location)
  return wanted


def stored_config(marker: Dict[str, Any], config_cls: type, folder: Path, variant: Any,
                  dtype: Any) -> Any:
  """The config of a converted folder from its marker, checked against `variant`, in
  `dtype` (None: the stored dtypes)."""
  try:
    stored = config_cls.from_dict(marker["config"])
  except (KeyError, TypeError, ValueError) as err:
    raise CheckpointError(f"{folder / MARKER}: bad config: {err}") from err
  cfg = resolve_variant(variant, stored, folder)
  if dtype is not None:
    return cfg.with_dtype(parse_dtype(dtype))
  return cfg.replace(**stored.dtypes())


def converted_config(folder: os.PathLike, fmt: str, version: int, config_cls: type,
                     variant: Any = None, dtype: Any = None) -> Tuple[Path, Any]:
  """(folder, config) of a folder `convert` wrote in format `fmt`: `stored_config` of its
  marker; CheckpointError naming `config_cls.FAMILY` when it has none."""
  folder = Path(folder)
  marker = read_marker(folder, fmt, version)
  if marker is None:
    raise CheckpointError(f"{folder}: not a converted {config_cls.FAMILY} (no {MARKER})")
  return folder, stored_config(marker, config_cls, folder, variant, dtype)


def component_folder(location: Path, name: str) -> Path:
  """`location` itself, or its `name/` subfolder (e.g. "vae") when given a pipeline folder
  (one with neither a config.json nor safetensors of its own)."""
  if (location.is_dir() and not (location / "config.json").is_file()
      and not any(location.glob("*.safetensors")) and (location / name).is_dir()):
    return location / name
  return location


def read_component_config(location: os.PathLike, name: str, parse: Callable[[Dict], Any]):
  """`parse` of the config.json of component `name` (e.g. "vae"): `location` is its folder,
  a pipeline folder holding `name/`, or a safetensors file in the component folder.

  Raises:
    CheckpointError: no config.json, or `parse` rejects it (TypeError / ValueError).
  """
  location = Path(location)
  folder = location.parent if location.is_file() else component_folder(location, name)
  raw = read_json(folder / "config.json")
  if raw is None:
    raise CheckpointError(f"{folder}: no config.json (pass config= to give the "
                          "architecture)")
  try:
    return parse(raw)
  except (TypeError, ValueError) as err:
    raise CheckpointError(f"{folder / 'config.json'}: {err}") from err


def stream_params(model: nnx.Module, ckpt: "SafetensorsCheckpoint", rules: Dict[str, Rule],
                  keys, *, device: Optional[jax.Device] = None, progress: bool = False,
                  reshape: bool = False) -> None:
  """Reads `keys` of an open checkpoint one tensor at a time into `model`'s (abstract)
  parameters through their `rules` (after `check_keys`); `reshape` to the parameter's shape
  where the rule's layout change leaves a different one."""
  from tqdm import tqdm

  specs = param_shapes(model)
  variables = param_variables(model)
  device = device or jax.devices()[0]
  for key in tqdm(keys, desc=f"loading {ckpt.location.name}", unit="tensor",
                  disable=not progress):
    rule = rules[key]
    spec = specs[rule.target]
    value = to_flax(rule.kind, ckpt.read(key))
    if reshape:
      value = value.reshape(spec.shape)
    variables[rule.target].set_value(jax.device_put(value.astype(spec.dtype), device))


# --- torch pickles, converted components ------------------------------------------------------

PICKLE_SUFFIXES = (".pth", ".pt")
_PICKLE_WRAPPERS = ("model", "module", "state_dict")  # as diffusers' conversion scripts


class TorchMissingError(CheckpointError, ImportError):
  """Reading a torch pickle without torch installed (a `CheckpointError` and an
  `ImportError`)."""


def import_torch(location: os.PathLike):
  """The `torch` module, or a `TorchMissingError` naming the pickle that needs it."""
  try:
    import torch
  except ImportError as err:
    raise TorchMissingError(
        f"{location} is a torch pickle: reading it needs PyTorch, which is not installed. "
        "Install torch (CPU build is enough), or convert the file on a machine with torch "
        "(svg-ear-convert) and use the converted folder here") from err
  return torch


class TorchPickleCheckpoint:
  """A local torch pickle state dict (`torch.save`), read through the same interface as
  `SafetensorsCheckpoint` (`location`, `file_of`, `keys`, `shape`, `dtype`, `read`).

  Loaded with `weights_only=True` and memory-mapped when the file is in torch's zip format
  (legacy pickles are read whole), so tensors are copied one at a time on `read`. Wrappers
  ("model", "module", "state_dict") holding the state dict are unwrapped; any other value
  that is not a tensor is an error. Needs torch (`TorchMissingError` without it).
  A reader with other rules overrides `_import_torch`, `_load` or `_unwrap` (e.g.
  `models.hunyuan.sources.TorchCheckpoint`).
  """

  def __init__(self, location: os.PathLike):
    self.location = Path(location)
    torch = self._import_torch()
    self._torch = torch
    state = self._unwrap(self._load(torch))
    if not isinstance(state, Mapping):
      raise CheckpointError(f"{self.location}: not a state dict ({type(state).__name__})")
    for key, value in state.items():
      if not isinstance(value, torch.Tensor):
        raise CheckpointError(f"key '{key}' in file {self.location} is a "
                              f"{type(value).__name__}, not a tensor")
    self._tensors = dict(state)
    self.file_of = {key: self.location for key in self._tensors}

  def _import_torch(self):
    return import_torch(self.location)

  @staticmethod
  def _unwrap(state: Any) -> Any:
    for wrapper in _PICKLE_WRAPPERS:
      if isinstance(state, Mapping) and isinstance(state.get(wrapper), Mapping):
        state = state[wrapper]
    return state

  def _load(self, torch):
    if not self.location.is_file():
      raise CheckpointError(f"{self.location}: no such file")
    kw = dict(map_location="cpu", weights_only=True)
    try:
      return torch.load(str(self.location), mmap=True, **kw)
    except Exception as err:  # legacy (non-zip) pickles cannot be memory-mapped
      first = err
    try:
      return torch.load(str(self.location), **kw)
    except Exception as err:  # pickle, zip and unpickling errors alike
      raise CheckpointError(f"cannot read torch checkpoint {self.location} (truncated or "
                            f"corrupt?): {err} (memory-mapped: {first})") from err

  def keys(self) -> List[str]:
    return list(self._tensors)

  def shape(self, key: str) -> Tuple[int, ...]:
    return tuple(self._tensors[key].shape)

  def dtype(self, key: str) -> str:
    """The safetensors name of the dtype (others keep torch's name, which `check_keys`
    rejects)."""
    torch = self._torch
    names = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16",
             torch.bfloat16: "BF16"}
    dtype = self._tensors[key].dtype
    return names.get(dtype, str(dtype))

  def read(self, key: str) -> np.ndarray:
    """One tensor as a host NumPy array (bfloat16 via ml_dtypes)."""
    return self._numpy(key, self._tensors[key])

  def read_rows(self, key: str, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of one tensor (axis 0), read alone."""
    return self._numpy(key, self._tensors[key][start:stop])

  def _numpy(self, key: str, tensor) -> np.ndarray:
    try:
      if tensor.dtype == self._torch.bfloat16:  # NumPy has no bfloat16: reinterpret the bits
        import ml_dtypes

        return tensor.contiguous().view(self._torch.int16).numpy().view(ml_dtypes.bfloat16)
      return tensor.contiguous().numpy()
    except Exception as err:
      raise CheckpointError(f"cannot read key '{key}' from file {self.location}: {err}") \
          from err

  def close(self) -> None:
    self._tensors = {}

  def __enter__(self) -> "TorchPickleCheckpoint":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


class PrefixView:
  """The keys of a checkpoint under `prefix`, with the prefix removed (the other keys are
  left out); the same reading interface as the checkpoint."""

  def __init__(self, ckpt: Any, prefix: str):
    self.location = ckpt.location
    self._ckpt, self._prefix = ckpt, prefix
    self.file_of = {k[len(prefix):]: f for k, f in ckpt.file_of.items() if k.startswith(prefix)}
    self.left_out = [k for k in ckpt.file_of if not k.startswith(prefix)]

  def keys(self) -> List[str]:
    return list(self.file_of)

  def shape(self, key: str) -> Tuple[int, ...]:
    return self._ckpt.shape(self._prefix + key)

  def dtype(self, key: str) -> str:
    return self._ckpt.dtype(self._prefix + key)

  def read(self, key: str) -> np.ndarray:
    return self._ckpt.read(self._prefix + key)


def find_pickles(folder: Path, pattern: str) -> List[Path]:
  """Torch pickles (`PICKLE_SUFFIXES`) directly in `folder` whose name matches the regular
  expression `pattern` (case-insensitive, searched anywhere in the name)."""
  import re

  if not folder.is_dir():
    return []
  return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in PICKLE_SUFFIXES
                and re.search(pattern, p.name, re.IGNORECASE))


PARAMS_DIR = "params"  # the Orbax folder inside a converted folder


def write_converted(model: nnx.Module, folder: os.PathLike, fmt: str, version: int,
                    config: Mapping[str, Any], **extra: Any) -> None:
  """A converted folder: the marker (format, version, config, `extra`) and the model's
  parameters as an Orbax checkpoint in `PARAMS_DIR`."""
  folder = Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  write_json(folder / MARKER, {"format": fmt, "version": version, "config": dict(config),
                               **extra})
  save_params(model, folder / PARAMS_DIR)


def convert_component(load: Callable[[jax.Device], nnx.Module], dst: os.PathLike, fmt: str,
                      version: int, config_of: Callable[[nnx.Module], Mapping[str, Any]], *,
                      overwrite: bool = False) -> Path:
  """Loads a model on the host CPU with `load(cpu_device)` and writes it as a converted
  folder at `dst`, atomically (nothing is left at `dst` on failure).

  Returns:
    `dst` as an absolute path.
  """
  dst = Path(dst).absolute()
  cpu = jax.local_devices(backend="cpu")[0]
  with atomic_directory(dst, overwrite=overwrite) as tmp:
    model = load(cpu)
    write_converted(model, tmp, fmt, version, config_of(model))
  return dst


def convert_source(load: Callable[..., nnx.Module], find_source: Callable[[Any], Any],
                   src: os.PathLike, dst: os.PathLike, fmt: str, version: int,
                   config_of: Callable[[nnx.Module], Mapping[str, Any]], *,
                   overwrite: bool = False, **load_kw: Any) -> Path:
  """A component's `convert`: checks `src` with `find_source` (a bad source fails before
  anything is created), then `convert_component` of `load(src, device=cpu, **load_kw)`.

  Args:
    load: the component's loader (`load_vae`, `load_umt5`, ...), reading any of its sources.
    find_source: raises `CheckpointError` on a missing or ambiguous source.
    src, dst: the source checkpoint and the converted folder to write.
    fmt, version, config_of: as `convert_component`.
    overwrite: replace an existing `dst`.
    **load_kw: passed to `load` (dtype, config, progress, ...).

  Returns:
    `dst` as an absolute path.
  """
  find_source(src)
  return convert_component(lambda cpu: load(src, device=cpu, **load_kw), dst, fmt, version,
                           config_of, overwrite=overwrite)
