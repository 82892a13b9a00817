"""One DiT forward at full resolution: dense cuDNN attention vs SVG-EAR, with random weights.

  python -m benchmarks.model --model wan --out benchmarks/results/model_wan_h100       # A14B expert, 720p x 81
  python -m benchmarks.model --model hunyuan --out benchmarks/results/model_hunyuan_h100  # 13B, 720p x 129
  python -m benchmarks.model --model wan --preset tiny --out /tmp/model_tiny            # CPU smoke run

--policies runs a subset (one device call may not hold all three at full size); --merge
adds the rows to an existing STEM.json (a policy measured again replaces its old row).

Each policy is timed as the steady state of a sampling loop: one untimed call (which also
cold-starts k-means), then the median of --iters calls, each warm-starting from the
previous call's centroids. The PyTorch diffusers peer runs in its own process
(benchmarks/model_diffusers_peer.py: JAX preallocates GPU memory) and its JSON is merged
with --peer-json.
"""

import argparse
import json
import math
import os
import sys

import jax
import jax.numpy as jnp
from flax import nnx

from benchmarks import timing
from models.attention import AttentionPolicy
from svg_ear_jax import SvgEarConfig

PRESETS = {
    # latent [C, F, H, W] after the VAE (4x temporal, 8x spatial), text length
    "wan": dict(full=dict(latent=(16, 21, 90, 160), text=512), tiny=dict(latent=(4, 3, 8, 8), text=8)),
    "hunyuan": dict(full=dict(latent=(16, 33, 90, 160), text=256),
                    tiny=dict(latent=(4, 3, 8, 8), text=8)),
}


def build(model_name, preset, attention):
  if model_name == "wan":
    from models.wan import WanConfig, WanTransformer
    cfg = WanConfig.t2v_a14b() if preset == "full" else WanConfig.tiny()
    return WanTransformer(cfg, attention=attention, rngs=nnx.Rngs(0)), cfg
  from models.hunyuan import HunyuanConfig, HunyuanVideoTransformer
  cfg = HunyuanConfig.t2v_720p() if preset == "full" else HunyuanConfig.tiny()
  return HunyuanVideoTransformer(cfg, attention=attention, rngs=nnx.Rngs(0)), cfg


