"""H100 checks and timings of the Pallas sparse-attention kernels: layouts and tile sizes.

  python -m benchmarks.kernels [sweep|inputs|mosaic|mosaic480|clean|softmax|calls|probe|
                               assign|smoke] [budget_s]
  python -m benchmarks.kernels profile [shipped|one_producer|chunk8|sorted|no_overlap|dense]
  python -m benchmarks.kernels trace [shipped|one_producer|chunk8|sorted|no_overlap ...]

Wan 720p attention shapes: G = 40 heads, S = 75,600, D = 128, bf16, Kq = 300, Kk = 1000
Dirichlet(2) cluster sizes, random block map of area density ~0.25. Prints one JSON line per
measurement (also appended to $OUT/gpu_log.jsonl).

  sweep:  layouts and tile sizes on pre-sorted inputs, then the GPU kernel tests.
  inputs: how the kernel gets its inputs, with random permutations: sorted copies made by
          XLA (gather, kernel, inverse gather) vs reading through the permutation indices,
          heads-first [G, S, D] vs tokens-first [B, S, H, D] (no transposes).
  mosaic: the Mosaic GPU kernel (Hopper) per chunk size, with half tiles paired, with
          idle second warpgroups or without half tiles, queries read in place or from a
          sorted copy, outputs written in place or to a slot buffer, one or two producer
          warpgroups, vs the Triton kernel. mosaic480: chunk sizes and producers at Wan
          480p's shape (S = 32,760, Kq = 200, Kk = 1000).
  clean:  the Mosaic kernel with its clean steps (no key-slot bias where a step holds no
          padding) vs every exact step biased, one and two producers, Wan 720p and 480p.
  softmax: the Mosaic kernel with and without FlashAttention-3's overlap of a step's
          softmax with the previous step's P.V inside a warpgroup, Wan 720p and 480p.
  calls:  the whole Mosaic call over the heads in one kernel call or in calls of fewer
          heads (heads_per_call: memory vs time), Wan 720p and 480p.
  probe:  the EAR probe kernel per tiling and cluster split, on k-means clusters of the
          structured Wan 720p workload (benchmarks/workloads.py).
  assign: the k-means assignment kernel per tiling, on the same workload's points and the
          centroids of 10 k-means iterations (Q: Kq = 300, K: Kk = 1000).
  profile: three calls of one kernel alone (a Mosaic variant on prepared tables, or jax's
          dense Mosaic flash attention on the same shape), for Nsight Compute:
          benchmarks/profile_ncu.sh.
  trace:  Mosaic GPU's in-kernel profiler over the sparse kernel's named scopes (waits on
          the key ring, QK^T, softmax, PV, query loads, output stores; the producer's
          waits and copies) on 1 head of the problem, summed per warpgroup role.
  smoke:  CPU interpret-mode run of the other modes on tiny shapes (checks this script).
"""

import functools
import importlib
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import timing, workloads
import pallas_kernels
from pallas_kernels import sparse_layout as sl
from svg_ear_jax import SvgEarConfig, permutation, pipeline

sa = importlib.import_module("pallas_kernels.sparse_attention")  # the package shadows it
sm = importlib.import_module("pallas_kernels.sparse_attention_mgpu")

_LOG = os.path.join(os.environ.get("OUT", "/tmp"), "gpu_log.jsonl")


def emit(**kw):
  line = json.dumps(kw, default=float)
  print(line, flush=True)
  with open(_LOG, "a") as f:
    f.write(line + "\n")


def wan_problem(g=40, s=75600, d=128, kq=300, kk=1000, density=0.25, seed=0):
  rng = np.random.default_rng(seed)

  def sizes(k):
    sz = np.floor(rng.dirichlet(np.full(k, 2.0), size=g) * s).astype(np.int64)
    sz[:, 0] += s - sz.sum(1)
    return sz

  q_sizes, k_sizes = sizes(kq), sizes(kk)
  block_map = rng.random((g, kq, kk)) < density
  area = float((q_sizes[:, :, None] * k_sizes[:, None, :] * block_map).sum())
  keys = jax.random.split(jax.random.PRNGKey(seed), 5)
  q, k, v = (jax.random.normal(kx, (g, s, d), jnp.bfloat16) for kx in keys[:3])
  kc = jax.random.normal(keys[3], (g, kk, d), jnp.float32) * 0.3
  vc = jax.random.normal(keys[4], (g, kk, d), jnp.float32) * 0.1
  args = (q, k, v, jnp.asarray(q_sizes, jnp.int32), jnp.asarray(k_sizes, jnp.int32),
          jnp.asarray(block_map), kc, vc)
  return args, area


