"""The reference's own SVG-EAR attention (PyTorch: Triton k-means and probe, FlashInfer's
variable-block-sparse attention, Triton merge) on the inputs of benchmarks/attention.py, same card.

The reference is svg-project/Sparse-VideoGen: `svg/kmeans_utils.py` at 9b81185a (PR #80, the EAR
kernels) with `svg/kernels/triton/permute.py`, `svg/timer.py`, `svg/flashinfer_patch.py`. One call
is what `WanAttn_EARAttn_Processor.attention_core_logic` does on a sparse step (dyxg/SVG-EAR
0fa88b22 `svg/models/wan/attention.py`), re-stated here stage by stage so that each can be timed:
  k-means     batch_kmeans_Euclid of q (Kq) and of k (Kk), warm: `--kmeans-iters-step` (2)
              iterations from the centroids of a cold `--kmeans-iters-init` (50) run, as the
              processor's kmeans_step does from the previous call's centroids; like
              benchmarks/attention.py every timed call starts from the same cold centroids
  permute     permute_tensor_by_labels_triton of q, k, v + scatter_mean_fused (value centroids)
  routing     identify_dynamic_map_estimated (Triton probe; top_p, gamma=1, min_kc_ratio=0.05 as
              the processor hard-codes them)
  sparse      dynamic_block_sparse_prune_fwd_flashinfer: FlashInfer plan + run (exact blocks,
              LSE) + _fused_qc_kernel_opt (centroid compensation merged through the LSE); its
              "plan" / "run" parts come from the reference's own timer (svg/timer.py, synchronizing)
  inverse     apply_inverse_permutation_triton
Inputs: benchmarks.workloads.structured(grid, heads, head_dim, seed=0) (numpy, [1, S, H, D]) cast
to bf16 and laid out [1, H, S, D] as the processor passes them; dense = torch SDPA (flash and
cuDNN backends) on the same tensors in the same process; error = relative L2 vs dense cuDNN
(flash where cuDNN is unavailable). The reference has no fixed-density knob: its budget is
top-p (0.9 in every script); `--match-density D` also runs the top_p whose routed density is D
(bisection on the first warm call's clusters), the counterpart of our `--densities D` rows.
Times are CUDA-event medians of `--iters` after `--warmup` calls. Video tokens only (HunyuanVideo
too, as in benchmarks/attention.py: no text tokens, so no 2 x 2 text blocks).

The reference and FlashInfer are not in this repository: benchmarks/reference_peer_bundle.sh
assembles them (untracked) and prints the GPU commands, e.g. (first call)
  TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS=16 FLASHINFER_WORKSPACE_BASE=$PWD/tmp/peer-jit \\
    python3 benchmarks/reference_peer.py --svg-path tmp/peer/svg-ref --site tmp/peer/site \\
    --shapes smoke wan22_720p --save-jit $OUT/flashinfer-aot --out $OUT/reference_peer_wan720.json
"smoke" (S = 768, D = 128) builds FlashInfer's JIT module (FA3 batch prefill, bf16, head dim
128: the one the full shapes use) and checks the call end to end in seconds; --save-jit keeps
the built module so that a later call loads it instead of building it again.
"""

import argparse
import inspect
import json
import math
import os
import statistics
import sys
import time

# shape name: (grid (frames, height, width), heads, head_dim, Kq, Kk) = benchmarks/attention.py's
# SHAPES (tests/test_reference_peer.py checks it), plus "smoke"
SHAPES = {
    "wan22_720p": ((21, 45, 80), 40, 128, 300, 1000),
    "wan22_480p": ((21, 30, 52), 40, 128, 200, 1000),
    "hunyuan_720p": ((33, 45, 80), 24, 128, 400, 1000),
    "tiny": ((4, 12, 16), 2, 64, 12, 40),
    "smoke": ((4, 12, 16), 2, 128, 12, 40),
}
EAR_FUNCTIONS = ("batch_kmeans_Euclid", "identify_dynamic_map_estimated", "scatter_mean_fused",
                 "dynamic_block_sparse_prune_fwd_flashinfer", "density_calculation")
