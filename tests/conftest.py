import collections
import gc
import importlib.metadata
import os
import sys
import zlib

import pytest


def _add_xla_flag(name, value):
  """Appends --name=value to XLA_FLAGS (read when jax starts its backend) unless it is
  named there already: the caller's choice wins."""
  flags = os.environ.get("XLA_FLAGS", "")
  if f"--{name}" not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} --{name}={value}".strip()


def _jaxlib_version():
  try:
    return tuple(int(x) for x in importlib.metadata.version("jaxlib").split(".")[:2])
  except (importlib.metadata.PackageNotFoundError, ValueError):
    return None


# The suite's time is mostly XLA compiling thousands of tiny CPU programs (eager jnp ops
# ~30 ms each, interpret-mode kernels) whose run time is milliseconds:
# - LLVM optimisation level 0 compiles them ~25% faster;
# - jaxlib 0.10's CPU compiler has its older elemental emitters beside the fusion emitters:
#   they compile eager ops ~30% faster (tests/test_attention.py::test_pallas_matches_xla
#   25 -> 16 s); jaxlib 0.11 has only the fusion emitters and rejects the flag.
# (A persistent compilation cache shared by make test's processes was tried: tests/models
# on jax 0.11 ran 359 s with it, 358 s without.)
_add_xla_flag("xla_backend_optimization_level", 0)
if (_jaxlib_version() or (0, 11)) < (0, 11):
  _add_xla_flag("xla_cpu_use_fusion_emitters", "false")

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
  parser.addoption(
      "--deal", default=None, metavar="I/N",
      help="of every test function marked split_cases, run only share I of N of its "
           "parametrized cases (a function with fewer than N cases runs one of them in every "
           "share): .ci/run deals them between its two interpreters, so that each case runs "
           "on one and every function on both")


def _parse_share(config, name):
  value = config.getoption(name)
  if value is None:
    return None
  try:
    i, n = (int(x) for x in value.split("/"))
  except ValueError:
    raise pytest.UsageError(f"--{name.lstrip('-')} must be I/N with integers, "
                            f"got {value!r}") from None
  if not 1 <= i <= n:
    raise pytest.UsageError(f"--{name.lstrip('-')} I/N needs 1 <= I <= N, got {value!r}")
  return i, n


def _dealt(items, i, n):
  """(dropped, kept) by share i of n: the cases of each split_cases function (unless it has
  a skipif, which may hold on one interpreter only) go round robin from an offset hashed
  from its name, so that the shares' sizes even out over many functions."""
  groups = collections.defaultdict(list)
  for item in items:
    if item.get_closest_marker("split_cases") and not item.get_closest_marker("skipif"):
      groups[item.nodeid.split("[")[0]].append(item)
  drop = set()
  for name, cases in groups.items():
    offset = zlib.crc32(name.encode())
    keep = {j for j in range(len(cases)) if (j + offset) % n == i - 1}
    keep = keep or {(i - 1 + offset) % len(cases)}
    drop.update(id(c) for j, c in enumerate(cases) if j not in keep)
  return [x for x in items if id(x) in drop], [x for x in items if id(x) not in drop]


def pytest_collection_modifyitems(config, items):
  deal = _parse_share(config, "--deal")
  if deal is not None:
    dropped, items[:] = _dealt(items, *deal)
    config.hook.pytest_deselected(items=dropped)
  part = _parse_share(config, "--part")
  if part is not None:
    i, n = part
    config.hook.pytest_deselected(items=[x for j, x in enumerate(items) if j % n != i - 1])
    items[:] = [x for j, x in enumerate(items) if j % n == i - 1]
