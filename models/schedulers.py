"""Flow-matching schedulers of the sampling loops, with pure jittable steps.

`UniPCFlowScheduler` is diffusers' `UniPCMultistepScheduler` in flow mode (Wan2.2:
`prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=s`);
`FlowMatchEulerScheduler` is diffusers' `FlowMatchEulerDiscreteScheduler` (HunyuanVideo).

A scheduler is a frozen, hashable, validated config. `set_timesteps` computes the schedule
on the host once (timesteps, sigmas and, for UniPC, every per-step solver coefficient, with
diffusers' own dtypes: float64 for the sigma formula, float32 for the coefficients, as torch
computes them). `step(schedule, state, model_output, sample)` is pure: the step index and
the multistep history live in `state` (a pytree of arrays), the first/last-step order
switches are gathered from per-step tables at the traced step index, so one jitted step
serves the whole loop (no retrace, no host sync) and the step also runs inside
`lax.scan` / `lax.fori_loop`.

  scheduler = UniPCFlowScheduler.from_pretrained(folder, flow_shift=12.0)
  schedule = scheduler.set_timesteps(40)        # host numpy; schedule.timesteps: int64
  state = scheduler.init_state(schedule, latents.shape)
  step = jax.jit(scheduler.step)
  for t in schedule.timesteps:
    latents, state = step(schedule, state, model(latents, t), latents)

The steps are also the module functions `unipc_step` / `flow_match_euler_step`, which read
everything from the schedule: one jitted function serves every config with the same N.
Sampling always starts at the first timestep (diffusers' `set_begin_index(0)`, as the Wan
and HunyuanVideo pipelines do); call `step` exactly `len(schedule.timesteps)` times.
"""

import dataclasses
import json
import math
import pathlib
from typing import Any, ClassVar, Dict, Mapping, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

PathLike = Union[str, pathlib.Path]

SOLVER_TYPES = ("bh1", "bh2")
FINAL_SIGMAS_TYPES = ("zero", "sigma_min")
TIMESTEP_SPACINGS = ("linspace", "leading", "trailing")


# ------------------------------------------------------------------------------------------
# diffusers config files


def read_scheduler_config(folder: PathLike) -> Dict[str, Any]:
  """The dict of `scheduler_config.json` in `folder/scheduler/` or in `folder` itself."""
  folder = pathlib.Path(folder)
  for path in (folder / "scheduler" / "scheduler_config.json", folder / "scheduler_config.json"):
    if path.is_file():
      with open(path, encoding="utf-8") as f:
        return json.load(f)
  raise FileNotFoundError(f"no scheduler_config.json in {folder} nor in {folder / 'scheduler'}")


def _parse_diffusers_config(owner: str, class_name: str, config: Mapping[str, Any],
                            overrides: Mapping[str, Any], fields: Mapping[str, Any],
                            required: Mapping[str, Tuple[Any, Any]],
                            without_effect: Sequence[str]) -> Dict[str, Any]:
  """Our field values from a diffusers config plus overrides.

  `fields`: our field -> diffusers default. `required`: diffusers option -> (diffusers
  default, predicate on the value) for options only some values of which are supported.
  `without_effect`: options that cannot change this scheduler's output (e.g. betas, unused in
  flow mode), accepted with any value. Unknown keys are an error.
  """
  name = config.get("_class_name")
  if name is not None and name != class_name:
    raise ValueError(f"{owner}: scheduler config has _class_name={name!r}, expected "
                     f"{class_name!r}")
  merged = {**{k: v for k, v in config.items() if not k.startswith("_")}, **overrides}
  unknown = sorted(set(merged) - set(fields) - set(required) - set(without_effect))
  if unknown:
    raise ValueError(f"{owner}: unknown scheduler config options {unknown}")
  for key, (default, ok) in required.items():
    value = merged.get(key, default)
    if not ok(value):
      raise ValueError(f"{owner}: {key}={value!r} is not supported"
                       + ("" if key in config or key in overrides else
                          " (diffusers' default, the config does not set it)"))
  return {key: merged.get(key, default) for key, default in fields.items()}


