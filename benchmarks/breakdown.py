"""Where the time of one warm SVG-EAR call goes: every GPU kernel, stage by stage (CUPTI).

Runs the pipeline's stages as separate jitted calls on the structured workload (seed 0), as
`svg_ear_attention` runs them on tokens-first [B, S, H, D] q, k, v: "cluster" (warm k-means
of Q and K, value centroids / moments), "route" (centroid logits, EAR probe, budgeted
selection), "attend" (tables, sorted copies, the sparse kernel, the gather back to token
order), and the whole call as `svg_ear_attention` compiles it (XLA fuses across stage
boundaries there, so its kernels need not sum to the stages'). Kernel names are XLA's
fusion names, the Pallas kernels' names (svg_ear_*, entry_mosaic_gpu_kernel) and library
kernels (cuBLAS, cub).

  python -m benchmarks.breakdown --shape wan22_720p --density 0.25 \
      --out benchmarks/results/breakdown_h100 [--hlo-dir /tmp/hlo]

--kmeans-update sorted segment_sum times both k-means centroid updates of the pallas path
in one run (pipeline.KMEANS_UPDATE; stage names get the mode appended); --route-fill kernel
sort both budgeted selections of its routing (pipeline.ROUTE_FILL) the same way,
--value-terms walk probe both sources of the EAR probe's per-token value terms
(pipeline.VALUE_TERMS), --sort-keys int32 narrow both key types of the label argsorts
(permutation.LABEL_SORT_KEYS).
--layout head-major feeds the cluster and route stages head-major [B*H, S, D] copies, as
before the kernels read tokens-first inputs in place, and adds a "layout" stage timing
those copies (the
transposes and, with --dense-tokens, the video slices); --layout tokens-first head-major
runs both. --dense-tokens T appends T text-like tokens that are not clustered
(`num_dense_tokens`, HunyuanVideo's layout).

GPU only (CUPTI through jax.experimental.mosaic.gpu.profiler); elsewhere it stops with a
message. --hlo-dir writes each stage's optimized HLO, to see what a fusion computes.
"""

import argparse
import collections
import contextlib
import functools
import itertools
import json
import os
import sys
from typing import Optional

import jax
import jax.numpy as jnp

from benchmarks import attention as attention_bench
from benchmarks import workloads
from svg_ear_jax import (SvgEarConfig, kmeans, permutation, pipeline,
                         resolve_implementation, svg_ear_attention)


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


@contextlib.contextmanager
def pipeline_modes(mode: str, route_fill: Optional[str] = None,
                   value_terms: Optional[str] = None, sort_keys: Optional[str] = None):
  """pipeline.KMEANS_UPDATE = mode, pipeline.ROUTE_FILL = route_fill, pipeline.VALUE_TERMS =
  value_terms and permutation.LABEL_SORT_KEYS = sort_keys (None: as they are) while the
  calls made inside are traced."""
  before = (pipeline.KMEANS_UPDATE, pipeline.ROUTE_FILL, pipeline.VALUE_TERMS,
            permutation.LABEL_SORT_KEYS)
  pipeline.KMEANS_UPDATE = mode
  pipeline.ROUTE_FILL = before[1] if route_fill is None else route_fill
  pipeline.VALUE_TERMS = before[2] if value_terms is None else value_terms
  permutation.LABEL_SORT_KEYS = before[3] if sort_keys is None else sort_keys
  try:
    yield
  finally:
    (pipeline.KMEANS_UPDATE, pipeline.ROUTE_FILL, pipeline.VALUE_TERMS,
     permutation.LABEL_SORT_KEYS) = before


def _heads_first(x, num_rows):
  b, s, h, d = x.shape
  return x.transpose(0, 2, 1, 3).reshape(b * h, s, d)[:, :num_rows]


