"""SVG-EAR attention speed vs dense cuDNN attention (run on a GPU; tiny shapes run anywhere).

Per configuration: dense cuDNN time (same run), the warm SVG-EAR call (k-means from the
previous call's centroids, `kmeans_iters_warm` iterations) and its breakdown (k-means,
routing incl. probe, attention incl. permutations, the sparse kernel alone), achieved
density, useful TFLOP/s of the sparse kernel (4 * D * exact area / time), relative L2 error
vs the dense output, and XLA's memory accounting of both calls. Inputs are the structured
video-like workload of benchmarks/workloads.py (seed 0) in bf16.

"mean" vs "variance" compensation in one run (benchmarks/results/attention_h200_variance.json):
  python -m benchmarks.attention --shapes wan22_720p --densities 0.15 0.25 \
      --compensations mean variance --out benchmarks/results/attention_h200_variance
Reproduce every row of benchmarks/results/attention_h100.json on one H100:
  python -m benchmarks.attention --shapes wan22_720p wan22_480p hunyuan_720p \
      --densities 0.15 0.25 0.35 ref --routings ear --out benchmarks/results/attention_h100
More shapes per device call: --no-stages times the whole call only (no per-stage programs,
no kernel alone; those columns NaN / "-").
Quick check on CPU (interpret-mode kernels are far too slow there; use xla):
  python -m benchmarks.attention --shapes tiny --implementation xla --out /tmp/attn_tiny
"""

import argparse
import dataclasses
import functools
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import timing, workloads
from svg_ear_jax import (SvgEarConfig, permutation, pipeline, resolve_implementation,
                         svg_ear_attention)


@dataclasses.dataclass(frozen=True)
class Shape:
  grid: workloads.Grid
  heads: int
  head_dim: int
  num_q_clusters: int
  num_k_clusters: int


SHAPES = {
    "wan22_720p": Shape(workloads.WAN_720P, 40, 128, 300, 1000),
    "wan22_480p": Shape(workloads.WAN_480P, 40, 128, 200, 1000),
    "hunyuan_720p": Shape(workloads.HUNYUAN_720P, 24, 128, 400, 1000),
    "tiny": Shape(workloads.Grid(4, 12, 16), 2, 64, 12, 40),
}


def _heads_first(x):
  b, s, h, d = x.shape
  return x.transpose(0, 2, 1, 3).reshape(b * h, s, d)


def time_sparse_kernel(q, k, v, clusters, block_map, cfg, iters):
  """Median ms of the Pallas sparse-attention kernel (and its tables / copies) alone.

  q, k, v are tokens-first [B, S, H, D], read through the clusterings' permutations as in
  the pipeline; the permutations are computed outside the timed call.
  """
  q_lay = permutation.cluster_layout(clusters.q.labels, clusters.q.sizes)
  k_lay = permutation.cluster_layout(clusters.k.labels, clusters.k.sizes)
  kernel = jax.jit(pipeline.attention_kernel(cfg, q))
  spread = clusters.k_spread
  extra = () if spread is None else (spread.variance, spread.radius)
  ms, _ = timing.measure_ms(
      lambda *a: kernel(*a[:8], q_index=a[8], kv_index=a[9],
                        **(dict(k_variance=a[10], k_radius=a[11]) if len(a) > 10 else {})),
      q, k, v, q_lay.sizes, k_lay.sizes, block_map, clusters.k.centroids,
      clusters.v_centroids, q_lay.perm, k_lay.perm, *extra, iterations=iters)
  return ms


def pipeline_stages(q, k, v, cfg, state):
  """{stage: (jitted fn, args)} for the pipeline's stages of a warm call on [B, S, H, D]
  q, k, v from `state`: "layout" (the heads-first copies the clustering reads), "cluster",
  "route" and "attend" (each fed the previous stage's outputs, computed here once)."""
  impl = resolve_implementation(cfg)
  heads_first = jax.jit(lambda *xs: tuple(_heads_first(x) for x in xs))
  qg, kg, vg = heads_first(q, k, v)
  g, _, d = qg.shape
  q_init = state.q_centroids.reshape(g, -1, d)
  k_init = state.k_centroids.reshape(g, -1, d)
  cluster = jax.jit(lambda q, k, v, qi, ki: pipeline.cluster(q, k, v, cfg, impl, qi, ki))
  clusters = cluster(qg, kg, vg, q_init, k_init)
  route = jax.jit(lambda q, k, v, c: pipeline.route(q, k, v, c, cfg, impl))
  block_map = route(qg, kg, vg, clusters)
  attend = jax.jit(lambda q, k, v, c, m: pipeline.attend(q, k, v, c, m, cfg, impl))
  return {"layout": (heads_first, (q, k, v)),
          "cluster": (cluster, (qg, kg, vg, q_init, k_init)),
          "route": (route, (qg, kg, vg, clusters)),
          "attend": (attend, (q, k, v, clusters, block_map))}


