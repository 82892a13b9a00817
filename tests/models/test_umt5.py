"""UMT5 encoder: parity with transformers `UMT5EncoderModel` (tiny random model, float32,
single-file and sharded saves), Wan `encode_prompt` against diffusers'
`WanPipeline._get_t5_prompt_embeds`, relative position buckets, config validation, and the
loader's errors."""

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from checkpoint_testing import write_safetensors
from models import convert_common as cc
from models.prompt import prompt_clean
from models.tokenizer import Tokenizer
from models.wan.text import encode_prompt
from models.wan.umt5 import UMT5Config, UMT5Encoder, relative_position_buckets
from models.wan.umt5_convert import EMBED_KEYS, key_table, load_config, load_umt5, to_state_dict

from test_tokenizer import PROMPTS, write_folder

safetensors_numpy = pytest.importorskip("safetensors.numpy")
save_file = safetensors_numpy.save_file

TINY = dict(vocab_size=160, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
            relative_attention_num_buckets=32, relative_attention_max_distance=128)
REL_TOL = 1e-4


@nnx.jit
def forward(model: UMT5Encoder, ids, mask=None):
  return model(jnp.asarray(ids), None if mask is None else jnp.asarray(mask))


def rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / np.abs(b).max())


def random_ids(seed: int, batch: int, length: int, vocab: int):
  """Random ids and right-padded masks (row 0 full, others shorter; pads hold id 0)."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(1, vocab, (batch, length)).astype(np.int32)
  lens = [length] + list(rng.integers(1, length, batch - 1))
  mask = (np.arange(length)[None] < np.asarray(lens)[:, None]).astype(np.int32)
  return ids * mask, mask


def hf_config_json(**overrides):
  return {"model_type": "umt5", "feed_forward_proj": "gated-gelu", "layer_norm_epsilon": 1e-6,
          **TINY, **overrides}


def random_jax_model(seed: int = 0, **cfg) -> UMT5Encoder:
  """Random weights drawn with NumPy, scaled like transformers' init; norm weights around 1
  (not all 1, so that two swapped norms would show)."""
  cfg = UMT5Config(**{**TINY, **cfg})
  model = nnx.eval_shape(lambda: UMT5Encoder(cfg, rngs=nnx.Rngs(0)))
  rng = np.random.default_rng(seed)
  for path, var in cc.param_variables(model).items():
    spec = var.get_value()
    scale = {"weight": 0.2, "kernel": spec.shape[0] ** -0.5}.get(path[-1], 1.0)
    value = rng.standard_normal(spec.shape) * scale
    var.set_value(jnp.asarray(value + (path[-1] == "weight"), spec.dtype))
  return model


def export(model: UMT5Encoder, folder: Path, *, shards: int = 1, embed_keys=EMBED_KEYS[:1],
           **config_overrides) -> Path:
  """A transformers-style save of `model` written with NumPy (no torch)."""
  folder.mkdir(parents=True, exist_ok=True)
  state = to_state_dict(model)
  emb = state.pop(EMBED_KEYS[0])
  for key in embed_keys:
    state[key] = emb
  (folder / "config.json").write_text(json.dumps(hf_config_json(**config_overrides)))
  write_safetensors(dict(sorted(state.items())), folder, shards, save_file, stem="model",
                    index_metadata={})
  return folder


# ---------------------------------------------------------------------------------------------
# Parity with transformers / diffusers (skipped without torch)


@pytest.fixture(scope="module")
def torch_umt5(tmp_path_factory):
  """(transformers UMT5EncoderModel with random weights, single-file save, sharded save)."""
  torch = pytest.importorskip("torch", reason="parity tests need torch")
  transformers = pytest.importorskip("transformers", reason="parity tests need transformers")
  torch.manual_seed(0)
  cfg = transformers.UMT5Config(**TINY, feed_forward_proj="gated-gelu", dropout_rate=0.0)
  model = transformers.UMT5EncoderModel(cfg).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("layer_norm.weight"):
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
  root = tmp_path_factory.mktemp("umt5")
  model.save_pretrained(str(root / "single"))
  model.save_pretrained(str(root / "sharded"), max_shard_size="20KB")
  assert len(list((root / "sharded").glob("*.safetensors"))) > 2
  return model, root / "single", root / "sharded"


@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_parity_with_transformers(torch_umt5, layout):
  import torch

  model, single, sharded = torch_umt5
  ours = UMT5Encoder.from_pretrained(single if layout == "single" else sharded)
  # 150 tokens: relative distances past max_distance (128) reach the clamped last bucket.
  for seed, (batch, length) in enumerate([(4, 40), (2, 150)]):
    ids, mask = random_ids(seed, batch, length, TINY["vocab_size"])
    with torch.no_grad():
      want = model(input_ids=torch.from_numpy(ids).long(),
                   attention_mask=torch.from_numpy(mask).long()).last_hidden_state.numpy()
    got = forward(ours, ids, mask)
    assert got.dtype == jnp.float32 and got.shape == want.shape
    assert rel_err(got, want) < REL_TOL, (layout, length, rel_err(got, want))
    # Padded query rows too, as transformers computes them.
    assert rel_err(got[1], want[1]) < REL_TOL


def test_buckets_match_transformers(torch_umt5):
  import torch
  import transformers

  for buckets, max_distance in [(32, 128), (16, 20), (64, 300)]:
    cfg = transformers.UMT5Config(**{**TINY, "relative_attention_num_buckets": buckets,
                                     "relative_attention_max_distance": max_distance})
    attn = transformers.models.umt5.modeling_umt5.UMT5Attention(cfg, True)
    pos = torch.arange(700)
    want = attn._relative_position_bucket(pos[None, :] - pos[:, None]).numpy()
    np.testing.assert_array_equal(relative_position_buckets(700, buckets, max_distance), want)


def test_encode_prompt_matches_diffusers(torch_umt5, tmp_path):
  import torch

  diffusers = pytest.importorskip("diffusers")
  transformers = pytest.importorskip("transformers")
  model, single, _ = torch_umt5
  folder = write_folder(tmp_path / "tokenizer", with_transformers=True)
  pipe = diffusers.WanPipeline(tokenizer=transformers.AutoTokenizer.from_pretrained(str(folder)),
                               text_encoder=model, vae=None, scheduler=None)
  prompts = [p + "  &amp; \n more" for p in PROMPTS]  # cleaning happens on both sides
  with torch.no_grad():
    want = pipe._get_t5_prompt_embeds(prompts, num_videos_per_prompt=2,
                                      max_sequence_length=512,
                                      device=torch.device("cpu")).numpy()
  tok = Tokenizer.from_pretrained(folder)
  got = encode_prompt(prompts, tokenizer=tok, text_encoder=UMT5Encoder.from_pretrained(single),
                      num_videos_per_prompt=2)
  assert got.shape == want.shape == (2 * len(prompts), 512, TINY["d_model"])
  assert rel_err(got, want) < REL_TOL
  got = np.asarray(got)
  _, mask = tok([prompt_clean(p) for p in prompts for _ in range(2)], max_length=512)
  lens = mask.sum(1)
  assert 1 <= lens.min() < lens.max() < 512
  for row, n in zip(got, lens):
    assert (row[n:] == 0).all() and (np.abs(row[:n]).sum(-1) > 0).all()


# ---------------------------------------------------------------------------------------------
# Without torch


def test_bucket_values():
  b = relative_position_buckets(300, 32, 128)  # b[q, k] for rel = k - q
  assert b[0, 0] == 0 and b[1, 0] == 1 and b[0, 1] == 17  # keys after the query: upper half
  assert b[0, 7] == 16 + 7 and b[7, 0] == 7  # exact below num_buckets // 4
  assert b[0, 8] == 16 + 8 and b[0, 16] == 16 + 10  # 8 + int(log(16/8)/log(16) * 8) = 10
  assert b[0, 127] == 31 and b[0, 299] == 31 and b[299, 0] == 15  # clamped
  assert b.dtype == np.int32 and b.min() == 0 and b.max() == 31


def test_padding_does_not_leak():
  model = random_jax_model(0)
  ids, mask = random_ids(3, 3, 24, TINY["vocab_size"])
  out = forward(model, ids, mask)
  other = np.where(mask > 0, ids, (ids + 7) % TINY["vocab_size"])
  out2 = forward(model, other, mask)
  real = mask[..., None] > 0
  np.testing.assert_allclose(np.where(real, out, 0), np.where(real, out2, 0), rtol=0, atol=1e-6)
  assert not np.allclose(out, out2)  # the pad rows themselves did change
  full = forward(model, ids)  # attention_mask=None: everything attends
  assert not np.allclose(np.where(real, full, 0), np.where(real, out, 0))


@pytest.mark.parametrize("shards,embed_keys", [(1, EMBED_KEYS[:1]), (3, EMBED_KEYS[1:]),
                                               (2, EMBED_KEYS)])
def test_loader_round_trip(tmp_path, shards, embed_keys):
  model = random_jax_model(1)
  folder = export(model, tmp_path / "pipe" / "text_encoder", shards=shards,
                  embed_keys=embed_keys)
  loaded = load_umt5(tmp_path / "pipe")  # finds text_encoder/
  want, got = cc.param_variables(model), cc.param_variables(loaded)
  assert set(want) == set(got)
  for path in want:
    np.testing.assert_array_equal(got[path].get_value(), want[path].get_value(), err_msg=str(path))
  ids, mask = random_ids(0, 2, 12, TINY["vocab_size"])
  np.testing.assert_array_equal(forward(loaded, ids, mask), forward(model, ids, mask))
  assert folder.name == "text_encoder"


def test_bf16_load(tmp_path):
  model = random_jax_model(2)
  folder = export(model, tmp_path / "te")
  bf16 = UMT5Encoder.from_pretrained(folder, dtype="bf16")
  variables = cc.param_variables(bf16)
  assert variables[("blocks", 0, "attn", "q", "kernel")].get_value().dtype == jnp.bfloat16
  # transformers keeps `wo` in float32 for float16 loads only (_keep_in_fp32_modules).
  assert variables[("blocks", 0, "ffn", "wo", "kernel")].get_value().dtype == jnp.bfloat16
  fp16 = cc.param_variables(UMT5Encoder.from_pretrained(folder, dtype="fp16"))
  assert fp16[("blocks", 0, "ffn", "wo", "kernel")].get_value().dtype == jnp.float32
  assert fp16[("blocks", 0, "ffn", "wi_0", "kernel")].get_value().dtype == jnp.float16
  ids, mask = random_ids(1, 2, 16, TINY["vocab_size"])
  out = forward(bf16, ids, mask)
  assert out.dtype == jnp.bfloat16
  assert rel_err(out, forward(model, ids, mask)) < 5e-2


def test_loader_errors(tmp_path):
  model = random_jax_model(0)
  good = export(model, tmp_path / "good")
  state = to_state_dict(model)

  def variant(name, edit):
    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text((good / "config.json").read_text())
    sd = dict(state)
    edit(sd)
    save_file(sd, str(folder / "model.safetensors"))
    return folder

  key = "encoder.block.1.layer.0.SelfAttention.k.weight"
  missing = variant("missing", lambda sd: sd.pop(key))
  with pytest.raises(cc.CheckpointError, match=f"missing key '{key}'"):
    load_umt5(missing)
  extra = variant("extra", lambda sd: sd.update({"decoder.block.0.x.weight": np.zeros(3,
                                                                                    np.float32)}))
  with pytest.raises(cc.CheckpointError, match="unknown key 'decoder.block.0.x.weight'"):
    load_umt5(extra)
  shape = variant("shape", lambda sd: sd.update({key: np.zeros((32, 33), np.float32)}))
  with pytest.raises(cc.CheckpointError, match=rf"key '{key}' .* has shape \(32, 33\)"):
    load_umt5(shape)
  no_embed = variant("no_embed", lambda sd: sd.pop(EMBED_KEYS[0]))
  with pytest.raises(cc.CheckpointError, match="missing key 'shared.weight'"):
    load_umt5(no_embed)
  tied_shape = variant("tied_shape", lambda sd: sd.update(
      {EMBED_KEYS[1]: np.zeros((TINY["vocab_size"] + 1, 32), np.float32)}))
  with pytest.raises(cc.CheckpointError, match=f"key '{EMBED_KEYS[1]}' .* has shape"):
    load_umt5(tied_shape)

  truncated = tmp_path / "truncated"
  truncated.mkdir()
  (truncated / "config.json").write_text((good / "config.json").read_text())
  data = (good / "model.safetensors").read_bytes()
  (truncated / "model.safetensors").write_bytes(data[:len(data) // 2])
  with pytest.raises(cc.CheckpointError, match="truncated or corrupt"):
    load_umt5(truncated)

  (good / "config.json").unlink()
  with pytest.raises(cc.CheckpointError, match="no config.json"):
    load_umt5(good)
  (tmp_path / "pytorch_model.bin").write_bytes(b"\0")
  with pytest.raises(cc.CheckpointError, match="not supported"):
    load_umt5(tmp_path / "pytorch_model.bin")  # Wan's .pth is: see test_original_layouts
  t5 = export(model, tmp_path / "t5", model_type="t5")
  with pytest.raises(cc.CheckpointError, match="expected 'umt5'"):
    load_umt5(t5)
  # An explicit config wins over config.json; a different depth then misses keys.
  with pytest.raises(cc.CheckpointError, match="missing key 'encoder.block.2"):
    load_umt5(t5, config=UMT5Config(**{**TINY, "num_layers": 3}))


def test_config(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps(hf_config_json(num_decoder_layers=5,
                                                                  is_encoder_decoder=True)))
  assert load_config(tmp_path) == UMT5Config(**TINY)
  xxl = UMT5Config.umt5_xxl()
  assert (xxl.vocab_size, xxl.d_model, xxl.num_layers, xxl.num_heads * xxl.d_kv) == (
      256384, 4096, 24, 4096)
  assert len(key_table(xxl)) == 24 * 10 + 1
  for bad, match in [(dict(d_model=0), "d_model must be a positive integer"),
                     (dict(num_heads=2.5), "num_heads must be a positive integer"),
                     (dict(relative_attention_num_buckets=30), "multiple of 4"),
                     (dict(relative_attention_max_distance=8), "must exceed"),
                     (dict(feed_forward_proj="relu"), "not supported"),
                     (dict(layer_norm_epsilon=0.0), "layer_norm_epsilon")]:
    with pytest.raises(ValueError, match=match):
      UMT5Config(**{**TINY, **bad})
  with pytest.raises(ValueError, match="expected 'umt5'"):
    UMT5Config.from_hf_config(hf_config_json(model_type="mt5"))

