"""Local source checkpoints of HunyuanVideo as `convert_common` sees them.

`convert_common.check_keys` / `load_into` read a checkpoint through `location`, `file_of`,
`keys`, `shape`, `dtype` and `read`. Here are two more such sources beside
`SafetensorsCheckpoint`:
  * `TorchCheckpoint`: the original release's torch pickle
    (`mp_rank_00_model_states.pt`, tensors under "module"), memory-mapped (needs torch;
    `convert_common.TorchPickleCheckpoint` with that release's unwrapping and messages);
  * `SlicedCheckpoint`: any of them with fused tensors (the original `img_attn_qkv`,
    `linear1`, ...) replaced by the row blocks the model needs (`RowSlice`), each read
    alone, so a fused tensor is never read twice.
"""

import contextlib
import dataclasses
from pathlib import Path
from typing import Any, Dict, List, Mapping, Tuple, Union

import jax
import numpy as np

from models import convert_common as cc

_STATE_WRAPPERS = ("module", "model", "state_dict")  # as diffusers' conversion script


@dataclasses.dataclass(frozen=True)
class RowSlice:
  """Row blocks of a fused source tensor (torch layout, axis 0), concatenated in order.

  Attributes:
    key: the fused tensor's name in the checkpoint.
    rows: (start, stop) ranges.
  """

  key: str
  rows: Tuple[Tuple[int, int], ...]

  @property
  def name(self) -> str:
    """The name the slice goes by in rule tables and messages, e.g. `x.qkv.weight[0:3072]`."""
    return f"{self.key}[{','.join(f'{a}:{b}' for a, b in self.rows)}]"

  @property
  def num_rows(self) -> int:
    return sum(b - a for a, b in self.rows)


class TorchCheckpoint(cc.TorchPickleCheckpoint):
  """A local torch pickle state dict, memory-mapped (`torch.load(mmap=True,
  weights_only=True)`): tensors are read one at a time. Nested single-key "module" /
  "model" / "state_dict" wrappers are unwrapped. `convert_common.TorchPickleCheckpoint`
  with the original DiT release's rules: no fallback to reading a legacy pickle whole, and
  a plain `CheckpointError` without torch."""

  def _import_torch(self):
    try:
      import torch
    except ImportError as err:
      raise cc.CheckpointError(f"{self.location}: reading a torch pickle needs torch; install "
                               "it or convert the file to safetensors") from err
    return torch

  @staticmethod
  def _unwrap(state: Any) -> Any:
    while isinstance(state, Mapping) and len(state) == 1 and next(iter(state)) in _STATE_WRAPPERS:
      state = next(iter(state.values()))
    return state

  def _load(self, torch):
    try:
      return torch.load(str(self.location), map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # pickle, zip and mmap errors alike
      raise cc.CheckpointError(f"cannot read torch checkpoint {self.location} (truncated or "
                               f"corrupt?): {err}") from err


Checkpoint = Union[cc.SafetensorsCheckpoint, TorchCheckpoint]


def open_checkpoint(location: Path) -> Checkpoint:
  """A `.pt` / `.pth` file, or a folder holding one and no safetensors, as a
  `TorchCheckpoint`; anything else as a `SafetensorsCheckpoint`."""
  location = Path(location)
  if location.is_dir() and not any(location.glob("*.safetensors")):
    pickles = sorted(p for p in location.iterdir() if p.suffix in cc.PICKLE_SUFFIXES)
    if len(pickles) > 1:
      raise cc.CheckpointError(f"{location}: several torch checkpoints "
                               f"{[p.name for p in pickles]}; pass the file to convert")
    if pickles:
      location = pickles[0]
  if location.is_file() and location.suffix in cc.PICKLE_SUFFIXES:
    return TorchCheckpoint(location)
  return cc.SafetensorsCheckpoint(location)


class SlicedCheckpoint:
  """A checkpoint seen through `RowSlice`s: each fused tensor is replaced by the slices
  named in `slices` (as `key[a:b]`), the other keys pass through unchanged.

  Raises:
    CheckpointError: a fused tensor whose row count is not what the slices cover.
  """

  def __init__(self, ckpt: Checkpoint, slices: Mapping[str, RowSlice], what: str):
    self.location = ckpt.location
    self._ckpt = ckpt
    self._slices = dict(slices)
    self._stack = contextlib.ExitStack()
    self._handles: Dict[Path, Any] = {}
    rows: Dict[str, int] = {}
    for piece in self._slices.values():
      rows[piece.key] = max(rows.get(piece.key, 0), *(b for _, b in piece.rows))
    self.file_of = {k: f for k, f in ckpt.file_of.items() if k not in rows}
    for name, piece in self._slices.items():
      if piece.key in ckpt.file_of:
        self.file_of[name] = ckpt.file_of[piece.key]
    for key, n in rows.items():
      if key in ckpt.file_of:
        shape = ckpt.shape(key)
        if not shape or shape[0] != n:
          raise cc.CheckpointError(f"key '{key}' in file {ckpt.file_of[key]} has shape {shape}, "
                                   f"but {what} expects {n} rows (fused tensor)")

  def keys(self) -> List[str]:
    return list(self.file_of)

  def shape(self, key: str) -> Tuple[int, ...]:
    piece = self._slices.get(key)
    if piece is None:
      return self._ckpt.shape(key)
    return (piece.num_rows, *self._ckpt.shape(piece.key)[1:])

  def dtype(self, key: str) -> str:
    piece = self._slices.get(key)
    return self._ckpt.dtype(key if piece is None else piece.key)

  def read(self, key: str) -> np.ndarray:
    """One tensor, or the rows of a slice (read alone from the file), as a NumPy array."""
    piece = self._slices.get(key)
    if piece is None:
      return self._ckpt.read(key)
    if isinstance(self._ckpt, cc.TorchPickleCheckpoint):
      parts = [self._ckpt.read_rows(piece.key, a, b) for a, b in piece.rows]
    else:
      parts = self._safetensors_rows(piece)
    return parts[0] if len(parts) == 1 else np.concatenate(parts)

  def _safetensors_rows(self, piece: RowSlice) -> List[np.ndarray]:
    path = self.file_of[piece.name]
    try:
      if path not in self._handles:
        from safetensors import safe_open

        # "flax" rather than "numpy": NumPy has no bfloat16.
        self._handles[path] = self._stack.enter_context(safe_open(str(path), framework="flax"))
      view = self._handles[path].get_slice(piece.key)
      with jax.default_device(jax.local_devices(backend="cpu")[0]):
        return [np.asarray(view[a:b]) for a, b in piece.rows]
    except Exception as err:
      raise cc.CheckpointError(f"cannot read key '{piece.key}' from file {path}: {err}") from err

  def close(self) -> None:
    self._stack.close()

  def __enter__(self) -> "SlicedCheckpoint":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
