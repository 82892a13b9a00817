"""Fixtures of the Wan tests: tiny checkpoints made by diffusers (torch) or by NumPy."""

import pytest

from wan_testing import export_numpy_checkpoint, random_jax_model, tiny_diffusers_transformer


@pytest.fixture
def numpy_checkpoint(tmp_path):
  """Factory: (kind, layout) -> (random JAX model, fresh checkpoint folder of it)."""
  pytest.importorskip("safetensors")

  def make(kind: str = "t2v", layout: str = "diffusers", seed: int = 0):
    model = random_jax_model(kind, seed)
    folder = export_numpy_checkpoint(model, tmp_path / f"{kind}_{layout}_{seed}", layout=layout)
    return model, folder

  return make


@pytest.fixture(scope="session")
def diffusers_wan(tmp_path_factory):
  """Factory: (kind, seed) -> (diffusers WanTransformer3DModel with random weights, folder
  of its `save_pretrained` with >= 2 shards). Skips without torch / diffusers."""
  pytest.importorskip("torch", reason="parity tests need torch")
  pytest.importorskip("diffusers", reason="parity tests need diffusers")
  cache = {}

  def make(kind: str = "t2v", seed: int = 0):
    if (kind, seed) not in cache:
      model = tiny_diffusers_transformer(kind, seed)
      folder = tmp_path_factory.mktemp(f"diffusers_{kind}_{seed}")
      model.save_pretrained(folder, safe_serialization=True, max_shard_size="20KB")
      cache[kind, seed] = model, folder
    return cache[kind, seed]

  return make