def bench_config(name, shape, q, k, v, dense_out, dense_ms, routing, density, impl, iters,
                 attention_kernel="auto", compensation="mean", stages=True):
  cfg = SvgEarConfig(num_q_clusters=shape.num_q_clusters, num_k_clusters=shape.num_k_clusters,
                     routing=routing, density=density, implementation=impl,
                     attention_kernel=attention_kernel, compensation=compensation)
  call = jax.jit(functools.partial(svg_ear_attention, cfg=cfg, return_aux=True))
  _, cold_aux = call(q, k, v)  # cold start: 50 iterations, gives the warm state
  state = cold_aux.state
  full_ms, method = timing.measure_ms(lambda q, k, v: call(q, k, v, state=state), q, k, v,
                                      iterations=iters)
  out, aux = call(q, k, v, state=state)
  diff = out.astype(jnp.float32) - dense_out.astype(jnp.float32)
  rel_err = float(jnp.linalg.norm(diff) / jnp.linalg.norm(dense_out.astype(jnp.float32)))
  dens = float(aux.density.mean())

  pipeline_impl = resolve_implementation(cfg)
  _, s, _, d = q.shape
  g = q.shape[0] * q.shape[2]
  nan = float("nan")
  kmeans_ms = route_ms = attend_ms = kernel_ms = nan
  if stages:  # each stage compiled and timed on its own, then the sparse kernel alone
    calls = pipeline_stages(q, k, v, cfg, state)
    stage_ms = {name: timing.measure_ms(fn, *args, iterations=iters)[0]
                for name, (fn, args) in calls.items() if name != "layout"}
    kmeans_ms, route_ms, attend_ms = (stage_ms["cluster"], stage_ms["route"],
                                      stage_ms["attend"])
    if pipeline_impl == "pallas":
      _, (_, _, _, clusters, block_map) = calls["attend"]
      kernel_ms = time_sparse_kernel(q, k, v, clusters, block_map, cfg, iters)
  useful_flops = 4.0 * d * dens * s * s * g
  t_kernel = kernel_ms if np.isfinite(kernel_ms) else attend_ms  # NaN without stages
  peak = timing.compiled_memory_gb(call, q, k, v, state=state)
  return dict(
      name=name, device=jax.devices()[0].device_kind, jax_version=jax.__version__,
      batch=q.shape[0], seq_len=s, heads=q.shape[2], head_dim=d,
      num_q_clusters=shape.num_q_clusters, num_k_clusters=shape.num_k_clusters,
      routing=routing, budget="top-p 0.9" if density is None else density,
      compensation=cfg.compensation,
      implementation=pipeline_impl,
      attention_kernel=(("mosaic" if pipeline._use_mosaic(cfg, q) else "triton")
                        if pipeline_impl == "pallas" else None),
      density=dens, dense_ms=dense_ms, svg_ear_ms=full_ms,
      speedup_vs_cudnn=dense_ms / full_ms, rel_err=rel_err, kmeans_ms=kmeans_ms,
      routing_ms=route_ms, attention_ms=attend_ms, sparse_kernel_ms=kernel_ms,
      permutation_ms=(attend_ms - kernel_ms) if np.isfinite(kernel_ms) else float("nan"),
      sparse_tflops=useful_flops / (t_kernel * 1e-3) / 1e12,
      dense_tflops=4.0 * d * s * s * g / (dense_ms * 1e-3) / 1e12,
      peak_mem_gb=peak, timing=method, kmeans_iters_warm=cfg.kmeans_iters_warm)


def _num(x, digits):
  """x with `digits` decimals, "-" for NaN (stages not timed: --no-stages)."""
  return "-" if not np.isfinite(x) else f"{x:.{digits}f}"


def markdown(rows):
  head = ("| shape | S | H | routing | comp. | budget | density | dense cuDNN ms | SVG-EAR ms |"
          " speedup | k-means ms | routing ms | attention ms | kernel TFLOP/s | rel. err |"
          " mem GB | mem vs dense |")
  lines = [head, "|" + "---|" * 17]
  for r in rows:
    budget = r["budget"] if isinstance(r["budget"], str) else f"{r['budget']:.2f}"
    lines.append(
        f"| {r['name']} | {r['seq_len']} | {r['heads']} | {r['routing']} | "
        f"{r.get('compensation', 'mean')} | {budget} | "
        f"{r['density']:.3f} | {r['dense_ms']:.1f} | {r['svg_ear_ms']:.1f} | "
        f"{r['speedup_vs_cudnn']:.2f}x | {_num(r['kmeans_ms'], 1)} | "
        f"{_num(r['routing_ms'], 1)} | {_num(r['attention_ms'], 1)} | "
        f"{_num(r['sparse_tflops'], 0)} | {r['rel_err']:.4f} | "
        f"{r['peak_mem_gb']:.2f} | {r['peak_mem_gb'] / r.get('dense_mem_gb', float('nan')):.2f}x |")
  return "\n".join(lines)


