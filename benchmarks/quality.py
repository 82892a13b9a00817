"""Attention quality vs density: SVG2 top-p, top-p + compensation, and SVG-EAR, each
compensation with the paper's centroid pseudo-token ("mean") and with its second-moment
correction ("variance", ALGORITHM.md 9).

For each workload and each target density (fixed-density budget), runs the five methods
and reports the relative L2 error of the output against dense float32 attention, at the
density each actually reached; plus one row per method at the reference top-p budget
(density=None, top_p=0.9). Writes a markdown table, a JSON file and an error-vs-density
PNG under --out-dir (default out/quality, outside the committed results: the committed
demo tables are written with --out-dir benchmarks/results).

  python -m benchmarks.quality --preset demo    # CPU, < 2 minutes (README's main job)
  python -m benchmarks.quality --preset full    # larger grid, more heads (minutes on CPU)
"""

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from benchmarks import workloads
from svg_ear_jax import (SvgEarConfig, dense_attention_reference, pipeline,
                         resolve_implementation, routing)

METHODS = {
    "SVG2 (top-p)": dict(routing="topp", compensation="none"),
    "top-p + comp.": dict(routing="topp", compensation="mean"),
    "top-p + var.": dict(routing="topp", compensation="variance"),
    "SVG-EAR": dict(routing="ear", compensation="mean"),
    "SVG-EAR + var.": dict(routing="ear", compensation="variance"),
}
STYLES = {"SVG2 (top-p)": "o--", "top-p + comp.": "s-.", "top-p + var.": "s:",
          "SVG-EAR": "D-", "SVG-EAR + var.": "D:"}


PROBE_STUDY = "SVG-EAR + var. (probe: query centroid)"


@dataclasses.dataclass(frozen=True)
class Preset:
  """One quality sweep.

  Attributes:
    grid, heads, head_dim, num_q_clusters, num_k_clusters: the problem.
    densities: fixed-density budgets swept.
    reference_budget: also one row per method at the reference budget (top-p 0.9).
    dtype: input dtype of the SVG-EAR call (the reference is float32 on the same inputs).
    implementation: SvgEarConfig.implementation.
    sample_rows: None = error over every query; else over this many sampled query
      positions (all heads), against exact float32 attention of those rows.
    workloads: the default workloads.
  """

  grid: workloads.Grid
  heads: int
  head_dim: int
  num_q_clusters: int
  num_k_clusters: int
  densities: tuple
  reference_budget: bool = True
  dtype: str = "float32"
  implementation: str = "auto"
  sample_rows: Optional[int] = None
  workloads: tuple = ("structured", "random")


PRESETS = {
    # 2,304 tokens, Kk/S and Kq/S near the 720p reference (~1/76 and ~1/250 -> 1/24, 1/96)
    "demo": Preset(workloads.Grid(6, 16, 24), heads=4, head_dim=64, num_q_clusters=24,
                   num_k_clusters=96, densities=(0.1, 0.15, 0.2, 0.25, 0.3)),
    "full": Preset(workloads.Grid(9, 24, 32), heads=8, head_dim=128, num_q_clusters=48,
                   num_k_clusters=160, densities=(0.05, 0.1, 0.15, 0.2, 0.25, 0.35)),
    # GPU: the real shapes and kernels (bf16), error on 512 sampled rows vs exact float32
    "wan22_720p": Preset(workloads.WAN_720P, 40, 128, 300, 1000, (0.1, 0.15, 0.25),
                         reference_budget=False, dtype="bfloat16", sample_rows=512,
                         workloads=("structured",)),
    "hunyuan_720p": Preset(workloads.HUNYUAN_720P, 24, 128, 400, 1000, (0.1, 0.15, 0.25),
                           reference_budget=False, dtype="bfloat16", sample_rows=512,
                           workloads=("structured",)),
}


def rel_err(out, ref):
  """Relative L2 error over everything, and per head ([H]); out, ref [B, N, H, D]."""
  diff = (out.astype(jnp.float32) - ref)
  total = float(jnp.linalg.norm(diff) / jnp.linalg.norm(ref))
  per_head = jnp.sqrt(jnp.sum(diff ** 2, axis=(0, 1, 3)) / jnp.sum(ref ** 2, axis=(0, 1, 3)))
  return total, np.asarray(per_head).tolist()


def exact_rows(q, k, v, rows):
  """Exact float32 attention of query positions `rows` [N]: [B, N, H, D]."""
  if rows is None:
    return dense_attention_reference(q, k, v)
  f32 = lambda x: x.astype(jnp.float32)
  out = []
  for h in range(q.shape[2]):  # one head at a time: [N, S] logits
    qh, kh, vh = f32(q[0, rows, h]), f32(k[0, :, h]), f32(v[0, :, h])
    p = jax.nn.softmax(jnp.dot(qh, kh.T, precision="highest") * q.shape[-1] ** -0.5, -1)
    out.append(jnp.dot(p, vh, precision="highest"))
  return jnp.stack(out, 1)[None]


