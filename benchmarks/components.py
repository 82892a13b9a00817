"""The non-DiT components at full size with random weights: VAE decode / encode, UMT5-XXL,
HunyuanVideo's Llama and CLIP text encoders.

On the GPU (one H200; each case runs in its own subprocess, twice: see "Memory" below):

  python -m benchmarks.components --tag h200                        # everything, bf16 (~40 min)
  python -m benchmarks.components --tag h200 --dtypes bf16,f32      # and float32 (~90 min)
  python -m benchmarks.components --tag h200 --only vae-hunyuan --merge   # one section, added
  python -m benchmarks.components --list                           # the case ids --only takes
  python -m benchmarks.components --smoke --out-dir /tmp/c          # tiny configs on CPU, seconds

Sections (`--only` takes sections and/or case ids, comma-separated):
  vae-wan21   Wan2.1 VAE (z 16; T2V/I2V-A14B): decode [1,16,21,90,160] latents (720p x 81
              frames) untiled and with diffusers' spatial tiling (256 px tiles, stride 192);
              encode one 720p image [1,3,1,720,1280] and the I2V condition video
              [1,3,81,720,1280] (image at frame 0, zeros after, as WanImageToVideoPipeline
              encodes it).
  vae-wan22   Wan2.2 VAE (z 48, TI2V-5B): decode [1,48,31,44,80] (704x1280 x 121 frames),
              untiled and tiled.
  vae-hunyuan HunyuanVideo VAE: decode [1,16,33,90,160] (720p x 129 frames) with
              `HunyuanVAETiling(spatial=True)` (= diffusers `enable_tiling()`: spatial and
              temporal tiles), spatial tiles only, untiled, and temporal tiles only
              (diffusers' default). A configuration whose mid-block attention (dense [N, N] logits
              over all tokens of a tile, and an [N, N] boolean mask built on the host) would
              not fit the device or the host is reported as skipped, with the estimate.
  umt5        UMT5-XXL (vocab 256384, d_model 4096, d_ff 10240, 64 heads, 24 layers; 5.7 B
              parameters, 11.4 GB in bf16): 512 tokens, batch 1 (the prompt) and batch 2
              (prompt + negative prompt).
  llama       HunyuanVideo's text encoder, the LLaVA-Llama-3-8B language model
              (`LlamaConfig.llava_llama3_8b`), built with only the 30 layers
              hidden_states[-3] needs, as the pipeline loads it (7.1 B parameters, 14.1 GB
              in bf16): what `hunyuan.text.encode_prompt` runs, 256 prompt tokens + the
              template's 95 (351, right padding), hidden_states[-3], the 95 cropped; batch 1
              and 2.
  clip        HunyuanVideo's CLIP-L text encoder (`CLIPTextConfig.clip_l`): 77 tokens, no
              mask, the pooled output; batch 1 and 2.
The pipeline runs the text encoders in its DiT dtype (bf16 by default); times are ms-scale,
so rows also carry `warm_ms`.

Weights are random (a counter hash per parameter, lecun-scaled kernels, unit norm scales, zero
biases), built in one jitted program from `nnx.eval_shape` of the module, so that no float32
temporaries or per-leaf compiles are paid (5.7 B parameters take about a second). Wan2.2
latent statistics are zeros / ones (timing does not depend on them).

Timing is wall clock around `block_until_ready`: the first call (traces + compiles + runs)
and the median of --iters warm calls. Memory: jax cannot reset `peak_bytes_in_use`, so every
case runs in a fresh process. The first process also compiles, and XLA's autotuning
allocates device scratch then, so its peak (`peak_incl_compile_gb`) overstates what decoding
needs; a second process of the same case loads the compiled programs from a persistent
compilation cache (no compile, no autotuning) and reports `peak_gb` (`peak_source` says which
one a row has; `--clean-peak never` skips the second process). `fits_h100_80gb` compares the
peak with 80e9 bytes (an 80 GB H100 less its CUDA context), the issue's target of decoding
720p x 81 on one H100 with the DiT elsewhere. The children run with
XLA_PYTHON_CLIENT_MEM_FRACTION=--mem-fraction (0.95) unless it is set; to emulate an 80 GB
card on the 141 GB H200, pass --mem-fraction 0.56.

A child that crashes or runs past --timeout (900 s) leaves an error row (with its log's
tail) and the run goes on; HunyuanVideo's temporal-only tiling is the likeliest to: its tile's
attention has a 5.2 GB [N, N] mask that jit embeds in the program as a constant.

Output: OUT_DIR/components_TAG.json ({"meta", "rows"}) and .md, child logs under OUT_DIR/logs.
"""

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any, Dict, List, Optional

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
H100_BYTES = 80e9
DTYPES = {"bf16": "bfloat16", "f32": "float32"}
SECTIONS = ("vae-wan21", "vae-wan22", "vae-hunyuan", "umt5", "llama", "clip")
ENCODER_KINDS = ("umt5", "llama", "clip")  # kinds of one encoder call per batch size

