"""GPU timing and memory helpers shared by the benchmarks."""

import statistics
import time

import jax


def measure_ms(fn, *args, iterations: int = 5, warmup: int = 2, wallclock: bool = False):
  """Median device time (ms) of `fn(*args)` over `iterations` runs after `warmup` runs.

  Uses CUPTI through `jax.experimental.mosaic.gpu.profiler.measure` when it works (GPU) and
  `wallclock` is False, wall clock around `block_until_ready` otherwise (what stateful
  callables such as an nnx model need: the profiler traces `fn`, so it must be pure).
  Returns (median_ms, method).
  """
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  if jax.default_backend() == "gpu" and not wallclock:
    try:
      from jax.experimental.mosaic.gpu import profiler
      _, times = profiler.measure(fn, iterations=iterations)(*args)
      times = times if isinstance(times, list) else [times]
      times = [t for t in times if t is not None]
      if times:
        return statistics.median(times), "cupti"
    except Exception:  # CUPTI unavailable: fall back to wall clock
      pass
  times = []
  for _ in range(iterations):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append((time.perf_counter() - t0) * 1e3)
  return statistics.median(times), "wallclock"


def compiled_memory_gb(jitted, *args, **kwargs) -> float:
  """Arguments + outputs + temporaries of one compiled call, in GB (XLA's own accounting)."""
  try:
    mem = jitted.lower(*args, **kwargs).compile().memory_analysis()
    total = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
             - mem.alias_size_in_bytes)
    return total / 1e9
  except Exception:
    return float("nan")