def parse_mosaic_options(text: str) -> dict:
  """'chunk_rows=8,split_producers=1' -> {"chunk_rows": 8, "split_producers": True}."""
  options = {}
  for item in filter(None, (x.strip() for x in text.split(","))):
    name, sep, value = item.partition("=")
    if not sep or name not in pipeline.MOSAIC_OPTION_NAMES:
      raise ValueError(f"--mosaic-options: {item!r} is not NAME=VALUE with NAME one of "
                       f"{pipeline.MOSAIC_OPTION_NAMES}")
    try:
      number = int(value)
    except ValueError:
      raise ValueError(f"--mosaic-options: {name} needs an integer, got {value!r}") from None
    flag = name not in ("chunk_rows", "max_concurrent_steps", "heads_per_call")
    options[name] = bool(number) if flag else number
  return options


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--shapes", nargs="+", default=["wan22_720p"], choices=sorted(SHAPES))
  parser.add_argument("--densities", nargs="+", default=["0.25"],
                      help="fixed densities in (0, 1], or 'ref' for the reference top-p budget")
  parser.add_argument("--routings", nargs="+", default=["ear"], choices=["ear", "topp"])
  parser.add_argument("--compensations", nargs="+", default=["mean"],
                      choices=["none", "mean", "variance"],
                      help="SvgEarConfig.compensation values, timed in the same run")
  parser.add_argument("--implementation", default="auto", choices=["auto", "pallas", "xla"])
  parser.add_argument("--attention-kernel", default="auto", choices=["auto", "triton", "mosaic"],
                      help="Pallas attention kernel (SvgEarConfig.attention_kernel)")
  parser.add_argument("--mosaic-options", default="",
                      help="Mosaic kernel options for the whole run, e.g. "
                           "'chunk_rows=8,split_producers=1' (pipeline.MOSAIC_OPTIONS)")
  parser.add_argument("--no-stages", dest="stages", action="store_false",
                      help="time the whole call only (no per-stage programs, no kernel alone: "
                           "about half the compiles; those columns are NaN)")
  parser.add_argument("--iters", type=int, default=5, help="timed repetitions (median)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", default=os.path.join("benchmarks", "results", "attention"),
                      help="output path stem: writes STEM.json and STEM.md")
  args = parser.parse_args(argv)
  try:
    pipeline.MOSAIC_OPTIONS = parse_mosaic_options(args.mosaic_options)
  except ValueError as e:
    parser.error(str(e))
  densities = []
  for d in args.densities:
    if d == "ref":
      densities.append(None)
    else:
      value = float(d)
      if not 0 < value <= 1:
        parser.error(f"density {d} is not in (0, 1]")
      densities.append(value)

  rows = []
  for name in args.shapes:
    shape = SHAPES[name]
    q, k, v = (jnp.asarray(x, jnp.bfloat16) for x in workloads.structured(
        shape.grid, shape.heads, shape.head_dim, seed=args.seed))
    dense_impl = "cudnn" if jax.default_backend() == "gpu" else "xla"
    dense = jax.jit(functools.partial(jax.nn.dot_product_attention, implementation=dense_impl))
    dense_ms, _ = timing.measure_ms(dense, q, k, v, iterations=args.iters)
    dense_out = dense(q, k, v)
    dense_mem = timing.compiled_memory_gb(dense, q, k, v)
    print(f"{name}: S={q.shape[1]} H={shape.heads} dense {dense_impl} {dense_ms:.2f} ms, "
          f"{dense_mem:.2f} GB", flush=True)
    for routing in args.routings:
      for density in densities:
        for compensation in args.compensations:
          row = bench_config(name, shape, q, k, v, dense_out, dense_ms, routing, density,
                             args.implementation, args.iters, args.attention_kernel,
                             compensation, stages=args.stages)
          row["dense_mem_gb"] = dense_mem
          row["mosaic_options"] = dict(pipeline.MOSAIC_OPTIONS)
          rows.append(row)
          print(json.dumps(row), flush=True)
          write(rows, args.out)  # after every row: a timeout keeps what was measured
  print(markdown(rows))
  return 0


def write(rows, stem):
  os.makedirs(os.path.dirname(os.path.abspath(stem)), exist_ok=True)
  with open(stem + ".json", "w") as f:
    json.dump(rows, f, indent=1)
  with open(stem + ".md", "w") as f:
    f.write(markdown(rows) + "\n")


if __name__ == "__main__":
  sys.exit(main())
