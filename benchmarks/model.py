"""One DiT forward at full resolution: dense cuDNN attention vs SVG-EAR, with random weights.

  python -m benchmarks.model --model wan --out benchmarks/results/model_wan_h100       # A14B expert, 720p x 81
  python -m benchmarks.model --model hunyuan --out benchmarks/results/model_hunyuan_h100  # 13B, 720p x 129
  python -m benchmarks.model --model wan --preset tiny --out /tmp/model_tiny            # CPU smoke run

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


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model", choices=["wan", "hunyuan"], default="wan")
  parser.add_argument("--preset", choices=["full", "tiny"], default="full")
  parser.add_argument("--iters", type=int, default=3)
  parser.add_argument("--peer-json", help="JSON written by benchmarks/model_diffusers_peer.py")
  parser.add_argument("--out", default=os.path.join("benchmarks", "results", "model"))
  args = parser.parse_args(argv)

  rows = []
  model = cfg = None
  for name, policy in policies(args.model, args.preset).items():
    if model is None:
      model, cfg = build(args.model, args.preset, policy)
    else:
      model.set_attention(policy)
    xs = inputs(args.model, cfg, args.preset)
    fwd = nnx.jit(lambda m, *a: m(*a))
    out = fwd(model, *xs)  # first call: compile (+ cold k-means)
    ms, method = timing.measure_ms(lambda *a: fwd(model, *a), *xs, iterations=args.iters,
                                   warmup=1)
    density = None
    if model.attention_density.get_value() is not None:
      density = float(jnp.mean(model.attention_density.get_value()))
    rows.append(dict(model=args.model, preset=args.preset, policy=name,
                     device=jax.devices()[0].device_kind, jax_version=jax.__version__,
                     tokens=int(math.prod(out.shape[2:]) // 4), forward_ms=ms,
                     mean_sparse_density=density, timing=method))
    print(json.dumps(rows[-1]), flush=True)
  dense_ms = rows[0]["forward_ms"]
  for r in rows:
    r["speedup_vs_dense"] = dense_ms / r["forward_ms"]
  if args.peer_json:
    with open(args.peer_json) as f:
      peer = json.load(f)
    for r in rows:
      r["diffusers_dense_ms"] = peer["forward_ms"]
      r["speedup_vs_diffusers"] = peer["forward_ms"] / r["forward_ms"]
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out + ".json", "w") as f:
    json.dump(rows, f, indent=1)
  lines = ["| model | policy | forward ms | vs our dense | mean density |", "|---|---|---|---|---|"]
  for r in rows:
    dens = "" if r["mean_sparse_density"] is None else f"{r['mean_sparse_density']:.3f}"
    lines.append(f"| {r['model']} | {r['policy']} | {r['forward_ms']:.1f} | "
                 f"{r['speedup_vs_dense']:.2f}x | {dens} |")
  with open(args.out + ".md", "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))
  return 0


if __name__ == "__main__":
  sys.exit(main())
