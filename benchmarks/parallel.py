"""Ulysses sequence parallelism: one denoising step of a DiT over 1, 2, 4, 8 devices.

  python -m benchmarks.parallel --model wan --devices 1 2 4 8 --out benchmarks/results/parallel_wan_h200
  python -m benchmarks.parallel --model hunyuan --devices 1 2 4 8 --out benchmarks/results/parallel_hunyuan_h200
  python -m benchmarks.parallel --smoke --out /tmp/parallel_smoke     # tiny, CPU fake devices

One row per (policy, layout, device count): the step time (one forward of the CFG batch,
--batch 2 by default, with random bf16 weights: Wan2.2 A14B one expert 720p x 81 =
75,600 tokens, HunyuanVideo 720p x 129 = 118,800 video tokens), the per-device memory
(XLA's accounting of the compiled SPMD program, which is per device, and the largest
`peak_bytes_in_use` over the mesh's devices: the process's peak so far, so run one row per
process, with --merge, for clean peaks), and the communication time measured by an
all-to-all-only program: the same all-to-alls (and HunyuanVideo's text all-gather) with
the same per-device shapes, every layer, and nothing else (an upper bound of the exposed
communication: in the real step XLA may overlap some of it).

Layouts of the CFG batch over n devices: "seq" = mesh data 1 x seq n (every device holds
both CFG samples, sequence split n ways); "data_seq" = data 2 x seq n/2 (one CFG sample
per half of the devices). Policies: "dense" (cuDNN attention on GPU) and "svg_ear"
(density 0.25, first layer dense, as benchmarks/model.py's svg_ear_0.25). Timing follows
benchmarks/model.py: one untimed call (compile + cold k-means), then the wall-clock median
of --iters calls, each warm-starting from the previous call's centroids.

A full run does not fit one 10-minute device call: split it with --devices / --policies /
--layouts and --merge (rows measured again replace their old ones). Rows are written after
every measurement, so a run cut short keeps what it measured.
"""

import argparse
import json
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

FLAG = "--xla_force_host_platform_device_count"

PRESETS = {
    # latent [C, F, H, W] after the VAE (4x temporal, 8x spatial), text length
    "wan": dict(full=dict(latent=(21, 90, 160), text=512), tiny=dict(latent=(3, 6, 6), text=8)),
    "hunyuan": dict(full=dict(latent=(33, 90, 160), text=256),
                    tiny=dict(latent=(3, 6, 6), text=8)),
}
LAYOUTS = ("seq", "data_seq")
POLICIES = ("dense", "svg_ear")