def stage_calls(q, k, v, cfg, *, num_dense: int = 0, layout: str = "tokens-first",
                update: str = "sorted"):
  """(name, jitted fn, args) of every stage of a warm call on tokens-first q, k, v with the
  warm state of one cold call, each stage fed the previous one's outputs (computed here).

  layout "tokens-first": the stages read q, k, v as `svg_ear_attention` does; "head-major":
  cluster and route read [B*H, S_video, D] copies (the old data flow), made by an extra
  "layout" stage. `update` is the pallas k-means centroid update (KMEANS_UPDATE); call this
  and run the returned functions inside `pipeline_modes(update)` (the whole call reads it
  when traced).
  """
  b, s, h, d = q.shape
  n = s - num_dense
  call = jax.jit(functools.partial(svg_ear_attention, cfg=cfg, return_aux=True,
                                   num_dense_tokens=num_dense))
  _, aux = call(q, k, v)
  whole = jax.jit(lambda q, k, v, st: svg_ear_attention(q, k, v, cfg, state=st,
                                                        num_dense_tokens=num_dense))
  impl = resolve_implementation(cfg)
  q_init = aux.state.q_centroids.reshape(b * h, -1, d)
  k_init = aux.state.k_centroids.reshape(b * h, -1, d)
  stages = []
  qkv, rows = (q, k, v), n
  if layout == "head-major":
    copies = jax.jit(lambda *xs: tuple(_heads_first(x, n) for x in xs))
    stages.append(("layout", copies, (q, k, v)))
    qkv, rows = copies(q, k, v), None
  cluster = jax.jit(lambda q, k, v, qi, ki: pipeline.cluster(
      q, k, v, cfg, impl, qi, ki, num_rows=rows, kmeans_update=update))
  clusters = cluster(*qkv, q_init, k_init)
  route = jax.jit(lambda q, k, v, c: pipeline.route(q, k, v, c, cfg, impl, num_rows=rows))
  block_map = route(*qkv, clusters)

  def attend(q, k, v, c, m):
    if num_dense:
      c, m = pipeline.append_dense_tokens(c, m, num_dense, None)
    return pipeline.attend(q, k, v, c, m, cfg, impl)

  stages += [("cluster", cluster, (*qkv, q_init, k_init)), ("route", route, (*qkv, clusters)),
             ("attend", jax.jit(attend), (q, k, v, clusters, block_map)),
             ("whole call", whole, (q, k, v, aux.state))]
  return stages


def markdown(result, top: int) -> str:
  lines = [f"{result['device']}, jax {result['jax_version']}: {result['shape']} (S="
           f"{result['seq_len']}, H={result['heads']}, D={result['head_dim']}, Kq/Kk="
           f"{result['num_q_clusters']}/{result['num_k_clusters']}"
           + (f", {result['dense_tokens']} dense tokens" if result.get("dense_tokens") else "")
           + f"), routing {result['routing']}, density {result['density']}, bf16, warm call.",
           "", "| stage | kernels | ms |", "|---|---|---|"]
  for st in result["stages"]:
    lines.append(f"| {st['stage']} | {st['launches']} | {st['total_ms']:.2f} |")
  for st in result["stages"]:
    lines += ["", f"### {st['stage']} ({st['total_ms']:.2f} ms)", "",
              "| kernel | launches | ms |", "|---|---|---|"]
    for name, n, ms in st["kernels"][:top]:
      lines.append(f"| `{name[:90]}` | {n} | {ms:.3f} |")
  return "\n".join(lines) + "\n"