def rows_reference(args, h, i, compensation, sm_scale):
  """Float64 numpy output of query cluster i of head h (rows of the permuted order)."""
  as_np = lambda a: np.asarray(a[h]).astype(np.float64) if a.ndim > 2 else np.asarray(a[h])
  q, k, v, qs, ks, kc, vc = map(as_np, args[:5] + args[6:])
  bm = np.asarray(args[5][h])
  q_off = np.cumsum(qs) - qs
  k_lab = np.repeat(np.arange(ks.shape[0]), ks)
  qi = q[q_off[i]:q_off[i] + qs[i]]
  logits = np.where(bm[i][k_lab][None], qi @ k.T * sm_scale, -np.inf)
  vals = v
  if compensation:
    pseudo = qi @ kc.T * sm_scale + np.log(np.maximum(ks, 1))[None]
    pseudo = np.where((~bm[i] & (ks > 0))[None], pseudo, -np.inf)
    logits = np.concatenate([logits, pseudo], 1)
    vals = np.concatenate([vals, vc], 0)
  p = np.exp(logits - logits.max(1, keepdims=True))
  return (p @ vals) / p.sum(1, keepdims=True), slice(q_off[i], q_off[i] + qs[i])


SWEEP = [
    dict(block_q=64, block_k=64, block_c=64, num_warps=4, num_stages=3),
    dict(block_q=64, block_k=64, block_c=64, num_warps=4, num_stages=3, layout="flat"),
    dict(block_q=128, block_k=64, block_c=64, num_warps=8, num_stages=3),
    dict(block_q=128, block_k=64, block_c=64, num_warps=8, num_stages=3, tail_block_q=64),
    dict(block_q=128, block_k=128, block_c=64, num_warps=8, num_stages=2),
    dict(block_q=128, block_k=128, block_c=64, num_warps=8, num_stages=2, tail_block_q=64),
    dict(block_q=128, block_k=64, block_c=64, num_warps=4, num_stages=3, tail_block_q=64),
    dict(block_q=64, block_k=128, block_c=64, num_warps=4, num_stages=2),
    dict(block_q=64, block_k=64, block_c=64, num_warps=4, num_stages=4),
    dict(block_q=128, block_k=64, block_c=128, num_warps=8, num_stages=4, tail_block_q=64),
]


