"""`svg-ear-generate` (models/generate_cli.py): embeddings -> latents for both models on
NumPy-written tiny pipeline folders (no torch), prompt -> mp4 on a diffusers-saved one
(skipped without torch), and the error paths."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import hunyuan_testing
from models.attention import AttentionPolicy
from models.generate_cli import main
from models.hunyuan.pipeline import HunyuanVideoPipeline
from models.sampling import SvgEarSchedule
from models.wan.pipeline import WanPipeline
from svg_ear_jax import SvgEarConfig
from test_tokenizer import write_folder
from wan_testing import random_jax_model, rel_err, tiny_text_pipeline, write_jax_pipeline

SIZE = ["--height", "64", "--width", "64", "--frames", "5", "--steps", "3", "--quiet"]
SPARSE = ["--q-clusters", "4", "--k-clusters", "8", "--density", "0.5", "--dense-steps", "1"]


@pytest.fixture(scope="module")
def wan_folder(tmp_path_factory):
  return write_jax_pipeline(tmp_path_factory.mktemp("cli_wan"), random_jax_model("t2v", seed=3))


@pytest.fixture(scope="module")
def hunyuan_folder(tmp_path_factory):
  root = tmp_path_factory.mktemp("cli_hunyuan")
  hunyuan_testing.export_numpy_checkpoint(hunyuan_testing.random_jax_model(seed=4),
                                          root / "transformer")
  (root / "scheduler").mkdir()
  (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(
      {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 7.0}))
  (root / "model_index.json").write_text(json.dumps(
      {"_class_name": "HunyuanVideoPipeline",
       "transformer": ["diffusers", "HunyuanVideoTransformer3DModel"],
       "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"]}))
  return root


def test_wan_embeddings_to_latents(wan_folder, tmp_path, capsys):
  rng = np.random.default_rng(0)
  pe = rng.standard_normal((1, 7, 16), dtype=np.float32)
  ne = rng.standard_normal((1, 7, 16), dtype=np.float32)
  save_file({"prompt_embeds": pe, "negative_prompt_embeds": ne}, str(tmp_path / "e.safetensors"))
  out, summary = tmp_path / "lat.safetensors", tmp_path / "run.json"
  assert main(["wan", str(wan_folder), "--prompt-embeds", str(tmp_path / "e.safetensors"),
               "--out", str(out), "--dtype", "fp32", "--seed", "5", "--guidance", "4",
               "--json", str(summary), *SIZE, *SPARSE, "--compensation", "mean",
               "--kmeans-iters", "3"]) == 0
  got = load_file(str(out))["latents"]
  attention = AttentionPolicy.sparse(SvgEarConfig.wan22_720p(
      num_q_clusters=4, num_k_clusters=8, density=0.5, compensation="mean", kmeans_iters=3),
      dense_layers=1)
  pipe = WanPipeline.from_pretrained(wan_folder, dtype=jnp.float32, attention=attention)
  want = pipe(jnp.asarray(pe), jnp.asarray(ne), height=64, width=64, num_frames=5,
              num_inference_steps=3, seed=5, guidance_scale=4.0, progress=False,
              schedule=SvgEarSchedule(dense_steps=1))
  assert got.shape == (1, 4, 2, 8, 8)
  assert rel_err(got, want.latents) < 1e-6
  report = json.loads(summary.read_text())
  assert report["steps"] == 3 and report["dense_steps"] == 1
  assert 0 < report["mean_sparse_density"] < 1
  assert "seconds_per_sparse_step" in capsys.readouterr().out


def test_hunyuan_embeddings_to_latents(hunyuan_folder, tmp_path):
  rng = np.random.default_rng(1)
  mask = np.zeros((1, 6), np.int64)
  mask[0, :4] = 1
  tensors = {"prompt_embeds": rng.standard_normal((1, 6, 16), dtype=np.float32),
             "prompt_attention_mask": mask,
             "pooled_prompt_embeds": rng.standard_normal((1, 8), dtype=np.float32)}
  save_file(tensors, str(tmp_path / "e.safetensors"))
  out = tmp_path / "lat.safetensors"
  assert main(["hunyuan", str(hunyuan_folder), "--prompt-embeds", str(tmp_path / "e.safetensors"),
               "--out", str(out), "--dtype", "fp32", "--attention", "dense", *SIZE]) == 0
  pipe = HunyuanVideoPipeline.from_pretrained(hunyuan_folder, dtype=jnp.float32)
  want = pipe(jnp.asarray(tensors["prompt_embeds"]), jnp.asarray(tensors["pooled_prompt_embeds"]),
              jnp.asarray(mask), height=64, width=64, num_frames=5, num_inference_steps=3,
              seed=0, progress=False)
  assert rel_err(load_file(str(out))["latents"], want.latents) < 1e-6


@pytest.mark.parametrize("extra, message", [
    (["--out", "x.gif"], "must end in .mp4 or .safetensors"),
    (["--out", "x.mp4"], "vae"),
    (["--out", "x.safetensors", "--true-cfg", "2"], "hunyuan option"),
    (["--out", "x.safetensors", "--seq-parallel", "2"], "needs 2 devices, this process has 1"),
    (["--out", "x.safetensors", "--data-parallel", "2"], "--data-parallel needs --seq-parallel"),
])
def test_errors(wan_folder, tmp_path, capsys, extra, message):
  save_file({"prompt_embeds": np.zeros((1, 7, 16), np.float32)}, str(tmp_path / "ok.safetensors"))
  extra = [str(tmp_path / e) if e.startswith("x.") else e for e in extra]
  assert main(["wan", str(wan_folder), "--prompt-embeds", str(tmp_path / "ok.safetensors"),
               "--attention", "dense", *SIZE, *extra]) == 1
  assert message in capsys.readouterr().err


def test_embeddings_file_errors(wan_folder, tmp_path, capsys):
  save_file({"prompt_embeds": np.zeros((1, 7, 16), np.float32), "bogus": np.zeros(1, np.float32)},
            str(tmp_path / "bad.safetensors"))
  (tmp_path / "corrupt.safetensors").write_bytes(b"not a safetensors file")
  for name, message in (("bad", "unknown keys ['bogus']"), ("none", "no such embeddings file"),
                        ("corrupt", "not a readable safetensors file")):
    assert main(["wan", str(wan_folder), "--prompt-embeds", str(tmp_path / f"{name}.safetensors"),
                 "--out", str(tmp_path / "x.safetensors"), *SIZE]) == 1
    assert message in capsys.readouterr().err
  assert not (tmp_path / "x.safetensors").exists()


def test_prompt_to_mp4(tmp_path_factory, tmp_path):
  pytest.importorskip("torch", reason="builds the pipeline with diffusers")
  pytest.importorskip("diffusers")
  pytest.importorskip("transformers")
  tok = write_folder(tmp_path_factory.mktemp("cli_tok") / "tokenizer", with_transformers=True)
  folder = tmp_path_factory.mktemp("cli_text")
  tiny_text_pipeline(folder, tok)
  out = tmp_path / "fox.mp4"
  assert main(["wan", str(folder), "--prompt", "a red fox in the snow", "--out", str(out),
               "--wan-negative", "--dtype", "fp32", "--attention", "dense", *SIZE]) == 0
  assert out.stat().st_size > 0