def _with_text(x, num_dense, seed):
  """x [1, S, H, D] followed by num_dense tokens of the same scale (text-like, unclustered)."""
  if not num_dense:
    return x
  extra = jax.random.normal(jax.random.PRNGKey(seed), (x.shape[0], num_dense) + x.shape[2:])
  scale = jnp.std(x.astype(jnp.float32))
  return jnp.concatenate([x, (extra * scale).astype(x.dtype)], axis=1)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--shape", default="wan22_720p", choices=sorted(attention_bench.SHAPES))
  parser.add_argument("--density", type=float, default=0.25)
  parser.add_argument("--routing", default="ear", choices=["ear", "topp"])
  parser.add_argument("--compensation", default=SvgEarConfig().compensation,
                      choices=["mean", "variance", "none"])
  parser.add_argument("--kmeans-update", nargs="+", default=[pipeline.KMEANS_UPDATE],
                      choices=list(kmeans.UPDATES), help="pallas k-means centroid update(s)")
  parser.add_argument("--route-fill", nargs="+", default=[pipeline.ROUTE_FILL],
                      choices=list(pipeline.ROUTE_FILLS),
                      help="pallas routing's budgeted selection(s) (pipeline.ROUTE_FILL)")
  parser.add_argument("--value-terms", nargs="+", default=[pipeline.VALUE_TERMS],
                      choices=list(pipeline.VALUE_TERMS_CHOICES),
                      help="where the EAR probe's per-token value terms come from "
                           "(pipeline.VALUE_TERMS)")
  parser.add_argument("--sort-keys", nargs="+", default=[permutation.LABEL_SORT_KEYS],
                      choices=list(permutation.LABEL_SORT_KEYS_CHOICES),
                      help="key type(s) of the label argsorts (permutation.LABEL_SORT_KEYS)")
  parser.add_argument("--layout", nargs="+", default=["tokens-first"],
                      choices=["tokens-first", "head-major"],
                      help="what the cluster / route stages read (see the module docstring)")
  parser.add_argument("--dense-tokens", type=int, default=0,
                      help="trailing unclustered tokens (HunyuanVideo's text: 256)")
  parser.add_argument("--top", type=int, default=25, help="kernels listed per stage")
  parser.add_argument("--hlo-dir", help="write each stage's optimized HLO text here")
  parser.add_argument("--out", default=os.path.join("benchmarks", "results", "breakdown"))
  args = parser.parse_args(argv)
  if jax.default_backend() != "gpu":
    print("benchmarks.breakdown needs a GPU (CUPTI kernel timings)", file=sys.stderr)
    return 2
  shape = attention_bench.SHAPES[args.shape]
  q, k, v = (_with_text(jnp.asarray(x, jnp.bfloat16), args.dense_tokens, seed)
             for seed, x in enumerate(workloads.structured(shape.grid, shape.heads,
                                                           shape.head_dim, seed=0)))
  cfg = SvgEarConfig(num_q_clusters=shape.num_q_clusters, num_k_clusters=shape.num_k_clusters,
                     routing=args.routing, density=args.density,
                     compensation=args.compensation)
  runs = list(itertools.product(args.kmeans_update, args.route_fill, args.value_terms,
                                args.sort_keys, args.layout))
  stages = []
  for update, fill, terms, keys, layout in runs:
    tag = ("" if len(runs) == 1
           else f" [{update}, fill {fill}, terms {terms}, keys {keys}, {layout}]")
    with pipeline_modes(update, fill, terms, keys):
      for name, fn, fargs in stage_calls(q, k, v, cfg, num_dense=args.dense_tokens,
                                         layout=layout, update=update):
        times = kernel_times(fn, *fargs)
        stages.append(dict(stage=name + tag, kmeans_update=update, route_fill=fill,
                           value_terms=terms, sort_keys=keys, layout=layout,
                           launches=sum(n for n, _ in times.values()),
                           total_ms=sum(ms for _, ms in times.values()),
                           kernels=[(kname, n, ms) for kname, (n, ms) in times.items()]))
        print(f"{name + tag}: {stages[-1]['total_ms']:.2f} ms in {stages[-1]['launches']} "
              f"kernels", flush=True)
        if args.hlo_dir:
          os.makedirs(args.hlo_dir, exist_ok=True)
          text = fn.lower(*fargs).compile().as_text()
          fname = (name + tag).replace(" ", "_").replace(",", "").replace("[", "").replace(
              "]", "")
          with open(os.path.join(args.hlo_dir, fname + ".hlo.txt"), "w") as f:
            f.write(text)
  result = dict(device=jax.devices()[0].device_kind, jax_version=jax.__version__,
                shape=args.shape, seq_len=q.shape[1], heads=shape.heads,
                head_dim=shape.head_dim, num_q_clusters=shape.num_q_clusters,
                num_k_clusters=shape.num_k_clusters, routing=args.routing,
                density=args.density, compensation=args.compensation,
                dense_tokens=args.dense_tokens, stages=stages)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out + ".json", "w") as f:
    json.dump(result, f, indent=1)
  with open(args.out + ".md", "w") as f:
    f.write(markdown(result, args.top))
  print(markdown(result, args.top))
  return 0


if __name__ == "__main__":
  sys.exit(main())