# Shapes, [B, C, F, H, W]. "full" is the issue's; "smoke" runs in seconds on a CPU.
SHAPES = {
    "full": {
        "wan2.1": (1, 16, 21, 90, 160),  # 720p x 81 frames
        "wan2.2": (1, 48, 31, 44, 80),  # 704x1280 x 121 frames (TI2V-5B)
        "hunyuan": (1, 16, 33, 90, 160),  # 720p x 129 frames
        "wan2.1-image": (1, 3, 1, 720, 1280),
        "wan2.1-i2v": (1, 3, 81, 720, 1280),
        "umt5": dict(length=512, batches=(1, 2)),
        "llama": dict(tokens=256, crop_start=95, batches=(1, 2)),  # hunyuan.text's
        "clip": dict(length=77, batches=(1, 2)),
    },
    # smoke: each tiled input splits into tiles of the untiled input's shape, so that the
    # tiled cases reuse its compiled programs (compiling is what takes the time on a CPU)
    "smoke": {
        "wan2.1": (1, 16, 3, 4, 4),
        "wan2.1/spatial": (1, 16, 3, 8, 8),
        "wan2.2": (1, 48, 3, 2, 2),
        "wan2.2/spatial": (1, 48, 3, 4, 4),
        "hunyuan": (1, 4, 3, 4, 4),
        "hunyuan/temporal": (1, 4, 5, 4, 4),
        "hunyuan/spatial": (1, 4, 3, 8, 8),
        "hunyuan/spatial+temporal": (1, 4, 5, 8, 8),
        "wan2.1-image": (1, 3, 1, 64, 64),
        "wan2.1-i2v": (1, 3, 9, 64, 64),
        "umt5": dict(length=16, batches=(1, 2)),
        "llama": dict(tokens=16, crop_start=8, batches=(1, 2)),
        "clip": dict(length=16, batches=(1, 2)),
    },
}


@dataclasses.dataclass(frozen=True)
class Case:
  """One process's worth of measurements (one or more rows)."""

  id: str  # "<section>/<what>-<dtype>"
  section: str
  kind: str  # "wan-decode" | "wan-encode" | "hunyuan-decode" | "umt5" | "llama" | "clip"
  model: str  # "wan2.1" | "wan2.2" | "hunyuan" | "umt5-xxl" | "llava-llama-3-8b" | "clip-l"
  dtype: str  # key of DTYPES
  tiling: str = "-"  # "none" | "spatial" | "temporal" | "spatial+temporal" | "-"


def all_cases(dtypes) -> List[Case]:
  cases = []
  for d in dtypes:
    for t in ("none", "spatial"):
      cases.append(Case(f"vae-wan21/decode-{t}-{d}", "vae-wan21", "wan-decode", "wan2.1", d, t))
    cases.append(Case(f"vae-wan21/encode-{d}", "vae-wan21", "wan-encode", "wan2.1", d))
    for t in ("none", "spatial"):
      cases.append(Case(f"vae-wan22/decode-{t}-{d}", "vae-wan22", "wan-decode", "wan2.2", d, t))
    for t in ("spatial+temporal", "spatial", "none", "temporal"):  # the riskiest last
      cases.append(Case(f"vae-hunyuan/decode-{t}-{d}", "vae-hunyuan", "hunyuan-decode",
                        "hunyuan", d, t))
    cases.append(Case(f"umt5/encode-{d}", "umt5", "umt5", "umt5-xxl", d))
    cases.append(Case(f"llama/encode-{d}", "llama", "llama", "llava-llama-3-8b", d))
    cases.append(Case(f"clip/encode-{d}", "clip", "clip", "clip-l", d))
  order = {s: i for i, s in enumerate(SECTIONS)}
  return sorted(cases, key=lambda c: order[c.section])  # stable: dtypes stay in order


def select(cases: List[Case], only: Optional[str]) -> List[Case]:
  if not only:
    return cases
  wanted = [w.strip() for w in only.split(",") if w.strip()]
  known = set(SECTIONS) | {c.id for c in cases}
  unknown = [w for w in wanted if w not in known]
  if unknown:
    raise SystemExit(f"--only: unknown {unknown}; sections {list(SECTIONS)}, cases: "
                     f"{[c.id for c in cases]}")
  return [c for c in cases if c.section in wanted or c.id in wanted]


# --- models and random weights ----------------------------------------------------------------


def input_shape(preset: str, model: str, tiling: str = "none") -> tuple:
  shapes = SHAPES[preset]
  return shapes.get(f"{model}/{tiling}", shapes[model])


