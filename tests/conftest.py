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


def pytest_addoption(parser):
  parser.addoption(
      "--part", default=None, metavar="I/N",
      help="run only part I of N of the collected tests (round robin over collection order, "
           "so each part gets its share of every file): splits the compiled GPU suite into "
           "runs that each fit one device call")


def pytest_collection_modifyitems(config, items):
  part = config.getoption("--part")
  if part is None:
    return
  try:
    i, n = (int(x) for x in part.split("/"))
  except ValueError:
    raise pytest.UsageError(f"--part must be I/N with integers, got {part!r}") from None
  if not 1 <= i <= n:
    raise pytest.UsageError(f"--part I/N needs 1 <= I <= N, got {part!r}")
  config.hook.pytest_deselected(items=[x for j, x in enumerate(items) if j % n != i - 1])
  items[:] = [x for j, x in enumerate(items) if j % n == i - 1]