def _heads_first(x):
  b, s, h, d = x.shape
  return x.transpose(0, 2, 1, 3).reshape(b * h, s, d)


def sweep(preset: Preset, workload: str, seed: int, progress, probe_study=False) -> list:
  """All (method, budget) rows of one workload.

  Runs the pipeline's stages (the same functions `svg_ear_attention` chains): one cold
  clustering shared by every method (its key spread is only read by "variance"), a route
  per (method, budget) and an attend per compensation mode, so that a sweep at full size
  compiles each kernel once instead of once per configuration.
  """
  if workload == "structured":
    qkv = workloads.structured(preset.grid, preset.heads, preset.head_dim, seed=seed)
  else:
    qkv = workloads.random_qkv(preset.grid.seq_len, preset.heads, preset.head_dim, seed=seed)
  q, k, v = (jnp.asarray(x).astype(preset.dtype) for x in qkv)
  rows_idx = None
  if preset.sample_rows is not None:
    rng = np.random.default_rng(seed + 1)
    rows_idx = jnp.asarray(np.sort(rng.choice(q.shape[1], preset.sample_rows, replace=False)))
  ref = exact_rows(q, k, v, rows_idx)
  base = SvgEarConfig(num_q_clusters=preset.num_q_clusters,
                      num_k_clusters=preset.num_k_clusters, compensation="variance",
                      implementation=preset.implementation)
  impl = resolve_implementation(base)
  qg, kg, vg = (_heads_first(x) for x in (q, k, v))
  clusters = jax.jit(lambda *a: pipeline.cluster(*a, base, impl))(qg, kg, vg)
  route = jax.jit(pipeline.route, static_argnames=("cfg", "impl"))
  attends = {}
  # the probe study's alternative: the probe's correction at the query centroid
  at_centroid = dataclasses.replace(clusters, q_sq_means=None)
  methods = dict(METHODS, **({PROBE_STUDY: METHODS["SVG-EAR + var."]} if probe_study else {}))
  budgets = preset.densities + ((None,) if preset.reference_budget else ())
  rows = []
  for density in budgets:
    for method, changes in methods.items():
      cfg = base.replace(density=density, **changes)
      block_map = route(qg, kg, vg, at_centroid if method == PROBE_STUDY else clusters,
                        cfg=cfg, impl=impl)
      if cfg.compensation not in attends:
        attends[cfg.compensation] = jax.jit(
            lambda *a, _cfg=cfg: pipeline.attend(*a, _cfg, impl))
      out = attends[cfg.compensation](q, k, v, clusters, block_map)
      if rows_idx is not None:
        out = out[:, rows_idx]
      total, per_head = rel_err(out, ref)
      dens = routing.block_density(block_map, clusters.q.sizes, clusters.k.sizes)
      rows.append(dict(workload=workload, method=method,
                       budget="top-p 0.9" if density is None else f"{density:.2f}",
                       target_density=density, density=float(dens.mean()),
                       rel_err=total, rel_err_per_head=per_head))
      progress.update(1)
  return rows


def check_ear_wins(rows) -> list:
  """Structured-workload budgets where SVG-EAR ("mean") is not the most accurate of the
  paper's three methods."""
  losses = []
  for budget in sorted({r["budget"] for r in rows if r["workload"] == "structured"}):
    at = {r["method"]: r["rel_err"] for r in rows
          if r["workload"] == "structured" and r["budget"] == budget}
    if any(at["SVG-EAR"] >= at[m] for m in ("SVG2 (top-p)", "top-p + comp.")):
      losses.append(budget)
  return losses


def variance_ratios(rows) -> dict:
  """{(workload, budget): error of EAR + var. / error of EAR (mean)} for every budget."""
  err = {(r["workload"], r["budget"], r["method"]): r["rel_err"] for r in rows}
  return {(wl, b): err[wl, b, "SVG-EAR + var."] / err[wl, b, "SVG-EAR"]
          for wl, b, m in err if m == "SVG-EAR"}


