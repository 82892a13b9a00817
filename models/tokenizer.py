"""Text tokenizers from a local `tokenizer/` folder, through the `tokenizers` package only.

A diffusers pipeline's `tokenizer/` folder is a transformers `save_pretrained` of a fast
tokenizer: `tokenizer.json` (the complete `tokenizers` serialisation: normaliser,
pre-tokeniser, model, post-processor adding EOS/BOS, added tokens) plus
`tokenizer_config.json` / `special_tokens_map.json` (pad token, padding and truncation
sides, `model_max_length`). `Tokenizer.__call__` sets padding and truncation on the backend
exactly as transformers' `PreTrainedTokenizerFast.__call__` does
(`set_truncation_and_padding`) and returns NumPy arrays, so the ids and masks are the ones
transformers gives on the same folder; neither transformers nor torch is needed.

A folder saved by a slow (pure-Python) `CLIPTokenizer`, such as some HunyuanVideo
`tokenizer_2/` folders, has `vocab.json` + `merges.txt` and no tokenizer.json; the backend is
then built from them as transformers' `CLIPTokenizerFast` conversion does
(`convert_slow_tokenizer.CLIPConverter`: byte-level BPE with the `</w>` end-of-word
suffix, NFC + whitespace folding + lowercasing, CLIP's split pattern,
`<|startoftext|> $A <|endoftext|>`), see `clip_backend`.

Caveat: transformers 5's model-specific classes with their own `__init__` (e.g.
`T5Tokenizer`, which the Wan `tokenizer/` folders name) rebuild the backend from the vocab
and replace the pre-tokeniser (WhitespaceSplit + Metaspace) instead of using the one in
tokenizer.json; this class always uses tokenizer.json as saved, like transformers 4's
`T5TokenizerFast`.
"""

import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_FILE = "special_tokens_map.json"
VOCAB_FILE, MERGES_FILE = "vocab.json", "merges.txt"  # a slow BPE tokenizer's files
CLIP_CLASSES = ("CLIPTokenizer", "CLIPTokenizerFast")
# The slow CLIPTokenizer's defaults (its pad token is end-of-text too).
CLIP_DEFAULTS = dict(bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                     unk_token="<|endoftext|>", pad_token="<|endoftext|>")
# The slow CLIPTokenizer reads at most this many merges (49152 - 256 bytes - 2 specials).
CLIP_MAX_MERGES = 49152 - 256 - 2
CLIP_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""

# transformers' "no limit" placeholder for model_max_length (VERY_LARGE_INTEGER).
_NO_MAX_LENGTH = int(1e30)


class TokenizerError(ValueError):
  """A tokenizer folder that cannot be used: the message names the folder or file."""


def _token_str(token: Any) -> Optional[str]:
  # Saved special tokens are either strings or AddedToken dicts {"content": ..., ...}.
  if token is None or isinstance(token, str):
    return token
  if isinstance(token, dict) and isinstance(token.get("content"), str):
    return token["content"]
  raise TokenizerError(f"cannot read special token {token!r}")


def _read_json(path: Path) -> Dict[str, Any]:
  if not path.is_file():
    return {}
  try:
    data = json.loads(path.read_text(encoding="utf-8"))
  except (OSError, ValueError) as err:
    raise TokenizerError(f"cannot parse {path}: {err}") from err
  if not isinstance(data, dict):
    raise TokenizerError(f"{path}: expected a JSON object")
  return data


def _read_bpe_files(folder: Path) -> Tuple[Dict[str, int], List[Tuple[str, str]]]:
  vocab = _read_json(folder / VOCAB_FILE)
  if not all(isinstance(k, str) and isinstance(v, int) for k, v in vocab.items()):
    raise TokenizerError(f"{folder / VOCAB_FILE}: expected an object of token -> id")
  path = folder / MERGES_FILE
  try:
    lines = path.read_text(encoding="utf-8").strip().split("\n")
  except (OSError, UnicodeDecodeError) as err:
    raise TokenizerError(f"cannot read {path}: {err}") from err
  if lines and lines[0].startswith("#version"):
    lines = lines[1:]
  merges = []
  for number, line in enumerate(lines[:CLIP_MAX_MERGES], start=2):
    pair = tuple(line.split())
    if len(pair) != 2:
      raise TokenizerError(f"{path}, line {number}: expected two tokens, got {line!r}")
    merges.append(pair)
  return vocab, merges


