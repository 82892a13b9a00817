"""Writing local safetensors checkpoints in tests: one file, or shards with an index."""

import json
from pathlib import Path


def write_safetensors(tensors: dict, folder: Path, num_shards: int, save_file, *,
                      stem: str = "diffusion_pytorch_model",
                      index_metadata: dict = None) -> None:
  """`tensors` as `{stem}.safetensors`, or `num_shards` > 1 shards (keys dealt round-robin
  in the given order) with a `{stem}.safetensors.index.json` weight map. `save_file`:
  safetensors.numpy's or safetensors.torch's."""
  folder.mkdir(parents=True, exist_ok=True)
  if num_shards == 1:
    save_file(tensors, str(folder / f"{stem}.safetensors"))
    return
  names = [f"{stem}-{i + 1:05d}-of-{num_shards:05d}.safetensors" for i in range(num_shards)]
  shards = [dict() for _ in names]
  for i, (key, value) in enumerate(tensors.items()):
    shards[i % num_shards][key] = value
  weight_map = {}
  for name, shard in zip(names, shards):
    save_file(shard, str(folder / name))
    weight_map.update({k: name for k in shard})
  index = {"metadata": {"total_size": 0} if index_metadata is None else index_metadata,
           "weight_map": weight_map}
  (folder / f"{stem}.safetensors.index.json").write_text(json.dumps(index))
