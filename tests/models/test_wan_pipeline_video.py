"""`WanPipeline` around the loop: image conditioning (I2V-A14B, TI2V-5B), decoding to frames
and mp4, prompts through the JAX UMT5 + tokenizer, all against diffusers' pipelines on tiny
random-weight components saved with `save_pretrained` (skipped without torch / diffusers),
plus validation that needs no torch.
"""

import jax.numpy as jnp
import numpy as np
import pytest

from models import video_io
from models.components import MissingComponentError
from models.schedulers import UniPCFlowScheduler
from models.wan.pipeline import WanPipeline
from test_tokenizer import write_folder
from wan_testing import (CHANNELS, random_jax_model, rel_err, tiny_diffusers_transformer,
                         tiny_diffusers_vae, tiny_text_pipeline, unipc_flow_scheduler)

GEOMETRY = dict(height=64, width=64, num_frames=5)
STEPS = 4
TOL = 1e-4
TEXT_DIM = 16


@pytest.fixture(scope="module")
def torch_modules():
  pytest.importorskip("torch", reason="parity tests need torch")
  return pytest.importorskip("diffusers", reason="parity tests need diffusers")


def _save(pipe, tmp_path_factory, name):
  pipe.set_progress_bar_config(disable=True)
  folder = tmp_path_factory.mktemp(name)
  pipe.save_pretrained(folder)
  return folder