def _special_token(token: Any):
  """A `tokenizers.AddedToken` (special, not normalized unless the saved flags say so)."""
  from tokenizers import AddedToken

  if isinstance(token, dict):
    flags = {k: bool(token[k]) for k in ("single_word", "lstrip", "rstrip", "normalized",
                                          "special") if k in token}
    return AddedToken(token["content"], **{"special": True, "normalized": False, **flags})
  return AddedToken(token, special=True, normalized=False)


def clip_backend(vocab: Dict[str, int], merges: Sequence[Tuple[str, str]], *,
                 bos_token: str, eos_token: str, unk_token: str,
                 added_tokens: Sequence[Any] = (), name: str = "tokenizer"):
  """The `tokenizers.Tokenizer` transformers' `CLIPTokenizerFast` builds from a slow
  `CLIPTokenizer`'s vocabulary and merges (`CLIPConverter`).

  Args:
    vocab: byte-level token -> id (words end in "</w>").
    merges: BPE merges in rank order.
    bos_token, eos_token, unk_token: CLIP's start / end of text and unknown token.
    added_tokens: more special tokens to register (strings, or transformers' AddedToken
      dicts with their flags); bos / eos / unk are registered as well.
    name: the folder, for messages.

  Raises:
    TokenizerError: merges that do not fit the vocabulary, or an added token whose id is
      not where the folder says.
  """
  from tokenizers import Regex, Tokenizer as Backend, decoders, models, normalizers
  from tokenizers import pre_tokenizers, processors

  try:
    backend = Backend(models.BPE(vocab=dict(vocab), merges=list(merges), dropout=None,
                                 continuing_subword_prefix="", end_of_word_suffix="</w>",
                                 fuse_unk=False, unk_token=unk_token))
  except Exception as err:  # tokenizers raises a bare Exception on inconsistent merges
    raise TokenizerError(f"{name}: vocab.json and merges.txt do not form a BPE model: "
                         f"{err}") from err
  backend.normalizer = normalizers.Sequence(
      [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
  backend.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(CLIP_PATTERN), behavior="removed", invert=True),
      pre_tokenizers.ByteLevel(add_prefix_space=False)])
  backend.decoder = decoders.ByteLevel()
  added = [_special_token(t) for t in added_tokens]
  contents = {t.content for t in added}
  added += [_special_token(t) for t in dict.fromkeys((bos_token, eos_token, unk_token))
            if t not in contents]
  backend.add_special_tokens(added)
  for token in (bos_token, eos_token):
    if backend.token_to_id(token) is None:
      raise TokenizerError(f"{name}: {token!r} is not in the vocabulary")
  backend.post_processor = processors.RobertaProcessing(
      (eos_token, backend.token_to_id(eos_token)), (bos_token, backend.token_to_id(bos_token)),
      trim_offsets=False, add_prefix_space=False)
  return backend


