"""`HunyuanVideoPipeline` (models/hunyuan/pipeline.py) against diffusers'
`HunyuanVideoPipeline` on a tiny random-weight DiT and VAE saved with `save_pretrained`
(skipped without torch / diffusers), plus SVG-EAR schedules and validation without torch.
"""

import jax.numpy as jnp
import numpy as np
import pytest

from hunyuan_testing import TINY_DIFFUSERS, random_jax_model, rel_err
from models.attention import AttentionPolicy
from models.components import MissingComponentError
from models.hunyuan.pipeline import HunyuanVideoPipeline
from models.sampling import SvgEarSchedule
from models.schedulers import FlowMatchEulerScheduler
from svg_ear_jax import SvgEarConfig

GEOMETRY = dict(height=64, width=64, num_frames=5)  # latents (2, 8, 8) -> 32 video tokens
STEPS = 4
TOL = 1e-4
TEXT_LEN = 6
NEGATIVE = "A dog runs along the beach at sunset, waves crashing behind it."
VAE = dict(latent_channels=4, block_out_channels=(8, 8, 16, 16), layers_per_block=1,
           norm_num_groups=4)
SPARSE = SvgEarConfig(num_q_clusters=4, num_k_clusters=8, kmeans_iters=3, kmeans_iters_warm=1,
                      top_p=0.5, min_kc_ratio=0.125, implementation="xla")


def _inputs(seed, batch=1):
  rng = np.random.default_rng(seed)
  lat = rng.standard_normal((batch, 4, 2, 8, 8), dtype=np.float32)

  def text():
    embeds = rng.standard_normal((batch, TEXT_LEN, 16), dtype=np.float32)
    mask = np.zeros((batch, TEXT_LEN), np.int64)
    for b in range(batch):
      mask[b, :4 + b] = 1
    return embeds, mask, rng.standard_normal((batch, 8), dtype=np.float32)

  return lat, text(), text()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """(diffusers HunyuanVideoPipeline with a tiny DiT and VAE, its save_pretrained folder)."""
  torch = pytest.importorskip("torch", reason="parity tests need torch")
  diffusers = pytest.importorskip("diffusers", reason="parity tests need diffusers")
  torch.manual_seed(0)
  dit = diffusers.HunyuanVideoTransformer3DModel(**TINY_DIFFUSERS).eval()
  vae = diffusers.AutoencoderKLHunyuanVideo(**VAE).eval()
  with torch.no_grad():
    for _, p in dit.named_parameters():
      p.copy_(torch.randn_like(p) * 0.3)
    for key, p in vae.named_parameters():
      if "norm" in key:
        p.copy_((1.0 if key.endswith("weight") else 0.0) + 0.3 * torch.randn_like(p))
  pipe = diffusers.HunyuanVideoPipeline(
      text_encoder=None, tokenizer=None, transformer=dit, vae=vae,
      scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=7.0), text_encoder_2=None,
      tokenizer_2=None)
  pipe.set_progress_bar_config(disable=True)
  folder = tmp_path_factory.mktemp("hunyuan_pipeline")
  pipe.save_pretrained(folder)
  return pipe, folder


def _torch_run(pipe, lat, pos, neg=None, **kw):
  import torch

  t = lambda a: torch.from_numpy(a)
  extra = {}
  if neg is not None:
    extra = dict(negative_prompt_embeds=t(neg[0]), negative_prompt_attention_mask=t(neg[1]),
                 negative_pooled_prompt_embeds=t(neg[2]))
  with torch.no_grad():
    out = pipe(prompt_embeds=t(pos[0]), prompt_attention_mask=t(pos[1]),
               pooled_prompt_embeds=t(pos[2]), latents=t(lat), **GEOMETRY,
               num_inference_steps=STEPS, return_dict=False, **extra, **kw)[0]
  return out.numpy() if hasattr(out, "numpy") else np.asarray(out)


def _run(pipe, lat, pos, neg=None, **kw):
  extra = {}
  if neg is not None:
    extra = dict(negative_prompt_embeds=jnp.asarray(neg[0]),
                 negative_prompt_attention_mask=jnp.asarray(neg[1]),
                 negative_pooled_prompt_embeds=jnp.asarray(neg[2]))
  return pipe(jnp.asarray(pos[0]), jnp.asarray(pos[2]), jnp.asarray(pos[1]),
              latents=jnp.asarray(lat), **GEOMETRY, num_inference_steps=STEPS, progress=False,
              **extra, **kw)