def attention(configs, budget_end, with_index=True, problem=None, interpret=False):
  args, area = wan_problem(**(problem or {}))
  g, s, d = args[0].shape
  scale = d ** -0.5
  emit(what="problem", G=g, S=s, D=d, Kq=args[5].shape[1], Kk=args[5].shape[2],
       density=area / (g * s * s))
  qd = args[0][None].transpose(0, 2, 1, 3)  # [1, S, G, D]
  dense = jax.jit(functools.partial(jax.nn.dot_product_attention, implementation="cudnn"))
  try:
    ms, how = timing.measure_ms(dense, qd, qd, qd)
    emit(what="cudnn_dense", ms=ms, tflops=4 * d * s * s * g / ms / 1e9, timing=how)
  except Exception as e:  # no cuDNN (CPU smoke run)
    emit(what="cudnn_dense", error=f"{type(e).__name__}: {str(e)[:200]}")
  for bk in (64, 128):
    for layout in ("packed", "flat"):
      meta = jax.jit(functools.partial(sl.sparse_attention_metadata, seq_len=s, block_q=64,
                                       block_k=bk, layout=layout))
      ms, _ = timing.measure_ms(meta, args[5], args[3], args[4])
      waste = {f"bq{bq}" + (f"+tail{tb}" if tb else ""): float(jnp.mean(sl.padding_waste(
                   args[5], args[3], args[4], seq_len=s, block_q=bq, block_k=bk, layout=layout,
                   tail_block_q=tb)))
               for bq, tb in ((64, None), (128, None), (128, 64))}
      emit(what="metadata", block_k=bk, layout=layout, ms=ms, useful_over_visited=waste)
  first = None
  heads = (0, g // 2, g - 1)
  kq = args[5].shape[1]
  refs = [rows_reference(args, h, i, True, scale) for h, i in zip(heads, (0, kq // 2, kq - 1))]
  for cfg in configs:
    if time.time() > budget_end:
      emit(what="skipped", cfg=cfg)
      continue
    try:
      t0 = time.time()
      f = jax.jit(functools.partial(sa.sparse_attention, compensation=cfg.pop("compensation", True),
                                    sm_scale=scale, interpret=interpret, **cfg))
      out = jax.block_until_ready(f(*args))
      compile_s = time.time() - t0
      ms, how = timing.measure_ms(f, *args)
      errs = [float(np.abs(np.asarray(out[h, rows].astype(jnp.float32)) - ref).max())
              for (ref, rows), h in zip(refs, heads)]
      nan = bool(jnp.isnan(out).any())
      if first is None:
        first = out
      diff = float(jnp.max(jnp.abs(out.astype(jnp.float32) - first.astype(jnp.float32))))
      emit(what="sparse", cfg=cfg, ms=ms, useful_tflops=4 * d * area / ms / 1e9,
           max_err_vs_f32_rows=max(errs), max_diff_vs_first=diff, nan=nan,
           compile_s=compile_s, timing=how)
    except Exception as e:  # report and go on
      emit(what="sparse", cfg=cfg, error=f"{type(e).__name__}: {str(e)[:400]}")
  if with_index and time.time() < budget_end:
    # same work, K/V/Q read through permutation indices (here: the identity)
    idx = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (g, s))
    cfg = dict(SWEEP[0])
    f = jax.jit(functools.partial(sa.sparse_attention, compensation=True, sm_scale=scale,
                                  q_index=idx, kv_index=idx, interpret=interpret, **cfg))
    try:
      ms, _ = timing.measure_ms(f, *args)
      emit(what="sparse_index", cfg=cfg, ms=ms, useful_tflops=4 * d * area / ms / 1e9)
    except Exception as e:
      emit(what="sparse_index", error=f"{type(e).__name__}: {str(e)[:400]}")


def pytest_gpu(paths, timeout):
  import subprocess
  cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-k", "not Interpret", *paths]
  try:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    emit(what="pytest", paths=paths, rc=r.returncode, tail=(r.stdout + r.stderr)[-3000:])
  except subprocess.TimeoutExpired as e:
    emit(what="pytest", paths=paths, error="timeout", tail=str(e.stdout)[-2000:])


def inputs(configs, budget_end, problem=None, interpret=False):
  """Sorted copies vs permutation indices vs tokens-first, on random permutations."""
  (q, k, v, *rest), area = wan_problem(**(problem or {}))
  g, s, d = q.shape
  scale = d ** -0.5
  rng = np.random.default_rng(1)
  q_idx = jnp.asarray(np.stack([rng.permutation(s) for _ in range(g)]), jnp.int32)
  kv_idx = jnp.asarray(np.stack([rng.permutation(s) for _ in range(g)]), jnp.int32)
  heads = jnp.arange(g)[:, None]
  unsort = lambda x, idx: jnp.zeros_like(x).at[heads, idx].set(x)  # token order
  qt, kt, vt = unsort(q, q_idx), unsort(k, kv_idx), unsort(v, kv_idx)
  tokens_first = lambda x: x.reshape(1, g, s, d).transpose(0, 2, 1, 3)
  q4, k4, v4 = tokens_first(qt), tokens_first(kt), tokens_first(vt)
  emit(what="problem", G=g, S=s, D=d, density=area / (g * s * s))
  ref = None
  for cfg in configs:
    for mode in ("copies", "index", "tokens_first"):
      if time.time() > budget_end:
        emit(what="skipped", cfg=cfg, mode=mode)
        continue
      kernel = functools.partial(sa.sparse_attention, compensation=True, sm_scale=scale,
                                 interpret=interpret, **cfg)
      if mode == "copies":
        take = lambda x, idx: jnp.take_along_axis(x, idx[..., None], axis=1)

        def f(q, k, v, *rest):
          out = kernel(take(q, q_idx), take(k, kv_idx), take(v, kv_idx), *rest)
          return unsort(out, q_idx)
        xs = (qt, kt, vt)
      elif mode == "index":
        f = lambda *a: kernel(*a, q_index=q_idx, kv_index=kv_idx)
        xs = (qt, kt, vt)
      else:
        f = lambda *a: kernel(*a, q_index=q_idx, kv_index=kv_idx).transpose(0, 2, 1, 3)[0]
        xs = (q4, k4, v4)
      try:
        f = jax.jit(f)
        out = jax.block_until_ready(f(*xs, *rest))
        ms, how = timing.measure_ms(f, *xs, *rest)
        ref = out if ref is None else ref
        diff = float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref.astype(jnp.float32))))
        emit(what="inputs", cfg=cfg, mode=mode, ms=ms, useful_tflops=4 * d * area / ms / 1e9,
             max_diff_vs_first=diff, mem_gb=timing.compiled_memory_gb(f, *xs, *rest),
             timing=how)
      except Exception as e:  # report and go on
        emit(what="inputs", cfg=cfg, mode=mode, error=f"{type(e).__name__}: {str(e)[:400]}")


def shipped_triton(head_dim, emulate=False):
  """The Pallas-Triton kernel with the tiles the pipeline ships (interpret-mode tiles and
  interpret mode off GPU), "mean" compensation, jitted: the Mosaic comparisons' reference."""
  return jax.jit(functools.partial(sa.sparse_attention, compensation=True,
                                   sm_scale=head_dim ** -0.5, interpret=emulate,
                                   **pipeline._attention_blocks()))


