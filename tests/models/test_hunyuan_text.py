"""HunyuanVideo text encoders: `LlamaEncoder` and `CLIPTextEncoder` against transformers'
`LlamaModel` / `LlavaForConditionalGeneration` / `CLIPTextModel` (tiny random models,
float32, right and left padding, single-file and sharded saves), `encode_prompt` against
diffusers' `HunyuanVideoPipeline.encode_prompt`, `svg-ear-convert llama | clip` of
transformers' saves (outputs equal to the direct loads), and, without torch, the loaders'
round trips, key layouts, partial loads and errors."""

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from checkpoint_testing import write_safetensors
from models import convert_common as cc
from models.hunyuan import text_convert as tc
from models.hunyuan.clip import CLIPTextConfig, CLIPTextEncoder, pooled_positions
from models.hunyuan.llama import LlamaConfig, LlamaEncoder, rope_inv_freq
from models.hunyuan.text import DEFAULT_PROMPT_TEMPLATE, crop_start, encode_prompt
from models.tokenizer import Tokenizer

safetensors_numpy = pytest.importorskip("safetensors.numpy")
tokenizers = pytest.importorskip("tokenizers")
save_file = safetensors_numpy.save_file

LLAMA = dict(vocab_size=1000, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
             rms_norm_eps=1e-5, rope_theta=500000.0)
CLIP = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5)
REL_TOL = 1e-4
PROMPTS = [
    "A cat walks on the grass in the sunny garden.",
    "A dog runs along the beach at sunset, waves crashing behind it, while the camera slowly "
    "pans across the snowy mountain range at dawn and a red car drives through a rainy city "
    "street at night with neon lights, two astronauts float inside a space station looking "
    "at the earth.",
    "unknownword",
]
LLAMA_SPECIALS = ["<pad>", "<unk>", "<|begin_of_text|>", "<|start_header_id|>",
                  "<|end_header_id|>", "<|eot_id|>"]


@nnx.jit
def llama_states(model, ids, mask):
  return model.hidden_states(ids, mask)


@nnx.jit
def clip_forward(model, ids, mask=None):
  return model(ids, mask)


def rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / np.abs(b).max())


