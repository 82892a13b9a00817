"""What the pipelines share around the denoising loop: lazily loaded components (tokenizers,
text encoders, VAEs), a bounded cache of encoded prompts, video post-processing as
diffusers' `VideoProcessor` does it, and mp4 output."""

import collections
import json
import pathlib
import time
from typing import Any, Callable, Dict, Hashable, List, Mapping, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from models import video_io

PathLike = Union[str, pathlib.Path]
OUTPUT_TYPES = ("latent", "np", "mp4")


class PipelineFolder:
  """A local diffusers pipeline folder: its `model_index.json` and which components it
  holds (an index entry that is not [None, None] and a folder of that name)."""

  def __init__(self, path: PathLike):
    self.root = pathlib.Path(path)
    index_path = self.root / "model_index.json"
    if not index_path.is_file():
      raise FileNotFoundError(f"{self.root}: no model_index.json (not a diffusers pipeline "
                              f"folder)")
    self.index = json.loads(index_path.read_text(encoding="utf-8"))

  def has(self, name: str) -> bool:
    entry = self.index.get(name)
    return (isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[0] is not None
            and (self.root / name).is_dir())

  def require(self, *names: str) -> None:
    for name in names:
      if not self.has(name):
        raise FileNotFoundError(f"{self.root}: the pipeline has no {name}/ (required)")


class MissingComponentError(ValueError):
  """A call needs a component (VAE, text encoder, tokenizer) the pipeline does not have."""


class Components:
  """Optional pipeline components, each given directly or loaded from its folder on first
  use (a 5.7B-parameter UMT5 or a VAE is not loaded when embeddings are passed and latents
  are returned).

  Args:
    given: name -> component object (takes precedence).
    loaders: name -> zero-argument function that loads it (from a pipeline folder).
    owner: pipeline name for error messages.
  """

  def __init__(self, given: Mapping[str, Any], loaders: Mapping[str, Callable[[], Any]],
               owner: str):
    self._objects = {k: v for k, v in given.items() if v is not None}
    self._loaders = dict(loaders)
    self.owner = owner

  def has(self, name: str) -> bool:
    return name in self._objects or name in self._loaders

  def loaded(self, name: str) -> bool:
    return name in self._objects

  @property
  def names(self) -> tuple:
    return tuple(sorted(set(self._objects) | set(self._loaders)))

  def get(self, name: str, why: str) -> Any:
    """The component `name`, loaded now if needed; `why` names what needs it."""
    if name not in self._objects:
      if name not in self._loaders:
        raise MissingComponentError(
            f"{why} needs the {self.owner}'s {name}, which it does not have (pass it to the "
            f"constructor or use a pipeline folder with {name}/)")
      self._objects[name] = self._loaders.pop(name)()
    return self._objects[name]


class PromptCache:
  """Bounded LRU of encoded prompts (the negative prompt is the same for every video)."""

  def __init__(self, size: int = 8):
    self.size = size
    self._items: "collections.OrderedDict[Hashable, Any]" = collections.OrderedDict()

  def get(self, key: Hashable, compute: Callable[[], Any]) -> Any:
    if key in self._items:
      self._items.move_to_end(key)
      return self._items[key]
    value = compute()
    self._items[key] = value
    while len(self._items) > self.size:
      self._items.popitem(last=False)
    return value

  def __len__(self) -> int:
    return len(self._items)


def as_prompts(name: str, prompt: Union[str, Sequence[str]]) -> List[str]:
  """One prompt or a list of prompts as a list of str, else TypeError naming `name`."""
  if isinstance(prompt, str):
    return [prompt]
  if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) for p in prompt):
    return list(prompt)
  raise TypeError(f"{name} must be a str or a non-empty list of str, got {prompt!r}")


def check_output_type(output_type: str, output_path: Optional[PathLike]) -> None:
  if output_type not in OUTPUT_TYPES:
    raise ValueError(f"output_type={output_type!r}: must be one of {OUTPUT_TYPES}")
  if output_type == "mp4":
    if output_path is None:
      raise ValueError("output_type='mp4' needs output_path (a .mp4 file)")
    if pathlib.Path(output_path).suffix.lower() != ".mp4":
      raise ValueError(f"output_path={str(output_path)!r} must end in .mp4")
  elif output_path is not None:
    raise ValueError(f"output_path is only used with output_type='mp4', not {output_type!r}")


def postprocess_video(video: jax.Array) -> np.ndarray:
  """[B, 3, F, H, W] decoder output in [-1, 1] -> [B, F, H, W, 3] float32 frames in [0, 1]
  (diffusers' `VideoProcessor.postprocess_video(output_type="np")`: x / 2 + 0.5, clamped)."""
  frames = jnp.clip(jnp.asarray(video, jnp.float32) / 2 + 0.5, 0.0, 1.0)
  return np.asarray(jnp.transpose(frames, (0, 2, 3, 4, 1)))


def video_paths(path: PathLike, batch: int) -> List[pathlib.Path]:
  """Where a batch of videos goes: `path` for one video, `stem_{i}.mp4` beside it for more."""
  path = pathlib.Path(path)
  if batch == 1:
    return [path]
  return [path.with_name(f"{path.stem}_{i}{path.suffix}") for i in range(batch)]


def write_videos(frames: np.ndarray, path: PathLike, fps: float) -> List[pathlib.Path]:
  """Writes [B, F, H, W, 3] frames in [0, 1] as B mp4 files (see `video_paths`)."""
  paths = video_paths(path, frames.shape[0])
  for video, p in zip(frames, paths):
    video_io.write_mp4(video, p, fps)
  return paths


class Stopwatch:
  """Wall times of the named phases of one call (blocks on each phase's result)."""

  def __init__(self):
    self.seconds: Dict[str, float] = {}

  def run(self, name: str, fn: Callable[[], Any]) -> Any:
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
    return out
