"""Flow schedulers against diffusers, step by step; jit / scan behaviour; config loading.

Sample tolerance: max |ours - diffusers| / max |diffusers| < 2e-6 after every step (float32;
measured <= 7e-7 over 40 steps, orders 1-3).
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.schedulers import (FlowMatchEulerScheduler, UniPCFlowScheduler,
                               flow_match_euler_step, read_scheduler_config,
                               scheduler_from_pretrained, unipc_step)

SHAPE = (1, 4, 3, 4, 5)
SAMPLE_RTOL = 2e-6
# Order 3 solves 2 x 2 / 3 x 3 float32 systems per step (np.linalg.solve here, torch's there):
# LAPACK builds round them an ulp apart depending on the CPU (within 2e-6 on the machine the
# test was written on; 7.9e-6 at 40 steps on an AMD EPYC, where a float64 run of both
# loops differs by the same 7.4e-6, so it is not the samples' dtype), and the multistep
# amplifies that over the steps.
SAMPLE_RTOL_ORDER3 = 2e-5
WAN_FLOW = dict(prediction_type="flow_prediction", use_flow_sigmas=True)

# One jitted step per scheduler for the whole file: configs differ only in the schedule.
UNIPC_STEP = jax.jit(unipc_step)
EULER_STEP = jax.jit(flow_match_euler_step)


def _rel(a, b):
  return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max()
               / max(np.abs(np.asarray(b)).max(), 1e-30))


def _noise(n, seed=0):
  rng = np.random.default_rng(seed)
  return rng.standard_normal(SHAPE).astype(np.float32), \
      rng.standard_normal((n,) + SHAPE).astype(np.float32)


def _velocity(x, noise_i):
  # Depends on the sample, so both trajectories stay coupled and errors would compound.
  return 0.7 * x - noise_i


def _compare_loops(ours, schedule, theirs, step, n_expected):
  """Runs diffusers' loop and ours on the same velocity field; returns per-step rel errors."""
  torch = pytest.importorskip("torch")
  theirs.set_begin_index(0)
  assert len(theirs.timesteps) == n_expected == schedule.num_inference_steps
  x0, noise = _noise(n_expected)
  x_t, x_j = torch.from_numpy(x0.copy()), jnp.asarray(x0)
  state = ours.init_state(schedule, SHAPE)
  errors = []
  for i, t in enumerate(theirs.timesteps):
    x_t = theirs.step(_velocity(x_t, torch.from_numpy(noise[i])), t, x_t).prev_sample
    x_j, state = step(schedule, state, _velocity(x_j, noise[i]), x_j)
    assert x_j.dtype == jnp.float32
    errors.append(_rel(x_j, x_t.numpy()))
  assert int(state.step_index) == n_expected
  return errors, x_j, x_t.numpy()


# ------------------------------------------------------------------------------------------
# UniPC


@pytest.mark.parametrize("shift", [1.0, 3.0, 5.0, 12.0])
@pytest.mark.parametrize("n", [1, 2, 3, 10, 40])
def test_unipc_matches_diffusers(n, shift):
  diffusers = pytest.importorskip("diffusers")
  theirs = diffusers.UniPCMultistepScheduler(**WAN_FLOW, flow_shift=shift)
  theirs.set_timesteps(n)
  ours = UniPCFlowScheduler(flow_shift=shift)
  schedule = ours.set_timesteps(n)

  assert schedule.timesteps.dtype == np.int64
  np.testing.assert_array_equal(schedule.timesteps, theirs.timesteps.numpy())
  assert schedule.sigmas.dtype == np.float32
  np.testing.assert_array_equal(schedule.sigmas, theirs.sigmas.numpy())
  assert schedule.sigmas[-1] == 0.0
  expected_orders = [1] + [2] * max(n - 2, 0) + [1] * (n > 1)
  np.testing.assert_array_equal(schedule.orders, expected_orders)
  np.testing.assert_array_equal(schedule.corr_use, np.arange(n) > 0)

  errors, _, _ = _compare_loops(ours, schedule, theirs, UNIPC_STEP, n)
  assert max(errors) < SAMPLE_RTOL, errors


