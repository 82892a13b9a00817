"""Dense attention baseline: cuDNN flash attention on GPU where it applies, XLA elsewhere."""

import jax
import jax.numpy as jnp


def cudnn_supported(q: jax.Array) -> bool:
  """cuDNN fused attention takes f16/bf16, head dim <= 256 and a multiple of 8, on a GPU."""
  return (jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16)
          and q.shape[-1] <= 256 and q.shape[-1] % 8 == 0)


def dense_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """Full softmax attention, scale 1/sqrt(D).

  Args:
    q, k, v: [B, S, H, D] (the layout of `jax.nn.dot_product_attention`).

  Returns:
    [B, S, H, D] in q.dtype. Uses cuDNN on GPU for bf16/f16, XLA otherwise (which
    materialises the [B, H, S, S] logits: keep S moderate off-GPU).
  """
  if cudnn_supported(q):
    return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
  # float32 inputs mean float32 math: the GPU default for f32 matmuls is TF32
  if q.dtype == jnp.float32:
    with jax.default_matmul_precision("highest"):
      return jax.nn.dot_product_attention(q, k, v, implementation="xla")
  return jax.nn.dot_product_attention(q, k, v, implementation="xla")