def test_embedded_guidance_matches_diffusers(reference):
  ref, folder = reference
  lat, pos, _ = _inputs(1)
  want = _torch_run(ref, lat, pos, guidance_scale=6.0, output_type="latent")
  pipe = HunyuanVideoPipeline.from_pretrained(folder, dtype=jnp.float32)
  assert pipe.scheduler.shift == 7.0 and pipe.components == ("vae",)
  out = _run(pipe, lat, pos, guidance_scale=6.0)
  np.testing.assert_allclose(out.timesteps, ref.scheduler.timesteps.numpy(), rtol=1e-6)
  assert out.latents.dtype == jnp.float32 and out.latents.shape == lat.shape
  assert rel_err(out.latents, want) < TOL, rel_err(out.latents, want)


@pytest.mark.parametrize("cfg_batch", [True, False])
def test_true_cfg_matches_diffusers(reference, cfg_batch):
  ref, folder = reference
  lat, pos, neg = _inputs(2, batch=2)
  want = _torch_run(ref, lat, pos, neg, guidance_scale=5.0, true_cfg_scale=3.0,
                    output_type="latent")
  pipe = HunyuanVideoPipeline.from_pretrained(folder, dtype=jnp.float32)
  out = _run(pipe, lat, pos, neg, guidance_scale=5.0, true_cfg_scale=3.0, cfg_batch=cfg_batch)
  assert rel_err(out.latents, want) < TOL, rel_err(out.latents, want)
  mode = "batch" if cfg_batch else "single"
  assert ("transformer", "dense", mode) in pipe.trace_counts or cfg_batch is False


def test_decoded_frames_match_diffusers(reference, tmp_path):
  ref, folder = reference
  lat, pos, _ = _inputs(3)
  want = _torch_run(ref, lat, pos, output_type="np")
  pipe = HunyuanVideoPipeline.from_pretrained(folder, dtype=jnp.float32)
  out = _run(pipe, lat, pos, output_type="np")
  assert out.frames.shape == want.shape == (1, 5, 64, 64, 3)
  assert np.abs(out.frames - want).max() < 1e-4
  out = _run(pipe, lat, pos, output_type="mp4", output_path=tmp_path / "h.mp4")
  assert out.video_paths == (tmp_path / "h.mp4",) and (tmp_path / "h.mp4").stat().st_size > 0


# ------------------------------------------------------------------------------------------
# Without torch


def _pipe(attention=None):
  return HunyuanVideoPipeline(random_jax_model(seed=0, attention=attention),
                              FlowMatchEulerScheduler(shift=7.0))


@pytest.fixture(scope="module")
def dense_pipe():
  return _pipe()


def test_cfg_batch_equals_two_calls_and_svg_ear_dense_routing(dense_pipe):
  lat, pos, neg = _inputs(4, batch=2)
  kw = dict(guidance_scale=4.0, true_cfg_scale=2.5)
  batched = _run(dense_pipe, lat, pos, neg, cfg_batch=True, **kw)
  separate = _run(dense_pipe, lat, pos, neg, cfg_batch=False, **kw)
  assert rel_err(batched.latents, separate.latents) < 1e-5
  sparse = _pipe(AttentionPolicy.sparse(SPARSE.replace(routing="dense")))
  routed = _run(sparse, lat, pos, neg, schedule=SvgEarSchedule.sparse(), **kw)
  assert rel_err(routed.latents, batched.latents) < 1e-5
  np.testing.assert_array_equal(routed.step_density, 1.0)


def test_sparse_schedule_and_kmeans_during_dense():
  pipe = _pipe(AttentionPolicy.sparse(SPARSE, dense_layers=1))
  lat, pos, _ = _inputs(5)
  out = _run(pipe, lat, pos, schedule=SvgEarSchedule(dense_steps=0.5))
  assert out.step_dense.tolist() == [True, True, False, False]
  assert np.all(out.step_density[2:] < 1.0) and np.isfinite(np.asarray(out.latents)).all()
  assert [r.graph for r in out.records] == ["dense", "dense", "sparse-cold", "sparse-warm"]
  warm = _run(pipe, lat, pos, schedule=SvgEarSchedule(dense_steps=0.5,
                                                      kmeans_during_dense=True))
  assert [r.graph for r in warm.records] == ["dense-kmeans-cold", "dense-kmeans-warm",
                                             "sparse-warm", "sparse-warm"]
  assert pipe.transformer.kmeans_state.get_value() is not None