def test_unipc_first_and_last_steps():
  ours = UniPCFlowScheduler(flow_shift=5.0)
  schedule = ours.set_timesteps(3)
  x0, noise = _noise(3)
  x, state = jnp.asarray(x0), ours.init_state(schedule, SHAPE)
  for i in range(3):
    v = _velocity(x, noise[i])
    x_in = x
    x, state = UNIPC_STEP(schedule, state, v, x)
    if i == 0:  # no corrector at the first step
      np.testing.assert_array_equal(state.last_sample, x_in)
  # sigma_N = 0: the last step returns the x0 prediction x - sigma * v, made (as diffusers
  # does) from the step's input sample, not from the corrected one.
  np.testing.assert_allclose(x, x_in - schedule.sigmas[2] * v, rtol=1e-6, atol=1e-6)
  assert not np.allclose(state.last_sample, x_in, atol=1e-3)


@pytest.mark.parametrize("n", [2, 3, 10, 40])
@pytest.mark.parametrize("options", [
    dict(solver_order=1), dict(solver_order=3), dict(solver_type="bh1"),
    dict(disable_corrector=[0, 2]), dict(final_sigmas_type="sigma_min"),
    dict(final_sigmas_type="sigma_min", lower_order_final=False),
    dict(num_train_timesteps=500, solver_order=3),
], ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_unipc_options_match_diffusers(options, n):
  diffusers = pytest.importorskip("diffusers")
  theirs = diffusers.UniPCMultistepScheduler(**WAN_FLOW, flow_shift=5.0, **options)
  theirs.set_timesteps(n)
  ours = UniPCFlowScheduler(flow_shift=5.0, **options)
  schedule = ours.set_timesteps(n)
  np.testing.assert_array_equal(schedule.timesteps, theirs.timesteps.numpy())
  np.testing.assert_array_equal(schedule.sigmas, theirs.sigmas.numpy())
  errors, _, _ = _compare_loops(ours, schedule, theirs, UNIPC_STEP, n)
  rtol = SAMPLE_RTOL_ORDER3 if options.get("solver_order") == 3 else SAMPLE_RTOL
  assert max(errors) < rtol, errors


def test_unipc_custom_sigmas_match_diffusers():
  diffusers = pytest.importorskip("diffusers")
  sigmas = np.linspace(1.0, 0.05, 7)
  theirs = diffusers.UniPCMultistepScheduler(**WAN_FLOW, flow_shift=3.0)
  theirs.set_timesteps(sigmas=sigmas.copy())
  ours = UniPCFlowScheduler(flow_shift=3.0)
  schedule = ours.set_timesteps(sigmas=sigmas)
  np.testing.assert_array_equal(schedule.timesteps, theirs.timesteps.numpy())
  np.testing.assert_array_equal(schedule.sigmas, theirs.sigmas.numpy())
  errors, _, _ = _compare_loops(ours, schedule, theirs, UNIPC_STEP, 7)
  assert max(errors) < SAMPLE_RTOL, errors


def test_unipc_wan_timesteps_without_diffusers():
  # Values of PIPELINE.md 3.1 / 3.4 (computed with diffusers' formulas).
  t = UniPCFlowScheduler(flow_shift=12.0).set_timesteps(40).timesteps
  assert t[:5].tolist() == [999, 997, 995, 993, 990]
  assert t[-3:].tolist() == [496, 391, 242]
  assert int((t >= 875).sum()) == 26
  t = UniPCFlowScheduler(flow_shift=5.0).set_timesteps(40).timesteps
  assert int((t >= 900).sum()) == 15
  t = UniPCFlowScheduler(flow_shift=5.0).set_timesteps(50).timesteps
  assert t[:3].tolist() == [999, 995, 991] and t[-2:].tolist() == [175, 96]


def _model_loop_inputs(n, seed=1):
  x0, noise = _noise(n, seed)
  return jnp.asarray(x0), jnp.asarray(noise)


@pytest.mark.parametrize("kind", ["unipc", "euler"])
def test_jitted_step_traces_once_and_scan_matches(kind):
  n = 10
  if kind == "unipc":
    schedulers = [UniPCFlowScheduler(flow_shift=s) for s in (3.0, 12.0)]
    pure_step = unipc_step
  else:
    schedulers = [FlowMatchEulerScheduler(shift=s) for s in (3.0, 7.0)]
    pure_step = flow_match_euler_step
  traces = []

  def counted(schedule, state, v, x):
    traces.append(1)
    return pure_step(schedule, state, v, x)

  step = jax.jit(counted)
  x0, noise = _model_loop_inputs(n)
  for scheduler in schedulers:
    schedule = jax.device_put(scheduler.set_timesteps(n))
    state = scheduler.init_state(schedule, SHAPE)
    x = x0
    for i in range(n):
      x, state = step(schedule, state, _velocity(x, noise[i]), x)
    # Same N: the second config (other shift) reuses the trace too.
    assert len(traces) == 1

    # The whole loop inside one jit via fori_loop, the step index traced.
    @jax.jit
    def scanned(schedule, x0, noise):
      def body(i, carry):
        x, state = carry
        return pure_step(schedule, state, _velocity(x, noise[i]), x)
      return jax.lax.fori_loop(0, n, body, (x0, scheduler.init_state(schedule, SHAPE)))

    x_scan, state_scan = scanned(schedule, x0, noise)
    assert int(state_scan.step_index) == n
    np.testing.assert_allclose(x_scan, x, rtol=1e-6, atol=1e-6)

    # Eager (un-jitted) steps agree as well.
    state, x_eager = scheduler.init_state(schedule, SHAPE), x0
    for i in range(n):
      x_eager, state = scheduler.step(schedule, state, _velocity(x_eager, noise[i]), x_eager)
    np.testing.assert_allclose(x_eager, x, rtol=1e-6, atol=1e-6)


def test_step_keeps_sample_dtype_and_upcasts():
  scheduler = UniPCFlowScheduler(flow_shift=5.0)
  schedule = scheduler.set_timesteps(4)
  state = scheduler.init_state(schedule, SHAPE)
  x = jnp.ones(SHAPE, jnp.bfloat16)
  out, state = scheduler.step(schedule, state, jnp.ones(SHAPE, jnp.bfloat16), x)
  assert out.dtype == jnp.bfloat16 and state.model_outputs.dtype == jnp.float32
  out, _ = FlowMatchEulerScheduler().step(FlowMatchEulerScheduler().set_timesteps(4),
                                          FlowMatchEulerScheduler().init_state(None), x, x)
  assert out.dtype == jnp.bfloat16


# ------------------------------------------------------------------------------------------
# FlowMatch Euler


@pytest.mark.parametrize("given_sigmas", [False, True], ids=["default", "given_sigmas"])
@pytest.mark.parametrize("shift", [1.0, 3.0, 7.0, 12.0])
@pytest.mark.parametrize("n", [1, 2, 3, 10, 50])
def test_flow_match_matches_diffusers(n, shift, given_sigmas):
  diffusers = pytest.importorskip("diffusers")
  sigmas = np.linspace(1.0, 0.0, n + 1)[:-1] if given_sigmas else None
  theirs = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
  theirs.set_timesteps(n, sigmas=sigmas)
  ours = FlowMatchEulerScheduler(shift=shift)
  schedule = ours.set_timesteps(n, sigmas=sigmas)

  assert schedule.timesteps.dtype == np.float32
  np.testing.assert_array_equal(schedule.timesteps, theirs.timesteps.numpy())
  np.testing.assert_array_equal(schedule.sigmas, theirs.sigmas.numpy())
  assert schedule.sigmas[-1] == 0.0
  errors, _, _ = _compare_loops(ours, schedule, theirs, EULER_STEP, n)
  assert max(errors) < SAMPLE_RTOL, errors


def test_flow_match_hunyuan_timesteps_without_diffusers():
  # PIPELINE.md 3.5: HunyuanVideo, N = 50, shift 7.
  schedule = FlowMatchEulerScheduler(shift=7.0).set_timesteps(
      50, sigmas=np.linspace(1.0, 0.0, 51)[:-1])
  t = schedule.timesteps
  assert t[0] == 1000.0 and t[-1] == pytest.approx(125.0, abs=1e-4)
  assert t[1] == pytest.approx(997.09, abs=5e-3) and t[2] == pytest.approx(994.08, abs=5e-3)
  np.testing.assert_allclose(t, schedule.sigmas[:-1] * 1000, rtol=0, atol=0)
  # Default path: the first sigma is 1 and the last is sigma_min shifted twice.
  s = FlowMatchEulerScheduler(shift=3.0).set_timesteps(5).sigmas
  once = 3 * 1e-3 / (1 + 2 * 1e-3)
  assert s[0] == 1.0 and s[-2] == pytest.approx(3 * once / (1 + 2 * once), rel=1e-5)


# ------------------------------------------------------------------------------------------
# Configs

WAN22_T2V_CONFIG = {  # scheduler/scheduler_config.json of Wan-AI/Wan2.2-T2V-A14B-Diffusers
    "_class_name": "UniPCMultistepScheduler", "_diffusers_version": "0.35.0.dev0",
    "beta_end": 0.02, "beta_schedule": "linear", "beta_start": 0.0001,
    "disable_corrector": [], "dynamic_thresholding_ratio": 0.995,
    "final_sigmas_type": "zero", "flow_shift": 3.0, "lower_order_final": True,
    "num_train_timesteps": 1000, "predict_x0": True, "prediction_type": "flow_prediction",
    "rescale_betas_zero_snr": False, "sample_max_value": 1.0, "solver_order": 2,
    "solver_p": None, "solver_type": "bh2", "steps_offset": 0, "thresholding": False,
    "time_shift_type": "exponential", "timestep_spacing": "linspace", "trained_betas": None,
    "use_beta_sigmas": False, "use_dynamic_shifting": False, "use_exponential_sigmas": False,
    "use_flow_sigmas": True, "use_karras_sigmas": False}


def test_config_from_dict_and_overrides():
  scheduler = UniPCFlowScheduler.from_config(WAN22_T2V_CONFIG)
  assert scheduler == UniPCFlowScheduler(flow_shift=3.0)
  assert UniPCFlowScheduler.from_config(WAN22_T2V_CONFIG, flow_shift=12.0).flow_shift == 12.0
  assert hash(scheduler) == hash(UniPCFlowScheduler(flow_shift=3))
  assert scheduler.replace(solver_order=3).solver_order == 3
  # diffusers renames DPM-Solver solver types to bh2.
  assert UniPCFlowScheduler.from_config(WAN22_T2V_CONFIG, solver_type="midpoint").solver_type \
      == "bh2"


def test_config_from_saved_diffusers_folders(tmp_path):
  diffusers = pytest.importorskip("diffusers")
  unipc = diffusers.UniPCMultistepScheduler(**WAN_FLOW, flow_shift=5.0, disable_corrector=[1])
  unipc.save_pretrained(tmp_path / "wan" / "scheduler")
  euler = diffusers.FlowMatchEulerDiscreteScheduler(shift=7.0)
  euler.save_pretrained(tmp_path / "hunyuan")

  for folder in (tmp_path / "wan", tmp_path / "wan" / "scheduler"):
    ours = UniPCFlowScheduler.from_pretrained(folder)
    assert ours == UniPCFlowScheduler(flow_shift=5.0, disable_corrector=(1,))
    assert scheduler_from_pretrained(folder) == ours
  ours = UniPCFlowScheduler.from_pretrained(tmp_path / "wan", flow_shift=12.0)
  assert ours.flow_shift == 12.0
  unipc_12 = diffusers.UniPCMultistepScheduler.from_pretrained(tmp_path / "wan",
                                                               subfolder="scheduler",
                                                               flow_shift=12.0)
  unipc_12.set_timesteps(40)
  np.testing.assert_array_equal(ours.set_timesteps(40).timesteps, unipc_12.timesteps.numpy())

  ours = FlowMatchEulerScheduler.from_pretrained(tmp_path / "hunyuan")
  assert ours == FlowMatchEulerScheduler(shift=7.0)
  assert scheduler_from_pretrained(tmp_path / "hunyuan", shift=5.0).shift == 5.0

  with pytest.raises(ValueError, match="_class_name='FlowMatchEulerDiscreteScheduler'"):
    UniPCFlowScheduler.from_pretrained(tmp_path / "hunyuan")
  with pytest.raises(ValueError, match="_class_name='UniPCMultistepScheduler'"):
    FlowMatchEulerScheduler.from_pretrained(tmp_path / "wan")


def test_config_file_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="scheduler_config.json"):
    read_scheduler_config(tmp_path)
  (tmp_path / "scheduler_config.json").write_text(json.dumps({"_class_name": "DDIMScheduler"}))
  with pytest.raises(ValueError, match="'DDIMScheduler' is not supported"):
    scheduler_from_pretrained(tmp_path)