def _wan_config(model: str, smoke: bool, dtype):
  from models.wan.vae import WanVAEConfig

  kw: Dict[str, Any] = {}
  if model == "wan2.2":  # diffusers' vae22_diffusers_config (TI2V-5B)
    kw = dict(base_dim=160, decoder_base_dim=256, z_dim=48, in_channels=12, out_channels=12,
              is_residual=True, patch_size=2, scale_factor_spatial=16,
              latents_mean=(0.0,) * 48, latents_std=(1.0,) * 48)
  if smoke:  # as tests/models/test_wan_vae.py's TINY / WAN22
    kw.update(base_dim=4, decoder_base_dim=4, dim_mult=(1, 1, 1, 1), num_res_blocks=1)
  return WanVAEConfig(**kw, param_dtype=dtype, dtype=dtype)


def _wan_tiling(smoke: bool):
  from models.wan.vae import WanVAETiling

  # smoke: 4-latent tiles every 4 (2 for Wan2.2's x16): the untiled input's shape
  return WanVAETiling(32, 32, 32, 32) if smoke else WanVAETiling()


def _hunyuan_config(smoke: bool, dtype):
  from models.hunyuan.vae import HunyuanVAEConfig

  kw = (dict(latent_channels=4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
             norm_num_groups=4) if smoke else {})  # tests/models/test_hunyuan_vae.py's TINY
  return HunyuanVAEConfig(**kw, param_dtype=dtype, dtype=dtype)


def _hunyuan_tiling(name: str, smoke: bool):
  from models.hunyuan.vae import HunyuanVAETiling

  if name == "none":
    return None
  sizes = {}
  if smoke:  # 4-latent tiles every 4, 3-latent-frame tiles every 2: the untiled input's shape
    sizes = dict(tile_sample_min_height=32, tile_sample_min_width=32,
                 tile_sample_stride_height=32, tile_sample_stride_width=32,
                 tile_sample_min_num_frames=8, tile_sample_stride_num_frames=8)
  return HunyuanVAETiling(spatial="spatial" in name, temporal="temporal" in name, **sizes)


def _umt5_config(smoke: bool, dtype):
  from models.wan.umt5 import UMT5Config

  if smoke:  # tests/models/test_umt5.py's tiny config
    return UMT5Config(vocab_size=1000, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                      dtype=dtype)
  return UMT5Config.umt5_xxl(dtype=dtype)


def _llama_config(smoke: bool, dtype):
  from models.hunyuan.llama import LlamaConfig

  if smoke:  # tests/models/test_hunyuan_text.py's LLAMA
    return LlamaConfig(vocab_size=1000, hidden_size=32, intermediate_size=48,
                       num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                       rope_theta=500000.0, dtype=dtype)
  return LlamaConfig.llava_llama3_8b(dtype=dtype)


def _clip_config(smoke: bool, dtype):
  from models.hunyuan.clip import CLIPTextConfig

  if smoke:  # tests/models/test_hunyuan_text.py's CLIP
    return CLIPTextConfig(vocab_size=200, hidden_size=32, intermediate_size=48,
                          num_hidden_layers=2, num_attention_heads=4, dtype=dtype)
  return CLIPTextConfig.clip_l(dtype=dtype)


def _hash_values(n: int, seed: int):
  """n pseudo-random float32 values in [-sqrt(3), sqrt(3)) (unit variance), elementwise from
  a counter (lowbias32 hash), so XLA fuses it into the write of the result."""
  import jax
  import jax.numpy as jnp

  if n >= 2 ** 32:
    raise ValueError(f"a parameter of {n} elements is too large for the 32-bit counter")
  x = jax.lax.iota(jnp.uint32, n) + np.uint32((seed * 0x9E3779B9) & 0xFFFFFFFF)
  x = x ^ (x >> 16)
  x = x * np.uint32(0x7FEB352D)
  x = x ^ (x >> 15)
  x = x * np.uint32(0x846CA68B)
  x = x ^ (x >> 16)
  u = (x >> 8).astype(jnp.float32) * np.float32(2.0 ** -24)
  return (u * 2.0 - 1.0) * np.float32(math.sqrt(3.0))


def _leaf_name(path) -> str:
  names = [getattr(k, "key", getattr(k, "name", None)) for k in path]
  names = [str(n) for n in names if n is not None and n not in ("value", "raw_value")]
  return names[-1] if names else ""


