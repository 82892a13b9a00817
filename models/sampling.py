"""Machinery shared by the denoising loops (models/denoise.py and the pipelines).

- `SvgEarSchedule`: which denoising steps run dense attention (the reference's
  `first_times_fp` warm-up) and what happens to the k-means state at a Wan expert switch.
- Classifier-free guidance as one DiT batch of 2: `cfg_concat` / `cfg_split` / `cfg_combine`.
- `StepRecord` / `StepLog`: per-step timing, dense-or-sparse flag and attention density,
  with an optional tqdm progress bar and a per-step user callback; `density_overshoot`:
  the warning when sparse steps route far above a fixed density budget.
- `check_*` helpers: input validation with clear errors, before any device work.
"""

import dataclasses
import math
import time
from typing import Any, Callable, List, Mapping, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

EXPERT_SWITCHES = ("cold", "carry")


# ------------------------------------------------------------------------------------------
# SVG-EAR step schedule


@dataclasses.dataclass(frozen=True)
class SvgEarSchedule:
  """Which steps of a video run dense attention; the DiT's `AttentionPolicy` says which
  layers are dense and with which `SvgEarConfig` the other layers run.

  Attributes:
    dense_steps: a float in [0, 1] -> the first int(dense_steps * steps) steps are dense
      (the reference's `first_times_fp`: `num_fp_timesteps = int(first_times_fp * steps)`);
      an int >= 0 -> that many leading steps are dense (capped at the step count). 1.0
      makes every step dense; note 1 (int) is one step.
    expert_switch: what the low-noise Wan expert's k-means state starts from when it takes
      over: "cold" (empty: its first sparse step runs the cold `kmeans_iters`) or "carry"
      (a copy of the high-noise expert's last centroids when the shapes match, else cold).
      Default "cold": within ~0.002 attention error of the best start whatever the two
      experts' projections are, while carrying breaks down when they are unrelated
      (benchmarks/results/kmeans_start_h200.md). The reference shares one processor per
      layer index between both experts, so it effectively carries; choose "carry" to
      reproduce it (or when the experts are known to be close).
    kmeans_during_dense: the reference's `zero_step_kmeans_init`: the dense warm-up steps
      still run k-means in the sparse layers (output exact dense attention, the centroids
      carried), so the first sparse step starts warm (`kmeans_iters_warm`) instead of cold.
  """

  dense_steps: Union[float, int] = 0.2
  expert_switch: str = "cold"
  kmeans_during_dense: bool = False

  def __post_init__(self):
    d = self.dense_steps
    if isinstance(d, bool) or not isinstance(d, (int, float)):
      raise TypeError(f"SvgEarSchedule.dense_steps must be a float fraction or an int count, "
                      f"got {d!r}")
    if isinstance(d, float) and not 0.0 <= d <= 1.0:
      raise ValueError(f"SvgEarSchedule.dense_steps={d}: a fraction must be in [0, 1]")
    if isinstance(d, int) and d < 0:
      raise ValueError(f"SvgEarSchedule.dense_steps={d}: a step count must be >= 0")
    if self.expert_switch not in EXPERT_SWITCHES:
      raise ValueError(f"SvgEarSchedule.expert_switch={self.expert_switch!r}: must be one of "
                       f"{EXPERT_SWITCHES}")
    if not isinstance(self.kmeans_during_dense, bool):
      raise TypeError(f"SvgEarSchedule.kmeans_during_dense must be a bool, got "
                      f"{self.kmeans_during_dense!r}")

  @classmethod
  def dense(cls) -> "SvgEarSchedule":
    """Every step dense."""
    return cls(dense_steps=1.0)

  @classmethod
  def sparse(cls, **changes) -> "SvgEarSchedule":
    """No dense warm-up steps: every step follows the DiT's attention policy."""
    return cls(**{"dense_steps": 0, **changes})

  def num_dense(self, num_steps: int) -> int:
    """How many leading steps of a `num_steps` loop are dense."""
    if isinstance(self.dense_steps, float):
      return int(self.dense_steps * num_steps)
    return min(self.dense_steps, num_steps)

  def dense_flags(self, num_steps: int) -> Tuple[bool, ...]:
    """(num_steps,) whether each step runs dense attention."""
    n = self.num_dense(num_steps)
    return tuple(i < n for i in range(num_steps))

# ------------------------------------------------------------------------------------------
# Classifier-free guidance


def cfg_enabled(guidance_scale: float) -> bool:
  """diffusers' `do_classifier_free_guidance`: guidance_scale > 1."""
  return guidance_scale > 1.0


def cfg_concat(cond: jax.Array, uncond: jax.Array) -> jax.Array:
  """[B, ...] cond and uncond -> [2B, ...] (cond first): one DiT batch for both branches."""
  return jnp.concatenate([cond, uncond], axis=0)


def cfg_split(out: jax.Array) -> Tuple[jax.Array, jax.Array]:
  """[2B, ...] output of a `cfg_concat` batch -> ([B, ...] cond, [B, ...] uncond)."""
  b = out.shape[0] // 2
  return out[:b], out[b:]