def _is_int(value) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_real(value) -> bool:
  return (isinstance(value, (int, float, np.integer, np.floating))
          and not isinstance(value, (bool, np.bool_)) and math.isfinite(value))


def _register(cls, data_fields):
  return jax.tree_util.register_dataclass(cls, data_fields=list(data_fields), meta_fields=[])


# ------------------------------------------------------------------------------------------
# UniPC (bh1 / bh2, predict_x0) in flow mode


@dataclasses.dataclass(frozen=True)
class UniPCSchedule:
  """Host-computed schedule of `UniPCFlowScheduler` for N inference steps (a pytree).

  Leaves are numpy arrays (`jax.device_put(schedule)` gives a device copy, where timesteps
  become int32 unless x64 is on). K = solver_order - 1 history slots; unused slots have
  rk = 1 and rho = 0, so they add exact zeros.

  Attributes:
    timesteps: (N,) int64, sigma * num_train_timesteps truncated: what the DiT receives.
    sigmas: (N + 1,) float32, the last one 0 ("zero") or sigma_{N-1} ("sigma_min").
    orders: (N,) int32, order of the predictor at each step (1 at the first step and, with
      lower_order_final, at the last ones).
    pred_cx, pred_cm, pred_cb: (N,) float32 predictor coefficients:
      x' = (cx * x - cm * m0) - cb * sum_k rho_k * (m_k - m0) / rk_k.
    pred_rk, pred_rho: (N, K) float32.
    corr_use: (N,) bool, whether the corrector runs at the step (never at step 0).
    corr_cx, corr_cm, corr_cb, corr_rho_t: (N,) float32, corrector coefficients:
      x = (cx * x_last - cm * m0) - cb * (sum_k rho_k * (m_k - m0) / rk_k + rho_t * (m - m0)).
    corr_rk, corr_rho: (N, K) float32.
  """

  timesteps: np.ndarray
  sigmas: np.ndarray
  orders: np.ndarray
  pred_cx: np.ndarray
  pred_cm: np.ndarray
  pred_cb: np.ndarray
  pred_rk: np.ndarray
  pred_rho: np.ndarray
  corr_use: np.ndarray
  corr_cx: np.ndarray
  corr_cm: np.ndarray
  corr_cb: np.ndarray
  corr_rho_t: np.ndarray
  corr_rk: np.ndarray
  corr_rho: np.ndarray

  @property
  def num_inference_steps(self) -> int:
    return int(self.timesteps.shape[0])

  @property
  def solver_order(self) -> int:
    return int(self.pred_rk.shape[1]) + 1


_register(UniPCSchedule, [f.name for f in dataclasses.fields(UniPCSchedule)])


@dataclasses.dataclass(frozen=True)
class UniPCState:
  """Per-sample state of the UniPC loop (a pytree).

  Attributes:
    step_index: () int32, index of the next step.
    model_outputs: (solver_order, *sample_shape) float32 x0 predictions, newest last.
    last_sample: (*sample_shape) float32, the (corrected) sample of the previous step.
  """

  step_index: jax.Array
  model_outputs: jax.Array
  last_sample: jax.Array


_register(UniPCState, ["step_index", "model_outputs", "last_sample"])


# Correctly rounded float32 log / expm1 (via float64), as torch's scalar float32 ops give;
# numpy's vectorised float32 log can be an ulp off, which the order-3 solves amplify.
def _log_f32(x):
  return np.log(np.asarray(x, np.float64)).astype(np.float32)


def _expm1_f32(x):
  return np.float32(np.expm1(np.float64(x)))


