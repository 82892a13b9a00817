"""Wan prompt encoding: diffusers `WanPipeline._get_t5_prompt_embeds` on the JAX UMT5 encoder.

prompts -> `prompt_clean` -> tokenizer (pad/truncate to `max_sequence_length`, EOS added)
-> `UMT5Encoder` -> every row past the prompt's true length (its mask sum) set to zero.
diffusers trims each row to that length and pads it back with zeros, which is the same
thing; the zeros matter because the DiT's cross-attention attends to all 512 positions
without a mask.
"""

from typing import Any, Optional, Sequence, Union

import jax
import jax.numpy as jnp
from flax import nnx

from models.prompt import prompt_clean
from models.tokenizer import Tokenizer
from models.wan.umt5 import UMT5Encoder

MAX_SEQUENCE_LENGTH = 512  # WanPipeline.__call__ default (Wan's text_len)


@nnx.jit
def _encode(encoder: UMT5Encoder, input_ids: jax.Array, mask: jax.Array) -> jax.Array:
  hidden = encoder(input_ids, mask)
  seq_lens = jnp.sum(mask > 0, axis=1)
  # Like diffusers' u[:v]: the first seq_len rows are kept whichever side was padded.
  keep = jnp.arange(input_ids.shape[1])[None, :] < seq_lens[:, None]
  return jnp.where(keep[..., None], hidden, jnp.zeros((), hidden.dtype))


def encode_prompt(prompts: Union[str, Sequence[str]], *, tokenizer: Tokenizer,
                  text_encoder: UMT5Encoder,
                  max_sequence_length: int = MAX_SEQUENCE_LENGTH,
                  num_videos_per_prompt: int = 1, dtype: Optional[Any] = None) -> jax.Array:
  """Text embeddings for the Wan DiT's cross-attention.

  Args:
    prompts: one prompt or B prompts (cleaned here, as diffusers does).
    tokenizer: the pipeline's `tokenizer/` (`Tokenizer.from_pretrained`).
    text_encoder: the pipeline's `text_encoder/` (`UMT5Encoder.from_pretrained`).
    max_sequence_length: token length of every row (truncation includes the EOS).
    num_videos_per_prompt: each prompt's rows are repeated this many times, consecutively.
    dtype: output dtype (None: the encoder's).

  Returns:
    [B * num_videos_per_prompt, max_sequence_length, d_model], zero past each prompt's
    tokens.
  """
  if isinstance(prompts, str):
    prompts = [prompts]
  if num_videos_per_prompt < 1:
    raise ValueError(f"num_videos_per_prompt must be >= 1, got {num_videos_per_prompt}")
  cleaned = [prompt_clean(p) for p in prompts]
  ids, mask = tokenizer(cleaned, max_length=max_sequence_length, padding="max_length",
                        truncation=True, add_special_tokens=True)
  embeds = _encode(text_encoder, jnp.asarray(ids), jnp.asarray(mask))
  if dtype is not None:
    embeds = embeds.astype(dtype)
  if num_videos_per_prompt > 1:
    embeds = jnp.repeat(embeds, num_videos_per_prompt, axis=0)
  return embeds