def cfg_combine(cond: jax.Array, uncond: jax.Array, guidance_scale) -> jax.Array:
  """noise = uncond + g * (cond - uncond), each op rounded to the predictions' dtype as
  torch does for a bf16 tensor and a Python-float g (g itself is not rounded to bf16)."""
  dtype = cond.dtype
  diff = (cond - uncond).astype(jnp.float32)
  scaled = (jnp.asarray(guidance_scale, jnp.float32) * diff).astype(dtype)
  return uncond + scaled


# ------------------------------------------------------------------------------------------
# Per-step records, progress bar, callback


@dataclasses.dataclass(frozen=True)
class StepRecord:
  """What one denoising step did.

  Attributes:
    index: step number, 0-based.
    timestep: the timestep the DiT received.
    expert: which DiT ran ("transformer", "transformer_2", ...).
    dense: whether the step ran dense attention everywhere.
    guidance_scale: the CFG scale used (<= 1: no CFG).
    seconds: wall time of the step (NaN when timings were not requested: no host sync).
    density: mean exact-area fraction over the sparse layers, batch and heads (1.0 dense).
    graph: which DiT program ran: "dense", "dense-kmeans-cold" / "dense-kmeans-warm" (dense
      attention, k-means in the sparse layers without / with the previous centroids),
      "sparse-cold" / "sparse-warm".
  """

  index: int
  timestep: float
  expert: str
  dense: bool
  guidance_scale: float
  seconds: float
  density: float
  graph: str = "dense"


Callback = Callable[[StepRecord, jax.Array], Optional[jax.Array]]


def mean_density(density: Optional[jax.Array]) -> jax.Array:
  """[L_sparse, B, H] `AttentionDensity` (or None: all dense) -> scalar float32 mean."""
  if density is None:
    return jnp.ones((), jnp.float32)
  return jnp.mean(density.astype(jnp.float32))


class StepLog:
  """Collects `StepRecord`s of one loop; drives a tqdm bar and the user callback.

  Timing blocks on the step's result only when `sync` (progress bar, timings or a callback
  requested); otherwise no host sync happens per step and `seconds` / `density` are filled
  in at `finish()` (seconds then NaN).
  """

  def __init__(self, num_steps: int, *, progress: bool = True, sync: bool = True,
               callback: Optional[Callback] = None, desc: str = "denoising"):
    self.num_steps = num_steps
    self.sync = bool(sync or progress or callback is not None)
    self.callback = callback
    self._pending: List[Tuple[dict, Any]] = []
    self._bar = None
    if progress:
      try:
        from tqdm.auto import tqdm
      except ImportError:  # the progress bar is optional
        tqdm = None
      if tqdm is not None:
        self._bar = tqdm(total=num_steps, desc=desc, leave=True)
    self._t0 = None

  def start_step(self) -> None:
    self._t0 = time.perf_counter()

  def end_step(self, latents: jax.Array, density: jax.Array, **fields) -> jax.Array:
    """Closes a step; returns the latents (possibly replaced by the callback)."""
    if self.sync:
      jax.block_until_ready(latents)
      seconds = time.perf_counter() - self._t0
      record = StepRecord(seconds=seconds, density=float(density), **fields)
      self._pending.append((record, None))
      if self._bar is not None:
        self._bar.set_postfix_str(f"{seconds:.3f}s {'dense' if record.dense else 'sparse'} "
                                  f"density={record.density:.3f}", refresh=False)
        self._bar.update(1)
      if self.callback is not None:
        new = self.callback(record, latents)
        if new is not None:
          if tuple(new.shape) != tuple(latents.shape):
            raise ValueError(f"callback returned latents of shape {tuple(new.shape)}, "
                             f"expected {tuple(latents.shape)}")
          latents = jnp.asarray(new, latents.dtype)
    else:
      self._pending.append((fields, density))
    return latents

  def finish(self) -> List[StepRecord]:
    """All records, in step order (converts pending device densities, one sync)."""
    if self._bar is not None:
      self._bar.close()
    records = []
    for item, density in self._pending:
      if isinstance(item, StepRecord):
        records.append(item)
      else:
        records.append(StepRecord(seconds=math.nan, density=float(density), **item))
    return records


class DensityBudgetWarning(UserWarning):
  """Sparse steps routed well above their fixed density budget (see `density_overshoot`)."""


# Above this ratio of routed density to a fixed budget a loop warns. The greedy fill may
# overshoot by its last block (a few percent at the presets' cluster counts); far above it,
# the always-exact clusters alone exceed the budget.
DENSITY_OVERSHOOT = 1.25