def mosaic(chunks, budget_end, problem=None, emulate=False):
  """The Mosaic GPU kernel per chunk size vs the shipped Triton kernel on the same problem.

  Per (chunk size, half_tiles, pair_half_tiles, sorted_queries, slot_output,
  split_producers): the kernel alone on prepared tables, the whole call (padded copies of
  K / V, tables, kernel, and the gather of a slot-buffer output), useful TFLOP/s (exact
  area) and visited TFLOP/s
  (every exact key slot the computing warpgroups visit, padding included), and the largest
  difference from the Triton output. `emulate` (CPU smoke run): the kernel's jnp
  emulation, Triton in interpret mode.
  """
  args, area = wan_problem(**(problem or {}))
  g, s, d = args[0].shape
  scale = d ** -0.5
  useful = 4 * d * area
  emit(what="problem", G=g, S=s, D=d, Kq=args[5].shape[1], Kk=args[5].shape[2],
       density=area / (g * s * s))
  tri = shipped_triton(d, emulate)
  ref = tri(*args).astype(jnp.float32)
  ms, how = timing.measure_ms(tri, *args)
  emit(what="mosaic_vs_triton", ms=ms, useful_tflops=useful / ms / 1e9, timing=how)
  for chunk, half, pair, sorted_q, slots, split in chunks:
    tag = dict(chunk_rows=chunk, half_tiles=half, pair_half_tiles=pair,
               sorted_queries=sorted_q, slot_output=slots, split_producers=split)
    if time.time() > budget_end:
      emit(what="skipped", **tag)
      continue
    try:
      whole = jax.jit(functools.partial(sm.sparse_attention_mgpu, compensation=True,
                                        sm_scale=scale, chunk_rows=chunk, half_tiles=half,
                                        pair_half_tiles=pair, sorted_queries=sorted_q,
                                        slot_output=slots, split_producers=split,
                                        emulate=emulate))
      out = whole(*args).astype(jnp.float32)
      ms_whole, how = timing.measure_ms(whole, *args)
      kern, operands = kernel_alone(args, tag, emulate=emulate)
      ms_kernel, _ = timing.measure_ms(kern, *operands)
      mode, exact = operands[0][:2]
      n_half = jnp.sum(mode == sm.MODE_HALF) + 2 * jnp.sum(mode == sm.MODE_PAIR)
      wgs = jnp.where(mode == sm.MODE_HALF, 1, jnp.where(mode == sm.MODE_NONE, 0, 2))
      # key slots x query rows of the computing warpgroups' exact steps, padding included
      visited = int(jnp.sum(wgs * exact * jnp.where(mode == sm.MODE_PAIR, sm.HALF_K,
                                                    sm.BLOCK_K))) * sm.BLOCK_Q
      emit(what="mosaic", **tag, kernel_ms=ms_kernel,
           whole_ms=ms_whole, useful_tflops=useful / ms_kernel / 1e9,
           visited_tflops=4 * d * visited / ms_kernel / 1e9,
           half_tile_share=float(n_half / (jnp.sum(mode == sm.MODE_FULL) + n_half)),
           max_diff_vs_triton=float(jnp.max(jnp.abs(out - ref))),
           mem_gb=timing.compiled_memory_gb(whole, *args), timing=how)
    except Exception as e:  # report and go on
      emit(what="mosaic", **tag, error=f"{type(e).__name__}: {str(e)[:400]}")


def clean_steps(budget_end, problem=None, emulate=False):
  """The kernel alone with its clean steps (a warpgroup's leading exact steps without
  padding slots run without the key-slot bias) vs the same tables with wg_clean = 0
  (every exact step biased), with one and with two producers, in one process; the share
  of clean steps; each output's largest difference from the Triton kernel's."""
  args, area = wan_problem(**(problem or {}))
  g, s, d = args[0].shape
  ref = shipped_triton(d, emulate)(*args).astype(jnp.float32)
  for split in (True, False):
    if time.time() > budget_end:
      emit(what="skipped", split_producers=split)
      continue
    kern, operands = kernel_alone(args, dict(variant_options("shipped"),
                                             split_producers=split), emulate=emulate)
    tables = operands[0]
    clean = tables.wg_clean
    emit(what="clean_share", S=s, split_producers=split,
         clean_steps=int(jnp.sum(jnp.min(clean, -1))),
         exact_steps=int(jnp.sum(tables.tile_exact)))
    biased = (tables._replace(wg_clean=jnp.zeros_like(clean)),) + tuple(operands[1:])
    for label, ops in (("clean", operands), ("every_step_biased", biased)):
      emit(what="clean_steps", S=s, split_producers=split, variant=label,
           **_kernel_run(kern, ops, args, area, ref))


def _kernel_run(kern, operands, args, area, ref):
  """The kernel alone on its prepared operands: kernel_ms, useful TFLOP/s, its output's
  largest difference from `ref` (Triton's output), how it was timed."""
  rows = sm._clear_uncovered(kern(*operands), args[3], None, args[0].shape)
  diff = float(jnp.max(jnp.abs(rows.reshape(args[0].shape).astype(jnp.float32) - ref)))
  ms, how = timing.measure_ms(kern, *operands)
  return dict(kernel_ms=ms, useful_tflops=4 * args[0].shape[-1] * area / ms / 1e9,
              max_diff_vs_triton=diff, timing=how)


def softmax_variants(budget_end, problem=None, emulate=False):
  """The kernel alone, shipped (FlashAttention-3's overlap of a step's softmax with the
  previous step's P.V inside a warpgroup) and without it (PROFILE_VARIANTS "no_overlap"),
  in one process; each output's largest difference from the Triton kernel's."""
  args, area = wan_problem(**(problem or {}))
  g, s, d = args[0].shape
  ref = shipped_triton(d, emulate)(*args).astype(jnp.float32)
  for name in ("shipped", "no_overlap"):
    if time.time() > budget_end:
      emit(what="skipped", variant=name)
      continue
    try:
      kern, operands = kernel_alone(args, variant_options(name), emulate=emulate)
      emit(what="softmax_variant", S=s, variant=name, **_kernel_run(kern, operands, args,
                                                                     area, ref))
    except Exception as e:  # report and go on
      emit(what="softmax_variant", S=s, variant=name, error=f"{type(e).__name__}: {str(e)[:600]}")