@pytest.mark.parametrize("change, error, match", [
    (dict(num_frames=6), ValueError, "4k \\+ 1"),
    (dict(height=72), ValueError, "multiple of 16"),
    (dict(true_cfg_scale=2.0), ValueError, "negative_prompt"),
    (dict(pooled=None), ValueError, "pooled_prompt_embeds"),
    (dict(pooled=np.zeros((1, 7), np.float32)), ValueError, "pooled_prompt_embeds"),
    (dict(mask=np.ones((1, TEXT_LEN + 1))), ValueError, "prompt_attention_mask"),
    (dict(embeds=np.zeros((1, TEXT_LEN, 15), np.float32)), ValueError, "prompt_embeds"),
    (dict(output_type="np"), MissingComponentError, "vae"),
    (dict(negative_prompt="bad"), MissingComponentError, "tokenizer"),
    (dict(seed=0), ValueError, "seed or latents"),
])
def test_validation(dense_pipe, change, error, match):
  lat, (embeds, mask, pooled), _ = _inputs(6)
  change = dict(change)
  embeds, mask, pooled = (change.pop(k, v) for k, v in
                          (("embeds", embeds), ("mask", mask), ("pooled", pooled)))
  with pytest.raises(error, match=match):
    dense_pipe(jnp.asarray(embeds), None if pooled is None else jnp.asarray(pooled),
               jnp.asarray(mask), latents=jnp.asarray(lat),
               **{**GEOMETRY, "num_inference_steps": 2, "progress": False, **change})


def test_prompt_without_text_encoders(dense_pipe):
  with pytest.raises(MissingComponentError, match="text_encoder"):
    dense_pipe(prompt="a cat", **GEOMETRY, num_inference_steps=2, progress=False)
  with pytest.raises(ValueError, match="exactly one"):
    dense_pipe(**GEOMETRY, num_inference_steps=2, progress=False)


def test_prompt_to_mp4_matches_diffusers(reference, tmp_path_factory, tmp_path):
  """Tokenizers, Llama (hidden_states[-3]) and CLIP through the whole pipeline."""
  import torch
  import transformers
  import diffusers
  from test_hunyuan_text import clip_backend, write_tokenizers

  _, folder = reference
  torch.manual_seed(1)
  llama = transformers.LlamaModel(transformers.LlamaConfig(
      vocab_size=1000, hidden_size=16, intermediate_size=24, num_hidden_layers=3,
      num_attention_heads=4, num_key_value_heads=2, rope_theta=500000.0, bos_token_id=2,
      pad_token_id=0)).eval()
  clip = transformers.CLIPTextModel(transformers.CLIPTextConfig(
      hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
      max_position_embeddings=77, vocab_size=clip_backend().get_vocab_size(), eos_token_id=2,
      bos_token_id=1, pad_token_id=1)).eval()
  tok_root = tmp_path_factory.mktemp("hunyuan_tok")
  llama_tok, clip_tok = write_tokenizers(tok_root, with_transformers=True)
  ref = diffusers.HunyuanVideoPipeline.from_pretrained(
      folder, text_encoder=llama, tokenizer=transformers.AutoTokenizer.from_pretrained(
          str(llama_tok)), text_encoder_2=clip,
      tokenizer_2=transformers.AutoTokenizer.from_pretrained(str(clip_tok)))
  ref.set_progress_bar_config(disable=True)
  full = tmp_path_factory.mktemp("hunyuan_full")
  ref.save_pretrained(full)
  lat, _, _ = _inputs(7)
  prompt = "A cat walks on the grass in the sunny garden."
  # long enough that tokens remain after the 95-token template crop with this tiny
  # vocabulary (an all-padding negative mask gives NaN in diffusers' attention)
  with torch.no_grad():
    want = ref(prompt=prompt, negative_prompt=NEGATIVE, true_cfg_scale=2.0,
               latents=torch.from_numpy(lat), **GEOMETRY, num_inference_steps=STEPS,
               output_type="latent", return_dict=False)[0].numpy()
  pipe = HunyuanVideoPipeline.from_pretrained(full, dtype=jnp.float32)
  assert set(pipe.components) == {"tokenizer", "tokenizer_2", "text_encoder",
                                  "text_encoder_2", "vae"}
  out = pipe(prompt=prompt, negative_prompt=NEGATIVE, true_cfg_scale=2.0,
             latents=jnp.asarray(lat), **GEOMETRY, num_inference_steps=STEPS, progress=False,
             output_type="mp4", output_path=tmp_path / "cat.mp4")
  assert rel_err(out.latents, want) < TOL, rel_err(out.latents, want)
  assert (tmp_path / "cat.mp4").stat().st_size > 0 and len(pipe.negative_cache) == 1
