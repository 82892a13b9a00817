"""WanPipeline and HunyuanVideoPipeline with their DiTs on a mesh (fake CPU devices,
float32): the same latents as on one device, the loop's arrays on the mesh."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import hunyuan_testing
import wan_testing
from models import parallel
from models.hunyuan.pipeline import HunyuanVideoPipeline
from models.sampling import SvgEarSchedule
from models.wan.pipeline import WanPipeline
from parallel_testing import assert_state_equal, mesh, rel_err
from svg_ear_jax import SvgEarConfig

pytest.importorskip("safetensors")

# 5 frames at 64 x 64 -> latents (2, 8, 8) -> 32 tokens; 4 UniPC steps at shift 3:
# t = 999, 900 (high-noise expert, >= 875), 750, 500 (low-noise expert).
GEOMETRY = dict(height=64, width=64, num_frames=5, progress=False)
# top-p routing and mean compensation compile faster than the EAR / variance defaults,
# which tests/parallel/test_*_ulysses.py check sharded
SPARSE = SvgEarConfig(num_q_clusters=4, num_k_clusters=8, kmeans_iters=3, kmeans_iters_warm=1,
                      routing="topp", compensation="mean", top_p=0.5, min_kc_ratio=0.125,
                      implementation="xla")


def _embeds(seed, *shape):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, dtype=np.float32))


def _on(x, m) -> bool:
  return x.sharding.device_set == set(m.devices.flat)


@pytest.fixture(scope="module")
def wan_folder(tmp_path_factory):
  models = [wan_testing.random_jax_model("t2v", seed, num_heads=4) for seed in (0, 1)]
  return wan_testing.write_jax_pipeline(tmp_path_factory.mktemp("wan_a14b"), models[0],
                                        model_2=models[1], boundary_ratio=0.875)


def test_wan_a14b_seq2_equals_one_device(wan_folder):
  """T2V A14B, CFG as one batch, 1 dense step (k-means running) then SVG-EAR on both
  sides of the expert switch (centroids carried over it): equal latents, densities and
  centroids, the k-means state sharded by head, no retrace per step; then with the idle
  expert offloaded from the mesh to host memory: the same latents again."""
  schedule = SvgEarSchedule(dense_steps=1, kmeans_during_dense=True, expert_switch="carry")
  kw = dict(latents=_embeds(0, 1, 4, 2, 8, 8), num_inference_steps=4, schedule=schedule,
            **GEOMETRY)
  pe, ne = _embeds(1, 1, 7, 16), _embeds(2, 1, 7, 16)
  load = lambda **k: WanPipeline.from_pretrained(wan_folder, dtype=jnp.float32,
                                                 attention=SPARSE, **k)
  ref_pipe = load()
  ref = ref_pipe(pe, ne, **kw)
  m = mesh(1, 2)
  pipe = load(mesh=m)
  assert pipe.mesh is m and pipe.transformer_2.mesh is m
  out = pipe(pe, ne, **kw)
  assert [r.graph for r in out.records] == [r.graph for r in ref.records] == [
      "dense-kmeans-cold", "sparse-warm", "sparse-warm", "sparse-warm"]
  assert out.step_expert == ("transformer",) * 2 + ("transformer_2",) * 2
  assert rel_err(out.latents, ref.latents) < 1e-5 and _on(out.latents, m)
  np.testing.assert_allclose(out.step_density, ref.step_density, atol=1e-6)
  assert np.all(out.step_density[1:] < 1.0)
  for name in ("transformer", "transformer_2"):
    assert_state_equal(getattr(pipe, name).kmeans_state.get_value(),
                       getattr(ref_pipe, name).kmeans_state.get_value(),
                       P(None, None, parallel.SEQ))
  assert max(pipe.trace_counts.values()) <= 1, pipe.trace_counts
  with pytest.raises(ValueError, match="different meshes"):
    WanPipeline(pipe.transformer, pipe.scheduler, transformer_2=ref_pipe.transformer_2,
                boundary_ratio=0.875)
  for_vae = pipe._denoiser.to_one_device(out.latents)  # what the single-device VAE decodes
  assert for_vae.sharding.device_set == {jax.devices()[0]}
  np.testing.assert_array_equal(np.asarray(for_vae), np.asarray(out.latents))

  offload = load(mesh=m, offload_idle_expert=True)
  kernel = lambda p: p.blocks.attn1.to_q.kernel.get_value()
  assert kernel(offload.transformer_2).sharding.memory_kind == "pinned_host"
  again = offload(pe, ne, **kw)
  np.testing.assert_array_equal(np.asarray(again.latents), np.asarray(out.latents))
  high, low = kernel(offload.transformer), kernel(offload.transformer_2)
  assert high.sharding.memory_kind == "pinned_host" and _on(high, m)
  assert low.sharding.memory_kind == "device" and _on(low, m)
  assert low.sharding.is_fully_replicated
  with pytest.raises(ValueError, match="num_heads=4 is not divisible by its size 3"):
    offload.set_mesh(mesh(1, 3))
  assert offload.mesh is m
  offload.set_mesh(None)  # the idle expert comes off the mesh to one device's host memory
  assert offload.mesh is None
  high, low = kernel(offload.transformer), kernel(offload.transformer_2)
  assert high.sharding.device_set == low.sharding.device_set == {jax.devices()[0]}
  assert high.sharding.memory_kind == "device" and low.sharding.memory_kind == "pinned_host"


def test_hunyuan_set_mesh_data2_x_seq2_equals_one_device(tmp_path):
  """True CFG as one batch of 2 over the "data" axis x 2-way Ulysses, after `set_mesh` on
  a pipeline loaded for one device; a batch that does not split over "data" is refused
  before any device work; set_mesh(None) goes back to one device."""
  model = hunyuan_testing.random_jax_model(num_heads=4)
  pipe = HunyuanVideoPipeline.from_pretrained(
      hunyuan_testing.write_jax_pipeline(tmp_path, model), dtype=jnp.float32)
  mask = jnp.asarray([[1, 1, 1, 1, 0, 0]], jnp.int32)
  kw = dict(pooled_prompt_embeds=_embeds(4, 1, 8), prompt_attention_mask=mask,
            negative_prompt_embeds=_embeds(5, 1, 6, 16),
            negative_pooled_prompt_embeds=_embeds(6, 1, 8),
            negative_prompt_attention_mask=mask, true_cfg_scale=2.5,
            num_inference_steps=2, **GEOMETRY)
  # committed to one device as every later step's latents: one single-device compile
  kw["latents"] = jax.device_put(_embeds(7, 1, 4, 2, 8, 8), jax.devices()[0])
  text = _embeds(3, 1, 6, 16)
  ref = pipe(text, **kw)
  m = mesh(2, 2)
  pipe.set_mesh(m)
  assert pipe.mesh is m
  out = pipe(text, **kw)
  assert rel_err(out.latents, ref.latents) < 1e-5 and _on(out.latents, m)
  with pytest.raises(ValueError, match=r"batch of 1 \(CFG as two calls\).*'data' axis of "
                                       r"size 2"):
    pipe(text, **{**kw, "cfg_batch": False})
  pipe.set_mesh(None)
  assert pipe.mesh is None
  kernel = pipe.transformer.transformer_blocks.attn.to_q.kernel.get_value()
  assert kernel.sharding.device_set == {jax.devices()[0]}


def test_generate_cli_seq_parallel(wan_folder, tmp_path):
  from safetensors.numpy import load_file, save_file

  from models.generate_cli import main

  save_file({"prompt_embeds": np.asarray(_embeds(20, 1, 7, 16)),
             "negative_prompt_embeds": np.asarray(_embeds(21, 1, 7, 16))},
            str(tmp_path / "e.safetensors"))
  common = ["wan", str(wan_folder), "--prompt-embeds", str(tmp_path / "e.safetensors"),
            "--height", "64", "--width", "64", "--frames", "5", "--steps", "2", "--quiet",
            "--dtype", "fp32", "--attention", "dense", "--guidance", "4"]
  assert main([*common, "--out", str(tmp_path / "one.safetensors")]) == 0
  assert main([*common, "--out", str(tmp_path / "seq.safetensors"), "--seq-parallel", "2",
               "--data-parallel", "2"]) == 0
  one, seq = (load_file(str(tmp_path / f"{n}.safetensors"))["latents"] for n in ("one", "seq"))
  assert rel_err(seq, one) < 1e-5