def density_overshoot(records: Sequence[StepRecord], configs: Mapping[str, Any],
                      factor: float = DENSITY_OVERSHOOT) -> Optional[str]:
  """Why sparse steps of a loop routed far above their fixed density budget, or None.

  `configs` maps an expert's name to its sparse layers' `SvgEarConfig` (None: dense, or
  no such expert). Only fixed-density budgets (`density` set) are checked: a top-p
  budget has no target. Two things route above a fixed budget: the `min_kc_ratio` floor
  (per query cluster the `num_guaranteed` most probable key clusters are exact whatever the
  budget, as in the reference) and the greedy fill's last block (one key cluster's area);
  with unbalanced key clusters (a cold or a carried k-means start) or few of them they
  can exceed it by far. The output is not worse for it (more is computed exactly, not
  less), but the speed is not the budget's.
  """
  over = []  # (ratio, record, budget, config) of the steps above factor x their budget
  for r in records:
    cfg = configs.get(r.expert)
    budget = getattr(cfg, "density", None)
    if r.dense or budget is None or not budget < 1.0 or not math.isfinite(r.density):
      continue
    if r.density > factor * budget:
      over.append((r.density / budget, r, budget, cfg))
  if not over:
    return None
  _, r, budget, cfg = max(over, key=lambda x: x[0])
  return (f"{len(over)} sparse step(s) routed above {factor:g}x their density budget: step "
          f"{r.index} ({r.expert}) computed {r.density:.3f} of the attention exactly for a "
          f"budget of {budget:g}. Per query cluster the {cfg.num_guaranteed} most probable of "
          f"{cfg.num_k_clusters} key clusters are always exact (min_kc_ratio="
          f"{cfg.min_kc_ratio:g}) and the greedy fill's last block may overshoot by one key "
          f"cluster's area: with few or unbalanced key clusters these exceed the budget. "
          f"Lower min_kc_ratio, use more key clusters, or give k-means more iterations "
          f"(kmeans_iters / kmeans_iters_warm) or a warm start, to get the budgeted speed.")


# ------------------------------------------------------------------------------------------
# Validation


def check_schedule(schedule: Optional[SvgEarSchedule]) -> SvgEarSchedule:
  """`schedule`, or the default `SvgEarSchedule()` for None; TypeError for anything else."""
  schedule = SvgEarSchedule() if schedule is None else schedule
  if not isinstance(schedule, SvgEarSchedule):
    raise TypeError(f"schedule must be an SvgEarSchedule, got {type(schedule).__name__}")
  return schedule


def check_int(name: str, value, minimum: int = 1) -> int:
  """`value` as an int >= minimum, else ValueError naming it."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
    raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
  return int(value)


def check_real(name: str, value) -> float:
  """`value` as a finite float, else ValueError naming it."""
  if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)) or (
      not math.isfinite(value)):
    raise ValueError(f"{name} must be a finite number, got {value!r}")
  return float(value)


def check_num_frames(num_frames, temporal_factor: int) -> int:
  """Frame count of the form k * temporal_factor + 1 (the causal VAE's first frame alone)."""
  num_frames = check_int("num_frames", num_frames)
  if (num_frames - 1) % temporal_factor:
    lo = (num_frames - 1) // temporal_factor * temporal_factor + 1
    raise ValueError(f"num_frames={num_frames}: must be {temporal_factor}k + 1 (e.g. {lo} or "
                     f"{lo + temporal_factor})")
  return num_frames


def check_spatial(height, width, multiple: int, why: str) -> Tuple[int, int]:
  """height and width, both multiples of `multiple` (`why` names its factors)."""
  height, width = check_int("height", height), check_int("width", width)
  for name, value in (("height", height), ("width", width)):
    if value % multiple:
      raise ValueError(f"{name}={value}: must be a multiple of {multiple} ({why})")
  return height, width


def check_embeddings(name: str, embeds, text_dim: int, batch: Optional[int] = None
                     ) -> jax.Array:
  """[B, L, text_dim] floating-point text embeddings, else ValueError / TypeError naming
  `name`. `batch` pins B."""
  shape = tuple(getattr(embeds, "shape", ()))
  dtype = getattr(embeds, "dtype", None)
  if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(f"{name} must be a floating-point array [B, L, {text_dim}], got "
                    f"{type(embeds).__name__} of dtype {dtype}")
  if len(shape) != 3 or shape[2] != text_dim or shape[1] < 1 or shape[0] < 1:
    raise ValueError(f"{name} must be [B, L, {text_dim}], got shape {shape}")
  if batch is not None and shape[0] != batch:
    raise ValueError(f"{name} has batch {shape[0]}, expected {batch}")
  return embeds


def check_latents(latents, shape: Sequence[int]) -> jax.Array:
  """Initial latents of exactly `shape` (floating point), returned as float32."""
  got = tuple(getattr(latents, "shape", ()))
  dtype = getattr(latents, "dtype", None)
  if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(f"latents must be a floating-point array, got dtype {dtype}")
  if got != tuple(shape):
    raise ValueError(f"latents have shape {got}, expected {tuple(shape)} from the batch, "
                     f"num_frames, height and width")
  return jnp.asarray(latents, jnp.float32)


def random_latents(seed: int, shape: Sequence[int]) -> jax.Array:
  """Standard-normal float32 latents from `jax.random.key(seed)`.

  These are JAX PRNG draws: equal seeds do NOT give diffusers' torch `randn` latents; pass
  `latents=` for bit-comparable runs.
  """
  seed = check_int("seed", seed, minimum=0)
  return jax.random.normal(jax.random.key(seed), tuple(shape), jnp.float32)