def _unipc_coefficients(lam, sig, t_idx, s0_idx, prev_idxs, order, solver_type):
  """diffusers' multistep_uni_{p,c}_bh_update scalars, in float32 as torch computes them.

  Returns cx, cm, cb, rks (order,) with the trailing 1, R (order, order), b (order,).
  """
  f32 = np.float32
  sigma_t, sigma_s0 = sig[t_idx], sig[s0_idx]
  alpha_t = f32(1) - sigma_t
  lambda_s0 = lam[s0_idx]
  h = lam[t_idx] - lambda_s0
  rks = np.array([(lam[si] - lambda_s0) / h for si in prev_idxs] + [f32(1)], np.float32)
  hh = -h
  h_phi_1 = _expm1_f32(hh)
  h_phi_k = h_phi_1 / hh - f32(1)
  factorial = 1
  b_h = hh if solver_type == "bh1" else _expm1_f32(hh)
  rows, b = [], []
  for i in range(1, order + 1):
    rows.append(rks ** (i - 1))
    b.append(h_phi_k * factorial / b_h)
    factorial *= i + 1
    h_phi_k = h_phi_k / hh - 1 / factorial
  r = np.stack(rows).astype(np.float32)
  b = np.array(b, np.float32)
  return sigma_t / sigma_s0, alpha_t * h_phi_1, alpha_t * b_h, rks, r, b