BUNDLE_HINT = "benchmarks/reference_peer_bundle.sh assembles both (see its header)"


class PeerError(Exception):
  """A missing or unusable reference / FlashInfer / torch: reported without a traceback."""


def _repo_root():
  return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_reference(svg_path, site):
  """Imports torch, FlashInfer and the reference's modules (svg_path and site first on sys.path).

  Returns a dict: torch, flashinfer, ku (svg.kmeans_utils), permute (svg.kernels.triton.permute),
  timer (svg.timer), patched (whether svg/flashinfer_patch.py's plan patch is installed).
  """
  if not svg_path:
    raise PeerError("--svg-path DIR is required: a checkout of the reference "
                    f"(DIR/svg/kmeans_utils.py with the SVG-EAR kernels); {BUNDLE_HINT}")
  if not os.path.isfile(os.path.join(svg_path, "svg", "kmeans_utils.py")):
    raise PeerError(f"--svg-path {svg_path}: no svg/kmeans_utils.py there; {BUNDLE_HINT}")
  if site is not None and not os.path.isdir(site):
    raise PeerError(f"--site {site} is not a folder; {BUNDLE_HINT}")
  for path in (svg_path, site):
    if path is not None:
      sys.path.insert(0, os.path.abspath(path))
  try:
    import torch
  except ImportError:
    raise PeerError(f"torch does not import in {sys.executable}") from None
  try:
    import flashinfer
  except ImportError as e:
    raise PeerError(f"flashinfer does not import ({e}); pass --site with the bundle's site folder; "
                    f"{BUNDLE_HINT}") from None
  try:
    import svg.kmeans_utils as ku
    import svg.timer as timer
    from svg.kernels.triton import permute
  except ImportError as e:
    raise PeerError(f"the reference in {svg_path} does not import: {e}; the bundle's site folder "
                    f"holds loguru and a cuVS stub; {BUNDLE_HINT}") from None
  missing = [name for name in EAR_FUNCTIONS if not hasattr(ku, name)]
  if missing:
    raise PeerError(f"{ku.__file__} lacks {', '.join(missing)}: not the SVG-EAR version "
                    "(svg-project/Sparse-VideoGen 9b81185a or later)")
  wrapper = getattr(getattr(flashinfer, "sparse", None), "VariableBlockSparseAttentionWrapper",
                    None)
  if wrapper is None or "vector_sparse_indices_buffer" not in inspect.signature(
      wrapper.reset_workspace_buffer).parameters:
    raise PeerError(f"flashinfer {getattr(flashinfer, '__version__', '?')}: its "
                    "VariableBlockSparseAttentionWrapper.reset_workspace_buffer takes no "
                    "vector_sparse_indices_buffer, which the reference passes (FlashInfer 0.2.9 to "
                    f"0.5.x have it; 0.6.0 removed it); {BUNDLE_HINT}")
  patched = bool(getattr(wrapper.plan, "__svg_flashinfer_wrapper__", False))
  return dict(torch=torch, flashinfer=flashinfer, ku=ku, permute=permute, timer=timer,
              patched=patched)


def _versions(ref, device, svg_path):
  torch, flashinfer = ref["torch"], ref["flashinfer"]
  info = dict(framework="torch", torch=torch.__version__, cuda=torch.version.cuda,
              flashinfer=getattr(flashinfer, "__version__", None),
              flashinfer_patch_applied=ref["patched"],
              device=torch.cuda.get_device_name() if device == "cuda" else "cpu")
  try:
    import triton
    info["triton"] = triton.__version__
  except ImportError:
    info["triton"] = None
  try:
    info["flashinfer_backend"] = flashinfer.utils.determine_attention_backend(
        torch.device(device), 0, False, False, torch.bfloat16, torch.bfloat16)
  except Exception as e:  # what backend="auto" picks; informative only
    info["flashinfer_backend"] = f"unknown ({type(e).__name__})"
  provenance = os.path.join(svg_path, "PROVENANCE.json")
  if os.path.isfile(provenance):
    with open(provenance) as f:
      info["reference"] = json.load(f)
  return info