def _slow_clip_backend(folder: Path, config: Dict[str, Any], tokens: Dict[str, Optional[str]]):
  """`clip_backend` of a slow CLIPTokenizer folder (vocab.json + merges.txt)."""
  cls = config.get("tokenizer_class")
  if cls not in CLIP_CLASSES:
    raise TokenizerError(
        f"{folder}: no {TOKENIZER_FILE}; its {VOCAB_FILE} + {MERGES_FILE} are read only for a "
        f"CLIPTokenizer ({CONFIG_FILE} names tokenizer_class {cls!r}); re-save the folder "
        "with transformers' fast tokenizer")
  vocab, merges = _read_bpe_files(folder)
  # transformers 4 saves list the special tokens here: {"49406": {"content": ..., flags}}.
  decoder = config.get("added_tokens_decoder") or {}
  try:
    listed = sorted(((int(k), t if isinstance(t, dict) else {"content": _token_str(t)})
                     for k, t in decoder.items()), key=lambda item: item[0])
  except (TypeError, ValueError) as err:
    raise TokenizerError(f"{folder / CONFIG_FILE}: bad added_tokens_decoder: {err}") from err
  backend = clip_backend(vocab, merges, bos_token=tokens["bos_token"],
                         eos_token=tokens["eos_token"], unk_token=tokens["unk_token"],
                         added_tokens=[t for _, t in listed], name=str(folder))
  for token_id, token in listed:
    if backend.token_to_id(token["content"]) != token_id:
      raise TokenizerError(f"{folder / CONFIG_FILE}: added token {token['content']!r} has id "
                           f"{backend.token_to_id(token['content'])}, not {token_id}")
  return backend