def random_model(ctor):
  """`ctor()` with random weights, made on the default device in one jitted program (no
  eager per-parameter init, no float32 temporaries). Kernels (ndim >= 2) get std
  1/sqrt(fan_in) (fan_in = all axes but the last; embedding tables std 1), 1-D biases zeros,
  other 1-D parameters (norm scales) ones."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  graphdef, abstract = nnx.split(nnx.eval_shape(ctor))
  leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)

  def make():
    out = []
    for i, (path, leaf) in enumerate(leaves):
      shape, dtype, name = tuple(leaf.shape), jnp.dtype(leaf.dtype), _leaf_name(path)
      if not jnp.issubdtype(dtype, jnp.floating):
        out.append(jnp.zeros(shape, dtype))
      elif len(shape) <= 1:
        out.append(jnp.full(shape, 0.0 if name == "bias" else 1.0, dtype))
      else:
        std = 1.0 if name == "embedding" else 1.0 / math.sqrt(math.prod(shape[:-1]))
        values = _hash_values(math.prod(shape), i) * np.float32(std)
        out.append(values.astype(dtype).reshape(shape))
    return jax.tree_util.tree_unflatten(treedef, out)

  return nnx.merge(graphdef, jax.jit(make)())


def _pseudo_normal(shape, seed: int, dtype="float32"):
  """Unit-variance pseudo-random input of `shape` (a counter hash, like the weights)."""
  import jax

  return jax.jit(lambda: _hash_values(math.prod(shape), seed).reshape(shape).astype(dtype))()


# --- measuring ------------------------------------------------------------------------------


def _mem() -> Dict[str, Optional[int]]:
  import jax

  stats = jax.devices()[0].memory_stats() or {}
  return {k: stats.get(k) for k in ("bytes_in_use", "peak_bytes_in_use", "bytes_limit")}


def _gb(b) -> Optional[float]:
  return None if b is None else b / 1e9


class _CacheEvents:
  """Counts persistent compilation cache requests and hits (jax.monitoring events)."""

  def __init__(self):
    import jax

    self.requests = self.hits = 0
    jax.monitoring.register_event_listener(self)

  def __call__(self, event, **kwargs):
    if event == "/jax/compilation_cache/compile_requests_use_cache":
      self.requests += 1
    elif event == "/jax/compilation_cache/cache_hits":
      self.hits += 1


def _trace_count(kind: str) -> int:
  if kind.startswith("wan"):
    from models.wan import vae as lib
  elif kind.startswith("hunyuan"):
    from models.hunyuan import vae as lib
  else:
    return 0
  return sum(lib.TRACE_COUNTS.values())


def _timed(fn, iters: int, kind: str) -> Dict[str, Any]:
  """First call (with tracing and compiling), then `iters` warm calls; memory after each."""
  import jax
  import jax.numpy as jnp

  from benchmarks import timing

  before = _mem()
  traces = _trace_count(kind)
  t0 = time.perf_counter()
  out = jax.block_until_ready(fn())
  first = time.perf_counter() - t0
  after_first = _mem()
  row = dict(first_call_s=first,
             traces=_trace_count(kind) - traces if kind not in ENCODER_KINDS else None,
             output_shape=list(out.shape), output_dtype=str(out.dtype),
             bytes_in_use_before_gb=_gb(before["bytes_in_use"]),
             peak_after_first_call_gb=_gb(after_first["peak_bytes_in_use"]),
             bytes_limit_gb=_gb(after_first["bytes_limit"]))
  row["output_finite"] = bool(jnp.isfinite(out).all())
  del out
  if iters > 0:
    ms, method = timing.measure_ms(fn, iterations=iters, warmup=0, wallclock=True)
    row.update(warm_s=ms / 1e3, warm_ms=ms, warm_iters=iters, timing=method)
    row["peak_after_warm_gb"] = _gb(_mem()["peak_bytes_in_use"])
  return row


def _hunyuan_attention_estimate(shape, tiling) -> Dict[str, Any]:
  """Tokens of the largest mid-block attention (one tile) and what it holds at once: the
  host's [N, N] bool mask (numpy, then a device constant), float32 logits and probabilities."""
  _, _, t, h, w = shape
  if tiling is not None:
    min_h, min_w, min_t, _, _, _ = tiling.latent_sizes(8, 4)
    if tiling.temporal and t > min_t:
      t = min(t, min_t + 1)
    if tiling.spatial and (h > min_h or w > min_w):
      h, w = min(h, min_h), min(w, min_w)
  n = t * h * w
  return dict(attention_tokens=n, mask_host_gb=n * n / 1e9, attention_device_gb=n * n * 9 / 1e9)


def _host_bytes() -> Optional[int]:
  try:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  except (ValueError, OSError, AttributeError):
    return None


_BUILT: Dict[tuple, tuple] = {}  # in-process runs: (family, model, dtype, preset) -> (model, info)