def inputs(model_name, cfg, preset):
  p = PRESETS[model_name][preset]
  c, f, h, w = p["latent"]
  key = jax.random.split(jax.random.PRNGKey(0), 4)
  x = jax.random.normal(key[0], (1, cfg.in_channels, f, h, w), cfg.dtype)
  t = jnp.array([500.0], jnp.float32)
  ctx = jax.random.normal(key[1], (1, p["text"], cfg.text_dim), cfg.dtype)
  if model_name == "wan":
    return (x, t, ctx)
  mask = jnp.ones((1, p["text"]), jnp.int32).at[:, p["text"] // 2:].set(0)
  pooled = jax.random.normal(key[2], (1, cfg.pooled_projection_dim), cfg.dtype)
  return (x, t, ctx, mask, pooled, jnp.array([6000.0], jnp.float32))


def policies(model_name, preset):
  if preset == "tiny":
    small = dict(num_q_clusters=4, num_k_clusters=8)
    return {"dense": AttentionPolicy.dense(),
            "svg_ear_0.25": AttentionPolicy.sparse(SvgEarConfig(density=0.25, **small), 1)}
  base = SvgEarConfig.wan22_720p() if model_name == "wan" else SvgEarConfig.hunyuan_720p()
  return {"dense": AttentionPolicy.dense(),
          "svg_ear_0.25": AttentionPolicy.sparse(base.replace(density=0.25), dense_layers=1),
          "svg_ear_top-p": AttentionPolicy.sparse(base, dense_layers=1)}


def forward_memory_gb(model, xs) -> dict:
  """Memory of one forward: XLA's accounting of the compiled call (weights + inputs +
  temporaries) where it can be had, and the process's device peak so far (BFC allocator)."""
  graphdef, state = nnx.split(model)
  weights = sum(x.nbytes for x in jax.tree.leaves(state)) / 1e9
  row = dict(weights_gb=weights, peak_mem_gb=None, process_peak_gb=None)
  try:
    fn = jax.jit(lambda st, *a: nnx.merge(graphdef, st)(*a))
    row["peak_mem_gb"] = timing.compiled_memory_gb(fn, state, *xs)
  except Exception as e:  # report, keep the timing
    row["memory_error"] = f"{type(e).__name__}: {str(e)[:200]}"
  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    row["process_peak_gb"] = stats["peak_bytes_in_use"] / 1e9
  return row


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model", choices=["wan", "hunyuan"], default="wan")
  parser.add_argument("--preset", choices=["full", "tiny"], default="full")
  parser.add_argument("--iters", type=int, default=3)
  parser.add_argument("--policies", nargs="+", default=None,
                      help="subset of: dense svg_ear_0.25 svg_ear_top-p (default: all)")
  parser.add_argument("--merge", action="store_true",
                      help="merge into an existing STEM.json instead of overwriting it")
  parser.add_argument("--peer-json", help="JSON written by benchmarks/model_diffusers_peer.py")
  parser.add_argument("--out", default=os.path.join("benchmarks", "results", "model"))
  args = parser.parse_args(argv)

  all_policies = policies(args.model, args.preset)
  chosen = args.policies or list(all_policies)
  unknown = sorted(set(chosen) - set(all_policies))
  if unknown:
    parser.error(f"unknown policies {unknown}; choose from {sorted(all_policies)}")
  rows = []
  model = cfg = None
  for name in chosen:
    policy = all_policies[name]
    if model is None:
      model, cfg = build(args.model, args.preset, policy)
    else:
      model.set_attention(policy)
    xs = inputs(args.model, cfg, args.preset)
    fwd = nnx.jit(lambda m, *a: m(*a))
    out = fwd(model, *xs)  # first call: compile (+ cold k-means)
    # wall clock: a forward takes seconds, and the model's k-means state changes per call
    ms, method = timing.measure_ms(lambda *a: fwd(model, *a), *xs, iterations=args.iters,
                                   warmup=1, wallclock=True)
    density = None
    if model.attention_density.get_value() is not None:
      density = float(jnp.mean(model.attention_density.get_value()))
    rows.append(dict(model=args.model, preset=args.preset, policy=name,
                     device=jax.devices()[0].device_kind, jax_version=jax.__version__,
                     tokens=int(math.prod(out.shape[2:]) // 4), forward_ms=ms,
                     mean_sparse_density=density, timing=method,
                     **forward_memory_gb(model, xs)))
    print(json.dumps(rows[-1]), flush=True)
  if args.merge and os.path.exists(args.out + ".json"):
    measured = {(r["model"], r["policy"]) for r in rows}
    with open(args.out + ".json") as f:
      old = [r for r in json.load(f) if (r["model"], r["policy"]) not in measured]
    rows = sorted(old + rows, key=lambda r: list(all_policies).index(r["policy"]))
  dense = [r for r in rows if r["policy"] == "dense"]
  for r in rows:
    r["speedup_vs_dense"] = dense[0]["forward_ms"] / r["forward_ms"] if dense else None
  if args.peer_json:
    with open(args.peer_json) as f:
      peer = json.load(f)
    for r in rows:
      r["diffusers_dense_ms"] = peer["forward_ms"]
      r["speedup_vs_diffusers"] = peer["forward_ms"] / r["forward_ms"]
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out + ".json", "w") as f:
    json.dump(rows, f, indent=1)
  lines = ["| model | policy | tokens | forward ms | vs our dense | vs diffusers dense |"
           " mean density | peak mem GB (weights + activations) |", "|---|---|---|---|---|---|---|---|"]
  fmt = lambda x, spec, unit="": "" if x is None else format(x, spec) + unit
  for r in rows:
    lines.append(f"| {r['model']} | {r['policy']} | {r['tokens']} | {r['forward_ms']:.1f} | "
                 f"{fmt(r['speedup_vs_dense'], '.2f', 'x')} | "
                 f"{fmt(r.get('speedup_vs_diffusers'), '.2f', 'x')} | "
                 f"{fmt(r['mean_sparse_density'], '.3f')} | {fmt(r['peak_mem_gb'], '.1f')} |")
  if args.peer_json:
    lines.append(f"\ndiffusers dense forward (torch "
                 f"{peer.get('torch')}, {peer.get('device')}): {peer['forward_ms']:.1f} ms, "
                 f"peak {fmt(peer.get('peak_mem_gb'), '.1f')} GB")
  with open(args.out + ".md", "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))
  return 0


if __name__ == "__main__":
  sys.exit(main())
