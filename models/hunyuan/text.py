"""HunyuanVideo prompt encoding: diffusers' `HunyuanVideoPipeline.encode_prompt`
(`_get_llama_prompt_embeds` + `_get_clip_prompt_embeds`) on the JAX encoders.

Llama path: each prompt goes into the chat template, is tokenized to `crop_start +
max_sequence_length` tokens (right padding, truncation, BOS from the tokenizer), and
`hidden_states[-3]` of the Llama encoder is kept from position `crop_start` on, with the
matching slice of the attention mask (the DiT gets that mask; padded rows are not zeroed, as
in diffusers). `crop_start` is the template's, or, when the template has none, what diffusers
computes: the length of the tokenized template padded to the tokenizer's
`model_max_length` (unpadded when it has none), minus 2.

CLIP path: the same prompts (diffusers passes `prompt`, not `prompt_2`) tokenized to 77
tokens, run without an attention mask, `pooler_output` kept. Prompts are not cleaned.
"""

import functools
import logging
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
from flax import nnx

from models.hunyuan.clip import CLIPTextEncoder
from models.hunyuan.llama import LlamaEncoder
from models.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

DEFAULT_PROMPT_TEMPLATE = {
    "template": (
        "<|start_header_id|>system<|end_header_id|>\n\nDescribe the video by detailing the "
        "following aspects: "
        "1. The main content and theme of the video."
        "2. The color, shape, size, texture, quantity, text, and spatial relationships of the "
        "objects."
        "3. Actions, events, behaviors temporal relationships, physical movement changes of the "
        "objects."
        "4. background environment, light, style and atmosphere."
        "5. camera angles, movements, and transitions used in the video:<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>"
    ),
    "crop_start": 95,
}
MAX_SEQUENCE_LENGTH = 256  # HunyuanVideoPipeline.__call__ default (prompt tokens kept)
NUM_HIDDEN_LAYERS_TO_SKIP = 2  # diffusers' _get_llama_prompt_embeds default
LLAMA_HIDDEN_STATE = -(NUM_HIDDEN_LAYERS_TO_SKIP + 1)  # hidden_states[-3]
CLIP_MAX_LENGTH = 77


@functools.partial(nnx.jit, static_argnames=("index",))
def _llama_states(encoder: LlamaEncoder, input_ids: jax.Array, mask: jax.Array,
                  index: int) -> jax.Array:
  return encoder(input_ids, mask, hidden_state_index=index)


@nnx.jit
def _clip_pooled(encoder: CLIPTextEncoder, input_ids: jax.Array) -> jax.Array:
  return encoder(input_ids).pooler_output


def crop_start(tokenizer: Tokenizer, prompt_template: Dict[str, Any]) -> int:
  """The template's `crop_start`, or diffusers' computation when it is None or absent:
  tokenize the template itself with padding "max_length" and no `max_length` (so padded
  to the tokenizer's model_max_length when it has one, not padded otherwise), no
  truncation, special tokens added; take the length minus 2 (the `{}` and `<|eot_id|>`)."""
  start = prompt_template.get("crop_start")
  if start is not None:
    if isinstance(start, bool) or not isinstance(start, int) or start < 0:
      raise ValueError(f"prompt_template['crop_start'] must be a non-negative int, got "
                       f"{start!r}")
    return start
  template = prompt_template["template"]
  if tokenizer.model_max_length is None:
    ids, _ = tokenizer([template], padding="longest", truncation=False)
  else:
    ids, _ = tokenizer([template], max_length=tokenizer.model_max_length,
                       padding="max_length", truncation=False)
  return ids.shape[-1] - 2


def _check_template(prompt_template: Any) -> None:
  # diffusers' check_inputs.
  if not isinstance(prompt_template, dict) or "template" not in prompt_template:
    raise ValueError("prompt_template must be a dict with a 'template' key (a format string "
                     f"with one '{{}}'), got {prompt_template!r}")


def llama_prompt_embeds(prompts: Sequence[str], *, tokenizer: Tokenizer,
                        text_encoder: LlamaEncoder,
                        prompt_template: Dict[str, Any] = DEFAULT_PROMPT_TEMPLATE,
                        max_sequence_length: int = MAX_SEQUENCE_LENGTH,
                        num_hidden_layers_to_skip: int = NUM_HIDDEN_LAYERS_TO_SKIP
                        ) -> Tuple[jax.Array, jax.Array]:
  """diffusers' `_get_llama_prompt_embeds` for one copy of each prompt.

  Returns:
    (embeds [B, max_sequence_length, hidden] in the encoder's dtype, mask [B,
    max_sequence_length] int32); longer when the template has crop_start 0.
  """
  _check_template(prompt_template)
  start = crop_start(tokenizer, prompt_template)
  texts = [prompt_template["template"].format(p) for p in prompts]
  ids, mask = tokenizer(texts, max_length=max_sequence_length + start, padding="max_length",
                        truncation=True, add_special_tokens=True)
  ids, mask = jnp.asarray(ids), jnp.asarray(mask)
  embeds = _llama_states(text_encoder, ids, mask, index=-(num_hidden_layers_to_skip + 1))
  if start > 0:
    embeds, mask = embeds[:, start:], mask[:, start:]
  return embeds, mask