def head_calls(per_call, budget_end, problem=None, emulate=False):
  """The whole Mosaic call (sorted copies, tables, kernel) run over the heads in calls of
  `per_call` heads each (`heads_per_call`; None: the shipped choice, `sm.call_heads`):
  time, XLA's memory accounting, the largest difference from the one-call output."""
  args, area = wan_problem(**(problem or {}))
  g, s, d = args[0].shape
  run = lambda n: jax.jit(functools.partial(sm.sparse_attention_mgpu, compensation=True,
                                            sm_scale=d ** -0.5, heads_per_call=n,
                                            emulate=emulate))
  one = run(g)
  ref = one(*args).astype(jnp.float32)
  for n in per_call:
    if time.time() > budget_end:
      emit(what="skipped", heads_per_call=n)
      continue
    try:
      fn = one if n == g else run(n)
      ms, how = timing.measure_ms(fn, *args)
      diff = float(jnp.max(jnp.abs(fn(*args).astype(jnp.float32) - ref)))
      emit(what="head_calls", S=s, G=g, heads_per_call=n, calls_heads=sm.call_heads(g, n),
           whole_ms=ms, useful_tflops=4 * d * area / ms / 1e9, max_diff_vs_one_call=diff,
           mem_gb=timing.compiled_memory_gb(fn, *args),
           inputs_gb=sum(a.size * a.dtype.itemsize for a in args) / 1e9, timing=how)
    except Exception as e:  # report and go on
      emit(what="head_calls", heads_per_call=n, error=f"{type(e).__name__}: {str(e)[:600]}")


PROFILE_VARIANTS = {  # name: sparse_attention_mgpu options (the shipped defaults elsewhere)
    "shipped": {}, "one_producer": dict(split_producers=False),
    "chunk8": dict(chunk_rows=8),
    "sorted": dict(sorted_queries=True, slot_output=True),
    "no_overlap": dict(overlap_softmax=False),
}


def kernel_alone(args, opts, emulate=False, **call_kw):
  """The Mosaic kernel alone on the problem `args` ("mean" compensation, 2 ring slots):
  (the jitted `sm._call` with `opts` (chunk_rows, half_tiles, pair_half_tiles,
  sorted_queries, slot_output, split_producers, overlap_softmax: shipped if not given) and
  `call_kw`, its prepared operands
  (tables, q, padded k, padded v)). emulate: `sm.emulate_kernel` instead (CPU)."""
  g, s, d = args[0].shape
  chunk = opts["chunk_rows"]
  operands = jax.jit(lambda *a: sm.prepare_mgpu(
      *a, compensation=True, chunk=chunk, half_tiles=opts["half_tiles"],
      pair_half_tiles=opts["pair_half_tiles"],
      sorted_queries=opts["sorted_queries"] and not emulate,
      chunk_impl="jnp" if emulate else "pallas")[:4])(*args)
  statics = sm.kernel_statics(s, args[5].shape[2], compensation=True, chunk=chunk)
  scale = d ** -0.5 * sm._LOG2E
  if emulate:
    kern = functools.partial(sm.emulate_kernel, scale=scale, slot_output=opts["slot_output"],
                             **statics)
  else:
    kern = functools.partial(sm._call, num_out=g * s, mcs=2, scale=scale,
                             slot_output=opts["slot_output"],
                             split_producers=opts["split_producers"],
                             overlap=opts.get("overlap_softmax", True), **statics,
                             **call_kw)
  return jax.jit(kern), operands


def variant_options(variant):
  """A PROFILE_VARIANTS name's full kernel options (the shipped defaults elsewhere)."""
  return {**dict(chunk_rows=sm.CHUNK, half_tiles=True, pair_half_tiles=True,
                 sorted_queries=False, slot_output=False, split_producers=True,
                 overlap_softmax=True),
          **PROFILE_VARIANTS[variant]}