@pytest.mark.parametrize("kwargs, match", [
    (dict(flow_shift=0.0), r"flow_shift=0.0: must be a finite float > 0"),
    (dict(flow_shift=-3.0), r"flow_shift=-3.0"),
    (dict(flow_shift=float("nan")), r"flow_shift=nan"),
    (dict(flow_shift=True), r"flow_shift=True"),
    (dict(num_train_timesteps=0), r"num_train_timesteps=0"),
    (dict(num_train_timesteps=1000.0), r"num_train_timesteps=1000.0"),
    (dict(solver_order=4), r"solver_order=4: must be 1, 2 or 3"),
    (dict(solver_type="heun"), r"solver_type='heun'"),
    (dict(final_sigmas_type="one"), r"final_sigmas_type='one'"),
    (dict(lower_order_final="yes"), r"lower_order_final='yes'"),
    (dict(disable_corrector=["a"]), r"disable_corrector=\['a'\]"),
    (dict(disable_corrector=3), r"disable_corrector=3"),
    (dict(lower_order_final=False), r"lower_order_final=False.*divides by zero"),
])
def test_unipc_rejects_bad_values(kwargs, match):
  with pytest.raises(ValueError, match=match):
    UniPCFlowScheduler(**kwargs)


@pytest.mark.parametrize("change, match", [
    (dict(prediction_type="epsilon"), r"prediction_type='epsilon' is not supported"),
    (dict(use_flow_sigmas=False), r"use_flow_sigmas=False"),
    (dict(use_karras_sigmas=True), r"use_karras_sigmas=True"),
    (dict(thresholding=True), r"thresholding=True"),
    (dict(use_dynamic_shifting=True), r"use_dynamic_shifting=True"),
    (dict(predict_x0=False), r"predict_x0=False"),
    (dict(shift_terminal=0.1), r"shift_terminal=0.1"),
    (dict(timestep_spacing="random"), r"timestep_spacing='random'"),
    (dict(flow_shift=-1.0), r"UniPCFlowScheduler.flow_shift=-1.0"),
    (dict(solver_order=5), r"solver_order=5"),
    (dict(my_option=1), r"unknown scheduler config options \['my_option'\]"),
])
def test_unipc_from_config_rejects(change, match):
  with pytest.raises(ValueError, match=match):
    UniPCFlowScheduler.from_config(WAN22_T2V_CONFIG, **change)
  with pytest.raises(ValueError, match=match):
    UniPCFlowScheduler.from_config({**WAN22_T2V_CONFIG, **change})


