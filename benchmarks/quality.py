"""Attention quality vs density: SVG2 top-p, top-p + compensation, and SVG-EAR.

For each workload and each target density (fixed-density budget), runs the three methods
and reports the relative L2 error of the output against dense float32 attention, at the
density each actually reached; plus one row per method at the reference top-p budget
(density=None, top_p=0.9). Writes a markdown table, a JSON file and an error-vs-density
PNG under --out-dir.

  python -m benchmarks.quality --preset demo    # CPU, < 2 minutes (README's main job)
  python -m benchmarks.quality --preset full    # larger grid, more heads (minutes on CPU)
"""

import argparse
import dataclasses
import functools
import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from benchmarks import workloads
from svg_ear_jax import SvgEarConfig, dense_attention_reference, svg_ear_attention

METHODS = {
    "SVG2 (top-p)": dict(routing="topp", compensation=False),
    "top-p + comp.": dict(routing="topp", compensation=True),
    "SVG-EAR": dict(routing="ear", compensation=True),
}


@dataclasses.dataclass(frozen=True)
class Preset:
  grid: workloads.Grid
  heads: int
  head_dim: int
  num_q_clusters: int
  num_k_clusters: int
  densities: tuple


PRESETS = {
    # 2,304 tokens, Kk/S and Kq/S near the 720p reference (~1/76 and ~1/250 -> 1/24, 1/96)
    "demo": Preset(workloads.Grid(6, 16, 24), heads=4, head_dim=64, num_q_clusters=24,
                   num_k_clusters=96, densities=(0.1, 0.2, 0.3)),
    "full": Preset(workloads.Grid(9, 24, 32), heads=8, head_dim=128, num_q_clusters=48,
                   num_k_clusters=160, densities=(0.05, 0.1, 0.15, 0.2, 0.25, 0.35)),
}


def rel_err(out, ref):
  """Relative L2 error over everything, and per head ([H])."""
  diff = (out.astype(jnp.float32) - ref)
  total = float(jnp.linalg.norm(diff) / jnp.linalg.norm(ref))
  per_head = jnp.sqrt(jnp.sum(diff ** 2, axis=(0, 1, 3)) / jnp.sum(ref ** 2, axis=(0, 1, 3)))
  return total, np.asarray(per_head).tolist()


@functools.partial(jax.jit, static_argnames=("cfg",))
def _run(q, k, v, cfg):
  return svg_ear_attention(q, k, v, cfg, return_aux=True)


def sweep(preset: Preset, workload: str, seed: int, progress) -> list:
  """All (method, density) rows of one workload."""
  if workload == "structured":
    qkv = workloads.structured(preset.grid, preset.heads, preset.head_dim, seed=seed)
  else:
    qkv = workloads.random_qkv(preset.grid.seq_len, preset.heads, preset.head_dim, seed=seed)
  q, k, v = (jnp.asarray(x) for x in qkv)
  ref = dense_attention_reference(q, k, v)
  rows = []
  for density in preset.densities + (None,):
    for method, changes in METHODS.items():
      cfg = SvgEarConfig(num_q_clusters=preset.num_q_clusters,
                         num_k_clusters=preset.num_k_clusters, density=density, **changes)
      out, aux = _run(q, k, v, cfg)
      total, per_head = rel_err(out, ref)
      rows.append(dict(workload=workload, method=method,
                       budget="top-p 0.9" if density is None else f"{density:.2f}",
                       target_density=density, density=float(aux.density.mean()),
                       rel_err=total, rel_err_per_head=per_head))
      progress.update(1)
  return rows


def check_ear_wins(rows) -> list:
  """Structured-workload densities where SVG-EAR is not the most accurate method."""
  losses = []
  for budget in sorted({r["budget"] for r in rows if r["workload"] == "structured"}):
    at = {r["method"]: r["rel_err"] for r in rows
          if r["workload"] == "structured" and r["budget"] == budget}
    if any(at["SVG-EAR"] >= err for m, err in at.items() if m != "SVG-EAR"):
      losses.append(budget)
  return losses


def markdown_table(rows) -> str:
  lines = ["| workload | budget | method | density | rel. L2 error |",
           "|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['workload']} | {r['budget']} | {r['method']} | {r['density']:.3f} | "
                 f"{r['rel_err']:.4f} |")
  return "\n".join(lines)