def clip_pooled_embeds(prompts: Sequence[str], *, tokenizer_2: Tokenizer,
                       text_encoder_2: CLIPTextEncoder,
                       max_sequence_length: int = CLIP_MAX_LENGTH) -> jax.Array:
  """diffusers' `_get_clip_prompt_embeds` for one copy of each prompt: [B, hidden] in the
  encoder's dtype."""
  ids, _ = tokenizer_2(list(prompts), max_length=max_sequence_length, padding="max_length",
                       truncation=True)
  full, _ = tokenizer_2(list(prompts), max_length=None, padding="longest", truncation=False)
  if full.shape[-1] > ids.shape[-1]:
    logger.warning("Prompts were truncated to the %d tokens CLIP can handle",
                   max_sequence_length)
  return _clip_pooled(text_encoder_2, jnp.asarray(ids))


def encode_prompt(prompts: Union[str, Sequence[str]], *, tokenizer: Tokenizer,
                  text_encoder: LlamaEncoder, tokenizer_2: Tokenizer,
                  text_encoder_2: CLIPTextEncoder,
                  prompt_template: Dict[str, Any] = DEFAULT_PROMPT_TEMPLATE,
                  max_sequence_length: int = MAX_SEQUENCE_LENGTH,
                  num_videos_per_prompt: int = 1,
                  dtype: Optional[Any] = None) -> Tuple[jax.Array, jax.Array, jax.Array]:
  """Text conditioning of the HunyuanVideo DiT (diffusers' `encode_prompt`).

  Args:
    prompts: one prompt or B prompts (used as given, no cleaning).
    tokenizer: the pipeline's `tokenizer/` (Llama-3, right padding).
    text_encoder: the pipeline's `text_encoder/` (`LlamaEncoder.from_pretrained`; loading it
      with `up_to_hidden_state=LLAMA_HIDDEN_STATE` skips the unused last layers).
    tokenizer_2: the pipeline's `tokenizer_2/` (CLIP).
    text_encoder_2: the pipeline's `text_encoder_2/` (`CLIPTextEncoder.from_pretrained`).
    prompt_template: {"template": format string with one "{}", "crop_start": int or absent}.
    max_sequence_length: prompt tokens kept after the template's `crop_start`.
    num_videos_per_prompt: each prompt's rows are repeated this many times, consecutively.
    dtype: dtype of prompt_embeds (None: the Llama encoder's). As in diffusers, the pooled
      embeddings keep the CLIP encoder's dtype.

  Returns:
    (prompt_embeds [B * n, max_sequence_length, 4096], prompt_attention_mask [B * n,
    max_sequence_length] int32, pooled_prompt_embeds [B * n, 768]) for HunyuanVideo's
    encoders (diffusers returns the same three as (embeds, pooled, mask)).
  """
  if isinstance(prompts, str):
    prompts = [prompts]
  prompts = list(prompts)
  if not prompts or not all(isinstance(p, str) for p in prompts):
    raise TypeError("prompts must be a string or a non-empty sequence of strings")
  if isinstance(num_videos_per_prompt, bool) or not isinstance(num_videos_per_prompt, int) \
      or num_videos_per_prompt < 1:
    raise ValueError(f"num_videos_per_prompt must be an int >= 1, got {num_videos_per_prompt!r}")
  if isinstance(max_sequence_length, bool) or not isinstance(max_sequence_length, int) \
      or max_sequence_length < 1:
    raise ValueError(f"max_sequence_length must be an int >= 1, got {max_sequence_length!r}")
  embeds, mask = llama_prompt_embeds(prompts, tokenizer=tokenizer, text_encoder=text_encoder,
                                     prompt_template=prompt_template,
                                     max_sequence_length=max_sequence_length)
  if dtype is not None:
    embeds = embeds.astype(dtype)
  pooled = clip_pooled_embeds(prompts, tokenizer_2=tokenizer_2, text_encoder_2=text_encoder_2)
  if num_videos_per_prompt > 1:
    embeds, mask, pooled = (jnp.repeat(a, num_videos_per_prompt, axis=0)
                            for a in (embeds, mask, pooled))
  return embeds, mask, pooled