@dataclasses.dataclass(frozen=True)
class UniPCFlowScheduler:
  """diffusers `UniPCMultistepScheduler` with flow sigmas and flow prediction (Wan2.2).

  Fixed as in every Wan config: predict_x0=True, prediction_type="flow_prediction",
  use_flow_sigmas=True, no thresholding / solver_p / Karras-like sigmas / dynamic shifting.

  Attributes:
    num_train_timesteps: training timesteps; sigma_raw = linspace(1, 1/num_train_timesteps).
    flow_shift: sigma = s * sigma_raw / (1 + (s - 1) * sigma_raw) (Wan2.2 T2V: 12, I2V and
      TI2V: 5; diffusers' converted T2V config says 3).
    solver_order: multistep order 1, 2 or 3 (Wan: 2).
    solver_type: "bh2" (Wan) or "bh1": B(h) = expm1(-h) or -h.
    lower_order_final: lower the order at the last steps (needed with final sigma 0).
    final_sigmas_type: "zero" (Wan) or "sigma_min" (last sigma repeated).
    disable_corrector: step indices i whose following step i + 1 skips the corrector.
  """

  num_train_timesteps: int = 1000
  flow_shift: float = 1.0
  solver_order: int = 2
  solver_type: str = "bh2"
  lower_order_final: bool = True
  final_sigmas_type: str = "zero"
  disable_corrector: Tuple[int, ...] = ()

  CLASS_NAME: ClassVar[str] = "UniPCMultistepScheduler"

  def __post_init__(self):
    def fail(field, why):
      raise ValueError(f"UniPCFlowScheduler.{field}={getattr(self, field)!r}: {why}")

    if not _is_int(self.num_train_timesteps) or self.num_train_timesteps < 1:
      fail("num_train_timesteps", "must be an int >= 1")
    object.__setattr__(self, "num_train_timesteps", int(self.num_train_timesteps))
    if not _is_real(self.flow_shift) or not self.flow_shift > 0:
      fail("flow_shift", "must be a finite float > 0")
    object.__setattr__(self, "flow_shift", float(self.flow_shift))
    if not _is_int(self.solver_order) or self.solver_order not in (1, 2, 3):
      fail("solver_order", "must be 1, 2 or 3")
    object.__setattr__(self, "solver_order", int(self.solver_order))
    if self.solver_type not in SOLVER_TYPES:
      fail("solver_type", f"must be one of {SOLVER_TYPES}")
    if not isinstance(self.lower_order_final, (bool, np.bool_)):
      fail("lower_order_final", "must be a bool")
    object.__setattr__(self, "lower_order_final", bool(self.lower_order_final))
    if self.final_sigmas_type not in FINAL_SIGMAS_TYPES:
      fail("final_sigmas_type", f"must be one of {FINAL_SIGMAS_TYPES}")
    try:
      steps = () if isinstance(self.disable_corrector, str) else tuple(self.disable_corrector)
    except TypeError:
      steps = None
    if steps is None or isinstance(self.disable_corrector, str) or not all(
        _is_int(i) and i >= 0 for i in steps):
      fail("disable_corrector", "must be a sequence of step indices (ints >= 0)")
    object.__setattr__(self, "disable_corrector", tuple(int(i) for i in steps))
    if not self.lower_order_final and self.final_sigmas_type == "zero" and self.solver_order > 1:
      fail("lower_order_final", "False with final_sigmas_type='zero' and solver_order > 1 "
           "divides by zero at the last step (diffusers returns inf)")

  # Loading.

  @classmethod
  def from_config(cls, config: Mapping[str, Any], **overrides) -> "UniPCFlowScheduler":
    """From a diffusers `UniPCMultistepScheduler` config dict; `overrides` win over it.

    Options that cannot affect flow mode (betas, thresholding ratios, steps_offset, ...) are
    accepted; options set to values this port does not implement raise ValueError.
    """
    fields = dict(num_train_timesteps=1000, flow_shift=1.0, solver_order=2, solver_type="bh2",
                  lower_order_final=True, final_sigmas_type="zero", disable_corrector=())
    required = {
        "prediction_type": ("epsilon", lambda v: v == "flow_prediction"),
        "use_flow_sigmas": (False, lambda v: v is True),
        "predict_x0": (True, lambda v: v is True),
        "thresholding": (False, lambda v: v is False),
        "solver_p": (None, lambda v: v is None),
        "use_karras_sigmas": (False, lambda v: v is False),
        "use_exponential_sigmas": (False, lambda v: v is False),
        "use_beta_sigmas": (False, lambda v: v is False),
        "use_dynamic_shifting": (False, lambda v: v is False),
        "shift_terminal": (None, lambda v: not v),
        "timestep_spacing": ("linspace", lambda v: v in TIMESTEP_SPACINGS),
    }
    without_effect = ("beta_start", "beta_end", "beta_schedule", "trained_betas",
                      "rescale_betas_zero_snr", "dynamic_thresholding_ratio", "sample_max_value",
                      "steps_offset", "time_shift_type", "sigma_min", "sigma_max")
    values = _parse_diffusers_config("UniPCFlowScheduler", cls.CLASS_NAME, config, overrides,
                                     fields, required, without_effect)
    # diffusers' __init__ renames these DPM-Solver names to bh2.
    if values["solver_type"] in ("midpoint", "heun", "logrho"):
      values["solver_type"] = "bh2"
    return cls(**values)

  @classmethod
  def from_pretrained(cls, folder: PathLike, **overrides) -> "UniPCFlowScheduler":
    """From a diffusers pipeline folder (with `scheduler/`) or its `scheduler/` folder."""
    return cls.from_config(read_scheduler_config(folder), **overrides)

  def replace(self, **changes) -> "UniPCFlowScheduler":
    """A copy with `changes` applied (validated again)."""
    return dataclasses.replace(self, **changes)

  # Schedule and state.

  def set_timesteps(self, num_inference_steps: Optional[int] = None,
                    sigmas: Optional[Sequence[float]] = None) -> UniPCSchedule:
    """diffusers' `set_timesteps(num_inference_steps)` (or custom unshifted `sigmas`, which
    then set N = len(sigmas)), on the host.

    Returns:
      the UniPCSchedule: timesteps (N,) int64, sigmas (N + 1,) float32, coefficient tables.
    """
    if sigmas is not None:
      raw = np.array(sigmas)
      if not np.issubdtype(raw.dtype, np.floating):
        raw = raw.astype(np.float64)
      if raw.ndim != 1 or raw.size < 1 or not np.all((raw > 0) & (raw <= 1)):
        raise ValueError(f"UniPCFlowScheduler.set_timesteps: sigmas must be a non-empty 1-D "
                         f"sequence in (0, 1], got {sigmas!r}")
      if num_inference_steps is not None and num_inference_steps != raw.size:
        raise ValueError(f"UniPCFlowScheduler.set_timesteps: num_inference_steps="
                         f"{num_inference_steps} != len(sigmas)={raw.size}")
    else:
      n = num_inference_steps
      if not _is_int(n) or n < 1:
        raise ValueError(f"UniPCFlowScheduler.set_timesteps: num_inference_steps={n!r} must "
                         "be an int >= 1")
      raw = np.linspace(1, 1 / self.num_train_timesteps, int(n) + 1)[:-1]
    s = self.flow_shift
    sig = s * raw / (1 + (s - 1) * raw)
    eps = 1e-6
    # diffusers moves sigma off 1 so that log(alpha) stays finite.
    if np.fabs(sig[0] - 1) < eps:
      sig[0] -= eps
    timesteps = (sig * self.num_train_timesteps).astype(np.int64)
    last = sig[-1] if self.final_sigmas_type == "sigma_min" else 0
    sig = np.concatenate([sig, [last]]).astype(np.float32)
    return self._tables(timesteps, sig)

  def _tables(self, timesteps: np.ndarray, sig: np.ndarray) -> UniPCSchedule:
    n = timesteps.shape[0]
    order_max = self.solver_order
    k = order_max - 1
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
      lam = _log_f32(np.float32(1) - sig) - _log_f32(sig)
    lower_order_nums = [min(i, order_max) for i in range(n)]
    orders = [min(min(order_max, n - i) if self.lower_order_final else order_max,
                  lower_order_nums[i] + 1) for i in range(n)]
    f = lambda fill, *shape: np.full((n,) + shape, fill, np.float32)
    pred = dict(cx=f(0), cm=f(0), cb=f(0), rk=f(1, k), rho=f(0, k))
    corr = dict(cx=f(0), cm=f(0), cb=f(0), rho_t=f(0), rk=f(1, k), rho=f(0, k))
    corr_use = np.zeros((n,), bool)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
      for i in range(n):
        p = orders[i]
        cx, cm, cb, rks, r, b = _unipc_coefficients(
            lam, sig, i + 1, i, [i - j for j in range(1, p)], p, self.solver_type)
        pred["cx"][i], pred["cm"][i], pred["cb"][i] = cx, cm, cb
        pred["rk"][i, :p - 1] = rks[:-1]
        if p == 2:
          pred["rho"][i, 0] = 0.5
        elif p > 2:
          pred["rho"][i, :p - 1] = np.linalg.solve(r[:-1, :-1], b[:-1])
        if i == 0 or (i - 1) in self.disable_corrector:
          continue
        p = orders[i - 1]
        cx, cm, cb, rks, r, b = _unipc_coefficients(
            lam, sig, i, i - 1, [i - (j + 1) for j in range(1, p)], p, self.solver_type)
        rhos = np.array([0.5], np.float32) if p == 1 else np.linalg.solve(r, b)
        corr_use[i] = True
        corr["cx"][i], corr["cm"][i], corr["cb"][i] = cx, cm, cb
        corr["rk"][i, :p - 1] = rks[:-1]
        corr["rho"][i, :p - 1] = rhos[:-1]
        corr["rho_t"][i] = rhos[-1]
    return UniPCSchedule(
        timesteps=timesteps, sigmas=sig, orders=np.array(orders, np.int32),
        **{f"pred_{key}": value for key, value in pred.items()}, corr_use=corr_use,
        **{f"corr_{key}": value for key, value in corr.items()})

  def init_state(self, schedule: UniPCSchedule, sample_shape: Sequence[int]) -> UniPCState:
    """Empty state before the first step, for samples of shape `sample_shape`."""
    shape = tuple(int(d) for d in sample_shape)
    return UniPCState(step_index=jnp.zeros((), jnp.int32),
                      model_outputs=jnp.zeros((schedule.solver_order,) + shape, jnp.float32),
                      last_sample=jnp.zeros(shape, jnp.float32))

  # The step.

  def step(self, schedule: UniPCSchedule, state: UniPCState, model_output: jax.Array,
           sample: jax.Array) -> Tuple[jax.Array, UniPCState]:
    """One UniPC step (corrector UniC on `sample`, then predictor UniP); pure, jittable.

    Args:
      schedule: from `set_timesteps`.
      state: from `init_state` or the previous step.
      model_output: (*sample_shape) flow (velocity) prediction at `sample`, any float dtype.
      sample: (*sample_shape) current sample x_t.

    Returns:
      (prev_sample (*sample_shape) in sample.dtype, new state). Math in float32.
    """
    return unipc_step(schedule, state, model_output, sample)


