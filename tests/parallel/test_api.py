"""`from_pretrained(..., mesh=)` and `set_mesh` placement (no forward: no compile)."""

import jax
import jax.numpy as jnp
import pytest

import hunyuan_testing
import wan_testing
from models.hunyuan import from_pretrained as hunyuan_from_pretrained
from models.wan import from_pretrained as wan_from_pretrained
from parallel_testing import mesh

pytest.importorskip("safetensors")


def _replicated_on(model, devices):
  for leaf in jax.tree.leaves(model.blocks if hasattr(model, "blocks")
                              else model.transformer_blocks):
    assert leaf.sharding.device_set == set(devices) and leaf.sharding.is_fully_replicated


def test_wan_pair_from_pretrained_with_mesh(tmp_path):
  for sub, seed in (("transformer", 0), ("transformer_2", 1)):
    wan_testing.export_numpy_checkpoint(
        wan_testing.random_jax_model("t2v", seed, num_heads=4), tmp_path / sub, num_shards=1)
  m = mesh(1, 2)
  pair = wan_from_pretrained(tmp_path, dtype=jnp.float32, mesh=m)
  for expert in (pair.high_noise, pair.low_noise):
    assert expert.mesh is m
    _replicated_on(expert, list(m.devices.flat))
  single = wan_from_pretrained(tmp_path / "transformer", dtype=jnp.float32)
  assert single.mesh is None and single.seq_parallel is None
  with pytest.raises(ValueError, match="num_heads=4 is not divisible by its size 3"):
    wan_from_pretrained(tmp_path / "transformer", dtype=jnp.float32, mesh=mesh(1, 3))


def test_hunyuan_from_pretrained_with_mesh(tmp_path):
  model = hunyuan_testing.random_jax_model(num_heads=4)
  hunyuan_testing.export_numpy_checkpoint(model, tmp_path / "ckpt", num_shards=1)
  m = mesh(2, 2)
  loaded = hunyuan_from_pretrained(tmp_path / "ckpt", dtype=jnp.float32, mesh=m)
  assert loaded.mesh is m
  _replicated_on(loaded, list(m.devices.flat))
  assert hunyuan_from_pretrained(tmp_path / "ckpt", dtype=jnp.float32).mesh is None