def profile(variant, problem=None, calls=3):
  """For Nsight Compute (benchmarks/profile_ncu.sh): `calls` runs of one kernel on the
  kernel benchmark's problem, nothing else on the GPU between them but its tables.
  variant: a PROFILE_VARIANTS name (the Mosaic sparse kernel alone on prepared tables) or
  "dense" (jax's dense Mosaic flash attention, block_q 64 / block_kv 128 / 2 steps, f16,
  on the problem's shape: the ceiling the kernel is compared with)."""
  args, area = wan_problem(**(problem or {}))
  g, s, d = args[0].shape
  if variant == "dense":
    from jax.experimental.pallas.ops.gpu import attention_mgpu
    cfg = attention_mgpu.TuningConfig(block_q=64, block_kv=128, max_concurrent_steps=2)
    s_pad = -(-s // 128) * 128  # its grid needs whole blocks
    # f16: its shared-memory buffers are hard-coded float16 (jax 0.11.2)
    q = jnp.pad(args[0], ((0, 0), (0, s_pad - s), (0, 0))).transpose(1, 0, 2)[None]
    q = q.astype(jnp.float16)
    fn = jax.jit(functools.partial(attention_mgpu.attention, config=cfg))
    operands, flops = (q, q, q), 4 * d * s_pad * s_pad * g
  else:
    fn, operands = kernel_alone(args, variant_options(variant))
    flops = 4 * d * area
  jax.block_until_ready(operands)
  for i in range(calls):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*operands))
    ms = (time.perf_counter() - t0) * 1e3
    emit(what="profile", variant=variant, call=i, wall_ms=ms, tflops=flops / ms / 1e9)


def summarize_trace(trace, warpgroups, space=None):
  """Sums a Mosaic GPU profiler trace (Chrome JSON: "B"/"E" events per thread id
  1 + warpgroup + warpgroups * CTA) per warpgroup role and scope name.

  Returns {role: {"ctas": n, "span": mean CTA span, "ranges": mean ranges per CTA,
  "full": share of CTAs with `space` ranges or more (a bounds-checked trace that was cut
  short), "scopes": {name: {"total": mean time per CTA, "share": of the span, "count":
  mean ranges per CTA}}, "unscoped": share}} with
  times in the trace's units; roles "consumer 0", "consumer 1", "producer" (and
  "producer 1" with split producers). Nested ranges count in their own name only
  (exclusive time), so the shares of a role add up to at most 1.
  """
  per_tid = {}
  for ev in trace["traceEvents"]:
    per_tid.setdefault(ev["tid"], []).append(ev)
  roles = ["consumer 0", "consumer 1", "producer", "producer 1"][:warpgroups]
  acc = {r: {"ctas": 0, "span": 0.0, "ranges": 0, "full": 0, "scopes": {}} for r in roles}
  for tid, events in per_tid.items():
    role = roles[(tid - 1) % warpgroups]
    # a thread's events in time order, a range's end before the next one's start
    events = sorted(events, key=lambda e: (e["ts"], e["ph"] == "B"))
    stack, span = [], events[-1]["ts"] - events[0]["ts"]
    out = acc[role]
    out["ctas"] += 1
    out["span"] += span
    begins = sum(ev["ph"] == "B" for ev in events)
    out["ranges"] += begins
    out["full"] += space is not None and begins >= space
    last = events[0]["ts"]
    for ev in events:
      if stack:  # time since the last event belongs to the innermost open scope
        s = out["scopes"].setdefault(stack[-1], {"total": 0.0, "count": 0})
        s["total"] += ev["ts"] - last
      last = ev["ts"]
      if ev["ph"] == "B":
        stack.append(ev["name"])
        out["scopes"].setdefault(ev["name"], {"total": 0.0, "count": 0})["count"] += 1
      elif ev["name"] in stack:
        del stack[len(stack) - 1 - stack[::-1].index(ev["name"])]
  summary = {}
  for role, out in acc.items():
    n = out["ctas"]
    if not n:
      continue
    span = out["span"] / n
    scopes = {name: {"total": s["total"] / n, "share": s["total"] / n / span if span else 0.0,
                     "count": s["count"] / n}
              for name, s in sorted(out["scopes"].items(), key=lambda kv: -kv[1]["total"])}
    summary[role] = {"ctas": n, "span": span, "ranges": out["ranges"] / n,
                     "full": out["full"] / n, "scopes": scopes,
                     "unscoped": 1.0 - sum(s["share"] for s in scopes.values())}
  return summary


def trace(variant, heads=1, problem=None):
  """The in-kernel profile of one call (Mosaic GPU's profiler over the kernel's named
  scopes), on `heads` heads of the Wan 720p kernel problem (the trace holds every CTA's
  ranges: ~700 CTAs per head, so one head by default: its keys and values fit in L2,
  unlike the 40 heads' of a real call), summed up per warpgroup role and scope
  (`summarize_trace`). The profiler keeps its events in the shared memory the kernel
  leaves (~600 ranges per warpgroup): each CTA's trace covers its prologue and first
  ~70 key steps ("full" says how many were cut short). The trace file is deleted."""
  import glob
  import tempfile
  args, _ = wan_problem(**{"g": heads, **(problem or {})})
  g, s, d = args[0].shape
  opts = variant_options(variant)
  warpgroups = 4 if opts["split_producers"] else 3
  space = sm.profile_ranges(d, 2, args[0].dtype.itemsize, warpgroups)
  with tempfile.TemporaryDirectory() as tmp:
    fn, operands = kernel_alone(args, opts, profile_dir=tmp, profile_space=space)
    tables = operands[0]
    jax.block_until_ready(fn(*operands))
    jax.effects_barrier()  # the trace is written by a host callback
    files = sorted(glob.glob(os.path.join(tmp, "*-trace.json")))
    with open(files[-1]) as f:
      data = json.load(f)
  emit(what="trace", variant=variant, heads=g, tiles=int(tables.tile_mode.shape[1]),
       profile_space=space, events=len(data["traceEvents"]),
       summary=summarize_trace(data, warpgroups, space))