class Timer:
  """Median milliseconds of fn() over `iters` calls after `warmup`: CUDA events on a GPU
  (host stalls inside the call, such as the reference's synchronizations, count), wall clock
  on the CPU."""

  def __init__(self, torch, cuda, iters, warmup):
    self.torch, self.cuda, self.iters, self.warmup = torch, cuda, iters, warmup

  def sync(self):
    if self.cuda:
      self.torch.cuda.synchronize()

  def __call__(self, fn):
    for _ in range(self.warmup):
      fn()
    self.sync()
    times = []
    for _ in range(self.iters):
      if self.cuda:
        start = self.torch.cuda.Event(enable_timing=True)
        end = self.torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
      else:
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def rel_l2(torch, out, ref):
  """||out - ref|| / ||ref|| in float32, a head at a time ([1, H, S, D])."""
  num = den = 0.0
  for h in range(ref.shape[1]):
    r = ref[:, h].float()
    num += float(((out[:, h].float() - r) ** 2).sum())
    den += float((r ** 2).sum())
  return math.sqrt(num / den)


def inputs(torch, name, seed, device):
  """q, k, v [1, H, S, D] bf16 from benchmarks.workloads.structured (benchmarks/attention.py's)."""
  if _repo_root() not in sys.path:
    sys.path.insert(0, _repo_root())
  from benchmarks import workloads
  (f, h, w), heads, head_dim, _, _ = SHAPES[name]
  arrays = workloads.structured(workloads.Grid(f, h, w), heads, head_dim, seed=seed)
  return tuple(torch.from_numpy(a).to(device).to(torch.bfloat16).transpose(1, 2).contiguous()
               for a in arrays)


def dense_attention(torch, q, k, v, device, timer):
  """{backend: (ms, output) or (None, error)} of torch SDPA: flash and cuDNN (math on the CPU)."""
  import torch.nn.functional as F
  from torch.nn.attention import SDPBackend, sdpa_kernel
  backends = (dict(flash=SDPBackend.FLASH_ATTENTION, cudnn=SDPBackend.CUDNN_ATTENTION)
              if device == "cuda" else dict(math=SDPBackend.MATH))
  results = {}
  for name, backend in backends.items():
    def call(backend=backend):
      with sdpa_kernel([backend]):
        return F.scaled_dot_product_attention(q, k, v)
    try:
      with torch.no_grad():
        out = call()
        results[name] = (timer(call), out)
    except RuntimeError as e:  # backend unavailable for this shape / card
      results[name] = (None, str(e).splitlines()[0][:200])
  return results


