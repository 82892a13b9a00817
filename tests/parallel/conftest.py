"""Ulysses tests run on 8 fake CPU devices (`make test` sets XLA_FLAGS for this process;
a run without it gets the flag here, before jax starts its backend)."""

import os
import sys

# Also: LLVM optimisation level 0 for the CPU programs, which halves the compile time of
# the tiny SVG-EAR forwards (most of this suite's time; their run time is milliseconds).
# Every comparison is between programs compiled alike, so the level does not matter.
for _flag, _value in (("--xla_force_host_platform_device_count", "8"),
                      ("--xla_backend_optimization_level", "0")):
  if _flag not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_flag}={_value}".strip()

# the tiny model configs and inputs of the model tests
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "models"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