PROBE_CONFIGS = [  # (block_qc, block_k, cluster_splits, num_warps)
    (64, 32, 1, 4), (64, 32, 4, 4), (64, 32, 8, 4), (64, 32, 16, 4), (64, 32, 32, 4),
    (32, 32, 8, 4), (32, 32, 16, 4), (64, 16, 16, 4), (64, 64, 16, 4), (64, 32, 16, 8)]


def clustered_workload(grid, heads, head_dim, clusters):
  """Heads-first bf16 q, k, v [G, S, D] of the structured workload (seed 0) and their
  clustering after 10 cold k-means iterations (XLA)."""
  q, k, v = (jnp.asarray(a, jnp.bfloat16)[0].transpose(1, 0, 2)
             for a in workloads.structured(grid, heads, head_dim, seed=0))
  cfg = SvgEarConfig(num_q_clusters=clusters[0], num_k_clusters=clusters[1], kmeans_iters=10)
  return q, k, v, jax.jit(lambda q, k, v: pipeline.cluster(q, k, v, cfg, "xla"))(q, k, v)


def probe(configs, budget_end, grid=workloads.WAN_720P, heads=40, head_dim=128,
          clusters=(300, 1000), interpret=False):
  """EAR probe per (block_qc, block_k, cluster_splits, num_warps), on the clusters of 10
  cold k-means iterations of the structured workload; max |difference| from the first."""
  q, k, v, cl = clustered_workload(grid, heads, head_dim, clusters)
  perm = permutation.cluster_layout(cl.k.labels, cl.k.sizes).perm
  args = (cl.q.centroids, k, v, cl.k.centroids, cl.v_centroids, cl.k.sizes, perm)
  emit(what="probe_problem", G=q.shape[0], S=q.shape[1], D=q.shape[2], Kq=clusters[0],
       Kk=clusters[1])
  first = None
  for bqc, bk, splits, warps in configs:
    if time.time() > budget_end:
      emit(what="skipped", block_qc=bqc, block_k=bk, cluster_splits=splits)
      continue
    cfg_row = dict(block_qc=bqc, block_k=bk, cluster_splits=splits, num_warps=warps)
    try:
      fn = jax.jit(lambda *a, kw=cfg_row: pallas_kernels.ear_error_probe(
          *a[:6], kv_index=a[6], sm_scale=head_dim ** -0.5, interpret=interpret, **kw))
      out = fn(*args)
      first = out if first is None else first
      finite = jnp.isfinite(first)
      diff = float(jnp.max(jnp.where(finite, jnp.abs(out - first), 0.)))
      ms, how = timing.measure_ms(fn, *args)
      emit(what="probe", **cfg_row, ms=ms, max_diff_vs_first=diff, timing=how)
    except Exception as e:  # report and go on
      emit(what="probe", **cfg_row, error=f"{type(e).__name__}: {str(e)[:400]}")


def assign(configs, budget_end, grid=workloads.WAN_720P, heads=40, head_dim=128,
           clusters=(300, 1000), interpret=False):
  """k-means assignment per (block_n, block_k, num_warps, num_stages) on the structured
  workload's Q and K with the centroids of 10 cold k-means iterations; labels must equal
  those of the first configuration."""
  q, k, _, cl = clustered_workload(grid, heads, head_dim, clusters)
  points = dict(q=(q, cl.q.centroids), k=(k, cl.k.centroids))
  emit(what="assign_problem", G=q.shape[0], S=q.shape[1], D=q.shape[2], Kq=clusters[0],
       Kk=clusters[1])
  first = {}
  for bn, bk, warps, stages in configs:
    if time.time() > budget_end:
      emit(what="skipped", block_n=bn, block_k=bk, num_warps=warps, num_stages=stages)
      continue
    cfg_row = dict(block_n=bn, block_k=bk, num_warps=warps, num_stages=stages)
    try:
      fn = jax.jit(functools.partial(pallas_kernels.kmeans_assign, interpret=interpret,
                                     **cfg_row))
      row = dict(cfg_row)
      for name, (x, c) in points.items():
        labels = fn(x, c)
        first.setdefault(name, labels)
        row[f"{name}_mismatches"] = int(jnp.sum(labels != first[name]))
        row[f"{name}_ms"], row["timing"] = timing.measure_ms(fn, x, c)
        flops = 2 * x.shape[0] * x.shape[1] * c.shape[1] * x.shape[2]
        row[f"{name}_tflops"] = flops / row[f"{name}_ms"] / 1e9
      emit(what="assign", **row)
    except Exception as e:  # report and go on
      emit(what="assign", **cfg_row, error=f"{type(e).__name__}: {str(e)[:400]}")


