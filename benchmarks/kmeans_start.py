"""How SVG-EAR's k-means should start: cold iterations, and the state at Wan2.2's expert switch.

Each expert's first sparse step of a video cold-starts k-means (`kmeans_iters`, 50 in the
reference); on the H200 those two cold steps cost ~16 s each at 720p, 5% of a video. Two
questions, answered on the structured workload (benchmarks/workloads.py) at the real shapes:

  * cold: the attention error of the first sparse step after `kmeans_iters` = 5 ... 50 Lloyd
    iterations, and the time of the call;
  * switch: the low-noise expert reads the latents the high-noise one wrote, through other
    weights. Modelled as the same scene through projections mixed with unrelated ones
    (`other_weights` alpha: 0 = the same model, 1 = unrelated weights). "carry" = the first
    expert's converged centroids (cold 50 on the alpha = 0 workload) warm-started with
    `kmeans_iters_warm` (or `--switch-iters`) iterations on the alpha workload; "cold" = a
    cold start there with `--switch-iters` or the most `--cold-iters` (default 50).

Error = relative L2 vs exact float32 attention on sampled query rows (all heads). Writes
OUT.json and OUT.md.

  python -m benchmarks.kmeans_start --preset wan22_720p --out benchmarks/results/kmeans_start_h200
  python -m benchmarks.kmeans_start --preset demo --out /tmp/ks        # CPU, seconds
"""

import argparse
import functools
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import quality, workloads
from svg_ear_jax import SvgEarConfig, resolve_implementation, svg_ear_attention

COLD_ITERS = (5, 10, 20, 50)
ALPHAS = (0.0, 0.5, 1.0)


@functools.lru_cache(maxsize=2)
def _inputs(preset, alpha, seed):
  qkv = workloads.structured(preset.grid, preset.heads, preset.head_dim, seed=seed,
                             other_weights=alpha)
  return tuple(jnp.asarray(x).astype(preset.dtype) for x in qkv)


def _timed(fn, *args, repeats):
  out = jax.block_until_ready(fn(*args))  # compile
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append((time.perf_counter() - t0) * 1e3)
  return out, statistics.median(times)


def study(preset_name: str, density: float, compensation: str, seed: int = 0,
          cold_iters=COLD_ITERS, alphas=ALPHAS, repeats: int = 3,
          switch_iters: int = 10) -> list:
  """Rows: one per cold iteration count (alpha 0) and per (alpha, start) of the switch;
  "carry N" / "cold N" name the start and its Lloyd iterations."""
  preset = quality.PRESETS[preset_name]
  # the longest cold start studied (the reference's 50 by default) is the switch's baseline
  base = SvgEarConfig(num_q_clusters=preset.num_q_clusters,
                      num_k_clusters=preset.num_k_clusters, density=density,
                      compensation=compensation, implementation=preset.implementation,
                      kmeans_iters=max(cold_iters))
  impl = resolve_implementation(base)
  rng = np.random.default_rng(seed + 1)
  sample = (None if preset.sample_rows is None else jnp.asarray(np.sort(rng.choice(
      preset.grid.seq_len, preset.sample_rows, replace=False))))
  calls = {}

  def call(cfg):
    if cfg not in calls:
      calls[cfg] = jax.jit(lambda q, k, v, state: svg_ear_attention(
          q, k, v, cfg, state=state, return_aux=True))
    return calls[cfg]

  def error(out, q, k, v):
    ref = quality.exact_rows(q, k, v, sample)
    return quality.rel_err(out if sample is None else out[:, sample], ref)[0]

  common = dict(S=preset.grid.seq_len, H=preset.heads, D=preset.head_dim,
                Kq=base.num_q_clusters, Kk=base.num_k_clusters, density=density,
                compensation=compensation, dtype=preset.dtype, implementation=impl,
                device=jax.devices()[0].device_kind, jax_version=jax.__version__)
  rows = []
  q, k, v = _inputs(preset, 0.0, seed)
  converged = None
  for iters in cold_iters:
    cfg = base.replace(kmeans_iters=iters)
    (out, aux), ms = _timed(call(cfg), q, k, v, None, repeats=repeats)
    rows.append(dict(common, study="cold", alpha=0.0, start=f"cold {iters}", iters=iters,
                     rel_err=error(out, q, k, v), call_ms=ms, achieved=float(aux.density.mean())))
    print(json.dumps(rows[-1]), flush=True)
    if iters == max(cold_iters):
      converged = aux.state
  warm = base.kmeans_iters_warm
  starts = [("carry", base), ("carry", base.replace(kmeans_iters_warm=switch_iters)),
            ("cold", base.replace(kmeans_iters=switch_iters)), ("cold", base)]
  for alpha in alphas:
    qa, ka, va = _inputs(preset, alpha, seed)
    for start, cfg in starts:
      carry = start == "carry"
      (out, aux), ms = _timed(call(cfg), qa, ka, va, converged if carry else None,
                              repeats=repeats)
      iters = cfg.kmeans_iters_warm if carry else cfg.kmeans_iters
      rows.append(dict(common, study="switch", alpha=alpha, start=f"{start} {iters}",
                       iters=iters, rel_err=error(out, qa, ka, va), call_ms=ms,
                       achieved=float(aux.density.mean())))
      print(json.dumps(rows[-1]), flush=True)
  return rows


def markdown(rows) -> str:
  r0 = rows[0]
  lines = [f"S={r0['S']}, H={r0['H']}, D={r0['D']}, Kq={r0['Kq']}, Kk={r0['Kk']}, "
           f"{r0['compensation']} at density {r0['density']}, {r0['dtype']}, "
           f"{r0['implementation']}, jax {r0['jax_version']}, {r0['device']}.", "",
           "| study | weights alpha | start | rel. L2 error | density | call ms |",
           "|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['study']} | {r['alpha']:.2f} | {r['start']} | {r['rel_err']:.4f} | "
                 f"{r['achieved']:.3f} | {r['call_ms']:.1f} |")
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--preset", choices=sorted(quality.PRESETS), default="demo")
  parser.add_argument("--density", type=float, default=0.15)
  parser.add_argument("--compensation", choices=("mean", "variance"), default="variance")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--cold-iters", type=int, nargs="+", default=list(COLD_ITERS))
  parser.add_argument("--alphas", type=float, nargs="+", default=list(ALPHAS))
  parser.add_argument("--switch-iters", type=int, default=10,
                      help="the shorter carry / cold start of the switch study")
  parser.add_argument("--repeats", type=int, default=3, help="timed calls per row")
  parser.add_argument("--out", default=os.path.join("out", "kmeans_start"))
  args = parser.parse_args(argv)
  if not 0 < args.density <= 1:
    parser.error(f"--density must be in (0, 1], got {args.density}")
  if any(i < 1 for i in args.cold_iters + [args.switch_iters]):
    parser.error(f"--cold-iters must be >= 1, got {args.cold_iters}")
  if any(not 0 <= a <= 1 for a in args.alphas):
    parser.error(f"--alphas must be in [0, 1], got {args.alphas}")
  rows = study(args.preset, args.density, args.compensation, args.seed,
               tuple(sorted(args.cold_iters)), tuple(args.alphas), args.repeats,
               args.switch_iters)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out + ".json", "w") as f:
    json.dump(rows, f, indent=1)
  table = markdown(rows)
  with open(args.out + ".md", "w") as f:
    f.write("# k-means start: cold iterations and the expert switch\n\n" + table + "\n")
  print(table)
  return 0


if __name__ == "__main__":
  sys.exit(main())