def random_ids(seed: int, batch: int, length: int, vocab: int, *, side: str = "right"):
  """Random ids (pads hold 0) and masks: row 0 full, the others shorter."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(1, vocab, (batch, length)).astype(np.int32)
  lens = [length] + list(rng.integers(2, length, batch - 1))
  mask = (np.arange(length)[None] < np.asarray(lens)[:, None]).astype(np.int32)
  if side == "left":
    mask = mask[:, ::-1].copy()
  return ids * mask, mask


def randomize(model: nnx.Module, seed: int) -> nnx.Module:
  """Random weights drawn with NumPy into an abstract model; norm weights around 1."""
  rng = np.random.default_rng(seed)
  for path, var in cc.param_variables(model).items():
    spec = var.get_value()
    scale = {"weight": 0.2, "kernel": spec.shape[0] ** -0.5, "bias": 0.1}.get(path[-1], 1.0)
    value = rng.standard_normal(spec.shape) * scale + (path[-1] == "weight")
    var.set_value(jnp.asarray(value, spec.dtype))
  return model


def random_llama(seed: int = 0, **cfg) -> LlamaEncoder:
  cfg = LlamaConfig(**{**LLAMA, **cfg})
  return randomize(nnx.eval_shape(lambda: LlamaEncoder(cfg, rngs=nnx.Rngs(0))), seed)


def random_clip(seed: int = 0, **cfg) -> CLIPTextEncoder:
  cfg = CLIPTextConfig(**{**CLIP, "vocab_size": 200, **cfg})
  return randomize(nnx.eval_shape(lambda: CLIPTextEncoder(cfg, rngs=nnx.Rngs(0))), seed)


def llama_config_json(**overrides):
  return {"model_type": "llama", "architectures": ["LlamaModel"], **LLAMA, **overrides}


def export(state: dict, config: dict, folder: Path, *, shards: int = 1) -> Path:
  """A transformers-style save of a state dict written with NumPy (no torch)."""
  folder.mkdir(parents=True, exist_ok=True)
  (folder / "config.json").write_text(json.dumps(config))
  write_safetensors(dict(sorted(state.items())), folder, shards, save_file, stem="model",
                    index_metadata={})
  return folder


def assert_same_params(a: nnx.Module, b: nnx.Module):
  pa, pb = cc.param_variables(a), cc.param_variables(b)
  assert set(pa) == set(pb)
  for path in pa:
    np.testing.assert_array_equal(pa[path].get_value(), pb[path].get_value(), err_msg=str(path))


# ---------------------------------------------------------------------------------------------
# Tokenizers (tokenizers only; wrapped by transformers for diffusers' side)


def llama_backend():
  """A word-level stand-in for the Llama-3 tokenizer: the chat-template special tokens,
  BOS prepended by the post-processor."""
  from tokenizers import Tokenizer as Backend, models, pre_tokenizers, processors, trainers

  tok = Backend(models.WordLevel(unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.add_special_tokens(LLAMA_SPECIALS)
  trainer = trainers.WordLevelTrainer(special_tokens=LLAMA_SPECIALS, show_progress=False)
  tok.train_from_iterator([DEFAULT_PROMPT_TEMPLATE["template"], *PROMPTS[:2]], trainer=trainer)
  bos = tok.token_to_id("<|begin_of_text|>")
  tok.post_processor = processors.TemplateProcessing(
      single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
      special_tokens=[("<|begin_of_text|>", bos)])
  return tok


def clip_backend():
  """A word-level stand-in for CLIP's tokenizer: start and end of text around the words,
  the end-of-text token (also the pad) added last, so it has the largest id, as in CLIP."""
  from tokenizers import Tokenizer as Backend, models, normalizers, pre_tokenizers, processors
  from tokenizers import trainers

  tok = Backend(models.WordLevel(unk_token="<unk>"))
  tok.normalizer = normalizers.Lowercase()
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  trainer = trainers.WordLevelTrainer(special_tokens=["<unk>", "<|startoftext|>"],
                                      show_progress=False)
  tok.train_from_iterator(PROMPTS[:2], trainer=trainer)
  tok.add_special_tokens(["<|endoftext|>"])
  sot, eot = tok.token_to_id("<|startoftext|>"), tok.token_to_id("<|endoftext|>")
  assert eot == tok.get_vocab_size() - 1
  tok.post_processor = processors.TemplateProcessing(
      single="<|startoftext|> $A <|endoftext|>", pair="<|startoftext|> $A <|endoftext|> $B",
      special_tokens=[("<|startoftext|>", sot), ("<|endoftext|>", eot)])
  return tok


def write_tokenizer(folder: Path, backend, *, with_transformers: bool, **special) -> Path:
  """A tokenizer folder: transformers' save when `with_transformers`, else tokenizer.json
  and a hand-written tokenizer_config.json."""
  folder.mkdir(parents=True, exist_ok=True)
  if with_transformers:
    transformers = pytest.importorskip("transformers")
    transformers.PreTrainedTokenizerFast(tokenizer_object=backend, padding_side="right",
                                         **special).save_pretrained(str(folder))
  else:
    backend.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(special))
  return folder


def write_tokenizers(root: Path, *, with_transformers: bool):
  llama = write_tokenizer(root / "tokenizer", llama_backend(), with_transformers=with_transformers,
                          pad_token="<pad>", bos_token="<|begin_of_text|>",
                          eos_token="<|eot_id|>", unk_token="<unk>")
  clip = write_tokenizer(root / "tokenizer_2", clip_backend(), with_transformers=with_transformers,
                         pad_token="<|endoftext|>", bos_token="<|startoftext|>",
                         eos_token="<|endoftext|>", unk_token="<unk>", model_max_length=77)
  return llama, clip


# ---------------------------------------------------------------------------------------------
# Parity with transformers / diffusers (skipped without torch)


@pytest.fixture(scope="module")
def torch_models(tmp_path_factory):
  """transformers LlamaModel and CLIPTextModel with random weights, and their saves."""
  torch = pytest.importorskip("torch", reason="parity tests need torch")
  transformers = pytest.importorskip("transformers", reason="parity tests need transformers")
  torch.manual_seed(0)
  llama = transformers.LlamaModel(transformers.LlamaConfig(**LLAMA, bos_token_id=2,
                                                           pad_token_id=0)).eval()
  clip_vocab = clip_backend().get_vocab_size()
  clip = transformers.CLIPTextModel(transformers.CLIPTextConfig(
      **CLIP, vocab_size=clip_vocab, eos_token_id=2, bos_token_id=1, pad_token_id=1)).eval()
  with torch.no_grad():
    for model in (llama, clip):
      for name, p in model.named_parameters():
        if "norm" in name and name.endswith("weight"):
          p.copy_(1.0 + 0.2 * torch.randn_like(p))
        elif "norm" in name:
          p.copy_(0.1 * torch.randn_like(p))
  root = tmp_path_factory.mktemp("hunyuan_text")
  llama.save_pretrained(str(root / "llama"))
  llama.save_pretrained(str(root / "llama_sharded"), max_shard_size="30KB")
  assert len(list((root / "llama_sharded").glob("*.safetensors"))) > 2
  clip.save_pretrained(str(root / "clip"))
  return dict(llama=llama, clip=clip, root=root)


@pytest.mark.parametrize("layout,side", [("llama", "right"), ("llama_sharded", "left")])
def test_llama_parity(torch_models, layout, side):
  import torch

  ours = LlamaEncoder.from_pretrained(torch_models["root"] / layout)
  ids, mask = random_ids(0, 3, 48, LLAMA["vocab_size"], side=side)
  with torch.no_grad():
    out = torch_models["llama"](input_ids=torch.from_numpy(ids).long(),
                                attention_mask=torch.from_numpy(mask).long(),
                                output_hidden_states=True)
  want = [h.numpy() for h in out.hidden_states]
  got = llama_states(ours, jnp.asarray(ids), jnp.asarray(mask))
  assert len(got) == len(want) == LLAMA["num_hidden_layers"] + 1
  for i, (g, w) in enumerate(zip(got, want)):
    assert g.dtype == jnp.float32 and g.shape == w.shape
    assert rel_err(g, w) < REL_TOL, (i, rel_err(g, w))
    assert rel_err(g[1], w[1]) < REL_TOL  # the padded row, pad positions included
  np.testing.assert_allclose(got[-1], out.last_hidden_state.numpy(), rtol=0, atol=1e-5)
  # hidden_states[-3] alone (HunyuanVideo's) stops after layer N - 2, without the final norm.
  third = nnx.jit(lambda m, i, k: m(i, k, hidden_state_index=-3))(ours, jnp.asarray(ids),
                                                                  jnp.asarray(mask))
  np.testing.assert_array_equal(third, got[-3])


def test_llava_save_parity(torch_models, tmp_path):
  import torch
  import transformers

  text = transformers.LlamaConfig(**LLAMA)
  vision = transformers.CLIPVisionConfig(hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2,
                                         image_size=16, patch_size=8)
  torch.manual_seed(1)
  llava = transformers.LlavaForConditionalGeneration(transformers.LlavaConfig(
      text_config=text, vision_config=vision, image_token_index=999)).eval()
  llava.save_pretrained(str(tmp_path / "llava"))
  keys = json.loads((tmp_path / "llava" / "config.json").read_text())
  assert keys["model_type"] == "llava"
  ours = LlamaEncoder.from_pretrained(tmp_path / "llava", up_to_hidden_state=-3)
  assert ours.num_layers == LLAMA["num_hidden_layers"] - 2 and ours.norm is None
  ids, mask = random_ids(1, 2, 20, LLAMA["vocab_size"])
  with torch.no_grad():
    want = llava.model.language_model(input_ids=torch.from_numpy(ids).long(),
                                      attention_mask=torch.from_numpy(mask).long(),
                                      output_hidden_states=True).hidden_states[-3].numpy()
  got = nnx.jit(lambda m, i, k: m(i, k, hidden_state_index=-3))(ours, jnp.asarray(ids),
                                                                jnp.asarray(mask))
  assert rel_err(got, want) < REL_TOL


def test_llama3_rope_frequencies():
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

  scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
             "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
  raw = {**llama_config_json(), "head_dim": 64, "rope_scaling": scaling}
  hf = transformers.LlamaConfig(**{k: v for k, v in raw.items() if k != "model_type"})
  want, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, torch.device("cpu"))
  cfg = LlamaConfig.from_hf_config(raw)
  assert (cfg.rope_type, cfg.rope_original_max_position_embeddings) == ("llama3", 64)
  got = rope_inv_freq(cfg)
  # The three bands (kept, smoothed, divided by the factor) all occur.
  base = rope_inv_freq(cfg.replace(rope_type="default"))
  assert (got == base).any() and np.isclose(got, base / 8).any() and \
      ((got != base) & ~np.isclose(got, base / 8)).any()
  np.testing.assert_allclose(got, want.numpy(), rtol=1e-6)
  # transformers 5 rope_parameters saves read the same.
  new = {**llama_config_json(), "head_dim": 64,
         "rope_parameters": {**scaling, "rope_theta": 500000.0}}
  assert LlamaConfig.from_hf_config(new) == cfg
  dflt = transformers.LlamaConfig(**LLAMA)
  want, _ = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding \
      .compute_default_rope_parameters(dflt)
  np.testing.assert_allclose(rope_inv_freq(LlamaConfig(**LLAMA)), want.numpy(), rtol=1e-6)


def test_clip_parity(torch_models):
  import torch

  clip = torch_models["clip"]
  pooling = getattr(clip, "text_model", clip)  # transformers 5 flattened CLIPTextModel
  ours = CLIPTextEncoder.from_pretrained(torch_models["root"] / "clip")
  vocab = clip.config.vocab_size
  ids, mask = random_ids(2, 3, 77, vocab - 1)
  ids = np.where(mask > 0, ids, vocab - 1).astype(np.int32)  # pad with end-of-text (max id)
  for row, n in enumerate(mask.sum(1)):
    ids[row, n - 1] = vocab - 1
  for eos in (2, 7):  # 2: legacy argmax pooling; 7: the first position holding id 7
    if eos != 2:
      ids[:, 30] = eos
      pooling.eos_token_id = eos
      folder = torch_models["root"] / "clip"
      ours = tc.load_clip(folder, config=tc.load_clip_config(folder).replace(eos_token_id=eos))
    with torch.no_grad():
      want = clip(input_ids=torch.from_numpy(ids).long())
      masked = clip(input_ids=torch.from_numpy(ids).long(),
                    attention_mask=torch.from_numpy(mask).long())
    got = clip_forward(ours, jnp.asarray(ids))
    assert rel_err(got.last_hidden_state, want.last_hidden_state.numpy()) < REL_TOL
    assert rel_err(got.pooler_output, want.pooler_output.numpy()) < REL_TOL, eos
    got = clip_forward(ours, jnp.asarray(ids), jnp.asarray(mask))
    assert rel_err(got.last_hidden_state, masked.last_hidden_state.numpy()) < REL_TOL
    assert rel_err(got.pooler_output, masked.pooler_output.numpy()) < REL_TOL
  pooling.eos_token_id = 2


def test_encode_prompt_matches_diffusers(torch_models, tmp_path):
  import torch

  diffusers = pytest.importorskip("diffusers")
  transformers = pytest.importorskip("transformers")
  llama_tok, clip_tok = write_tokenizers(tmp_path, with_transformers=True)
  pipe = diffusers.HunyuanVideoPipeline(
      text_encoder=torch_models["llama"],
      tokenizer=transformers.AutoTokenizer.from_pretrained(str(llama_tok)),
      text_encoder_2=torch_models["clip"],
      tokenizer_2=transformers.AutoTokenizer.from_pretrained(str(clip_tok)),
      transformer=None, vae=None, scheduler=None)
  pipeline_module = diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video
  assert DEFAULT_PROMPT_TEMPLATE == pipeline_module.DEFAULT_PROMPT_TEMPLATE
  tok, tok_2 = Tokenizer.from_pretrained(llama_tok), Tokenizer.from_pretrained(clip_tok)
  llama = LlamaEncoder.from_pretrained(torch_models["root"] / "llama", up_to_hidden_state=-3)
  clip = CLIPTextEncoder.from_pretrained(torch_models["root"] / "clip")
  no_crop = {"template": DEFAULT_PROMPT_TEMPLATE["template"]}  # crop_start computed
  for template, max_len in [(DEFAULT_PROMPT_TEMPLATE, 256), (no_crop, 40)]:
    with torch.no_grad():
      want_embeds, want_pooled, want_mask = pipe.encode_prompt(
          PROMPTS, prompt_template=template, num_videos_per_prompt=2,
          max_sequence_length=max_len, device=torch.device("cpu"))
    embeds, mask, pooled = encode_prompt(
        PROMPTS, tokenizer=tok, text_encoder=llama, tokenizer_2=tok_2, text_encoder_2=clip,
        prompt_template=template, max_sequence_length=max_len, num_videos_per_prompt=2)
    assert embeds.shape == want_embeds.shape == (6, max_len, LLAMA["hidden_size"])
    assert rel_err(embeds, want_embeds.numpy()) < REL_TOL
    np.testing.assert_array_equal(mask, want_mask.numpy())
    assert pooled.shape == want_pooled.shape == (6, CLIP["hidden_size"])
    assert rel_err(pooled, want_pooled.numpy()) < REL_TOL
    lens = np.asarray(mask).sum(1)
    if template is no_crop:  # the crop ends right before the prompt
      assert 0 < lens.min() < lens.max() == max_len  # padding and truncation both happen
  n = len(tok([no_crop["template"]], padding="longest", truncation=False)[0][0])
  assert crop_start(tok, no_crop) == n - 2


def test_converted_encoders_equal_direct_loads(torch_models, tmp_path):
  from models.cli import main as cli_main

  root, pipe = torch_models["root"], tmp_path / "pipe"
  assert cli_main(["llama", str(root / "llama"), str(pipe / "text_encoder"),
                   "--quiet"]) == 0  # bf16 by default
  assert cli_main(["clip", str(root / "clip"), str(pipe / "text_encoder_2"), "--quiet"]) == 0
  third = nnx.jit(lambda m, i, k: m(i, k, hidden_state_index=-3))
  ids, mask = random_ids(4, 2, 24, LLAMA["vocab_size"])
  want = third(tc.load_llama(root / "llama", dtype="bf16", up_to_hidden_state=-3), ids, mask)
  got = third(LlamaEncoder.from_pretrained(pipe, dtype=None, up_to_hidden_state=-3), ids, mask)
  assert got.dtype == want.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
  ids, _ = random_ids(5, 2, 20, torch_models["clip"].config.vocab_size)
  want = clip_forward(tc.load_clip(root / "clip", dtype="bf16"), ids)
  got = clip_forward(CLIPTextEncoder.from_pretrained(pipe, dtype=None), ids)
  for g, w in zip(got, want):
    assert g.dtype == w.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32))


# ---------------------------------------------------------------------------------------------
# Without torch


# Keys each layout may hold besides the LlamaModel's (all ignored by the loader).
IGNORABLE = {
    "": {"layers.0.self_attn.rotary_emb.inv_freq": (4,)},
    "model.": {"lm_head.weight": (1000, 32), "model.layers.1.self_attn.rotary_emb.inv_freq": (4,)},
    "language_model.model.": {"language_model.lm_head.weight": (1000, 32),
                              "vision_tower.vision_model.post_layernorm.bias": (16,),
                              "multi_modal_projector.linear_1.weight": (32, 16),
                              "image_newline": (32,)},
    "model.language_model.": {"lm_head.weight": (1000, 32),
                              "model.vision_tower.vision_model.post_layernorm.bias": (16,),
                              "model.multi_modal_projector.linear_2.bias": (32,)},
}


@pytest.mark.parametrize("fmt", list(tc.LLAMA_FORMATS))
def test_llama_loader_layouts(tmp_path, fmt):
  model = random_llama(1)
  prefix = tc.LLAMA_FORMATS[fmt]
  state = tc.llama_to_state_dict(model, prefix)
  assert all(k.startswith(prefix) for k in state)
  state.update({k: np.zeros(shape, np.float32) for k, shape in IGNORABLE[prefix].items()})
  config = llama_config_json()
  if fmt.startswith("Llava"):
    config = {"model_type": "llava", "text_config": llama_config_json()}
  export(state, config, tmp_path / "pipe" / "text_encoder", shards=2)
  loaded = tc.load_llama(tmp_path / "pipe")  # finds text_encoder/
  assert_same_params(loaded, model)
  ids, mask = random_ids(0, 2, 12, LLAMA["vocab_size"])
  np.testing.assert_array_equal(llama_states(loaded, ids, mask)[-1],
                                llama_states(model, ids, mask)[-1])


def test_llama_partial_load_and_bf16(tmp_path):
  model = random_llama(2)
  folder = export(tc.llama_to_state_dict(model), llama_config_json(), tmp_path / "te")
  part = LlamaEncoder.from_pretrained(folder, up_to_hidden_state=-3)
  assert part.num_layers == 2 and part.norm is None and len(part.layers) == 2
  ids, mask = random_ids(3, 2, 16, LLAMA["vocab_size"])
  full = llama_states(model, ids, mask)
  run = nnx.jit(lambda m, i, k, index: m(i, k, hidden_state_index=index), static_argnums=3)
  np.testing.assert_array_equal(run(part, ids, mask, -3), full[-3])
  np.testing.assert_array_equal(run(part, ids, mask, 1), full[1])
  with pytest.raises(ValueError, match="holds only the first 2 of 4 layers"):
    part(jnp.asarray(ids), jnp.asarray(mask), hidden_state_index=-1)
  with pytest.raises(IndexError, match="out of range"):
    model(jnp.asarray(ids), hidden_state_index=5)
  bf16 = LlamaEncoder.from_pretrained(folder, dtype="bf16")
  out = run(bf16, ids, mask, -3)
  assert out.dtype == jnp.bfloat16 and rel_err(out, full[-3]) < 3e-2
  # Padding never leaks into real positions (causal + padding mask).
  other = np.where(mask > 0, ids, (ids + 7) % LLAMA["vocab_size"])
  a, b = run(model, ids, mask, -1), run(model, other, mask, -1)
  real = mask[..., None] > 0
  np.testing.assert_allclose(np.where(real, a, 0), np.where(real, b, 0), rtol=0, atol=1e-6)


@pytest.mark.parametrize("fmt", list(tc.CLIP_FORMATS))
def test_clip_loader_round_trip(tmp_path, fmt):
  model = random_clip(3)
  prefix = tc.CLIP_FORMATS[fmt]
  state = tc.clip_to_state_dict(model, prefix)
  state[f"{prefix}embeddings.position_ids"] = np.arange(77, dtype=np.float32)[None]
  state["text_projection.weight"] = np.zeros((32, 32), np.float32)
  config = {"model_type": "clip_text_model", **CLIP, "vocab_size": 200, "eos_token_id": 2}
  export(state, config, tmp_path / "pipe" / "text_encoder_2", shards=3)
  loaded = CLIPTextEncoder.from_pretrained(tmp_path / "pipe")
  assert_same_params(loaded, model)
  assert loaded.cfg.eos_token_id == 2
  ids = np.array([[5, 9, 199, 199], [3, 199, 4, 199]], np.int32)
  np.testing.assert_array_equal(pooled_positions(jnp.asarray(ids), 2), [2, 1])
  np.testing.assert_array_equal(pooled_positions(jnp.asarray(ids), 4), [0, 2])  # 0: absent
  out = clip_forward(loaded, ids)
  # the pooled rows are the EOS positions' hidden states (XLA may compute the two outputs
  # in different fusions: equal to rounding, not bit for bit)
  np.testing.assert_allclose(out.pooler_output, out.last_hidden_state[np.arange(2), [2, 1]],
                             rtol=0, atol=1e-6)


def test_loader_errors(tmp_path):
  model = random_llama(0)
  state = tc.llama_to_state_dict(model)
  good = export(state, llama_config_json(), tmp_path / "good")

  def variant(name, edit, config=None):
    sd = dict(state)
    edit(sd)
    return export(sd, config or llama_config_json(), tmp_path / name)

  key = "layers.1.self_attn.k_proj.weight"
  with pytest.raises(cc.CheckpointError, match=f"missing key '{key}'"):
    tc.load_llama(variant("missing", lambda sd: sd.pop(key)))
  with pytest.raises(cc.CheckpointError, match="unknown key 'lm_head.weight'"):
    # A bare LlamaModel save has no LM head: not ignored there.
    tc.load_llama(variant("extra", lambda sd: sd.update(
        {"lm_head.weight": np.zeros((1000, 32), np.float32)})))
  with pytest.raises(cc.CheckpointError, match=rf"key '{key}' .* has shape \(16, 33\)"):
    tc.load_llama(variant("shape", lambda sd: sd.update({key: np.zeros((16, 33), np.float32)})))
  # Shapes of the layers a partial load skips are checked all the same.
  late = "layers.3.mlp.up_proj.weight"
  with pytest.raises(cc.CheckpointError, match=f"key '{late}' .* has shape"):
    tc.load_llama(variant("late", lambda sd: sd.update({late: np.zeros((2, 2), np.float32)})),
                  up_to_hidden_state=-3)
  with pytest.raises(cc.CheckpointError, match="missing key 'embed_tokens.weight'"):
    tc.load_llama(variant("no_embed", lambda sd: sd.pop("embed_tokens.weight")))
  with pytest.raises(cc.CheckpointError, match="ambiguous"):
    tc.load_llama(variant("twice", lambda sd: sd.update(
        {"model.embed_tokens.weight": sd["embed_tokens.weight"]})))
  with pytest.raises(cc.CheckpointError, match="missing key 'layers.4"):
    tc.load_llama(good, config=LlamaConfig(**{**LLAMA, "num_hidden_layers": 5}))
  with pytest.raises(cc.CheckpointError, match="expected 'llama'"):
    tc.load_llama(variant("t5", lambda sd: None, {"model_type": "t5"}))
  with pytest.raises(cc.CheckpointError, match="not supported"):
    tc.load_llama(variant("yarn", lambda sd: None,
                          llama_config_json(rope_scaling={"rope_type": "yarn", "factor": 2.0})))
  with pytest.raises(cc.CheckpointError, match="not supported"):
    tc.load_llama(tmp_path / "pytorch_model.bin")
  with pytest.raises(cc.CheckpointError, match="no such file or folder"):
    tc.load_llama(tmp_path / "absent")
  (tmp_path / "empty").mkdir()
  (tmp_path / "empty" / "config.json").write_text(json.dumps(llama_config_json()))
  with pytest.raises(cc.CheckpointError, match="no .safetensors file"):
    tc.load_llama(tmp_path / "empty")
  (good / "config.json").unlink()
  with pytest.raises(cc.CheckpointError, match="no config.json"):
    tc.load_llama(good)

  clip = random_clip(0)
  cstate = tc.clip_to_state_dict(clip)
  cconfig = {"model_type": "clip_text_model", **CLIP, "vocab_size": 200}
  ckey = "text_model.encoder.layers.0.mlp.fc1.bias"
  sd = {k: v for k, v in cstate.items() if k != ckey}
  with pytest.raises(cc.CheckpointError, match=f"missing key '{ckey}'"):
    tc.load_clip(export(sd, cconfig, tmp_path / "c_missing"))
  sd = {**cstate, "vision_model.post_layernorm.weight": np.zeros(4, np.float32)}
  with pytest.raises(cc.CheckpointError, match="unknown key 'vision_model"):
    tc.load_clip(export(sd, cconfig, tmp_path / "c_extra"))
  sd = {**cstate, ckey: np.zeros(47, np.float32)}
  with pytest.raises(cc.CheckpointError, match=rf"key '{ckey}' .* has shape \(47,\)"):
    tc.load_clip(export(sd, cconfig, tmp_path / "c_shape"))
  with pytest.raises(cc.CheckpointError, match="expected 'clip_text_model'"):
    tc.load_clip(export(cstate, {**cconfig, "model_type": "clip"}, tmp_path / "c_full"))


def test_configs():
  assert LlamaConfig.from_hf_config(
      {"model_type": "llama", "rope_theta": 500000.0, "rope_scaling": None,
       "head_dim": None}) == LlamaConfig(rope_theta=500000.0)
  hv = LlamaConfig.llava_llama3_8b()
  assert (hv.head_dim, hv.num_key_value_heads, hv.rope_type) == (128, 8, "default")
  assert len(tc.llama_key_table(hv)) == 2 + 32 * 9
  assert LlamaConfig(**{**LLAMA, "num_key_value_heads": None}).num_key_value_heads == 4
  for bad, match in [(dict(hidden_size=0), "hidden_size must be a positive integer"),
                     (dict(num_key_value_heads=3), "must divide"),
                     (dict(hidden_act="gelu"), "not supported"),
                     (dict(rope_type="yarn"), "not supported"),
                     (dict(rope_theta=-1.0), "rope_theta must be a positive number"),
                     (dict(rms_norm_eps=0.0), "rms_norm_eps")]:
    with pytest.raises(ValueError, match=match):
      LlamaConfig(**{**LLAMA, **bad})
  with pytest.raises(ValueError, match="partial_rotary_factor"):
    LlamaConfig.from_hf_config(llama_config_json(partial_rotary_factor=0.5))
  with pytest.raises(ValueError, match="needs 'low_freq_factor'"):
    LlamaConfig.from_hf_config(llama_config_json(rope_scaling={"type": "llama3", "factor": 8}))
  clip_l = CLIPTextConfig.clip_l()
  assert (clip_l.hidden_size, clip_l.head_dim, clip_l.eos_token_id) == (768, 64, 2)
  assert CLIPTextConfig.from_hf_config({"model_type": "clip_text_model"}) == CLIPTextConfig()
  for bad, match in [(dict(num_attention_heads=5), "must divide"),
                     (dict(hidden_act="swish"), "not supported"),
                     (dict(layer_norm_eps=0), "layer_norm_eps")]:
    with pytest.raises(ValueError, match=match):
      CLIPTextConfig(**{**CLIP, **bad})
  with pytest.raises(ValueError, match="a list is not supported"):
    CLIPTextConfig.from_hf_config({"model_type": "clip_text_model", "eos_token_id": [2, 3]})
  with pytest.raises(ValueError, match="exceeds max_position_embeddings"):
    random_clip(0)(jnp.zeros((1, 78), jnp.int32))


def test_encode_prompt_shapes_and_crop_start(tmp_path):
  llama_tok, clip_tok = write_tokenizers(tmp_path, with_transformers=False)
  tok, tok_2 = Tokenizer.from_pretrained(llama_tok), Tokenizer.from_pretrained(clip_tok)
  assert tok.model_max_length is None
  template = {"template": DEFAULT_PROMPT_TEMPLATE["template"]}
  n = tok([template["template"]], padding="longest", truncation=False)[0].shape[1]
  assert crop_start(tok, template) == n - 2
  # diffusers pads the template to a finite model_max_length before counting.
  tok.model_max_length = 300
  assert crop_start(tok, template) == 298
  assert crop_start(tok, {**template, "crop_start": 0}) == 0
  tok.model_max_length = None
  llama = random_llama(4, vocab_size=tok.backend.get_vocab_size())
  clip = random_clip(5, vocab_size=tok_2.backend.get_vocab_size())
  embeds, mask, pooled = encode_prompt("A cat walks.", tokenizer=tok, text_encoder=llama,
                                       tokenizer_2=tok_2, text_encoder_2=clip,
                                       max_sequence_length=16, num_videos_per_prompt=3,
                                       dtype=jnp.bfloat16)
  assert embeds.shape == (3, 16, 32) and embeds.dtype == jnp.bfloat16
  assert mask.shape == (3, 16) and mask.dtype == jnp.int32
  assert pooled.shape == (3, 32) and pooled.dtype == jnp.float32  # as diffusers: not cast
  assert (np.asarray(embeds[0]) == np.asarray(embeds[2])).all()
  with pytest.raises(ValueError, match="'template' key"):
    encode_prompt("x", tokenizer=tok, text_encoder=llama, tokenizer_2=tok_2,
                  text_encoder_2=clip, prompt_template={"crop_start": 3})
  with pytest.raises(ValueError, match="num_videos_per_prompt"):
    encode_prompt("x", tokenizer=tok, text_encoder=llama, tokenizer_2=tok_2,
                  text_encoder_2=clip, num_videos_per_prompt=0)