def _weighted_diffs(history, m0, rk, rho):
  """sum_k rho_k * (history[-(k + 2)] - m0) / rk_k over the K = len(rk) older outputs."""
  total = None
  for j in range(rk.shape[0]):
    term = rho[j] * ((history[-(j + 2)] - m0) / rk[j])
    total = term if total is None else total + term
  return jnp.zeros((), jnp.float32) if total is None else total


def unipc_step(schedule: UniPCSchedule, state: UniPCState, model_output: jax.Array,
               sample: jax.Array) -> Tuple[jax.Array, UniPCState]:
  """`UniPCFlowScheduler.step`: every setting is in `schedule`, so one jitted function
  serves every scheduler config with the same N and solver order.

  Args:
    schedule: from `UniPCFlowScheduler.set_timesteps`.
    state: from `init_state` or the previous step.
    model_output: (*sample_shape) flow (velocity) prediction at `sample`.
    sample: (*sample_shape) current sample.

  Returns:
    (prev_sample (*sample_shape) in sample.dtype, new UniPCState).
  """
  i = state.step_index
  at = lambda table: jnp.asarray(table)[i]
  x = sample.astype(jnp.float32)
  m = x - at(schedule.sigmas).astype(jnp.float32) * model_output.astype(jnp.float32)

  history = state.model_outputs
  m0 = history[-1]
  x_c = at(schedule.corr_cx) * state.last_sample - at(schedule.corr_cm) * m0
  res = _weighted_diffs(history, m0, at(schedule.corr_rk), at(schedule.corr_rho))
  x_c = x_c - at(schedule.corr_cb) * (res + at(schedule.corr_rho_t) * (m - m0))
  x = jnp.where(at(schedule.corr_use), x_c, x)

  history = jnp.concatenate([history[1:], m[None]], axis=0)
  x_p = at(schedule.pred_cx) * x - at(schedule.pred_cm) * m
  res = _weighted_diffs(history, m, at(schedule.pred_rk), at(schedule.pred_rho))
  x_p = x_p - at(schedule.pred_cb) * res
  new_state = UniPCState(step_index=i + 1, model_outputs=history, last_sample=x)
  return x_p.astype(sample.dtype), new_state


