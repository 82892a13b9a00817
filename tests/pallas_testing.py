"""Shared base of the Pallas kernel test classes."""

import jax
import pytest


class CompiledOrInterpret:
  """Runs its tests compiled with Triton (GPU only; skipped elsewhere) or, in a subclass
  with INTERPRET = True, in Pallas interpret mode on any backend."""

  INTERPRET = False

  @pytest.fixture(autouse=True)
  def _device(self):
    if not self.INTERPRET and jax.default_backend() != "gpu":
      pytest.skip("compiled Pallas-Triton kernels need a GPU (the interpret class runs on CPU)")
