"""Seconds per video of the Wan2.2 T2V-A14B pipeline, dense vs SVG-EAR, random bf16 weights.

  # per kind of step at 720p x 81 (CFG batch of 2), summed over the paper's schedule
  python -m benchmarks.generate steps --resolution 720p --settings dense mean_0.25 \\
      --out benchmarks/results/generate_h200
  python -m benchmarks.generate steps --resolution 720p --settings variance_0.15 \\
      variance_0.10 --merge --out benchmarks/results/generate_h200
  # one complete run, end to end (denoising loop + VAE decode to frames)
  python -m benchmarks.generate full --resolution 480p --settings variance_0.15 \\
      --out benchmarks/results/generate_full_h200
  python -m benchmarks.generate steps --resolution tiny --out /tmp/gen   # CPU smoke run

`steps`: both experts resident; for each setting the pipeline runs 2 steps (compiling the
cold and warm k-means programs), then 4 timed steps (high-noise expert cold, warm, warm,
low-noise expert cold: each expert's first sparse step of a video cold-starts k-means).
Dense steps likewise. A video of N = 40 steps with the paper's protocol (the first 20% of steps
dense, first layer dense, k-means cold at each expert's first sparse step) costs
  dense_steps * t_dense + 2 * t_sparse_cold + (N - dense_steps - 2) * t_sparse_warm,
the dense pipeline N * t_dense; with `--expert-switch carry` the low-noise expert starts
warm from the high-noise expert's centroids, so one cold step instead of two.
`--cold-iters N` sets the cold start's k-means iterations (benchmarks/kmeans_start.py
measures what fewer cost in attention error). Overhead outside the DiT = step time - forward time (the
forward timed alone through the same jitted function). `full`: the whole schedule once for
real, plus VAE decoding of the latents (random-weight Wan2.1 VAE).
"""

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models import denoise
from models.attention import AttentionPolicy
from models.sampling import EXPERT_SWITCHES, SvgEarSchedule
from models.schedulers import UniPCFlowScheduler
from svg_ear_jax import SvgEarConfig

RESOLUTIONS = {"720p": (720, 1280, 81), "480p": (480, 832, 81), "tiny": (64, 64, 5)}
COMPENSATIONS = ("mean", "variance")  # a sparse setting is COMPENSATION_DENSITY


def setting_name(text: str) -> str:
  """argparse type: "dense" or "<mean|variance>_<density in (0, 1]>"."""
  if text == "dense":
    return text
  compensation, _, density = text.partition("_")
  try:
    ok = compensation in COMPENSATIONS and 0 < float(density) <= 1
  except ValueError:
    ok = False
  if not ok:
    raise argparse.ArgumentTypeError(
        f"{text!r}: a setting is 'dense' or <mean|variance>_<density in (0, 1]>, e.g. "
        "variance_0.15")
  return text


def _setting_order(setting: str):
  if setting == "dense":
    return (0, 0.0)
  compensation, density = setting.split("_")
  return (1 + COMPENSATIONS.index(compensation), -float(density))
STEPS, DENSE_FRACTION, SHIFT = 40, 0.2, 12.0  # Wan2.2 T2V official: 40 steps, shift 12


def policy(setting: str, tiny: bool, cold_iters=None) -> AttentionPolicy:
  if setting == "dense":
    return AttentionPolicy.dense()
  compensation, density = setting.split("_")
  base = (SvgEarConfig(num_q_clusters=4, num_k_clusters=8, kmeans_iters=3) if tiny
          else SvgEarConfig.wan22_720p())
  if cold_iters is not None:
    base = base.replace(kmeans_iters=cold_iters)
  return AttentionPolicy.sparse(base.replace(density=float(density),
                                             compensation=compensation), dense_layers=1)


