import gc
import os
import sys

import pytest

# LLVM optimisation level 0 for XLA's CPU programs: the suite's time is mostly compiling
# thousands of tiny programs whose run time is milliseconds, and level 0 compiles them ~25%
# faster. Set before jax starts its backend; an XLA_FLAGS that already names it wins.
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_backend_optimization_level=0").strip()

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