def test_from_config_class_name():
  with pytest.raises(ValueError, match="_class_name='DDIMScheduler', expected "
                     "'UniPCMultistepScheduler'"):
    UniPCFlowScheduler.from_config({**WAN22_T2V_CONFIG, "_class_name": "DDIMScheduler"})
  with pytest.raises(ValueError, match=r"unknown scheduler config options \['_class_name'\]"):
    UniPCFlowScheduler.from_config(WAN22_T2V_CONFIG, _class_name="DDIMScheduler")
  without_name = {k: v for k, v in WAN22_T2V_CONFIG.items() if k != "_class_name"}
  assert UniPCFlowScheduler.from_config(without_name).flow_shift == 3.0


def test_unipc_from_config_names_missing_defaults():
  with pytest.raises(ValueError, match="prediction_type='epsilon'.*diffusers' default"):
    UniPCFlowScheduler.from_config({"_class_name": "UniPCMultistepScheduler"})


@pytest.mark.parametrize("change, match", [
    (dict(shift=0.0), r"FlowMatchEulerScheduler.shift=0.0: must be a finite float > 0"),
    (dict(use_dynamic_shifting=True), r"use_dynamic_shifting=True is not supported"),
    (dict(invert_sigmas=True), r"invert_sigmas=True"),
    (dict(shift_terminal=0.1), r"shift_terminal=0.1"),
    (dict(use_beta_sigmas=True), r"use_beta_sigmas=True"),
    (dict(use_exponential_sigmas=True), r"use_exponential_sigmas=True"),
    (dict(stochastic_sampling=True), r"stochastic_sampling=True"),
    (dict(time_shift_type="cubic"), r"time_shift_type='cubic'"),
    (dict(flow_shift=3.0), r"unknown scheduler config options \['flow_shift'\]"),
])
def test_flow_match_from_config_rejects(change, match):
  base = {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 7.0, "base_shift": 0.5}
  assert FlowMatchEulerScheduler.from_config(base) == FlowMatchEulerScheduler(shift=7.0)
  with pytest.raises(ValueError, match=match):
    FlowMatchEulerScheduler.from_config(base, **change)


def test_set_timesteps_rejects_bad_arguments():
  for scheduler in (UniPCFlowScheduler(flow_shift=3.0), FlowMatchEulerScheduler(shift=3.0)):
    name = type(scheduler).__name__
    with pytest.raises(ValueError, match=f"{name}.set_timesteps: num_inference_steps=0"):
      scheduler.set_timesteps(0)
    with pytest.raises(ValueError, match="num_inference_steps=3 != len\\(sigmas\\)=2"):
      scheduler.set_timesteps(3, sigmas=[1.0, 0.5])
    with pytest.raises(ValueError, match="sigmas must be a non-empty"):
      scheduler.set_timesteps(sigmas=[])