def _encode_rows(encode, batches, length, start, tokens, vocab, base, iters, kind, emit):
  """One timed row per batch size of encode(ids, mask) on [batch, length] random ids: row 0
  a prompt of 3/16 of `tokens` real tokens, row 1 a negative prompt of 1/4, each after the
  first `start` (template) tokens. Batch 1 should come first: its peak is then its own."""
  import jax
  import jax.numpy as jnp

  for batch in batches:
    ids = jax.random.randint(jax.random.key(batch), (batch, length), 2, vocab)
    real = [start + max(1, tokens * 3 // 16), start + max(1, tokens // 4)][:batch]
    mask = (jnp.arange(length)[None, :] < jnp.asarray(real)[:, None]).astype(jnp.int32)
    row = dict(base, op=f"encode-b{batch}", input_shape=[batch, length])
    row.update(_timed(lambda: encode(ids, mask), iters, kind))
    emit(row)


def run_case(case: Case, smoke: bool, iters: int, emit) -> None:
  """Measures one case, calling emit(row) for each row as soon as it is done. Within one
  process, cases of the same model and dtype share its random weights."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  preset = "smoke" if smoke else "full"
  shapes = SHAPES[preset]
  dtype = jnp.dtype(DTYPES[case.dtype])
  base = dict(case=case.id, section=case.section, model=case.model, dtype=case.dtype,
              tiling=case.tiling, preset=preset, device=jax.devices()[0].device_kind,
              platform=jax.default_backend(), jax_version=jax.__version__)

  def build(ctor):
    key = (case.kind.split("-")[0], case.model, case.dtype, preset)
    if key not in _BUILT:
      _BUILT.clear()  # one model at a time
      _BUILT[key] = _build(ctor)
    return _BUILT[key]

  def _build(ctor):
    t0 = time.perf_counter()
    model = jax.block_until_ready(random_model(ctor))
    state = nnx.state(model)
    return model, dict(init_s=time.perf_counter() - t0,
                       params=int(sum(x.size for x in jax.tree.leaves(state))),
                       weights_gb=sum(x.nbytes for x in jax.tree.leaves(state)) / 1e9,
                       bytes_in_use_after_init_gb=_gb(_mem()["bytes_in_use"]))

  if case.kind in ("wan-decode", "wan-encode"):
    from models.wan.vae import WanVAE

    cfg = _wan_config(case.model, smoke, dtype)
    vae, info = build(lambda: WanVAE(cfg, rngs=nnx.Rngs(0)))
    base.update(info, config=cfg.describe())
    if case.kind == "wan-decode":
      shape = input_shape(preset, case.model, case.tiling)
      latents = _pseudo_normal(shape, 1)
      tiling = _wan_tiling(smoke) if case.tiling == "spatial" else None
      row = dict(base, op="decode", input_shape=list(shape), tiling_params=_asdict(tiling))
      row.update(_timed(lambda: vae.decode(latents, tiling=tiling), iters, case.kind))
      emit(row)
      return
    for what in ("image", "i2v"):  # the image alone first: its peak is then its own
      shape = shapes[f"wan2.1-{what}"]
      video = jnp.zeros(shape, jnp.float32).at[:, :, :1].set(
          jnp.tanh(_pseudo_normal((*shape[:2], 1, *shape[3:]), 2)))
      row = dict(base, op=f"encode-{what}", input_shape=list(shape))
      row.update(_timed(lambda: vae.encode(video), iters, case.kind))
      del video
      emit(row)
    return

  if case.kind == "hunyuan-decode":
    from models.hunyuan.vae import HunyuanVAE

    shape = input_shape(preset, "hunyuan", case.tiling)
    tiling = _hunyuan_tiling(case.tiling, smoke)
    row = dict(base, op="decode", input_shape=list(shape), tiling_params=_asdict(tiling))
    estimate = _hunyuan_attention_estimate(shape, tiling)
    row.update(estimate)
    limit, host = _mem()["bytes_limit"], _host_bytes()
    reasons = []
    if limit and estimate["attention_device_gb"] * 1e9 > limit:
      reasons.append(f"mid-block attention over {estimate['attention_tokens']} tokens needs "
                     f"~{estimate['attention_device_gb']:.0f} GB (mask + f32 logits + probs) "
                     f"> {limit / 1e9:.0f} GB on the device")
    if host and estimate["mask_host_gb"] * 1e9 > 0.5 * host:
      reasons.append(f"its numpy mask alone is {estimate['mask_host_gb']:.0f} GB on the host "
                     f"(of {host / 1e9:.0f} GB)")
    if reasons:
      emit(dict(row, status="skipped", reason="; ".join(reasons)))
      return
    cfg = _hunyuan_config(smoke, dtype)
    vae, info = build(lambda: HunyuanVAE(cfg, rngs=nnx.Rngs(0)))
    row.update(info, config=cfg.describe())
    latents = _pseudo_normal(shape, 1)
    row.update(_timed(lambda: vae.decode(latents, tiling=tiling), iters, case.kind))
    emit(row)
    return

  if case.kind == "umt5":
    from models.wan.umt5 import UMT5Encoder

    cfg = _umt5_config(smoke, dtype)
    model, info = build(lambda: UMT5Encoder(cfg, rngs=nnx.Rngs(0)))
    base.update(info, config=f"UMT5 (d_model={cfg.d_model}, d_ff={cfg.d_ff}, heads="
                             f"{cfg.num_heads}, layers={cfg.num_layers}, vocab={cfg.vocab_size})")
    graphdef, state = nnx.split(model)
    fwd = jax.jit(lambda st, ids, mask: nnx.merge(graphdef, st)(ids, mask))
    length = shapes["umt5"]["length"]
    _encode_rows(lambda ids, mask: fwd(state, ids, mask), shapes["umt5"]["batches"], length,
                 0, length, cfg.vocab_size, base, iters, case.kind, emit)
    return

  if case.kind == "llama":
    from models.hunyuan.llama import LlamaEncoder, resolve_hidden_state_index
    from models.hunyuan.text import LLAMA_HIDDEN_STATE

    cfg = _llama_config(smoke, dtype)
    keep = resolve_hidden_state_index(LLAMA_HIDDEN_STATE, cfg.num_hidden_layers)
    model, info = build(lambda: LlamaEncoder(cfg, rngs=nnx.Rngs(0), num_layers=keep))
    base.update(info, config=f"{cfg.describe()}, first {keep} layers (hidden_states"
                             f"[{LLAMA_HIDDEN_STATE}])")
    graphdef, state = nnx.split(model)
    tokens, start = shapes["llama"]["tokens"], shapes["llama"]["crop_start"]
    length = tokens + start  # encode_prompt: template + prompt, then the template cropped
    fwd = jax.jit(lambda st, ids, mask: nnx.merge(graphdef, st)(
        ids, mask, hidden_state_index=LLAMA_HIDDEN_STATE)[:, start:])
    _encode_rows(lambda ids, mask: fwd(state, ids, mask), shapes["llama"]["batches"], length,
                 start, tokens, cfg.vocab_size, base, iters, case.kind, emit)
    return

  if case.kind == "clip":
    from models.hunyuan.clip import CLIPTextEncoder

    cfg = _clip_config(smoke, dtype)
    model, info = build(lambda: CLIPTextEncoder(cfg, rngs=nnx.Rngs(0)))
    base.update(info, config=cfg.describe())
    graphdef, state = nnx.split(model)
    fwd = jax.jit(lambda st, ids: nnx.merge(graphdef, st)(ids).pooler_output)  # as text.py
    length = shapes["clip"]["length"]
    for batch in shapes["clip"]["batches"]:
      ids = jax.random.randint(jax.random.key(batch), (batch, length), 0, cfg.vocab_size)
      row = dict(base, op=f"encode-b{batch}", input_shape=[batch, length])
      row.update(_timed(lambda: fwd(state, ids), iters, case.kind))
      emit(row)
    return
  raise ValueError(f"unknown case kind {case.kind!r}")


def _asdict(tiling):
  return None if tiling is None else dataclasses.asdict(tiling)


# --- orchestration --------------------------------------------------------------------------


def _row_key(row) -> tuple:
  return (row["case"], row.get("op"))


def _child_main(args) -> int:
  """One case in this process; rows go to --child-out as they are done."""
  import jax

  if args.cache_dir:
    jax.config.update("jax_compilation_cache_dir", args.cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  events = _CacheEvents()
  case = {c.id: c for c in all_cases(DTYPES)}[args.child]
  rows: List[Dict[str, Any]] = []

  def emit(row):
    row = dict(row, cache_requests=events.requests, cache_hits=events.hits)
    row.setdefault("status", "ok")
    rows.append(row)
    with open(args.child_out, "w") as f:
      json.dump(rows, f, indent=1)
    print(json.dumps(row), flush=True)

  run_case(case, args.smoke, args.iters, emit)
  return 0


def _run_child(case: Case, args, log_dir: str, cache_dir: str, clean: bool):
  """Runs one case in a subprocess; returns its rows (or one error row)."""
  suffix = "_clean" if clean else ""
  name = re.sub(r"[^A-Za-z0-9_.+-]", "_", case.id) + suffix
  out_path = os.path.join(log_dir, name + ".json")
  log_path = os.path.join(log_dir, name + ".log")
  if os.path.exists(out_path):
    os.remove(out_path)
  cmd = [sys.executable, "-m", "benchmarks.components", "--child", case.id, "--child-out",
         out_path, "--iters", str(0 if clean else args.iters), "--cache-dir", cache_dir]
  if args.smoke:
    cmd.append("--smoke")
  env = dict(os.environ)
  env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", str(args.mem_fraction))
  if args.smoke:  # tiny programs: XLA's optimisations cost more than they save
    env.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
  t0 = time.perf_counter()
  error = None
  with open(log_path, "w") as log:
    try:
      proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                            timeout=args.timeout)
      if proc.returncode:
        error = f"exit status {proc.returncode}"
    except subprocess.TimeoutExpired:
      error = f"timed out after {args.timeout} s"
  rows = []
  if os.path.exists(out_path):
    with open(out_path) as f:
      rows = json.load(f)
  if error:
    with open(log_path) as f:
      tail = f.read()[-1500:]
    rows.append(dict(case=case.id, section=case.section, model=case.model, dtype=case.dtype,
                     tiling=case.tiling, op="(process)", status="error", error=error,
                     log=log_path, log_tail=tail))
  print(f"[{case.id}{' clean pass' if clean else ''}] {time.perf_counter() - t0:.0f} s"
        f"{', ' + error if error else ''}", flush=True)
  return rows


def _finish(row: Dict[str, Any], clean: Optional[Dict[str, Any]],
            source: str = "first process (incl. compile)") -> Dict[str, Any]:
  """The row's peak: the clean pass's where all its compiles hit the cache, else the cold
  process's (which includes compile-time autotuning scratch)."""
  row = dict(row)
  row["peak_incl_compile_gb"] = row.get("peak_after_warm_gb", row.get("peak_after_first_call_gb"))
  row["peak_gb"], row["peak_source"] = row["peak_incl_compile_gb"], source
  if clean and clean.get("status") == "ok":
    row.update(clean_first_call_s=clean.get("first_call_s"),
               peak_second_process_gb=clean.get("peak_after_first_call_gb"),
               clean_cache_hits=clean.get("cache_hits"),
               clean_cache_requests=clean.get("cache_requests"))
    if (clean.get("peak_after_first_call_gb") is not None and clean.get("cache_requests") and
        clean.get("cache_hits") == clean.get("cache_requests")):
      row["peak_gb"] = clean["peak_after_first_call_gb"]
      row["peak_source"] = "second process, programs from the compilation cache"
  if row["peak_gb"] is not None:
    row["fits_h100_80gb"] = row["peak_gb"] * 1e9 <= H100_BYTES
  return row


def _jaxlib_version() -> Optional[str]:
  try:
    import jaxlib
    return jaxlib.__version__
  except (ImportError, AttributeError):
    return None


def _meta(args, rows) -> Dict[str, Any]:
  import jax

  devices = sorted({r["device"] for r in rows if r.get("device")})
  return dict(date=datetime.datetime.now().isoformat(timespec="seconds"),
              command=" ".join([os.path.basename(sys.executable), "-m", "benchmarks.components",
                                *sys.argv[1:]]),
              card=", ".join(devices) or None, jax_version=jax.__version__,
              jaxlib_version=_jaxlib_version(),
              python=platform.python_version(), host=platform.node(),
              host_cpus=os.cpu_count(), preset="smoke" if args.smoke else "full",
              iters=args.iters, mem_fraction=os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION",
                                                             str(args.mem_fraction)),
              shapes={k: (list(v) if isinstance(v, tuple) else v)
                      for k, v in SHAPES["smoke" if args.smoke else "full"].items()},
              h100_bytes=H100_BYTES,
              weights="random: counter hash, lecun-scaled kernels, unit norm scales, zero biases",
              notes=("peak_gb: device peak_bytes_in_use of a fresh process (peak_source says "
                     "which); warm_s: median wall clock of warm calls"))


def _markdown(meta, rows) -> str:
  fmt = lambda x, spec: "" if x is None else format(x, spec)
  lines = [f"# Components ({meta['card']}, jax {meta['jax_version']}, {meta['date']})", "",
           f"`{meta['command']}`", "",
           "| case | op | input | output | dtype | tiling | first call s | warm s | peak GB |"
           " weights GB | fits 80 GB | status |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    shape = lambda s: "" if s is None else "x".join(map(str, s))
    fits = r.get("fits_h100_80gb")
    status = r.get("status", "ok")
    if status != "ok":
      status += ": " + (r.get("reason") or r.get("error") or "")[:160]
    elif r.get("output_finite") is False:
      status += " (non-finite output)"
    peak = fmt(r.get("peak_gb"), ".1f")
    if peak and not r.get("peak_source", "").startswith("second"):
      peak += "*"
    lines.append(
        f"| {r['case']} | {r.get('op', '')} | {shape(r.get('input_shape'))} | "
        f"{shape(r.get('output_shape'))} | {r.get('dtype', '')} | {r.get('tiling', '')} | "
        f"{fmt(r.get('first_call_s'), '.1f')} | {fmt(r.get('warm_s'), '.3f')} | {peak} | "
        f"{fmt(r.get('weights_gb'), '.2f')} | {'' if fits is None else ('yes' if fits else 'NO')} "
        f"| {status} |")
  lines += ["", "first call: trace + compile + run; warm: median of the warm calls; peak: "
            "device peak_bytes_in_use of a fresh process with the compiled programs loaded "
            "from the cache (* = of the compiling process, which includes autotuning "
            "scratch); fits 80 GB: peak <= 80e9 bytes."]
  return "\n".join(lines) + "\n"


def _run_in_process(cases: List[Case], args) -> List[Dict[str, Any]]:
  """Every case in this process (smoke runs: seconds, peaks cumulative)."""
  import jax

  rows: List[Dict[str, Any]] = []
  saved = bool(jax.config.values.get("jax_disable_most_optimizations", False))
  if args.smoke:  # tiny programs: XLA's optimisations cost more than they save
    jax.config.update("jax_disable_most_optimizations", True)
  try:
    for case in cases:
      case_rows: List[Dict[str, Any]] = []
      try:
        run_case(case, args.smoke, args.iters, case_rows.append)
      except Exception as e:  # keep going: one failing case must not lose the others
        case_rows.append(dict(case=case.id, section=case.section, model=case.model,
                              dtype=case.dtype, tiling=case.tiling, op="(case)",
                              status="error", error=f"{type(e).__name__}: {str(e)[:500]}",
                              traceback=traceback.format_exc()[-2000:]))
      for r in case_rows:
        r.setdefault("status", "ok")
        rows.append(_finish(r, None, "one process for all cases (cumulative, incl. compile)"))
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "traceback"}), flush=True)
  finally:
    jax.config.update("jax_disable_most_optimizations", saved)
    _BUILT.clear()
  return rows


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--only", help="comma-separated sections and/or case ids (--list)")
  parser.add_argument("--dtypes", default="bf16", help="comma-separated: bf16, f32")
  parser.add_argument("--iters", type=int, default=None,
                      help="warm calls per measurement (default 2; smoke 1)")
  parser.add_argument("--out-dir", default=os.path.join("out", "components"))
  parser.add_argument("--tag", help="file name tag (default: smoke, or the device kind)")
  parser.add_argument("--merge", action="store_true",
                      help="keep the rows of an existing components_TAG.json that this run "
                           "does not measure again")
  parser.add_argument("--smoke", action="store_true",
                      help="tiny configs and shapes (CPU, seconds); runs in this process")
  parser.add_argument("--subprocess", dest="in_process", action="store_false", default=None,
                      help="one process per case even with --smoke")
  parser.add_argument("--in-process", dest="in_process", action="store_true",
                      help="every case in this process (peaks are then cumulative)")
  parser.add_argument("--clean-peak", choices=("auto", "always", "never"), default="auto",
                      help="second process per case, compiled programs from the cache, for "
                           "the peak (auto: where the device reports memory statistics)")
  parser.add_argument("--timeout", type=int, default=900, help="seconds per child process")
  parser.add_argument("--mem-fraction", type=float, default=0.95,
                      help="XLA_PYTHON_CLIENT_MEM_FRACTION of the children, unless it is set")
  parser.add_argument("--list", action="store_true", help="print the case ids and exit")
  parser.add_argument("--child", help=argparse.SUPPRESS)
  parser.add_argument("--child-out", help=argparse.SUPPRESS)
  parser.add_argument("--cache-dir", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.iters is None:
    args.iters = 1 if args.smoke else 2
  if args.child:
    return _child_main(args)
  dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
  bad = [d for d in dtypes if d not in DTYPES]
  if bad or not dtypes:
    parser.error(f"--dtypes: unknown {bad}; choose from {list(DTYPES)}")
  cases = select(all_cases(dtypes), args.only)
  if args.list:
    print("\n".join(c.id for c in cases))
    return 0
  in_process = args.smoke if args.in_process is None else args.in_process
  os.makedirs(args.out_dir, exist_ok=True)

  rows: List[Dict[str, Any]] = []
  if in_process:
    rows = _run_in_process(cases, args)
  else:
    log_dir = os.path.join(args.out_dir, "logs")
    os.makedirs(log_dir, exist_ok=True)
    for case in cases:
      cache_dir = tempfile.mkdtemp(prefix="components_cache_")
      try:
        cold = _run_child(case, args, log_dir, cache_dir, clean=False)
        clean = {}
        # (without device memory statistics, as on CPU, there is no peak to clean up)
        ok = [r for r in cold if r.get("status") == "ok"]
        if ok and (args.clean_peak == "always" or (
            args.clean_peak == "auto" and
            any(r.get("peak_after_first_call_gb") is not None for r in ok))):
          clean = {_row_key(r): r for r in _run_child(case, args, log_dir, cache_dir, True)}
        rows += [_finish(r, clean.get(_row_key(r))) for r in cold]
      finally:
        shutil.rmtree(cache_dir, ignore_errors=True)

  tag = args.tag or ("smoke" if args.smoke else None)
  if tag is None:
    kinds = [r["device"] for r in rows if r.get("device")]
    tag = re.sub(r"[^a-z0-9]+", "_", kinds[0].lower()).strip("_") if kinds else "unknown"
  stem = os.path.join(args.out_dir, f"components_{tag}")
  if args.merge and os.path.exists(stem + ".json"):
    with open(stem + ".json") as f:
      old = json.load(f)["rows"]
    measured = {r["case"] for r in rows}
    rows = [r for r in old if r["case"] not in measured] + rows
    order = {c.id: i for i, c in enumerate(all_cases(DTYPES))}
    rows.sort(key=lambda r: order.get(r["case"], len(order)))
  meta = _meta(args, rows)
  with open(stem + ".json", "w") as f:
    json.dump(dict(meta=meta, rows=rows), f, indent=1)
  text = _markdown(meta, rows)
  with open(stem + ".md", "w") as f:
    f.write(text)
  print(text)
  return 0 if all(r.get("status") in ("ok", "skipped") for r in rows) else 1


if __name__ == "__main__":
  sys.exit(main())