# ------------------------------------------------------------------------------------------
# FlowMatch Euler


@dataclasses.dataclass(frozen=True)
class FlowMatchSchedule:
  """Host-computed schedule of `FlowMatchEulerScheduler` for N steps (a pytree of numpy).

  Attributes:
    timesteps: (N,) float32, sigma * num_train_timesteps (not truncated).
    sigmas: (N + 1,) float32, shifted, the last one 0.
  """

  timesteps: np.ndarray
  sigmas: np.ndarray

  @property
  def num_inference_steps(self) -> int:
    return int(self.timesteps.shape[0])


_register(FlowMatchSchedule, ["timesteps", "sigmas"])


@dataclasses.dataclass(frozen=True)
class FlowMatchState:
  """State of the Euler loop (a pytree). step_index: () int32, index of the next step."""

  step_index: jax.Array


_register(FlowMatchState, ["step_index"])


@dataclasses.dataclass(frozen=True)
class FlowMatchEulerScheduler:
  """diffusers `FlowMatchEulerDiscreteScheduler` (HunyuanVideo: shift 7), static shift only.

  Attributes:
    num_train_timesteps: training timesteps (timesteps = sigma * num_train_timesteps).
    shift: sigma' = s * sigma / (1 + (s - 1) * sigma).
  """

  num_train_timesteps: int = 1000
  shift: float = 1.0

  CLASS_NAME: ClassVar[str] = "FlowMatchEulerDiscreteScheduler"

  def __post_init__(self):
    def fail(field, why):
      raise ValueError(f"FlowMatchEulerScheduler.{field}={getattr(self, field)!r}: {why}")

    if not _is_int(self.num_train_timesteps) or self.num_train_timesteps < 1:
      fail("num_train_timesteps", "must be an int >= 1")
    object.__setattr__(self, "num_train_timesteps", int(self.num_train_timesteps))
    if not _is_real(self.shift) or not self.shift > 0:
      fail("shift", "must be a finite float > 0")
    object.__setattr__(self, "shift", float(self.shift))

  @classmethod
  def from_config(cls, config: Mapping[str, Any], **overrides) -> "FlowMatchEulerScheduler":
    """From a diffusers `FlowMatchEulerDiscreteScheduler` config dict; `overrides` win.

    Dynamic shifting, inverted / terminal-stretched / Karras-like sigmas and stochastic
    sampling are not implemented and raise ValueError; base/max shift and image sequence
    lengths only act with dynamic shifting and are accepted.
    """
    fields = dict(num_train_timesteps=1000, shift=1.0)
    required = {
        "use_dynamic_shifting": (False, lambda v: v is False),
        "invert_sigmas": (False, lambda v: v is False),
        "shift_terminal": (None, lambda v: not v),
        "use_karras_sigmas": (False, lambda v: v is False),
        "use_exponential_sigmas": (False, lambda v: v is False),
        "use_beta_sigmas": (False, lambda v: v is False),
        "stochastic_sampling": (False, lambda v: v is False),
        "time_shift_type": ("exponential", lambda v: v in ("exponential", "linear")),
    }
    without_effect = ("base_shift", "max_shift", "base_image_seq_len", "max_image_seq_len")
    return cls(**_parse_diffusers_config("FlowMatchEulerScheduler", cls.CLASS_NAME, config,
                                         overrides, fields, required, without_effect))

  @classmethod
  def from_pretrained(cls, folder: PathLike, **overrides) -> "FlowMatchEulerScheduler":
    """From a diffusers pipeline folder (with `scheduler/`) or its `scheduler/` folder."""
    return cls.from_config(read_scheduler_config(folder), **overrides)

  def replace(self, **changes) -> "FlowMatchEulerScheduler":
    """A copy with `changes` applied (validated again)."""
    return dataclasses.replace(self, **changes)

  def set_timesteps(self, num_inference_steps: Optional[int] = None,
                    sigmas: Optional[Sequence[float]] = None) -> FlowMatchSchedule:
    """diffusers' `set_timesteps(num_inference_steps, sigmas=sigmas)` on the host.

    `sigmas` (N,) are unshifted (HunyuanVideo: linspace(1, 0, N + 1)[:-1]); the shift is
    applied to them. Returns the FlowMatchSchedule: timesteps (N,), sigmas (N + 1,) float32.
    """
    n_train, s = self.num_train_timesteps, self.shift
    if sigmas is not None:
      sig = np.array(sigmas).astype(np.float32)
      if sig.ndim != 1 or sig.size < 1 or not np.all(np.isfinite(sig)):
        raise ValueError(f"FlowMatchEulerScheduler.set_timesteps: sigmas must be a non-empty "
                         f"finite 1-D sequence, got {sigmas!r}")
      if num_inference_steps is not None and num_inference_steps != sig.size:
        raise ValueError(f"FlowMatchEulerScheduler.set_timesteps: num_inference_steps="
                         f"{num_inference_steps} != len(sigmas)={sig.size}")
    else:
      n = num_inference_steps
      if not _is_int(n) or n < 1:
        raise ValueError(f"FlowMatchEulerScheduler.set_timesteps: num_inference_steps={n!r} "
                         "must be an int >= 1")
      # diffusers' __init__: the shifted training sigmas in float32 give sigma_min / max.
      train = np.linspace(1, n_train, n_train, dtype=np.float32)[::-1] / n_train
      train = s * train / (1 + (s - 1) * train)
      sigma_max, sigma_min = float(train[0]), float(train[-1])
      sig = np.linspace(sigma_max * n_train, sigma_min * n_train, int(n)) / n_train
    sig = (s * sig / (1 + (s - 1) * sig)).astype(np.float32)
    timesteps = sig * n_train
    return FlowMatchSchedule(timesteps=timesteps,
                             sigmas=np.concatenate([sig, np.zeros((1,), np.float32)]))

  def init_state(self, schedule: FlowMatchSchedule,
                 sample_shape: Optional[Sequence[int]] = None) -> FlowMatchState:
    """State before the first step (`sample_shape` unused, for symmetry with UniPC)."""
    del schedule, sample_shape
    return FlowMatchState(step_index=jnp.zeros((), jnp.int32))

  def step(self, schedule: FlowMatchSchedule, state: FlowMatchState, model_output: jax.Array,
           sample: jax.Array) -> Tuple[jax.Array, FlowMatchState]:
    """One Euler step x' = x + (sigma_{i+1} - sigma_i) * v; pure, jittable.

    Args:
      schedule: from `set_timesteps`.
      state: from `init_state` or the previous step.
      model_output: (*sample_shape) velocity prediction, any float dtype.
      sample: (*sample_shape) current sample.

    Returns:
      (prev_sample (*sample_shape) in sample.dtype, new state). Math in float32.
    """
    return flow_match_euler_step(schedule, state, model_output, sample)