class EarCall:
  """The processor's sparse-step SVG-EAR call on q, k, v [1, H, S, D], split into stages."""

  def __init__(self, ref, q, k, v, num_q, num_k, args):
    self.ku, self.perm, self.torch = ref["ku"], ref["permute"], ref["torch"]
    self.q, self.k, self.v = q, k, v
    self.num_q, self.num_k, self.args = num_q, num_k, args
    _, self.heads, self.seq, self.dim = q.shape
    self.state = None

  def _kmeans(self, iters, state):
    g, s, d = self.heads, self.seq, self.dim
    qi, ki = (None, None) if state is None else state
    ql, qc, qsz, _ = self.ku.batch_kmeans_Euclid(self.q.view(g, s, d), n_clusters=self.num_q,
                                                 max_iters=iters, init_centroids=qi)
    kl, kc, ksz, _ = self.ku.batch_kmeans_Euclid(self.k.view(g, s, d), n_clusters=self.num_k,
                                                 max_iters=iters, init_centroids=ki)
    return ql, qc, qsz, kl, kc, ksz

  def cold_start(self):
    """The processor's kmeans_init (first sparse call of a layer); keeps the centroids."""
    clusters = self._kmeans(self.args.kmeans_iters_init, None)
    self.state = (clusters[1], clusters[4])
    return clusters

  def kmeans(self):
    """kmeans_step: warm iterations from the cold-start centroids."""
    return self._kmeans(self.args.kmeans_iters_step, self.state)

  def permute(self, clusters):
    ql, qc, qsz, kl, kc, ksz = clusters
    g, kq, kk, d = self.heads, self.num_q, self.num_k, self.dim
    qsz, ksz = qsz.view(1, g, kq), ksz.view(1, g, kk)
    qp, q_idx = self.perm.permute_tensor_by_labels_triton(self.q, ql, dim=2)
    kp, k_idx = self.perm.permute_tensor_by_labels_triton(self.k, kl, dim=2)
    vp, _ = self.perm.permute_tensor_by_labels_triton(self.v, kl, dim=2, sorted_indices=k_idx)
    vc = self.ku.scatter_mean_fused(vp.view(1, g, self.seq, d), ksz)
    return dict(qp=qp, kp=kp, vp=vp, q_idx=q_idx, qsz=qsz, ksz=ksz, qc=qc.view(1, g, kq, d),
                kc=kc.view(1, g, kk, d), vc=vc.view(1, g, kk, d))

  def route(self, lay, top_p):
    return self.ku.identify_dynamic_map_estimated(
        lay["qp"], lay["kp"], lay["vp"], lay["qsz"], lay["ksz"], lay["qc"], lay["kc"], lay["vc"],
        top_p=top_p, gamma=self.args.gamma, min_kc_ratio=self.args.min_kc_ratio).contiguous()

  def sparse(self, lay, block_map):
    return self.ku.dynamic_block_sparse_prune_fwd_flashinfer(
        lay["qp"], lay["kp"], lay["vp"], lay["kc"], lay["vc"], block_map, lay["qsz"], lay["ksz"],
        is_cpu=False)

  def inverse(self, out_perm, lay):
    return self.perm.apply_inverse_permutation_triton(out_perm, lay["q_idx"], dim=2)

  def __call__(self, top_p):
    lay = self.permute(self.kmeans())
    block_map = self.route(lay, top_p)
    return self.inverse(self.sparse(lay, block_map), lay)

  def density(self, lay, block_map):
    """The reference's density_calculation (exact area / S^2), mean over heads."""
    return float(self.ku.density_calculation(block_map, lay["qsz"], lay["ksz"]).float().mean())

  def top_p_for(self, lay, target, steps):
    """Bisection for the top_p whose routed mean density is closest to `target` (density grows
    with top_p; the min_kc_ratio floor bounds it from below)."""
    lo, hi = 0.0, 1.0
    best = (abs(self.density(lay, self.route(lay, 1.0)) - target), 1.0)
    for _ in range(steps):
      mid = 0.5 * (lo + hi)
      dens = self.density(lay, self.route(lay, mid))
      best = min(best, (abs(dens - target), mid))
      lo, hi = (mid, hi) if dens < target else (lo, mid)
    return best[1]


def save_jit(ref, dest):
  """Copies FlashInfer's JIT-built modules (FLASHINFER_JIT_DIR/NAME/NAME.so) to dest/NAME/NAME.so:
  laid into the bundle's site/flashinfer/data/aot (reference_peer_bundle.sh FLASHINFER_AOT=dest),
  FlashInfer loads them as AOT modules and a later call needs no nvcc build. Returns the names."""
  import shutil
  jit_dir = ref["flashinfer"].jit.env.FLASHINFER_JIT_DIR
  names = []
  for name in sorted(os.listdir(jit_dir)) if os.path.isdir(jit_dir) else []:
    so = os.path.join(jit_dir, name, name + ".so")
    if os.path.isfile(so):
      os.makedirs(os.path.join(dest, name), exist_ok=True)
      shutil.copy2(so, os.path.join(dest, name, name + ".so"))
      names.append(name)
  return names