def _inputs(kind, seed, batch=1):
  rng = np.random.default_rng(seed)
  z = CHANNELS[kind][1]
  f_lat = (GEOMETRY["num_frames"] - 1) // 4 + 1
  s = 16 if kind == "ti2v" else 8
  lat = rng.standard_normal((batch, z, f_lat, 64 // s, 64 // s), dtype=np.float32)
  pe = rng.standard_normal((batch, 7, TEXT_DIM), dtype=np.float32)
  ne = rng.standard_normal((batch, 7, TEXT_DIM), dtype=np.float32)
  image = rng.uniform(-1, 1, (1, 3, 64, 64)).astype(np.float32)
  return lat, pe, ne, image


def _torch_call(pipe, **kw):
  import torch

  conv = {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in kw.items()}
  with torch.no_grad():
    return pipe(**GEOMETRY, num_inference_steps=STEPS, return_dict=False, **conv)[0]


def _ours(pipe, **kw):
  kw = {k: jnp.asarray(v) if isinstance(v, np.ndarray) and k != "image" else v
        for k, v in kw.items()}
  return pipe(**GEOMETRY, num_inference_steps=STEPS, progress=False, **kw)


# ------------------------------------------------------------------------------------------
# Image conditioning


@pytest.mark.parametrize("kind", ["i2v", "ti2v"])
def test_image_to_video_matches_diffusers(torch_modules, tmp_path_factory, kind):
  diffusers = torch_modules
  if kind == "i2v":
    ref = diffusers.WanImageToVideoPipeline(
        tokenizer=None, text_encoder=None, vae=tiny_diffusers_vae("i2v", 5),
        scheduler=unipc_flow_scheduler(),
        transformer=tiny_diffusers_transformer("i2v", 0),
        transformer_2=tiny_diffusers_transformer("i2v", 1), boundary_ratio=0.9)
  else:
    ref = diffusers.WanImageToVideoPipeline(
        tokenizer=None, text_encoder=None, vae=tiny_diffusers_vae("ti2v", 6),
        scheduler=unipc_flow_scheduler(),
        transformer=tiny_diffusers_transformer("ti2v", 2), expand_timesteps=True)
  folder = _save(ref, tmp_path_factory, f"wan_{kind}")
  lat, pe, ne, image = _inputs(kind, seed=11)
  want = _torch_call(ref, image=image, prompt_embeds=pe, negative_prompt_embeds=ne,
                     latents=lat, guidance_scale=4.0, output_type="latent").numpy()
  pipe = WanPipeline.from_pretrained(folder, dtype=jnp.float32)
  assert pipe.image_to_video == (kind == "i2v")
  assert not pipe.parts.loaded("vae")  # loaded on first use only
  out = _ours(pipe, prompt_embeds=pe, negative_prompt_embeds=ne, image=image, latents=lat,
              guidance_scale=4.0)
  assert pipe.parts.loaded("vae") and "image_encoder" in out.seconds
  assert rel_err(out.latents, want) < TOL, rel_err(out.latents, want)
  if kind == "i2v":
    assert set(out.step_expert) == {"transformer", "transformer_2"}
  # the same with the image latents given directly
  z = pipe.parts.get("vae", "test")
  video = jnp.asarray(image)[:, :, None]
  if kind == "i2v":
    video = jnp.concatenate([video, jnp.zeros((1, 3, 4, 64, 64))], axis=2)
  again = _ours(pipe, prompt_embeds=pe, negative_prompt_embeds=ne,
                image_latents=np.asarray(z.encode(video)), latents=lat, guidance_scale=4.0)
  assert rel_err(again.latents, out.latents) < 1e-6


def test_decode_to_frames_and_mp4_match_diffusers(torch_modules, tmp_path_factory, tmp_path):
  diffusers = torch_modules
  ref = diffusers.WanPipeline(tokenizer=None, text_encoder=None,
                              vae=tiny_diffusers_vae("t2v", 3), scheduler=unipc_flow_scheduler(),
                              transformer=tiny_diffusers_transformer("t2v", 0))
  folder = _save(ref, tmp_path_factory, "wan_t2v_vae")
  lat, pe, ne, _ = _inputs("t2v", seed=12)
  want = _torch_call(ref, prompt_embeds=pe, negative_prompt_embeds=ne, latents=lat,
                     guidance_scale=3.0, output_type="np")
  pipe = WanPipeline.from_pretrained(folder, dtype=jnp.float32)
  out = _ours(pipe, prompt_embeds=pe, negative_prompt_embeds=ne, latents=lat,
              guidance_scale=3.0, output_type="np")
  assert out.frames.shape == want.shape == (1, 5, 64, 64, 3)
  assert out.frames.dtype == np.float32 and 0 <= out.frames.min() <= out.frames.max() <= 1
  assert np.abs(out.frames - want).max() < 1e-4
  path = tmp_path / "video.mp4"
  out = _ours(pipe, prompt_embeds=pe, negative_prompt_embeds=ne, latents=lat,
              guidance_scale=3.0, output_type="mp4", output_path=path)
  assert out.video_paths == (path,) and pipe.fps == 16.0
  back = video_io.read_video(path)
  assert back.shape == (5, 64, 64, 3)
  # lossy H.264 of random-weight noise: only a loose bound
  assert np.abs(back / 255.0 - out.frames[0]).mean() < 0.1
  assert set(out.seconds) >= {"denoise", "vae_decode", "mp4"}


# ------------------------------------------------------------------------------------------
# Prompts -> mp4


@pytest.fixture(scope="module")
def text_pipeline(torch_modules, tmp_path_factory):
  """(diffusers WanPipeline with tiny UMT5, tokenizer, VAE and DiT; its folder)."""
  tok = write_folder(tmp_path_factory.mktemp("tok") / "tokenizer", with_transformers=True)
  folder = tmp_path_factory.mktemp("wan_text")
  return tiny_text_pipeline(folder, tok), folder


def test_prompt_to_mp4_matches_diffusers(text_pipeline, tmp_path):
  ref, folder = text_pipeline
  lat, _, _, _ = _inputs("t2v", seed=13)
  prompt = "A red fox runs through the  snowy forest &amp; jumps"
  want = _torch_call(ref, prompt=prompt, negative_prompt="", latents=lat, guidance_scale=4.0,
                     output_type="latent").numpy()
  pipe = WanPipeline.from_pretrained(folder, dtype=jnp.float32)
  assert set(pipe.components) == {"tokenizer", "text_encoder", "vae"}
  out = _ours(pipe, prompt=prompt, latents=lat, guidance_scale=4.0, output_type="mp4",
              output_path=tmp_path / "fox.mp4")
  assert rel_err(out.latents, want) < TOL, rel_err(out.latents, want)
  assert (tmp_path / "fox.mp4").stat().st_size > 0 and "text_encoder" in out.seconds
  assert len(pipe.negative_cache) == 1
  # a second video re-uses the cached negative prompt: same result, no new cache entry
  again = _ours(pipe, prompt=prompt, latents=lat, guidance_scale=4.0)
  assert len(pipe.negative_cache) == 1
  np.testing.assert_array_equal(np.asarray(again.latents), np.asarray(out.latents))
  embeds = pipe.encode_prompt(prompt)
  direct = _ours(pipe, prompt_embeds=np.asarray(embeds),
                 negative_prompt_embeds=np.asarray(pipe.encode_prompt("")), latents=lat,
                 guidance_scale=4.0)
  assert rel_err(direct.latents, out.latents) < 1e-6


# ------------------------------------------------------------------------------------------
# Validation (no torch)


@pytest.fixture(scope="module")
def t2v_pipe():
  return WanPipeline(random_jax_model("t2v", seed=0), UniPCFlowScheduler(flow_shift=3.0))


@pytest.fixture(scope="module")
def i2v_pipe():
  return WanPipeline(random_jax_model("i2v", seed=0), UniPCFlowScheduler(flow_shift=3.0))


def _embeds():
  return jnp.zeros((1, 7, TEXT_DIM), jnp.float32)


@pytest.mark.parametrize("kw, error, match", [
    (dict(output_type="mp4"), ValueError, "output_path"),
    (dict(output_type="mp4", output_path="x.avi"), ValueError, ".mp4"),
    (dict(output_type="gif"), ValueError, "output_type"),
    (dict(output_path="x.mp4"), ValueError, "only used"),
    (dict(output_type="np"), MissingComponentError, "vae"),
    (dict(image=np.zeros((64, 64, 3), np.uint8)), ValueError, "I2V"),
    (dict(prompt_embeds=None, prompt="a cat"), MissingComponentError,
     "text_encoder and the tokenizer"),
    (dict(prompt="a cat"), ValueError, "exactly one"),
    (dict(prompt_embeds=None, prompt=3), TypeError, "prompt"),
    (dict(negative_prompt_embeds=None), MissingComponentError, "CFG"),
])
def test_t2v_validation(t2v_pipe, kw, error, match):
  kw = {"prompt_embeds": _embeds(), "negative_prompt_embeds": _embeds(), **kw}
  with pytest.raises(error, match=match):
    t2v_pipe(**GEOMETRY, num_inference_steps=2, progress=False, **kw)


@pytest.mark.parametrize("kw, error, match", [
    (dict(), ValueError, "image= or image_latents="),
    (dict(image=np.zeros((32, 64, 3), np.uint8)), MissingComponentError, "vae"),
    (dict(image_latents=jnp.zeros((1, 4, 1, 8, 8))), ValueError, "latents have shape"),
    (dict(image_latents=jnp.zeros((1, 4, 2, 8, 8)), image=np.zeros((64, 64, 3))), ValueError,
     "not both"),
])
def test_i2v_validation(i2v_pipe, kw, error, match):
  with pytest.raises(error, match=match):
    i2v_pipe(_embeds(), _embeds(), **GEOMETRY, num_inference_steps=2, progress=False, **kw)


def test_i2v_image_latents_without_vae(i2v_pipe):
  rng = np.random.default_rng(0)
  cond = jnp.asarray(rng.standard_normal((1, 4, 2, 8, 8)), jnp.float32)
  out = i2v_pipe(_embeds(), _embeds(), image_latents=cond, **GEOMETRY, num_inference_steps=2,
                 progress=False, seed=0)
  assert out.latents.shape == (1, 4, 2, 8, 8) and np.isfinite(np.asarray(out.latents)).all()
  other = i2v_pipe(_embeds(), _embeds(), image_latents=cond + 1, **GEOMETRY,
                   num_inference_steps=2, progress=False, seed=0)
  assert rel_err(other.latents, out.latents) > 1e-3  # the condition reaches the DiT