def flow_match_euler_step(schedule: FlowMatchSchedule, state: FlowMatchState,
                          model_output: jax.Array,
                          sample: jax.Array) -> Tuple[jax.Array, FlowMatchState]:
  """`FlowMatchEulerScheduler.step` (depends on `schedule` only).

  Args:
    schedule: from `FlowMatchEulerScheduler.set_timesteps`.
    state: from `init_state` or the previous step.
    model_output: (*sample_shape) velocity prediction.
    sample: (*sample_shape) current sample.

  Returns:
    (prev_sample (*sample_shape) in sample.dtype, new FlowMatchState).
  """
  i = state.step_index
  sigmas = jnp.asarray(schedule.sigmas, jnp.float32)
  dt = sigmas[i + 1] - sigmas[i]
  prev = sample.astype(jnp.float32) + dt * model_output.astype(jnp.float32)
  return prev.astype(sample.dtype), FlowMatchState(step_index=i + 1)


# ------------------------------------------------------------------------------------------

SCHEDULERS = {cls.CLASS_NAME: cls for cls in (UniPCFlowScheduler, FlowMatchEulerScheduler)}


def scheduler_from_pretrained(folder: PathLike, **overrides):
  """The scheduler named by `_class_name` of a diffusers scheduler config (see from_config)."""
  config = read_scheduler_config(folder)
  name = config.get("_class_name")
  if name not in SCHEDULERS:
    raise ValueError(f"scheduler config in {folder}: _class_name={name!r} is not supported "
                     f"(supported: {sorted(SCHEDULERS)})")
  return SCHEDULERS[name].from_config(config, **overrides)