def run_shape(name, ref, args, device):
  torch = ref["torch"]
  cuda = device == "cuda"
  timer = Timer(torch, cuda, args.iters, args.warmup)
  (f, h, w), heads, head_dim, num_q, num_k = SHAPES[name]
  t0 = time.perf_counter()
  q, k, v = inputs(torch, name, args.seed, device)
  inputs_s = time.perf_counter() - t0
  seq = q.shape[2]
  dense = dense_attention(torch, q, k, v, device, timer)
  ok = {n: r for n, r in dense.items() if r[0] is not None}
  if not ok:
    raise PeerError(f"{name}: no SDPA backend ran: {dense}")
  ref_name = next(n for n in ("cudnn", "flash", "math") if n in ok)
  dense_out = ok[ref_name][1]
  dense_ms = {n: r[0] for n, r in dense.items()}
  dense_errors = {n: r[1] for n, r in dense.items() if r[0] is None}
  dense_agree = (rel_l2(torch, ok["flash"][1], ok["cudnn"][1])
                 if "flash" in ok and "cudnn" in ok else None)
  del dense, ok  # only the reference output stays on the device
  print(f"{name}: S={seq} H={heads} dense " + ", ".join(
      f"{n} {ms:.2f} ms" for n, ms in dense_ms.items() if ms is not None), flush=True)

  call = EarCall(ref, q, k, v, num_q, num_k, args)
  torch.manual_seed(args.seed)  # the cold start draws its initial centroids with torch.randint
  with torch.no_grad():
    t0 = time.perf_counter()
    call.cold_start()
    timer.sync()
    cold_s = time.perf_counter() - t0
    budgets = [("top-p", args.top_p, args.top_p)]
    if args.match_density:
      lay = call.permute(call.kmeans())
      for target in args.match_density:
        budgets.append(("density", target, call.top_p_for(lay, target, args.bisect_steps)))
    t0 = time.perf_counter()
    call(budgets[0][2])  # first sparse call: FlashInfer's JIT build, Triton compiles (uncached)
    timer.sync()
    first_call_s = time.perf_counter() - t0

    rows = []
    for kind, target, top_p in budgets:
      if cuda:
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
      out = call(top_p)
      call_gb = ((torch.cuda.max_memory_allocated() - before + 3 * q.nbytes) / 1e9 if cuda
                 else None)  # arguments + outputs + temporaries, like XLA's accounting
      err = rel_l2(torch, out, dense_out)
      del out
      full_ms = timer(lambda: call(top_p))
      clusters = call.kmeans()
      lay = call.permute(clusters)
      block_map = call.route(lay, top_p)
      out_perm = call.sparse(lay, block_map)
      density = call.density(lay, block_map)
      stage_ms = dict(kmeans=timer(call.kmeans), permute=timer(lambda: call.permute(clusters)),
                      routing=timer(lambda: call.route(lay, top_p)),
                      sparse=timer(lambda: call.sparse(lay, block_map)),
                      inverse=timer(lambda o=out_perm: call.inverse(o, lay)))
      del out_perm
      # the reference's own per-stage timer (CUDA events with a synchronize after each stage)
      log = ref["timer"]
      log.operator_log_data.clear()
      log.ENABLE_LOGGING = True
      try:
        for _ in range(args.iters):
          call(top_p)
        timer.sync()
      finally:
        log.ENABLE_LOGGING = False
      ref_timer = {key: value / args.iters for key, value in sorted(log.operator_log_data.items())}
      log.operator_log_data.clear()
      plan = ref_timer.get("Level 4 - Planning")
      run = ref_timer.get("Level 4 - Running")
      whole = ref_timer.get("Level 3 - dynamic block sparse fwd flashinfer on GPU")
      merge = whole - plan - run if None not in (plan, run, whole) else None
      budget = (f"top-p {top_p:g}" if kind == "top-p"
                else f"top-p {top_p:.4f} (matched density {target:g})")
      useful_flops = 4.0 * head_dim * density * seq * seq * heads
      row = dict(
          name=name, **_versions(ref, device, args.svg_path), batch=1, seq_len=seq, heads=heads,
          head_dim=head_dim, num_q_clusters=num_q, num_k_clusters=num_k, routing="ear",
          budget=budget, top_p=top_p, target_density=target if kind == "density" else None,
          min_kc_ratio=args.min_kc_ratio, gamma=args.gamma, compensation="mean",
          kmeans_iters_init=args.kmeans_iters_init, kmeans_iters_warm=args.kmeans_iters_step,
          warm_start=("every timed call: --kmeans-iters-step iterations from the cold start's "
                      "centroids"),
          density=density, dense_ref=ref_name, dense_ms=dense_ms[ref_name],
          dense_flash_ms=dense_ms.get("flash"), dense_cudnn_ms=dense_ms.get("cudnn"),
          dense_errors=dense_errors or None, dense_flash_vs_cudnn_rel_err=dense_agree,
          svg_ear_ms=full_ms, speedup_vs_cudnn=(dense_ms["cudnn"] / full_ms
                                                if dense_ms.get("cudnn") else None),
          speedup_vs_flash=dense_ms["flash"] / full_ms if dense_ms.get("flash") else None,
          rel_err=err, kmeans_ms=stage_ms["kmeans"], permute_ms=stage_ms["permute"],
          routing_ms=stage_ms["routing"], sparse_ms=stage_ms["sparse"],
          inverse_ms=stage_ms["inverse"],
          attention_ms=stage_ms["permute"] + stage_ms["sparse"] + stage_ms["inverse"],
          plan_ms=plan, flashinfer_run_ms=run, merge_ms=merge, reference_timer_ms=ref_timer,
          sparse_tflops=useful_flops / (run * 1e-3) / 1e12 if run else None,
          call_mem_gb=call_gb, timing="cuda-events" if cuda else "wallclock",
          iters=args.iters, warmup=args.warmup, inputs_s=inputs_s, cold_kmeans_s=cold_s,
          first_call_s=first_call_s)
      rows.append(row)
      print(json.dumps(row), flush=True)
  return rows


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--svg-path", help="the reference checkout (holds svg/kmeans_utils.py)")
  parser.add_argument("--site", help="folder prepended to sys.path: FlashInfer, loguru, cuVS stub")
  parser.add_argument("--shapes", nargs="+", default=["wan22_720p", "wan22_480p", "hunyuan_720p"],
                      choices=list(SHAPES))
  parser.add_argument("--top-p", type=float, default=0.9,
                      help="the reference's budget (its scripts: 0.9)")
  parser.add_argument("--match-density", type=float, nargs="*", default=[0.25],
                      help="also run the top_p that routes this mean density (none: skip)")
  parser.add_argument("--bisect-steps", type=int, default=14)
  parser.add_argument("--min-kc-ratio", type=float, default=0.05,
                      help="WanAttn_EARAttn_Processor passes 0.05 whatever its CLI says")
  parser.add_argument("--gamma", type=float, default=1.0)
  parser.add_argument("--kmeans-iters-init", type=int, default=50)
  parser.add_argument("--kmeans-iters-step", type=int, default=2)
  parser.add_argument("--iters", type=int, default=5, help="timed repetitions (median)")
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--allow-cpu", action="store_true",
                      help="run without a GPU (only a stand-in reference runs there: the tests')")
  parser.add_argument("--out", help="JSON file for the rows (rewritten after each shape)")
  parser.add_argument("--save-jit", metavar="DIR",
                      help="copy FlashInfer's JIT-built modules here after each shape "
                           "(see save_jit)")
  args = parser.parse_args(argv)
  try:
    ref = load_reference(args.svg_path, args.site)
    torch = ref["torch"]
    if torch.cuda.is_available():
      device = "cuda"
    elif args.allow_cpu:
      device = "cpu"
    else:
      raise PeerError("no CUDA device: the reference's Triton and FlashInfer kernels need one")
    rows = []
    for name in args.shapes:
      rows += run_shape(name, ref, args, device)
      if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
          json.dump(rows, f, indent=1)
      if args.save_jit and device == "cuda":
        print(f"FlashInfer modules saved: {save_jit(ref, args.save_jit)}", flush=True)
      if device == "cuda":
        torch.cuda.empty_cache()
  except PeerError as e:
    print(f"reference_peer: error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