def _start(setting, resolution, args) -> dict:
  """The k-means start of a row: cold iterations and the state at the expert switch."""
  if setting == "dense":
    return dict(kmeans_cold_iters=None, expert_switch=None,
                offload_idle_expert=args.offload_idle_expert)
  cfg = policy(setting, resolution == "tiny", args.cold_iters).svg_ear
  return dict(kmeans_cold_iters=cfg.kmeans_iters, expert_switch=args.expert_switch,
              offload_idle_expert=args.offload_idle_expert)


def build_pipeline(resolution: str, offload_idle_expert: bool = False):
  from models.wan import WanConfig, WanPipeline, WanTransformer

  tiny = resolution == "tiny"
  cfg = WanConfig.tiny() if tiny else WanConfig.t2v_a14b()
  high = WanTransformer(cfg, rngs=nnx.Rngs(0))
  low = WanTransformer(cfg, rngs=nnx.Rngs(1))
  return WanPipeline(high, UniPCFlowScheduler(flow_shift=SHIFT), transformer_2=low,
                     boundary_ratio=0.875, offload_idle_expert=offload_idle_expert), cfg


def _embeds(cfg, text_len):
  key = jax.random.split(jax.random.key(0), 2)
  return tuple(jax.random.normal(k, (1, text_len, cfg.text_dim), jnp.float32) for k in key)


def _peak_gb():
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use", float("nan")) / 1e9


def _forward_ms(pipe, pe, ne, shape, dense: bool, iterations: int = 1) -> float:
  """One DiT forward of the CFG batch alone, through the pipeline's jitted forward (warm
  k-means state from the previous pipeline call for sparse settings)."""
  from models.wan.pipeline import WanCall

  # the expert on the device (with --offload-idle-expert the other one waits on the host)
  ex = next(e for e in pipe._experts.values() if not e.on_host)
  # the pipeline wrote its final centroids back into the model, which changes the split
  # model's structure: split it again, keeping the warm state
  state = ex.states.get("batch")
  ex.refresh()
  ex.states["batch"] = state
  both = (jnp.concatenate([pe, ne]).astype(pipe.transformer.config.dtype), None)
  x = jax.random.normal(jax.random.key(1), shape, jnp.float32)
  if pipe.offload_idle_expert:  # committed, as the offloading loop's latents are
    x = jax.device_put(x, ex.device)
  kind = denoise.DENSE if dense else "sparse"
  times = []
  for _ in range(iterations):  # compiled by the pipeline's calls already
    t0 = time.perf_counter()
    out, _ = ex.forward("batch", x, 500.0, both, 4.0, kind=kind, mode="batch", call=WanCall())
    jax.block_until_ready(out)
    times.append((time.perf_counter() - t0) * 1e3)
  return statistics.median(times)