class Tokenizer:
  """A fast (Rust `tokenizers`) tokenizer with transformers' padding/truncation semantics.

  Attributes:
    backend: the `tokenizers.Tokenizer`.
    pad_token, eos_token: special token strings (None if the folder defines none).
    pad_token_id, eos_token_id: their ids.
    padding_side, truncation_side: "right" or "left" (tokenizer_config.json; default right).
    model_max_length: default `max_length` (None if the folder sets no limit).
    name: the folder, for messages.
  """

  def __init__(self, backend: Any, *, pad_token: Optional[str] = None,
               eos_token: Optional[str] = None, padding_side: str = "right",
               truncation_side: str = "right", model_max_length: Optional[int] = None,
               pad_token_type_id: int = 0, name: str = "tokenizer"):
    for what, side in (("padding_side", padding_side), ("truncation_side", truncation_side)):
      if side not in ("right", "left"):
        raise TokenizerError(f"{name}: {what} must be 'right' or 'left', got {side!r}")
    self.backend = backend
    self.name = name
    self.pad_token, self.eos_token = pad_token, eos_token
    self.pad_token_id = self._id_of(pad_token, "pad_token")
    self.eos_token_id = self._id_of(eos_token, "eos_token")
    self.padding_side, self.truncation_side = padding_side, truncation_side
    self.pad_token_type_id = pad_token_type_id
    if model_max_length is not None and model_max_length >= _NO_MAX_LENGTH:
      model_max_length = None
    self.model_max_length = model_max_length

  def _id_of(self, token: Optional[str], what: str) -> Optional[int]:
    if token is None:
      return None
    token_id = self.backend.token_to_id(token)
    if token_id is None:
      raise TokenizerError(f"{self.name}: {what} {token!r} is not in the vocabulary")
    return token_id

  @classmethod
  def from_pretrained(cls, folder: Union[str, os.PathLike]) -> "Tokenizer":
    """Loads a local tokenizer folder (or a pipeline folder holding `tokenizer/`).

    Raises:
      TokenizerError: no such folder, no tokenizer.json (nor a slow CLIPTokenizer's
        vocab.json + merges.txt), unreadable files, or a pad/eos token missing from the
        vocabulary.
    """
    try:
      from tokenizers import Tokenizer as Backend
    except ImportError as err:
      raise ImportError("models.tokenizer needs the `tokenizers` package "
                        "(pip install tokenizers)") from err

    folder = Path(folder)
    if not folder.is_dir():
      raise TokenizerError(f"{folder}: no such tokenizer folder")
    def files(f):
      return (f / TOKENIZER_FILE).is_file() or (f / VOCAB_FILE).is_file()

    if not files(folder) and (folder / "tokenizer").is_dir():
      folder = folder / "tokenizer"
    path = folder / TOKENIZER_FILE
    slow = not path.is_file() and (folder / VOCAB_FILE).is_file() and \
        (folder / MERGES_FILE).is_file()
    if not path.is_file() and not slow:
      raise TokenizerError(f"{folder}: no {TOKENIZER_FILE} (only fast-tokenizer folders and "
                           "slow CLIPTokenizer ones are supported; a sentencepiece-only "
                           "folder must be converted first)")

    config = _read_json(folder / CONFIG_FILE)
    special = _read_json(folder / SPECIAL_TOKENS_FILE)
    # transformers lets tokenizer_config.json override special_tokens_map.json.
    tokens = {k: _token_str(special.get(k)) for k in CLIP_DEFAULTS}
    for key in tokens:
      if config.get(key) is not None:
        tokens[key] = _token_str(config[key])
    if slow:
      tokens = {k: v if v is not None else CLIP_DEFAULTS[k] for k, v in tokens.items()}
      backend = _slow_clip_backend(folder, config, tokens)
    else:
      try:
        backend = Backend.from_file(str(path))
      except Exception as err:  # tokenizers raises a bare Exception on bad JSON
        raise TokenizerError(f"cannot read {path}: {err}") from err
    max_len = config.get("model_max_length")
    return cls(backend, pad_token=tokens["pad_token"], eos_token=tokens["eos_token"],
               padding_side=config.get("padding_side", "right"),
               truncation_side=config.get("truncation_side", "right"),
               model_max_length=int(max_len) if max_len is not None else None,
               name=str(folder))

  def __call__(self, texts: Union[str, Sequence[str]], max_length: Optional[int] = None,
               padding: Union[str, bool] = "max_length", truncation: bool = True,
               add_special_tokens: bool = True) -> Tuple[np.ndarray, np.ndarray]:
    """Tokenises a batch like transformers' fast tokenizer with the same arguments.

    Args:
      texts: one string or B strings.
      max_length: pad/truncate length (None: `model_max_length`).
      padding: "max_length" (every row `max_length` long) or "longest" / True (the longest
        row of the batch).
      truncation: cut rows to `max_length` tokens, special tokens included.
      add_special_tokens: apply the post-processor (e.g. T5's trailing `</s>`).

    Returns:
      (input_ids [B, L] int32, attention_mask [B, L] int32: 1 on real tokens, 0 on pads).
    """
    if isinstance(texts, str):
      texts = [texts]
    texts = list(texts)
    if not texts or not all(isinstance(t, str) for t in texts):
      raise TypeError("texts must be a string or a non-empty sequence of strings")
    if padding is True:
      padding = "longest"
    if padding not in ("max_length", "longest"):
      raise ValueError(f"padding must be 'max_length' or 'longest', got {padding!r} (rows of "
                       "an unpadded batch can differ in length)")
    if max_length is None:
      max_length = self.model_max_length
    if max_length is None and (truncation or padding == "max_length"):
      raise ValueError(f"{self.name} has no model_max_length: pass max_length")
    if self.pad_token_id is None:
      raise ValueError(f"{self.name} has no pad token, so batches cannot be padded")

    backend = self.backend
    if truncation:
      backend.enable_truncation(max_length, stride=0, strategy="longest_first",
                                direction=self.truncation_side)
    else:
      backend.no_truncation()
    backend.enable_padding(direction=self.padding_side, pad_id=self.pad_token_id,
                           pad_type_id=self.pad_token_type_id, pad_token=self.pad_token,
                           length=max_length if padding == "max_length" else None)
    encodings = backend.encode_batch(texts, add_special_tokens=add_special_tokens)
    lengths = {len(e.ids) for e in encodings}
    if len(lengths) > 1:
      raise ValueError(f"rows of {sorted(lengths)} tokens: with truncation=False a text longer "
                       f"than max_length={max_length} cannot be padded to it")
    ids = np.asarray([e.ids for e in encodings], np.int32)
    mask = np.asarray([e.attention_mask for e in encodings], np.int32)
    return ids, mask
