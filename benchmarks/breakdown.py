"""Where the time of one warm SVG-EAR call goes: every GPU kernel, stage by stage (CUPTI).

Runs the pipeline's stages as separate jitted calls on the structured workload (seed 0):
"layout" (the heads-first copies of q, k, v the clustering reads), "cluster" (warm k-means
of Q and K, value centroids), "route" (centroid logits, EAR probe, budgeted selection),
"attend" (tables, sorted copies, the sparse kernel, the gather back to token order), and the
whole call as `svg_ear_attention` compiles it (XLA fuses across stage boundaries there, so
its kernels need not sum to the stages'). Kernel names are XLA's fusion names, the Pallas
kernels' names (svg_ear_*, entry_mosaic_gpu_kernel) and library kernels (cuBLAS, cub).

  python -m benchmarks.breakdown --shape wan22_720p --density 0.25 \
      --out benchmarks/results/breakdown_h100 [--hlo-dir /tmp/hlo]

GPU only (CUPTI through jax.experimental.mosaic.gpu.profiler); elsewhere it stops with a
message. --hlo-dir writes each stage's optimized HLO, to see what a fusion computes.
"""

import argparse
import collections
import functools
import json
import os
import sys

import jax
import jax.numpy as jnp

from benchmarks import attention as attention_bench
from benchmarks import workloads
from svg_ear_jax import SvgEarConfig, svg_ear_attention


def kernel_times(fn, *args, warmup: int = 2, iterations: int = 3):
  """{kernel name: (launches, ms)} of one call of fn, median call of `iterations`."""
  from jax.experimental.mosaic.gpu import profiler
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  runs = []
  for _ in range(iterations):
    _, per = profiler.measure(fn, aggregate=False)(*args)
    runs.append(per or [])
  runs.sort(key=lambda per: sum(ms for _, ms in per))
  agg = collections.defaultdict(lambda: [0, 0.0])
  for name, ms in runs[len(runs) // 2]:
    agg[name][0] += 1
    agg[name][1] += ms
  return {name: tuple(v) for name, v in sorted(agg.items(), key=lambda kv: -kv[1][1])}


def stage_calls(q, k, v, cfg):
  """(name, jitted fn, args) of every stage, with the warm state of one cold call."""
  _, aux = jax.jit(functools.partial(svg_ear_attention, cfg=cfg, return_aux=True))(q, k, v)
  whole = jax.jit(lambda q, k, v, st: svg_ear_attention(q, k, v, cfg, state=st))
  stages = attention_bench.pipeline_stages(q, k, v, cfg, aux.state)
  return [(name, *stages[name]) for name in ("layout", "cluster", "route", "attend")] + [
      ("whole call", whole, (q, k, v, aux.state))]


def markdown(result, top: int) -> str:
  lines = [f"{result['device']}, jax {result['jax_version']}: {result['shape']} (S="
           f"{result['seq_len']}, H={result['heads']}, D={result['head_dim']}, Kq/Kk="
           f"{result['num_q_clusters']}/{result['num_k_clusters']}), routing "
           f"{result['routing']}, density {result['density']}, bf16, warm call.", "",
           "| stage | kernels | ms |", "|---|---|---|"]
  for st in result["stages"]:
    lines.append(f"| {st['stage']} | {st['launches']} | {st['total_ms']:.2f} |")
  for st in result["stages"]:
    lines += ["", f"### {st['stage']} ({st['total_ms']:.2f} ms)", "",
              "| kernel | launches | ms |", "|---|---|---|"]
    for name, n, ms in st["kernels"][:top]:
      lines.append(f"| `{name[:90]}` | {n} | {ms:.3f} |")
  return "\n".join(lines) + "\n"


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--shape", default="wan22_720p", choices=sorted(attention_bench.SHAPES))
  parser.add_argument("--density", type=float, default=0.25)
  parser.add_argument("--routing", default="ear", choices=["ear", "topp"])
  parser.add_argument("--top", type=int, default=25, help="kernels listed per stage")
  parser.add_argument("--hlo-dir", help="write each stage's optimized HLO text here")
  parser.add_argument("--out", default=os.path.join("benchmarks", "results", "breakdown"))
  args = parser.parse_args(argv)
  if jax.default_backend() != "gpu":
    print("benchmarks.breakdown needs a GPU (CUPTI kernel timings)", file=sys.stderr)
    return 2
  shape = attention_bench.SHAPES[args.shape]
  q, k, v = (jnp.asarray(x, jnp.bfloat16) for x in workloads.structured(
      shape.grid, shape.heads, shape.head_dim, seed=0))
  cfg = SvgEarConfig(num_q_clusters=shape.num_q_clusters, num_k_clusters=shape.num_k_clusters,
                     routing=args.routing, density=args.density)
  stages = []
  for name, fn, fargs in stage_calls(q, k, v, cfg):
    times = kernel_times(fn, *fargs)
    stages.append(dict(stage=name, launches=sum(n for n, _ in times.values()),
                       total_ms=sum(ms for _, ms in times.values()),
                       kernels=[(kname, n, ms) for kname, (n, ms) in times.items()]))
    print(f"{name}: {stages[-1]['total_ms']:.2f} ms in {stages[-1]['launches']} kernels",
          flush=True)
    if args.hlo_dir:
      os.makedirs(args.hlo_dir, exist_ok=True)
      text = fn.lower(*fargs).compile().as_text()
      with open(os.path.join(args.hlo_dir, name.replace(" ", "_") + ".hlo.txt"), "w") as f:
        f.write(text)
  result = dict(device=jax.devices()[0].device_kind, jax_version=jax.__version__,
                shape=args.shape, seq_len=q.shape[1], heads=shape.heads,
                head_dim=shape.head_dim, num_q_clusters=shape.num_q_clusters,
                num_k_clusters=shape.num_k_clusters, routing=args.routing,
                density=args.density, stages=stages)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out + ".json", "w") as f:
    json.dump(result, f, indent=1)
  with open(args.out + ".md", "w") as f:
    f.write(markdown(result, args.top))
  print(markdown(result, args.top))
  return 0


if __name__ == "__main__":
  sys.exit(main())