def matching_density(rows, workload: str, at: float = 0.25):
  """The density at which EAR + var. has the error of EAR ("mean") at density `at`
  (log-error interpolated linearly in density over the fixed-density rows), or None when
  it lies outside the swept range."""
  curve = lambda m: sorted((r["density"], np.log(r["rel_err"])) for r in rows
                           if r["workload"] == workload and r["method"] == m
                           and r["target_density"] is not None)
  mean, var = curve("SVG-EAR"), curve("SVG-EAR + var.")
  if len(mean) < 2 or not mean[0][0] <= at <= mean[-1][0]:
    return None
  target = np.interp(at, *zip(*mean))
  dens, log_err = (np.asarray(x) for x in zip(*var))
  if not log_err.min() <= target <= log_err.max():
    return None
  order = np.argsort(log_err)  # error falls with density: interpolate density in error
  return float(np.interp(target, log_err[order], dens[order]))


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
    for method, style in STYLES.items():
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
  parser.add_argument("--workloads", nargs="+", choices=["structured", "random"],
                      help="default: the preset's (demo, full: both; GPU shapes: structured)")
  parser.add_argument("--densities", type=float, nargs="+",
                      help="override the preset's density sweep")
  parser.add_argument("--seed", type=int, default=0, help="workload seed (default 0)")
  parser.add_argument("--out-dir", default=os.path.join("out", "quality"),
                      help="where the table, JSON and plot go (default out/quality)")
  parser.add_argument("--no-plot", action="store_true")
  parser.add_argument("--probe-study", action="store_true",
                      help=f"add the row '{PROBE_STUDY}': the EAR probe's variance correction "
                           "at each query cluster's centroid instead of from its mean of q*q")
  args = parser.parse_args(argv)
  workload_names = args.workloads or list(PRESETS[args.preset].workloads)

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
  total = (len(workload_names) * (len(preset.densities) + preset.reference_budget)
           * (len(METHODS) + args.probe_study))
  start = time.time()
  rows = []
  with tqdm(total=total, desc="configurations", unit="cfg") as progress:
    for wl in workload_names:
      rows += sweep(preset, wl, args.seed, progress, probe_study=args.probe_study)
  table = markdown_table(rows)
  print(table)
  verdict = []
  if "structured" in workload_names:
    losses = check_ear_wins(rows)
    verdict.append("SVG-EAR has a lower error than SVG2 and top-p + comp. at every budget on "
                   "the structured workload." if not losses else
                   f"SVG-EAR is NOT more accurate than SVG2 / top-p + comp. at budgets {losses}.")
  ratios = variance_ratios(rows)
  worse = sorted(f"{wl} {b}" for (wl, b), x in ratios.items() if x >= 1.0)
  verdict.append(
      f"EAR + var. / EAR error: {min(ratios.values()):.2f}-{max(ratios.values()):.2f}x; "
      + ("lower at every budget of every workload." if not worse else
         f"NOT lower at {worse}."))
  if args.probe_study:
    err = {(r["workload"], r["budget"], r["method"]): r["rel_err"] for r in rows}
    study = [err[wl, b, PROBE_STUDY] / err[wl, b, "SVG-EAR + var."]
             for wl, b, m in err if m == PROBE_STUDY]
    verdict.append(f"Probe study: error with the probe at the query centroid / with the "
                   f"cluster mean of q*q (the default): {min(study):.3f}-{max(study):.3f}x.")
  for wl in workload_names:
    d = matching_density(rows, wl)
    verdict.append(f"{wl}: EAR + var. matches EAR's error at density 0.25 at density "
                   + ("(outside the swept range)" if d is None else f"{d:.3f}") + ".")
  verdict = "\n".join(verdict)
  print(verdict)

  os.makedirs(args.out_dir, exist_ok=True)
  stem = os.path.join(args.out_dir, f"quality_{args.preset}")
  meta = dict(preset=args.preset, seq_len=g.seq_len, grid=dataclasses.asdict(g),
              heads=preset.heads, head_dim=preset.head_dim,
              num_q_clusters=preset.num_q_clusters, num_k_clusters=preset.num_k_clusters,
              seed=args.seed, dtype=preset.dtype, sample_rows=preset.sample_rows,
              implementation=resolve_implementation(SvgEarConfig(
                  implementation=preset.implementation)), jax_version=jax.__version__,
              device=jax.devices()[0].device_kind, python=platform.python_version(),
              seconds=round(time.time() - start, 1), verdict=verdict,
              variance_over_mean={f"{wl} {b}": round(x, 4)
                                  for (wl, b), x in variance_ratios(rows).items()})
  with open(stem + ".json", "w") as f:
    json.dump(dict(meta=meta, rows=rows), f, indent=1)
  with open(stem + ".md", "w") as f:
    f.write(f"# Attention quality vs density ({args.preset})\n\n"
            f"S={g.seq_len}, H={preset.heads}, D={preset.head_dim}, Kq={preset.num_q_clusters},"
            f" Kk={preset.num_k_clusters}, seed {args.seed}, {preset.dtype} inputs, "
            f"implementation {meta['implementation']}, jax {jax.__version__}, "
            f"{meta['device']}. Error = relative L2 vs exact float32 attention of the same "
            f"inputs" + ("" if preset.sample_rows is None else
                         f" on {preset.sample_rows} sampled query rows (all heads)")
            + ".\n\n"
            f"{table}\n\n" + verdict.replace("\n", "\n\n") + "\n")
  if not args.no_plot:
    plot(rows, stem + ".png", f"S={g.seq_len}, H={preset.heads}, D={preset.head_dim}, "
         f"Kq={preset.num_q_clusters}, Kk={preset.num_k_clusters}")
  print(f"wrote {stem}.json, {stem}.md" + ("" if args.no_plot else f", {stem}.png")
        + f" in {meta['seconds']} s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
