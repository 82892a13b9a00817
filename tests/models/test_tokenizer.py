"""`models.tokenizer.Tokenizer` (ids and masks equal to transformers' fast tokenizer on the
same folder, padding/truncation semantics, folder errors; a slow CLIPTokenizer folder with
only vocab.json + merges.txt equal to transformers' CLIP tokenizers) and `models.prompt`
cleaning."""

import json
from pathlib import Path

import numpy as np
import pytest

from models import prompt as prompt_lib
from models.prompt import prompt_clean
from models.tokenizer import Tokenizer, TokenizerError

tokenizers = pytest.importorskip("tokenizers")

SENTENCES = [
    "A cat walks on the grass in the sunny garden.",
    "A dog runs along the beach at sunset, waves crashing behind it.",
    "Two astronauts float inside a space station, looking at the earth.",
    "The camera slowly pans across a snowy mountain range at dawn.",
    "A red car drives through a rainy city street at night with neon lights.",
]
PROMPTS = [
    "A cat walks on the beach.",
    "",
    "Two red cars drive through the snowy mountain city at night, the camera pans slowly "
    "across the neon lights of the rainy street while waves crash behind them.",
    "a dog <extra_id_0> runs",
    "unknownwordxyz \u00e9t\u00e9 \u4e2d\u6587",
]
SPECIALS = ["<pad>", "</s>", "<unk>"]
CLIP_MERGES = ["t h", "th e</w>", "c a", "ca t</w>", "a n", "an d</w>", "i n", "in g</w>",
               "' s</w>", "o n</w>", "w a", "wa l", "wal k", "walk s</w>", "c a", "d o"]
CLIP_PROMPTS = [
    "A cat walks on the grass.",
    "THE  CATS\tand   dogs walking!!",
    "",
    "Don't stop: 3.14 caf\u00e9s, it's 12 o'clock \u4e2d\u6587",
    "the cat and the dog " * 20,  # > 77 tokens: truncated
    "a <|startoftext|> in <|endoftext|> text",
]


def build_backend():
  """A small T5-like Unigram tokenizer: <pad>=0, </s>=1, <unk>=2, Metaspace, `$A </s>`."""
  from tokenizers import (AddedToken, Tokenizer as Backend, models, normalizers,
                          pre_tokenizers, processors, trainers)

  tok = Backend(models.Unigram())
  tok.normalizer = normalizers.NFKC()
  tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
  trainer = trainers.UnigramTrainer(vocab_size=120, special_tokens=SPECIALS, unk_token="<unk>",
                                    show_progress=False)
  tok.train_from_iterator(SENTENCES, trainer=trainer)
  tok.add_special_tokens([AddedToken("<extra_id_0>", special=True)])
  eos = tok.token_to_id("</s>")
  tok.post_processor = processors.TemplateProcessing(
      single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", eos)])
  return tok


def write_folder(folder: Path, *, padding_side: str = "right", model_max_length: int = 512,
                 with_transformers: bool = False) -> Path:
  """A `tokenizer/` folder: transformers' `PreTrainedTokenizerFast.save_pretrained` when
  `with_transformers` (skips without transformers), else tokenizer.json plus hand-written
  tokenizer_config.json / special_tokens_map.json."""
  backend = build_backend()
  folder.mkdir(parents=True, exist_ok=True)
  if with_transformers:
    transformers = pytest.importorskip("transformers")
    wrapper = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
        model_max_length=model_max_length, padding_side=padding_side)
    wrapper.save_pretrained(str(folder))
  else:
    backend.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"model_max_length": model_max_length, "padding_side": padding_side,
         "eos_token": "</s>"}))
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"pad_token": {"content": "<pad>", "lstrip": False}, "eos_token": "</s>",
         "unk_token": "<unk>"}))
  return folder