def measure_steps(pipe, cfg, setting, resolution, args):
  h, w, f = RESOLUTIONS[resolution]
  tiny = resolution == "tiny"
  pol = policy(setting, tiny, args.cold_iters)
  for m in (pipe.transformer, pipe.transformer_2):
    m.set_attention(pol)
  dense = setting == "dense"
  schedule = (SvgEarSchedule.dense() if dense else
              dataclasses.replace(SvgEarSchedule.sparse(), expert_switch=args.expert_switch))
  pe, ne = _embeds(cfg, 8 if tiny else 512)
  common = dict(height=h, width=w, num_frames=f, guidance_scale=4.0, guidance_scale_2=3.0,
                schedule=schedule, progress=False, seed=0)
  t0 = time.perf_counter()
  pipe(pe, ne, num_inference_steps=2, **common)  # compile
  compile_s = time.perf_counter() - t0
  # 4 steps at shift 12: t = 999, 973, 923 (high-noise expert), 800 (low-noise): each
  # expert's first sparse step is cold (the low-noise one warm with expert_switch="carry"),
  # the two middle ones warm
  out = pipe(pe, ne, num_inference_steps=4, **common)
  cold = [r.seconds * 1e3 for r in out.records if r.graph.endswith("-cold")]
  warm = [r.seconds * 1e3 for r in out.records if not r.graph.endswith("-cold")]
  shape = pipe.latent_shape(1, f, h, w)
  forward = _forward_ms(pipe, pe, ne, shape, dense)
  row = dict(setting=setting, resolution=resolution, tokens=int(
                 shape[2] * shape[3] * shape[4] // 4),
             device=jax.devices()[0].device_kind, jax_version=jax.__version__,
             batch="CFG batch of 2", compile_and_first_steps_s=compile_s,
             **_start(setting, resolution, args),
             step_ms_cold=statistics.median(cold) if cold else None,
             step_ms_warm=statistics.median(warm), step_graphs=[r.graph for r in out.records],
             forward_ms=forward, density=float(np.mean(out.step_density)),
             peak_memory_gb=_peak_gb())
  row["outside_dit_ms"] = row["step_ms_warm"] - forward
  row["outside_dit_fraction"] = row["outside_dit_ms"] / row["step_ms_warm"]
  if dense:
    row["step_ms_cold"] = row["step_ms_warm"]
  print(json.dumps(row), flush=True)
  return row


def video_seconds(rows, steps=STEPS, fraction=DENSE_FRACTION):
  """Seconds per video of each setting under the protocol (see module doc)."""
  dense = {r["resolution"]: r for r in rows if r["setting"] == "dense"}
  n_dense = int(fraction * steps)
  for r in rows:
    if r["setting"] == "dense":
      r["video_s"] = steps * r["step_ms_warm"] / 1e3
    else:
      d = dense.get(r["resolution"])
      if d is None:
        r["video_s"] = None
        continue
      n_cold = 1 if r.get("expert_switch") == "carry" else 2
      r["video_s"] = (n_dense * d["step_ms_warm"] + n_cold * r["step_ms_cold"]
                      + (steps - n_dense - n_cold) * r["step_ms_warm"]) / 1e3
    d = dense.get(r["resolution"])
    r["speedup_vs_dense"] = (d["video_s"] / r["video_s"]
                             if d is not None and r["video_s"] else None)
  return rows


def run_full(pipe, cfg, setting, resolution, args):
  from models.wan import WanVAE, WanVAEConfig

  h, w, f = RESOLUTIONS[resolution]
  tiny = resolution == "tiny"
  pol = policy(setting, tiny, args.cold_iters)
  for m in (pipe.transformer, pipe.transformer_2):
    m.set_attention(pol)
  pe, ne = _embeds(cfg, 8 if tiny else 512)
  steps = 4 if tiny else STEPS
  schedule = SvgEarSchedule(dense_steps=DENSE_FRACTION, expert_switch=args.expert_switch)
  t0 = time.perf_counter()
  out = pipe(pe, ne, height=h, width=w, num_frames=f, num_inference_steps=steps,
             guidance_scale=4.0, guidance_scale_2=3.0, schedule=schedule, progress=True,
             seed=0)
  loop_s = time.perf_counter() - t0
  vae_cfg = (WanVAEConfig(base_dim=8, z_dim=cfg.out_channels,
                          latents_mean=(0.0,) * cfg.out_channels,
                          latents_std=(1.0,) * cfg.out_channels) if tiny
             else WanVAEConfig())
  vae = WanVAE(vae_cfg, rngs=nnx.Rngs(2))
  t0 = time.perf_counter()
  frames = jax.block_until_ready(vae.decode(out.latents))
  decode_s = time.perf_counter() - t0
  row = dict(setting=setting, resolution=resolution, steps=steps,
             **_start(setting, resolution, args),
             device=jax.devices()[0].device_kind, jax_version=jax.__version__,
             loop_s_including_compile=loop_s, step_s=[r.seconds for r in out.records],
             step_graph=[r.graph for r in out.records],
             step_density=[float(d) for d in out.step_density],
             steps_total_s=float(np.nansum(out.step_seconds)), vae_decode_s=decode_s,
             frames_shape=list(frames.shape), finite=bool(np.isfinite(
                 np.asarray(out.latents)).all()), peak_memory_gb=_peak_gb())
  print(json.dumps({k: v for k, v in row.items() if not isinstance(v, list)}), flush=True)
  return row


def _start_text(row) -> str:
  text = ("" if row.get("kmeans_cold_iters") is None else
          f"{row['kmeans_cold_iters']} cold iters, switch {row['expert_switch']}")
  return text + (", idle expert on host" if row.get("offload_idle_expert") else "")


def _row_key(row):
  return (row["resolution"], row["setting"], row.get("kmeans_cold_iters"),
          row.get("expert_switch"), bool(row.get("offload_idle_expert")))


def write(rows, out, mode):
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out + ".json", "w") as f:
    json.dump(rows, f, indent=1)
  if mode == "steps":
    lines = ["| resolution | setting | k-means start | density | step ms (cold / warm) | "
             "DiT forward ms | outside DiT | s / video (40 steps, 20% dense) | vs dense | "
             "peak GB |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
      sp = r.get("speedup_vs_dense")
      lines.append(
          f"| {r['resolution']} | {r['setting']} | {_start_text(r)} | {r['density']:.3f} | "
          f"{r['step_ms_cold']:.0f} / {r['step_ms_warm']:.0f} | {r['forward_ms']:.0f} | "
          f"{100 * r['outside_dit_fraction']:.2f}% | "
          f"{'' if r.get('video_s') is None else format(r['video_s'], '.1f')} | "
          f"{'' if sp is None else format(sp, '.2f') + 'x'} | {r['peak_memory_gb']:.1f} |")
  else:
    lines = ["| resolution | setting | k-means start | steps | steps total s | VAE decode s | "
             "loop incl. compile s | peak GB |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
      lines.append(f"| {r['resolution']} | {r['setting']} | {_start_text(r)} | {r['steps']} | "
                   f"{r['steps_total_s']:.1f} | {r['vae_decode_s']:.1f} | "
                   f"{r['loop_s_including_compile']:.1f} | {r['peak_memory_gb']:.1f} |")
  with open(out + ".md", "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("mode", choices=("steps", "full"))
  parser.add_argument("--resolution", choices=tuple(RESOLUTIONS), default="720p")
  parser.add_argument("--settings", nargs="+", default=["dense", "mean_0.25", "variance_0.15"],
                      type=setting_name,
                      help="dense or <mean|variance>_<density> (default: %(default)s)")
  parser.add_argument("--cold-iters", type=int, default=None,
                      help="k-means iterations of a cold start (default: the preset's, 50)")
  parser.add_argument("--expert-switch", choices=EXPERT_SWITCHES, default="cold",
                      help="the low-noise expert's k-means start (SvgEarSchedule.expert_switch)")
  parser.add_argument("--offload-idle-expert", action="store_true",
                      help="keep the idle expert in host memory (peak memory of one expert)")
  parser.add_argument("--merge", action="store_true", help="add rows to an existing OUT.json")
  parser.add_argument("--out", default=os.path.join("out", "generate"))
  args = parser.parse_args(argv)
  if args.cold_iters is not None and args.cold_iters < 1:
    parser.error(f"--cold-iters must be >= 1, got {args.cold_iters}")
  pipe, cfg = build_pipeline(args.resolution, args.offload_idle_expert)
  rows = []
  for setting in args.settings:
    fn = measure_steps if args.mode == "steps" else run_full
    rows.append(fn(pipe, cfg, setting, args.resolution, args))
  if args.merge and os.path.exists(args.out + ".json"):
    with open(args.out + ".json") as f:
      done = {_row_key(r) for r in rows}
      rows = [r for r in json.load(f) if _row_key(r) not in done] + rows
  rows.sort(key=lambda r: (r["resolution"], _setting_order(r["setting"]),
                           -(r.get("kmeans_cold_iters") or 0), r.get("expert_switch") or "",
                           bool(r.get("offload_idle_expert"))))
  if args.mode == "steps":
    rows = video_seconds(rows)
  write(rows, args.out, args.mode)
  return 0


if __name__ == "__main__":
  sys.exit(main())