def plot(rows, path, title):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  workload_names = sorted({r["workload"] for r in rows}, reverse=True)
  fig, axes = plt.subplots(1, len(workload_names), figsize=(5.5 * len(workload_names), 4.2))
  axes = np.atleast_1d(axes)
  for ax, wl in zip(axes, workload_names):
    for method, style in zip(METHODS, ("o--", "s-.", "D-")):
      pts = sorted((r["density"], r["rel_err"]) for r in rows
                   if r["workload"] == wl and r["method"] == method
                   and r["target_density"] is not None)
      ax.plot(*zip(*pts), style, label=method)
    ax.set_xlabel("density (fraction of S x S computed exactly)")
    ax.set_ylabel("relative L2 error vs dense")
    ax.set_yscale("log")
    ax.set_title(f"{wl} workload")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--preset", choices=sorted(PRESETS), default="demo")
  parser.add_argument("--workloads", nargs="+", default=["structured", "random"],
                      choices=["structured", "random"])
  parser.add_argument("--densities", type=float, nargs="+",
                      help="override the preset's density sweep")
  parser.add_argument("--seed", type=int, default=0, help="workload seed (default 0)")
  parser.add_argument("--out-dir", default=os.path.join("benchmarks", "results"))
  parser.add_argument("--no-plot", action="store_true")
  args = parser.parse_args(argv)

  preset = PRESETS[args.preset]
  if args.densities:
    bad = [d for d in args.densities if not 0 < d <= 1]
    if bad:
      parser.error(f"densities must be in (0, 1], got {bad}")
    preset = dataclasses.replace(preset, densities=tuple(args.densities))
  g = preset.grid
  print(f"SVG-EAR quality sweep, preset '{args.preset}': S={g.seq_len} "
        f"({g.frames}x{g.height}x{g.width}), H={preset.heads}, D={preset.head_dim}, "
        f"Kq={preset.num_q_clusters}, Kk={preset.num_k_clusters}, seed={args.seed}, "
        f"jax {jax.__version__} on {jax.devices()[0].device_kind}")
  total = len(args.workloads) * (len(preset.densities) + 1) * len(METHODS)
  start = time.time()
  rows = []
  with tqdm(total=total, desc="configurations", unit="cfg") as progress:
    for wl in args.workloads:
      rows += sweep(preset, wl, args.seed, progress)
  table = markdown_table(rows)
  print(table)
  verdict = ""
  if "structured" in args.workloads:
    losses = check_ear_wins(rows)
    verdict = ("SVG-EAR has the lowest error at every budget on the structured workload."
               if not losses else f"SVG-EAR is NOT the most accurate at budgets {losses}.")
    print(verdict)

  os.makedirs(args.out_dir, exist_ok=True)
  stem = os.path.join(args.out_dir, f"quality_{args.preset}")
  meta = dict(preset=args.preset, seq_len=g.seq_len, grid=dataclasses.asdict(g),
              heads=preset.heads, head_dim=preset.head_dim,
              num_q_clusters=preset.num_q_clusters, num_k_clusters=preset.num_k_clusters,
              seed=args.seed, jax_version=jax.__version__,
              device=jax.devices()[0].device_kind, python=platform.python_version(),
              seconds=round(time.time() - start, 1), verdict=verdict)
  with open(stem + ".json", "w") as f:
    json.dump(dict(meta=meta, rows=rows), f, indent=1)
  with open(stem + ".md", "w") as f:
    f.write(f"# Attention quality vs density ({args.preset})\n\n"
            f"S={g.seq_len}, H={preset.heads}, D={preset.head_dim}, Kq={preset.num_q_clusters},"
            f" Kk={preset.num_k_clusters}, seed {args.seed}, float32, jax {jax.__version__}, "
            f"{meta['device']}. Error = relative L2 vs dense float32 attention.\n\n"
            f"{table}\n\n{verdict}\n")
  if not args.no_plot:
    plot(rows, stem + ".png", f"S={g.seq_len}, H={preset.heads}, D={preset.head_dim}, "
         f"Kq={preset.num_q_clusters}, Kk={preset.num_k_clusters}")
  print(f"wrote {stem}.json, {stem}.md" + ("" if args.no_plot else f", {stem}.png")
        + f" in {meta['seconds']} s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
