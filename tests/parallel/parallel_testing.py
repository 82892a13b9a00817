"""Helpers of the sequence-parallel tests: compiled forwards with the k-means state carried
explicitly, HLO collective counts, the local shapes inside the shard_map."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import parallel


def need_devices(n: int) -> None:
  if len(jax.devices()) < n:
    pytest.skip(f"needs {n} devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")


def mesh(data: int, seq: int):
  need_devices(data * seq)
  return parallel.make_mesh(seq=seq, data=data)


class Run:
  """One compiled forward of `model` on `inputs` (the model's current mesh and k-means
  state); `out`, the new `state` / `density` (also stored in the model), and the
  compiled program's HLO text."""

  def __init__(self, model, inputs):
    graphdef, state = nnx.split(model)

    def step(state, *a):
      m = nnx.merge(graphdef, state)
      return m(*a), m.kmeans_state.get_value(), m.attention_density.get_value()

    self.inputs = [jnp.asarray(a) for a in inputs]
    self.compiled = jax.jit(step).lower(state, *self.inputs).compile()
    out, self.state, self.density = self.compiled(state, *self.inputs)
    self.out = np.asarray(out)
    model.kmeans_state.set_value(self.state)
    model.attention_density.set_value(self.density)

  def count(self, op: str) -> int:
    """Instructions `op` (e.g. "all-to-all") in the compiled (partitioned) HLO."""
    return len(re.findall(rf"\s{op}(-start)?\(", self.compiled.as_text()))


def rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / np.abs(b).max())


def assert_state_equal(got, want, spec=None):
  """Same centroids (float rounding), and sharded by head with `spec` when given."""
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert g.shape == w.shape
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5)
    if spec is not None:
      assert g.sharding.spec == spec, g.sharding


def shard_map_eqns(model, inputs):
  """(the shard_map equation, every all_to_all equation inside it) of the traced forward
  (a trace, no compile)."""
  graphdef, state = nnx.split(model)
  jaxpr = jax.make_jaxpr(lambda st, *a: nnx.merge(graphdef, st)(*a))(
      state, *[jnp.asarray(a) for a in inputs])

  def walk(jx):
    for eqn in jx.eqns:
      yield eqn
      for value in eqn.params.values():
        for sub in value if isinstance(value, (tuple, list)) else (value,):
          inner = getattr(sub, "jaxpr", sub)
          if hasattr(inner, "eqns"):
            yield from walk(inner)

  maps = [e for e in walk(jaxpr.jaxpr) if e.primitive.name == "shard_map"]
  assert len(maps) == 1, [e.primitive.name for e in maps]
  body = maps[0].params["jaxpr"]
  a2a = [e for e in walk(getattr(body, "jaxpr", body)) if e.primitive.name == "all_to_all"]
  return maps[0], a2a