ASSIGN_CONFIGS = [  # (block_n, block_k, num_warps, num_stages); the first is the default
    (128, 64, 4, 2), (128, 64, 4, 3), (128, 64, 4, 4), (128, 64, 8, 2), (128, 64, 8, 3),
    (128, 32, 4, 2), (128, 128, 4, 2), (128, 128, 8, 2), (256, 64, 8, 2), (256, 64, 8, 3),
    (256, 64, 4, 2), (256, 32, 8, 2), (256, 128, 8, 2), (64, 64, 4, 2), (64, 128, 4, 2),
]


INPUT_CONFIGS = [
    dict(block_q=128, block_k=128, block_c=64, num_warps=8, num_stages=2, tail_block_q=64),
    dict(block_q=128, block_k=128, block_c=64, num_warps=8, num_stages=3, tail_block_q=64),
    dict(block_q=128, block_k=64, block_c=64, num_warps=8, num_stages=3, tail_block_q=64),
    dict(block_q=64, block_k=64, block_c=64, num_warps=4, num_stages=3),
]


def main():
  mode = sys.argv[1] if len(sys.argv) > 1 else "sweep"
  budget = (float(sys.argv[2]) if len(sys.argv) > 2 and mode not in ("profile", "trace")
            else 300.0)
  start = time.time()
  emit(what="env", jax=jax.__version__, devices=[str(x) for x in jax.devices()])
  if mode == "sweep":
    attention([dict(c) for c in SWEEP], start + budget * 0.7)
    left = budget - (time.time() - start)
    if left > 30:
      pytest_gpu(["tests/test_pallas_kernels.py"], left - 10)
  elif mode == "inputs":
    inputs([dict(c) for c in INPUT_CONFIGS], start + budget)
  elif mode == "mosaic":
    # (chunk rows, half tiles, paired, sorted Q copy, slot-buffer output, split producers)
    mosaic([(16, True, True, False, False, False), (16, True, True, False, False, True),
            (8, True, True, False, False, True), (16, True, True, True, False, False),
            (16, True, True, True, True, False), (16, True, False, False, False, False),
            (16, False, False, False, False, False), (8, True, True, False, False, False),
            (32, True, True, False, False, False)], start + budget)
  elif mode == "mosaic480":
    # Wan 480p's shape: key clusters of ~33 rows, so 16-row chunks pad ~19% of the key
    # slots (8-row ones ~10%; 720p: ~9% and ~5%)
    mosaic([(16, True, True, False, False, False), (8, True, True, False, False, False),
            (16, True, True, False, False, True), (8, True, True, False, False, True)],
           start + budget, problem=dict(s=32760, kq=200, kk=1000))
  elif mode == "clean":  # clean steps vs every step biased, Wan 720p and 480p
    clean_steps(start + budget)
    clean_steps(start + budget, problem=dict(s=32760, kq=200, kk=1000))
  elif mode == "softmax":  # softmax schedules, Wan 720p and 480p
    softmax_variants(start + budget * 0.6)
    softmax_variants(start + budget, problem=dict(s=32760, kq=200, kk=1000))
  elif mode == "calls":  # heads per kernel call, Wan 720p and 480p
    head_calls([40, 20, None, 8, 5], start + budget * 0.7)
    head_calls([40, 20, None], start + budget, problem=dict(s=32760, kq=200, kk=1000))
  elif mode == "profile":  # python -m benchmarks.kernels profile VARIANT (for ncu)
    profile(sys.argv[2] if len(sys.argv) > 2 else "shipped")
  elif mode == "trace":  # python -m benchmarks.kernels trace VARIANT...
    for variant in sys.argv[2:] or ["shipped"]:
      trace(variant)
  elif mode == "probe":
    probe(PROBE_CONFIGS, start + budget)
  elif mode == "assign":
    assign(ASSIGN_CONFIGS, start + budget)
  elif mode == "smoke":  # CPU, interpret mode, tiny shapes: checks this script runs
    small = [dict(block_q=16, block_k=16, block_c=16),
             dict(block_q=32, block_k=16, block_c=16, tail_block_q=16, layout="flat")]
    problem = dict(g=2, s=600, d=32, kq=6, kk=20)
    attention(small, start + budget, interpret=True, problem=problem)
    inputs(small[:1], start + budget, problem=problem, interpret=True)
    mosaic([(16, True, True, False, False, False), (8, False, False, False, True, True)],
           start + budget, problem=problem, emulate=True)
    clean_steps(start + budget, problem=problem, emulate=True)
    softmax_variants(start + budget, problem=problem, emulate=True)
    head_calls([2, None, 1], start + budget, problem=problem, emulate=True)
    probe([(16, 16, 1, 4), (16, 16, 3, 4)], start + budget, grid=workloads.Grid(2, 6, 8),
          heads=2, head_dim=32, clusters=(12, 20), interpret=True)
    assign([(16, 16, 4, 2), (32, 16, 4, 2)], start + budget, grid=workloads.Grid(2, 6, 8),
           heads=2, head_dim=32, clusters=(12, 20), interpret=True)


if __name__ == "__main__":
  main()
