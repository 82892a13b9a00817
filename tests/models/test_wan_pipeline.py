"""`WanPipeline` (models/wan/pipeline.py) and the sampling helpers (models/sampling.py).

Parity against diffusers' `WanPipeline` on tiny random-weight DiTs (skipped without torch /
diffusers), CFG batching, SVG-EAR step schedules, trace counts, offload and validation.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models.attention import AttentionPolicy
from models import sampling
from models.sampling import SvgEarSchedule
from models.schedulers import UniPCFlowScheduler
from models.wan.pipeline import WanPipeline
from svg_ear_jax import SvgEarConfig
from wan_testing import CHANNELS, random_jax_model, rel_err, tiny_diffusers_transformer

# 5 frames at 64 x 64 -> latents (2, 8, 8) -> 32 tokens; 6 UniPC steps at shift 3 give
# t = 999, 937 (high-noise expert, >= 875) and 857, 750, 600, 376 (low-noise).
GEOMETRY = dict(height=64, width=64, num_frames=5)
STEPS = 6
TEXT_LEN = 7
TOL = 1e-4
SPARSE = SvgEarConfig(num_q_clusters=4, num_k_clusters=8, kmeans_iters=3, kmeans_iters_warm=1,
                      top_p=0.5, min_kc_ratio=0.125, implementation="xla")


def _inputs(kind="t2v", batch=1, seed=1):
  rng = np.random.default_rng(seed)
  c_in = CHANNELS[kind][0]
  lat = rng.standard_normal((batch, c_in, 2, 8, 8), dtype=np.float32)
  pe = rng.standard_normal((batch, TEXT_LEN, 16), dtype=np.float32)
  ne = rng.standard_normal((batch, TEXT_LEN, 16), dtype=np.float32)
  return lat, pe, ne


def _jax_pipeline(attention=None, two_experts=True, **kw):
  high = random_jax_model("t2v", seed=0)
  low = random_jax_model("t2v", seed=1) if two_experts else None
  for m in (high, low):
    if m is not None:
      m.set_attention(attention)
  return WanPipeline(high, UniPCFlowScheduler(flow_shift=3.0), transformer_2=low,
                     boundary_ratio=0.875 if two_experts else None, **kw)


def _run(pipe, lat, pe, ne, **kw):
  kw = {**GEOMETRY, "num_inference_steps": STEPS, "progress": False, **kw}
  return pipe(jnp.asarray(pe), None if ne is None else jnp.asarray(ne),
              latents=jnp.asarray(lat), **kw)


# ------------------------------------------------------------------------------------------
# diffusers parity


@pytest.fixture(scope="module")
def diffusers_pipelines(tmp_path_factory):
  """kind ("a14b" | "ti2v") -> (diffusers WanPipeline, its save_pretrained folder)."""
  pytest.importorskip("torch", reason="parity tests need torch")
  diffusers = pytest.importorskip("diffusers", reason="parity tests need diffusers")
  cache = {}

  dit = tiny_diffusers_transformer

  def make(kind):
    if kind not in cache:
      scheduler = diffusers.UniPCMultistepScheduler(
          prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
      if kind == "a14b":
        pipe = diffusers.WanPipeline(tokenizer=None, text_encoder=None, vae=None,
                                     scheduler=scheduler, transformer=dit("t2v", 0),
                                     transformer_2=dit("t2v", 1), boundary_ratio=0.875)
      else:
        pipe = diffusers.WanPipeline(tokenizer=None, text_encoder=None, vae=None,
                                     scheduler=scheduler, transformer=dit("ti2v", 2),
                                     expand_timesteps=True)
      pipe.set_progress_bar_config(disable=True)
      folder = tmp_path_factory.mktemp(f"wan_pipeline_{kind}")
      pipe.save_pretrained(folder)
      cache[kind] = pipe, folder
    return cache[kind]

  return make


def _diffusers_run(pipe, lat, pe, ne, **kw):
  import torch

  kw = {**GEOMETRY, "num_inference_steps": STEPS, **kw}
  with torch.no_grad():
    out = pipe(prompt_embeds=torch.from_numpy(pe),
               negative_prompt_embeds=None if ne is None else torch.from_numpy(ne),
               latents=torch.from_numpy(lat), output_type="latent", return_dict=False, **kw)[0]
  return out.numpy()


@pytest.mark.parametrize("cfg_batch", [True, False])
def test_a14b_matches_diffusers(diffusers_pipelines, cfg_batch):
  ref_pipe, folder = diffusers_pipelines("a14b")
  lat, pe, ne = _inputs()
  ref = _diffusers_run(ref_pipe, lat, pe, ne, guidance_scale=5.0, guidance_scale_2=3.0)
  pipe = WanPipeline.from_pretrained(folder, dtype=jnp.float32)
  out = _run(pipe, lat, pe, ne, guidance_scale=5.0, guidance_scale_2=3.0, cfg_batch=cfg_batch)
  assert out.step_expert == ("transformer",) * 2 + ("transformer_2",) * 4
  np.testing.assert_array_equal(out.timesteps, ref_pipe.scheduler.timesteps.numpy())
  assert out.latents.dtype == jnp.float32 and out.latents.shape == lat.shape
  assert rel_err(out.latents, ref) < TOL, rel_err(out.latents, ref)


def test_a14b_no_cfg_matches_diffusers(diffusers_pipelines):
  ref_pipe, folder = diffusers_pipelines("a14b")
  lat, pe, _ = _inputs(seed=2)
  ref = _diffusers_run(ref_pipe, lat, pe, None, guidance_scale=1.0)
  pipe = WanPipeline.from_pretrained(folder, dtype=jnp.float32)
  out = _run(pipe, lat, pe, None, guidance_scale=1.0)
  assert rel_err(out.latents, ref) < TOL


def test_ti2v_expand_timesteps_matches_diffusers(diffusers_pipelines):
  ref_pipe, folder = diffusers_pipelines("ti2v")
  lat, pe, ne = _inputs("ti2v", seed=3)
  ref = _diffusers_run(ref_pipe, lat, pe, ne, guidance_scale=4.0)
  pipe = WanPipeline.from_pretrained(folder, dtype=jnp.float32)
  assert pipe.expand_timesteps and pipe.transformer_2 is None and pipe.boundary_ratio is None
  out = _run(pipe, lat, pe, ne, guidance_scale=4.0)
  assert set(out.step_expert) == {"transformer"}
  assert rel_err(out.latents, ref) < TOL, rel_err(out.latents, ref)
  with pytest.raises(ValueError, match="guidance_scale_2"):
    _run(pipe, lat, pe, ne, guidance_scale_2=2.0)


def test_from_pretrained_flow_shift_and_components(diffusers_pipelines):
  _, folder = diffusers_pipelines("a14b")
  pipe = WanPipeline.from_pretrained(folder, dtype=jnp.float32, flow_shift=12.0,
                                     attention=SPARSE)
  assert pipe.scheduler.flow_shift == 12.0 and pipe.boundary_ratio == 0.875
  assert pipe.components == ()
  assert pipe.transformer.attention_policy.svg_ear == SPARSE
  lat, pe, _ = _inputs()
  with pytest.raises(ValueError, match="text_encoder"):
    _run(pipe, lat, pe, None)
  with pytest.raises(ValueError, match="vae"):
    _run(pipe, lat, pe, pe, output_type="np")


# ------------------------------------------------------------------------------------------
# CFG batching, schedules, traces, offload (no torch needed)


@pytest.fixture(scope="module")
def dense_pipe():
  return _jax_pipeline()


def test_cfg_batch_of_two_equals_two_calls(dense_pipe):
  lat, pe, ne = _inputs(batch=2, seed=4)
  batched = _run(dense_pipe, lat, pe, ne, cfg_batch=True, guidance_scale=4.0)
  separate = _run(dense_pipe, lat, pe, ne, cfg_batch=False, guidance_scale=4.0)
  assert rel_err(batched.latents, separate.latents) < 1e-5
  assert np.all(batched.step_dense) and np.all(batched.step_density == 1.0)
  # One architecture: the low-noise expert reuses the high-noise expert's compiled forward.
  counts = dense_pipe.trace_counts
  assert counts.get(("transformer_2", "dense", "batch"), 0) == 0, counts
  assert counts.get(("transformer_2", "dense", "single"), 0) == 0, counts
  assert counts[("scheduler",)] <= 1


def test_svg_ear_routing_dense_equals_dense(dense_pipe):
  lat, pe, ne = _inputs(seed=5)
  ref = _run(dense_pipe, lat, pe, ne)
  pipe = _jax_pipeline(attention=AttentionPolicy.sparse(SPARSE.replace(routing="dense")))
  out = _run(pipe, lat, pe, ne, schedule=SvgEarSchedule.sparse())
  assert not np.any(out.step_dense)
  np.testing.assert_array_equal(np.asarray(out.latents), np.asarray(ref.latents))
  np.testing.assert_array_equal(out.step_density, 1.0)


def test_sparse_schedule_flags_density_traces():
  pipe = _jax_pipeline(attention=AttentionPolicy.sparse(SPARSE, dense_layers=1))
  lat, pe, ne = _inputs(seed=6)
  schedule = SvgEarSchedule(dense_steps=0.35)  # int(0.35 * 6) = 2
  records = []
  out = _run(pipe, lat, pe, ne, schedule=schedule, callback=lambda r, x: records.append(r))
  assert out.step_dense.tolist() == [True, True, False, False, False, False]
  assert np.all(out.step_density[:2] == 1.0)
  assert np.all(out.step_density[2:] < 1.0) and np.all(out.step_density[2:] > 0.0)
  assert np.all(np.isfinite(out.step_seconds)) and len(records) == STEPS
  assert np.all(np.isfinite(np.asarray(out.latents)))
  counts = pipe.trace_counts
  assert max(counts.values()) <= 1, counts
  # transformer: 2 dense steps (its dense graph may be compiled already by another test);
  # transformer_2: 4 sparse steps, a cold k-means start and then warm ones.
  assert counts[("transformer_2", "sparse-cold", "batch")] == 1
  assert counts[("transformer_2", "sparse-warm", "batch")] == 1
  assert pipe.transformer_2.kmeans_state.get_value() is not None
  again = _run(pipe, lat, pe, ne, schedule=schedule, timings=False)
  assert pipe.trace_counts == counts  # no retrace on a second video
  np.testing.assert_array_equal(np.asarray(again.latents), np.asarray(out.latents))
  assert np.all(np.isnan(again.step_seconds))
  np.testing.assert_allclose(again.step_density, out.step_density)


def test_kmeans_during_dense_steps():
  """The reference's zero_step_kmeans_init: dense steps keep the dense result exactly and
  leave centroids behind, so the first sparse step of each expert starts warm."""
  pipe = _jax_pipeline(attention=SPARSE)
  lat, pe, ne = _inputs(seed=10)
  # 3 dense steps: 2 of the high-noise expert, 1 of the low-noise one, then 3 sparse ones.
  schedule = SvgEarSchedule(dense_steps=3, kmeans_during_dense=True)
  plain = _run(pipe, lat, pe, ne, schedule=SvgEarSchedule(dense_steps=3))
  warm = _run(pipe, lat, pe, ne, schedule=schedule)
  assert warm.step_dense.tolist() == [True] * 3 + [False] * 3
  np.testing.assert_array_equal(warm.step_density[:3], 1.0)
  assert [r.graph for r in warm.records] == [
      "dense-kmeans-cold", "dense-kmeans-warm",  # high-noise expert
      "dense-kmeans-cold", "sparse-warm", "sparse-warm", "sparse-warm"]  # low-noise expert
  assert [r.graph for r in plain.records] == ["dense"] * 3 + ["sparse-cold"] + [
      "sparse-warm"] * 2
  counts = pipe.trace_counts
  before = dict(counts)
  _run(pipe, lat, pe, ne, schedule=schedule)
  assert pipe.trace_counts == before  # no retrace
  assert not np.array_equal(np.asarray(plain.latents), np.asarray(warm.latents))
  # the dense steps are exactly dense: equal latents after an all-dense run of both kinds
  every = [_run(pipe, lat, pe, ne, schedule=SvgEarSchedule(dense_steps=1.0,
                                                           kmeans_during_dense=k))
           for k in (False, True)]
  np.testing.assert_array_equal(np.asarray(every[0].latents), np.asarray(every[1].latents))
  state = pipe.transformer.kmeans_state.get_value()
  assert state is not None and np.isfinite(np.asarray(state.q_centroids)).all()


def test_carry_copies_centroids_across_the_switch():
  pipe = _jax_pipeline(attention=SPARSE)
  lat, pe, ne = _inputs(seed=7)
  out = {s: _run(pipe, lat, pe, ne, schedule=SvgEarSchedule.sparse(expert_switch=s))
         for s in ("cold", "carry")}
  counts = pipe.trace_counts
  assert max(counts.values()) <= 1, counts
  assert sum(counts.values()) - counts[("scheduler",)] <= 2  # sparse cold + warm, shared
  # Identical high-noise steps; the low-noise steps differ by the k-means start.
  assert not np.array_equal(np.asarray(out["cold"].latents), np.asarray(out["carry"].latents))
  np.testing.assert_allclose(out["cold"].step_density[:2], out["carry"].step_density[:2])


def test_offload_idle_expert_identical(dense_pipe):
  lat, pe, ne = _inputs(seed=8)
  plain = _run(dense_pipe, lat, pe, ne)
  pipe = _jax_pipeline(offload_idle_expert=True)
  off = _run(pipe, lat, pe, ne)
  np.testing.assert_array_equal(np.asarray(off.latents), np.asarray(plain.latents))
  high = pipe._experts["transformer"]
  assert high.on_host and not pipe._experts["transformer_2"].on_host
  host = high._host_params
  off2 = _run(pipe, lat, pe, ne)
  np.testing.assert_array_equal(np.asarray(off2.latents), np.asarray(plain.latents))
  assert high._host_params is host  # one host copy, reused at every switch
  # new weights in the model (same values, new arrays): the stale host copy is dropped
  nnx.update(pipe.transformer, jax.tree.map(lambda x: jnp.array(x, copy=True),
                                            nnx.state(pipe.transformer, nnx.Param)))
  off3 = _run(pipe, lat, pe, ne)
  np.testing.assert_array_equal(np.asarray(off3.latents), np.asarray(plain.latents))
  assert high.on_host and high._host_params is not host


def test_seed_latents_and_progress(dense_pipe, capsys):
  _, pe, ne = _inputs(seed=9)
  kw = dict(GEOMETRY, num_inference_steps=2)
  a = dense_pipe(jnp.asarray(pe), jnp.asarray(ne), seed=3, progress=True, **kw)
  b = dense_pipe(jnp.asarray(pe), jnp.asarray(ne), seed=3, progress=False, **kw)
  np.testing.assert_array_equal(np.asarray(a.latents), np.asarray(b.latents))
  assert a.latents.shape == (1, 4, 2, 8, 8)
  assert "dense" in capsys.readouterr().err


def test_callback_can_replace_latents(dense_pipe):
  lat, pe, ne = _inputs(seed=10)
  out = _run(dense_pipe, lat, pe, ne, num_inference_steps=2,
             callback=lambda r, x: jnp.zeros_like(x) if r.index == 1 else None)
  np.testing.assert_array_equal(np.asarray(out.latents), 0.0)


# ------------------------------------------------------------------------------------------
# validation


@pytest.mark.parametrize("change, error, match", [
    (dict(num_frames=6), ValueError, "4k \\+ 1"),
    (dict(height=72), ValueError, "height=72: must be a multiple of 16"),
    (dict(width=0), ValueError, "width"),
    (dict(num_inference_steps=0), ValueError, "num_inference_steps"),
    (dict(num_inference_steps=2.5), ValueError, "num_inference_steps"),
    (dict(guidance_scale=float("nan")), ValueError, "guidance_scale"),
    (dict(pe=np.zeros((1, TEXT_LEN, 8), np.float32)), ValueError, "prompt_embeds"),
    (dict(pe=np.zeros((1, TEXT_LEN, 16), np.int32)), TypeError, "prompt_embeds"),
    (dict(ne=np.zeros((2, TEXT_LEN, 16), np.float32)), ValueError, "negative_prompt_embeds"),
    (dict(ne=np.zeros((1, TEXT_LEN + 1, 16), np.float32)), ValueError, "cfg_batch"),
    (dict(ne=None), ValueError, "text_encoder"),
    (dict(lat=np.zeros((1, 4, 3, 8, 8), np.float32)), ValueError, "latents have shape"),
    (dict(seed=1), ValueError, "seed or latents"),
    (dict(output_type="np"), ValueError, "vae"),
    (dict(schedule=0.2), TypeError, "schedule must be an SvgEarSchedule, got float"),
])
def test_validation(dense_pipe, change, error, match):
  lat, pe, ne = _inputs()
  change = dict(change)
  lat, pe, ne = (change.pop(k, v) for k, v in (("lat", lat), ("pe", pe), ("ne", ne)))
  with pytest.raises(error, match=match):
    _run(dense_pipe, lat, pe, ne, **change)


def test_missing_low_noise_expert_and_guidance_2():
  pipe = WanPipeline(random_jax_model("t2v"), UniPCFlowScheduler(flow_shift=3.0),
                     boundary_ratio=0.875)
  lat, pe, ne = _inputs()
  with pytest.raises(ValueError, match="transformer_2"):
    _run(pipe, lat, pe, ne)
  single = WanPipeline(random_jax_model("t2v"), UniPCFlowScheduler(flow_shift=3.0))
  with pytest.raises(ValueError, match="guidance_scale_2"):
    _run(single, lat, pe, ne, guidance_scale_2=2.0)


@pytest.mark.parametrize("kwargs, error", [
    (dict(dense_steps=1.5), ValueError), (dict(dense_steps=-1), ValueError),
    (dict(dense_steps=True), TypeError), (dict(dense_steps="0.2"), TypeError),
    (dict(expert_switch="warm"), ValueError), (dict(kmeans_during_dense=1), TypeError),
])
def test_schedule_validation(kwargs, error):
  with pytest.raises(error):
    SvgEarSchedule(**kwargs)


def test_schedule_counts():
  assert SvgEarSchedule(dense_steps=0.2).num_dense(50) == 10
  assert SvgEarSchedule(dense_steps=0.35).num_dense(40) == 14
  assert SvgEarSchedule(dense_steps=3).dense_flags(5) == (True, True, True, False, False)
  assert SvgEarSchedule(dense_steps=9).num_dense(5) == 5
  assert SvgEarSchedule.dense().num_dense(7) == 7 and SvgEarSchedule.sparse().num_dense(7) == 0


def _record(index, density, dense=False, expert="transformer"):
  return sampling.StepRecord(index=index, timestep=999.0 - index, expert=expert, dense=dense,
                             guidance_scale=5.0, seconds=0.1, density=density)


def test_density_overshoot_message():
  fixed = SvgEarConfig(num_q_clusters=4, num_k_clusters=40, density=0.1, min_kc_ratio=0.1)
  records = [_record(0, 1.0, dense=True), _record(1, 0.31), _record(2, 0.12), _record(3, 0.26),
             _record(4, 0.9, expert="transformer_2")]
  msg = sampling.density_overshoot(records, {"transformer": fixed, "transformer_2": None})
  # steps 1 and 3 (> 1.25 x 0.1); the dense step and the dense expert are not checked
  assert msg.startswith("2 sparse step(s)") and "step 1 (transformer) computed 0.310" in msg
  assert "the 4 most probable of 40 key clusters" in msg and "min_kc_ratio=0.1" in msg
  assert sampling.density_overshoot(records[:3], {"transformer": fixed}, factor=4.0) is None
  top_p = fixed.replace(density=None, top_p=0.5)  # a top-p budget has no target
  assert sampling.density_overshoot(records, {"transformer": top_p}) is None
  assert sampling.density_overshoot([_record(0, float("nan"))], {"transformer": fixed}) is None


def test_pipeline_warns_when_routing_exceeds_a_fixed_budget():
  # 8 key clusters of ~4 tokens, half of them always exact: about 0.5 routed for 0.1
  over = SvgEarConfig(num_q_clusters=4, num_k_clusters=8, kmeans_iters=3, kmeans_iters_warm=1,
                      density=0.1, min_kc_ratio=0.5, implementation="xla")
  pipe = _jax_pipeline(attention=AttentionPolicy.sparse(over), two_experts=False)
  lat, pe, ne = _inputs(seed=7)
  with pytest.warns(sampling.DensityBudgetWarning, match="always exact") as caught:
    out = _run(pipe, lat, pe, ne, schedule=SvgEarSchedule.sparse(), num_inference_steps=2,
               timings=False)
  assert len(caught) == 1 and np.all(out.step_density > 0.125)
