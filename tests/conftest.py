import gc
import os
import sys

import pytest

# Tests import the packages from the checkout, installed or not.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
  """Drops jax's compiled programs after each test module: the suite compiles thousands of
  them, and with jaxlib 0.10.2 on CPU a late compile in one long process segfaulted inside
  XLA (the same test passes in its own process)."""
  yield
  import jax
  jax.clear_caches()
  gc.collect()