def model_config(model_name, preset):
  if model_name == "wan":
    from models.wan import WanConfig
    if preset == "full":
      return WanConfig.t2v_a14b()
    return WanConfig.tiny(num_heads=4, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  from models.hunyuan import HunyuanConfig
  if preset == "full":
    return HunyuanConfig.t2v_720p()
  return HunyuanConfig.tiny(num_heads=4, num_layers=1, num_single_layers=1,
                            dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)


def policy(model_name, preset, name):
  from models.attention import AttentionPolicy
  from svg_ear_jax import SvgEarConfig
  if name == "dense":
    return AttentionPolicy.dense()
  if preset == "tiny":
    return AttentionPolicy.sparse(SvgEarConfig(density=0.25, num_q_clusters=4, num_k_clusters=8,
                                               kmeans_iters=3), dense_layers=1)
  base = SvgEarConfig.wan22_720p() if model_name == "wan" else SvgEarConfig.hunyuan_720p()
  return AttentionPolicy.sparse(base.replace(density=0.25), dense_layers=1)


def mesh_shape(layout, n):
  """(data, seq) of `layout` on n devices, or None where it does not exist."""
  if layout == "seq":
    return 1, n
  return (2, n // 2) if n >= 2 and n % 2 == 0 else None


def _init_std(shape, name):
  """Random weights of a plausible scale: kernels N(0, 1/fan_in), norm scales 1, biases 0,
  anything else (modulation tables) N(0, 0.02^2); None = constant (1 or 0)."""
  if name in ("scale", "bias"):
    return None
  if name == "kernel":
    return (math.prod(shape[:-1]) if len(shape) == 5 else shape[-2]) ** -0.5
  return 0.02


def _init_value(shape, dtype, name, key):
  std = _init_std(shape, name)
  if std is None:
    return jnp.full(shape, 1.0 if name == "scale" else 0.0, dtype)
  return (jax.random.normal(key, shape, jnp.float32) * std).astype(dtype)


def _init_numpy(shape, dtype, name, rng):
  std = _init_std(shape, name)
  if std is None:
    return np.full(shape, 1.0 if name == "scale" else 0.0, np.float32).astype(dtype)
  return (rng.standard_normal(shape, dtype=np.float32) * std).astype(dtype)


def random_model(model_name, cfg, attention, layout):
  """The model with random weights created directly with their shardings on the mesh
  (replicated, or FSDP-sharded block weights): no full copy on one device first."""
  from flax import nnx
  from jax.sharding import NamedSharding, PartitionSpec

  if model_name == "wan":
    from models.wan import WanTransformer as cls
  else:
    from models.hunyuan import HunyuanVideoTransformer as cls
  model = nnx.eval_shape(lambda: cls(cfg, attention=attention))
  stacked = {id(node) for name in cls._block_stacks
             for _, node in nnx.iter_graph(getattr(model, name)) if isinstance(node, nnx.Param)}
  params = [(str(path[-1]), var) for path, var in nnx.iter_graph(model)
            if isinstance(var, nnx.Param)]
  shardings = [NamedSharding(layout.mesh, layout.weight_spec(var.get_value())
                             if id(var) in stacked else PartitionSpec()) for _, var in params]

  specs = [(tuple(var.get_value().shape), var.get_value().dtype, name) for name, var in params]
  if sum(math.prod(shape) for shape, _, _ in specs) < 10**8:  # tiny: on the host, no compile
    rng = np.random.default_rng(0)
    values = [jax.device_put(_init_numpy(*spec, rng), sharding)
              for spec, sharding in zip(specs, shardings)]
  else:  # full size: one program for all weights, each created where it lives
    values = jax.jit(lambda key: [_init_value(*spec, jax.random.fold_in(key, i))
                                  for i, spec in enumerate(specs)],
                     out_shardings=shardings)(jax.random.PRNGKey(0))
  for (_, var), value in zip(params, values):
    var.set_value(value)
  model.set_mesh(layout.mesh, fsdp=layout.fsdp)  # checks; the weights are already in place
  return model


def inputs(model_name, cfg, preset, batch):
  """The step's inputs, made on the host (NumPy: no compile), for the CFG batch."""
  p = PRESETS[model_name][preset]
  f, h, w = p["latent"]
  rng = np.random.default_rng(0)
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape, dtype=np.float32), cfg.dtype)
  x = normal(batch, cfg.in_channels, f, h, w)
  t = jnp.full((batch,), 500.0, jnp.float32)
  ctx = normal(batch, p["text"], cfg.text_dim)
  if model_name == "wan":
    return (x, t, ctx)
  mask = np.ones((batch, p["text"]), np.int32)
  mask[:, p["text"] // 2:] = 0
  pooled = normal(batch, cfg.pooled_projection_dim)
  return (x, t, ctx, jnp.asarray(mask), pooled, jnp.full((batch,), 6000.0, jnp.float32))


def token_counts(model_name, cfg, preset):
  """(sharded tokens N, replicated tokens T) of one self-attention."""
  f, h, w = PRESETS[model_name][preset]["latent"]
  patch = cfg.patch_size if model_name == "wan" else cfg.patch
  n = math.prod(d // p for d, p in zip((f, h, w), patch))
  return n, (0 if model_name == "wan" else PRESETS[model_name][preset]["text"])


def comm_only_ms(model_name, cfg, preset, layout, batch, iters):
  """Wall-clock ms of the forward's collectives alone: per layer the q|k|v all-to-all,
  the output all-to-all back (and HunyuanVideo's text all-gather), on the shapes of the
  real step; None on a mesh whose seq axis is 1 (no communication)."""
  from models import parallel

  p = layout.seq_size
  if p == 1:
    return None
  n, t = token_counts(model_name, cfg, preset)
  layers = cfg.num_layers if model_name == "wan" else cfg.num_joint_layers
  uly = layout.ulysses(num_heads=cfg.num_heads, batch=batch, num_tokens=n, num_replicated=t)
  b_local = batch // layout.data_size
  shape = (b_local * layout.data_size, layout.padded(n) + t * p, cfg.num_heads, cfg.head_dim)
  spec = layout.spec("ds")

  def body(q, k, v):
    def layer(carry, _):
      q = uly(lambda q, k, v: q, carry, k, v)  # identity "attention"
      return q, None
    q, _ = jax.lax.scan(layer, q, None, length=layers)
    return q

  # local q, k, v: [B_l, S_pad/P + T, H, Dh] (the text rows appended on every device)
  run = jax.jit(parallel.shard_map(body, layout.mesh, in_specs=(spec, spec, spec),
                                   out_specs=spec))
  sharding = jax.sharding.NamedSharding(layout.mesh, spec)
  qkv = [jax.device_put(x, sharding) for x in jax.jit(
      lambda key: [jax.random.normal(kk, shape, cfg.dtype) for kk in jax.random.split(key, 3)],
      out_shardings=[sharding] * 3)(jax.random.PRNGKey(1))]
  from benchmarks import timing
  ms, _ = timing.measure_ms(run, *qkv, iterations=iters, warmup=1, wallclock=True)
  return ms


class compiled_step:
  """`model(*xs)` as compiled programs with the k-means state carried explicitly: the
  cold-start program on the first call, the warm-start one (compiled once) after, so the
  memory analysis is the steady state's without a compile of its own."""

  def __init__(self, model, xs):
    from flax import nnx

    self.model = model
    graphdef = nnx.graphdef(model)

    def step(state, *a):
      m = nnx.merge(graphdef, state)
      return m(*a), m.kmeans_state.get_value(), m.attention_density.get_value()

    self.jitted = jax.jit(step)
    self.compiled = {}

  def __call__(self, *xs):
    from flax import nnx

    state = nnx.state(self.model)
    key = jax.tree.structure(state)
    if key not in self.compiled:
      self.compiled[key] = self.jitted.lower(state, *xs).compile()
    self.last = self.compiled[key]
    y, kmeans, density = self.last(state, *xs)
    self.model.kmeans_state.set_value(kmeans)
    self.model.attention_density.set_value(density)
    return y

  def memory_analysis(self):
    try:
      return self.last.memory_analysis()
    except Exception:  # not every backend reports it
      return None


def device_peak_gb(mesh):
  peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in mesh.devices.flat]
  peaks = [p for p in peaks if p is not None]
  return max(peaks) / 1e9 if peaks else None


def measure(model_name, preset, policy_name, layout_name, n, args):
  from flax import nnx

  from benchmarks import timing
  from models import parallel

  shape = mesh_shape(layout_name, n)
  cfg = model_config(model_name, preset)
  layout = parallel.SeqParallel(parallel.make_mesh(seq=shape[1], data=shape[0],
                                                   devices=jax.devices()[:n]),
                                fsdp=args.fsdp)
  row = dict(model=model_name, preset=preset, policy=policy_name, layout=layout_name,
             devices=n, mesh=dict(data=shape[0], seq=shape[1]), fsdp=args.fsdp,
             batch=args.batch, device=jax.devices()[0].device_kind,
             jax_version=jax.__version__)
  model = random_model(model_name, cfg, policy(model_name, preset, policy_name), layout)
  xs = inputs(model_name, cfg, preset, args.batch)
  row["tokens"], row["text_tokens"] = token_counts(model_name, cfg, preset)
  row["weights_gb_per_device"] = sum(
      x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(nnx.state(model))) / 1e9
  step = compiled_step(model, xs)
  t0 = time.perf_counter()
  jax.block_until_ready(step(*xs))  # compile + cold k-means
  row["first_call_s"] = time.perf_counter() - t0
  row["step_ms"], row["timing"] = timing.measure_ms(step, *xs, iterations=args.iters,
                                                    warmup=1, wallclock=True)
  density = model.attention_density.get_value()
  row["mean_sparse_density"] = None if density is None else float(jnp.mean(density))
  mem = step.memory_analysis()  # per device: the SPMD partition of one device
  if mem is not None:
    row["compiled_gb_per_device"] = (mem.argument_size_in_bytes + mem.output_size_in_bytes
                                     + mem.temp_size_in_bytes - mem.alias_size_in_bytes) / 1e9
    row["temp_gb_per_device"] = mem.temp_size_in_bytes / 1e9
  row["process_peak_gb_per_device"] = device_peak_gb(layout.mesh)
  row["comm_ms"] = comm_only_ms(model_name, cfg, preset, layout, args.batch, args.iters)
  row["comm_fraction"] = None if row["comm_ms"] is None else row["comm_ms"] / row["step_ms"]
  return row


def table(rows):
  lines = ["| model | policy | layout | devices (data x seq) | step ms | speed-up vs 1 device |"
           " comm ms (share) | GB/device compiled | GB/device peak | density |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  fmt = lambda x, spec: "" if x is None else format(x, spec)
  one = {(r["model"], r["policy"]): r["step_ms"] for r in rows if r["devices"] == 1}
  for r in rows:
    base = one.get((r["model"], r["policy"]))
    comm = "" if r["comm_ms"] is None else f"{r['comm_ms']:.1f} ({r['comm_fraction']:.0%})"
    lines.append(
        f"| {r['model']} | {r['policy']} | {r['layout']} | {r['devices']} "
        f"({r['mesh']['data']} x {r['mesh']['seq']}) | {r['step_ms']:.1f} | "
        f"{fmt(base and base / r['step_ms'], '.2f')} | {comm} | "
        f"{fmt(r.get('compiled_gb_per_device'), '.2f')} | "
        f"{fmt(r.get('process_peak_gb_per_device'), '.2f')} | "
        f"{fmt(r['mean_sparse_density'], '.3f')} |")
  return "\n".join(lines) + "\n"


def write(rows, out):
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out + ".json", "w") as f:
    json.dump(rows, f, indent=1)
  with open(out + ".md", "w") as f:
    f.write(table(rows))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model", choices=["wan", "hunyuan"], default="wan")
  parser.add_argument("--preset", choices=["full", "tiny"], default="full")
  parser.add_argument("--devices", type=int, nargs="+", help="default 1 2 4 8")
  parser.add_argument("--policies", nargs="+", choices=POLICIES, help="default: all")
  parser.add_argument("--layouts", nargs="+", choices=LAYOUTS, help="default: all")
  parser.add_argument("--batch", type=int, default=2, help="2 = the CFG batch of one step")
  parser.add_argument("--fsdp", action="store_true", help="shard the block weights too")
  parser.add_argument("--iters", type=int, help="default 2")
  parser.add_argument("--merge", action="store_true",
                      help="merge into an existing OUT.json instead of overwriting it")
  parser.add_argument("--smoke", action="store_true",
                      help="tiny preset on 2 (CPU fake) devices, both layouts, dense, 1 iteration "
                           "(defaults: explicit --devices / --policies / ... still apply)")
  parser.add_argument("--out", default=os.path.join("benchmarks", "results", "parallel"))
  args = parser.parse_args(argv)
  if args.smoke:
    # fake CPU devices, when the backend has not started yet (a test sets XLA_FLAGS itself)
    if FLAG not in os.environ.get("XLA_FLAGS", ""):
      os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FLAG}=8".strip()
    args.preset = "tiny"
    args.devices, args.iters = args.devices or [2], args.iters or 1
    args.policies = args.policies or ["dense"]
  args.devices = args.devices or [1, 2, 4, 8]
  args.policies = args.policies or list(POLICIES)
  args.layouts = args.layouts or list(LAYOUTS)
  args.iters = args.iters or 2

  available = len(jax.devices())
  rows = []
  if args.merge and os.path.exists(args.out + ".json"):
    with open(args.out + ".json") as f:
      rows = json.load(f)
  key = lambda r: (r["model"], r["policy"], r["layout"], r["devices"], r.get("fsdp", False))
  for n in args.devices:
    if n > available:
      print(f"skipping {n} devices: only {available} present", file=sys.stderr)
      continue
    for policy_name in args.policies:
      for layout_name in args.layouts:
        if mesh_shape(layout_name, n) is None:
          continue
        row = measure(args.model, args.preset, policy_name, layout_name, n, args)
        print(json.dumps(row), flush=True)
        rows = [r for r in rows if key(r) != key(row)] + [row]
        rows.sort(key=lambda r: (r["model"], POLICIES.index(r["policy"]),
                                 LAYOUTS.index(r["layout"]), r["devices"]))
        write(rows, args.out)
  print(table(rows))
  return 0


if __name__ == "__main__":
  sys.exit(main())