def write_slow_clip_folder(folder: Path) -> Path:
  """A `tokenizer_2/` folder as transformers 4's slow `CLIPTokenizer.save_pretrained` writes
  it (vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json; no
  tokenizer.json): a byte-level vocabulary, its `</w>` forms, a few merges."""
  from tokenizers import pre_tokenizers

  merges = list(dict.fromkeys(CLIP_MERGES))
  chars = sorted(pre_tokenizers.ByteLevel.alphabet())
  tokens = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges]
  vocab = {t: i for i, t in enumerate([*tokens, "<|startoftext|>", "<|endoftext|>"])}
  folder.mkdir(parents=True)
  (folder / "vocab.json").write_text(json.dumps(vocab))
  (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
  special = lambda content, normalized: dict(content=content, lstrip=False, rstrip=False,
                                             normalized=normalized, single_word=False)
  sot, eot = special("<|startoftext|>", True), special("<|endoftext|>", False)
  (folder / "tokenizer_config.json").write_text(json.dumps({
      "added_tokens_decoder": {str(vocab[t["content"]]): {**t, "special": True}
                               for t in (sot, eot)},
      "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
      "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "model_max_length": 77,
      "tokenizer_class": "CLIPTokenizer", "do_lower_case": True, "errors": "replace",
      "clean_up_tokenization_spaces": True}))
  (folder / "special_tokens_map.json").write_text(json.dumps(
      {"bos_token": sot, "eos_token": eot, "pad_token": "<|endoftext|>", "unk_token": eot}))
  return folder


# ---------------------------------------------------------------------------------------------
# Against transformers (skipped where it is not installed)


@pytest.mark.parametrize("name", ["CLIPTokenizer", "CLIPTokenizerFast"])
def test_slow_clip_folder_matches_transformers(tmp_path, name):
  transformers = pytest.importorskip("transformers")
  folder = write_slow_clip_folder(tmp_path / "tokenizer_2")
  ref = getattr(transformers, name).from_pretrained(str(folder))
  ours = Tokenizer.from_pretrained(folder)
  assert not (folder / "tokenizer.json").exists()
  assert (ours.pad_token_id, ours.eos_token_id) == (ref.pad_token_id, ref.eos_token_id)
  assert ours.model_max_length == ref.model_max_length == 77
  # as hunyuan.text.clip_pooled_embeds calls it, then a short truncation, then no specials
  cases = [dict(max_length=77, padding="max_length", truncation=True),
           dict(max_length=None, padding="longest", truncation=False),
           dict(max_length=8, padding="max_length", truncation=True),
           dict(max_length=None, padding="max_length", truncation=True,
                add_special_tokens=False)]
  for kw in cases:
    want = ref(CLIP_PROMPTS, return_attention_mask=True, return_tensors="np", **kw)
    ids, mask = ours(CLIP_PROMPTS, **kw)
    np.testing.assert_array_equal(ids, want["input_ids"], err_msg=str(kw))
    np.testing.assert_array_equal(mask, want["attention_mask"], err_msg=str(kw))
  ids, mask = ours(CLIP_PROMPTS, max_length=77)
  assert mask[4].all() and ids[4, -1] == ours.eos_token_id  # truncated, end of text kept


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_matches_transformers_fast_tokenizer(tmp_path, padding_side):
  transformers = pytest.importorskip("transformers")
  folder = write_folder(tmp_path / "tok", padding_side=padding_side, with_transformers=True)
  ref = transformers.AutoTokenizer.from_pretrained(str(folder))
  ours = Tokenizer.from_pretrained(folder)
  assert (ours.pad_token_id, ours.eos_token_id) == (ref.pad_token_id, ref.eos_token_id)
  assert ours.padding_side == ref.padding_side == padding_side
  assert ours.model_max_length == ref.model_max_length == 512
  cases = [dict(max_length=512, padding="max_length", truncation=True),
           dict(max_length=12, padding="max_length", truncation=True),
           dict(max_length=12, padding="max_length", truncation=True, add_special_tokens=False),
           dict(max_length=64, padding="longest", truncation=True),
           dict(max_length=None, padding="max_length", truncation=True)]
  for kw in cases:
    want = ref(PROMPTS, return_attention_mask=True, return_tensors="np", **kw)
    ids, mask = ours(PROMPTS, **kw)
    assert ids.dtype == mask.dtype == np.int32
    np.testing.assert_array_equal(ids, want["input_ids"], err_msg=str(kw))
    np.testing.assert_array_equal(mask, want["attention_mask"], err_msg=str(kw))
  # The cases must exercise truncation, padding, the unknown and the added special token.
  ids, mask = ours(PROMPTS, max_length=12)
  assert mask[2].all() and ids[2, -1] == ours.eos_token_id  # truncated, EOS kept
  assert list(ids[1][mask[1] == 1]) == [ours.eos_token_id]  # "" is just EOS
  ids, _ = ours(PROMPTS, max_length=512)
  assert ours.backend.token_to_id("<extra_id_0>") in ids[3]
  assert ours.backend.token_to_id("<unk>") in ids[4]


# ---------------------------------------------------------------------------------------------
# Without transformers


def test_padding_and_truncation_semantics(tmp_path):
  tok = Tokenizer.from_pretrained(write_folder(tmp_path / "tok"))
  assert (tok.pad_token, tok.pad_token_id, tok.eos_token_id) == ("<pad>", 0, 1)
  raw = [tok.backend.encode(p).ids for p in PROMPTS]
  assert all(r[-1] == 1 for r in raw)
  ids, mask = tok(PROMPTS, max_length=16)
  assert ids.shape == mask.shape == (len(PROMPTS), 16)
  for row, m, r in zip(ids, mask, raw):
    n = min(len(r), 16)
    assert m.sum() == n and m[:n].all()
    assert row[n - 1] == 1  # EOS last, also after truncation
    np.testing.assert_array_equal(row[:n - 1], r[:n - 1])
    assert (row[n:] == 0).all()
  assert len(raw[2]) > 16
  ids, mask = tok(PROMPTS[:2], max_length=40, padding="longest")
  assert ids.shape[1] == max(len(r) for r in raw[:2])
  ids, _ = tok(PROMPTS[:2], max_length=8, add_special_tokens=False)
  assert 1 not in ids[0]
  with pytest.raises(ValueError, match="cannot be padded"):
    tok(PROMPTS, max_length=8, truncation=False)


def test_left_padding_and_pipeline_folder(tmp_path):
  write_folder(tmp_path / "pipe" / "tokenizer", padding_side="left")
  tok = Tokenizer.from_pretrained(tmp_path / "pipe")  # finds tokenizer/
  ids, mask = tok(["A cat."], max_length=10)
  n = int(mask.sum())
  assert (mask[0, :10 - n] == 0).all() and mask[0, 10 - n:].all()
  assert ids[0, -1] == 1 and (ids[0, :10 - n] == 0).all()


def test_slow_clip_folder(tmp_path):
  tok = Tokenizer.from_pretrained(write_slow_clip_folder(tmp_path / "pipe" / "tokenizer"))
  vocab = tok.backend.get_vocab()
  sot, eot = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
  assert (tok.pad_token_id, tok.eos_token_id, tok.model_max_length) == (eot, eot, 77)
  ids, mask = tok(["The  CAT walks", ""], max_length=7)
  want = [sot, vocab["the</w>"], vocab["cat</w>"], vocab["walks</w>"], eot, eot, eot]
  np.testing.assert_array_equal(ids, [want, [sot, eot] + [eot] * 5])
  np.testing.assert_array_equal(mask, [[1] * 5 + [0] * 2, [1] * 2 + [0] * 5])
  assert Tokenizer.from_pretrained(tmp_path / "pipe").backend.get_vocab() == vocab
  config = tmp_path / "pipe" / "tokenizer" / "tokenizer_config.json"
  raw = json.loads(config.read_text())
  config.write_text(json.dumps({**raw, "tokenizer_class": "GPT2Tokenizer"}))
  with pytest.raises(TokenizerError, match="only for a CLIPTokenizer .*'GPT2Tokenizer'"):
    Tokenizer.from_pretrained(tmp_path / "pipe" / "tokenizer")
  config.write_text(json.dumps({**raw, "added_tokens_decoder": {
      "3": raw["added_tokens_decoder"][str(sot)]}}))
  with pytest.raises(TokenizerError, match="has id .*, not 3"):
    Tokenizer.from_pretrained(tmp_path / "pipe" / "tokenizer")


def test_folder_errors(tmp_path):
  with pytest.raises(TokenizerError, match="no such tokenizer folder"):
    Tokenizer.from_pretrained(tmp_path / "absent")
  (tmp_path / "empty").mkdir()
  with pytest.raises(TokenizerError, match="no tokenizer.json"):
    Tokenizer.from_pretrained(tmp_path / "empty")
  bad = write_folder(tmp_path / "bad")
  (bad / "tokenizer.json").write_text("{not json")
  with pytest.raises(TokenizerError, match="cannot read"):
    Tokenizer.from_pretrained(bad)
  odd = write_folder(tmp_path / "odd")
  (odd / "tokenizer_config.json").write_text(json.dumps({"pad_token": "<nope>"}))
  with pytest.raises(TokenizerError, match="not in the vocabulary"):
    Tokenizer.from_pretrained(odd)
  (odd / "tokenizer_config.json").write_text("[1]")
  with pytest.raises(TokenizerError, match="expected a JSON object"):
    Tokenizer.from_pretrained(odd)


# ---------------------------------------------------------------------------------------------
# Prompt cleaning


@pytest.mark.parametrize("text,want", [
    ("  A  cat\t\twalks\n\non   grass  ", "A cat walks on grass"),
    ("Tom &amp; Jerry", "Tom & Jerry"),
    ("Tom &amp;amp; Jerry", "Tom & Jerry"),  # unescaped twice
    ("&lt;b&gt;bold&lt;/b&gt; &quot;q&quot; &#39;s&#39;", "<b>bold</b> \"q\" 's'"),
    ("a\u00a0b\u3000c\u2003d", "a b c d"),  # Unicode spaces are whitespace too
    ("&nbsp;x&nbsp;", "x"),  # the entity becomes a space, then is stripped
    ("", ""),
])
def test_prompt_clean(text, want):
  assert prompt_clean(text) == want


def test_prompt_clean_matches_diffusers():
  pipeline_wan = pytest.importorskip("diffusers.pipelines.wan.pipeline_wan")
  for text in ["  A  cat\t&amp;amp;\n dog ", "&lt;x&gt;\u00a0y", "caf\u00c3\u00a9  ok"]:
    assert prompt_clean(text) == pipeline_wan.prompt_clean(text)
  assert (prompt_lib.ftfy is None) == (not pipeline_wan.is_ftfy_available())
