"""`models.tokenizer.Tokenizer` (ids and masks equal to transformers' fast tokenizer on the
same folder, padding/truncation semantics, folder errors) and `models.prompt` cleaning."""

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


# ---------------------------------------------------------------------------------------------
# Against transformers (skipped where it is not installed)


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
