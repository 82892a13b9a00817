"""The two-expert Wan2.2 A14B denoiser: high-noise expert early, low-noise expert late."""

import jax
import numpy as np
from flax import nnx

from models.attention import AttentionLike
from models.wan.transformer import WanTransformer

NUM_TRAIN_TIMESTEPS = 1000


class WanExpertPair(nnx.Module):
  """T2V-A14B / I2V-A14B: two `WanTransformer`s of one architecture, picked per step.

  The high-noise expert runs while t >= boundary_ratio * 1000 (T2V 0.875, I2V 0.9), the
  low-noise one after, as in Wan2.2 `_prepare_model_for_timestep` and diffusers
  `WanPipeline` (`boundary_ratio`). The choice is made on the host from a concrete
  timestep, once per denoising step; to compile, jit the chosen expert:
  `nnx.jit(fwd)(pair.expert_for(t), x, t, ctx)`.
  """

  def __init__(self, high_noise: WanTransformer, low_noise: WanTransformer,
               boundary_ratio: float):
    if high_noise.config.architecture() != low_noise.config.architecture():
      raise ValueError("the two experts must share one architecture, got "
                       f"{high_noise.config.describe()} and {low_noise.config.describe()}")
    if not 0.0 < boundary_ratio < 1.0:
      raise ValueError(f"boundary_ratio={boundary_ratio}: must be in (0, 1)")
    self.high_noise = high_noise
    self.low_noise = low_noise
    self.boundary_ratio = float(boundary_ratio)

  @property
  def config(self):
    """The (shared) expert architecture."""
    return self.high_noise.config

  @property
  def boundary_timestep(self) -> float:
    """Timesteps at or above this go to the high-noise expert."""
    return self.boundary_ratio * NUM_TRAIN_TIMESTEPS

  def is_high_noise(self, timestep) -> bool:
    """Whether `timestep` (a number or a concrete [B] array, all on one side) is high-noise."""
    try:
      t = np.asarray(timestep, dtype=np.float64).reshape(-1)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError) as err:
      raise TypeError("WanExpertPair picks its expert on the host: pass a concrete timestep, "
                      "or jit `pair.expert_for(t)` instead of the pair") from err
    high = t >= self.boundary_timestep
    if high.any() != high.all():
      raise ValueError(f"timesteps {t.tolist()} straddle the expert boundary "
                       f"{self.boundary_timestep}")
    return bool(high.all())

  def expert_for(self, timestep) -> WanTransformer:
    """The expert that denoises at `timestep`."""
    return self.high_noise if self.is_high_noise(timestep) else self.low_noise

  def __call__(self, hidden_states: jax.Array, timestep, encoder_hidden_states: jax.Array
               ) -> jax.Array:
    """Runs `expert_for(timestep)`; same arguments and result as `WanTransformer.__call__`."""
    return self.expert_for(timestep)(hidden_states, timestep, encoder_hidden_states)

  def set_attention(self, attention: AttentionLike) -> None:
    """Sets the self-attention policy of both experts (resets their k-means state)."""
    self.high_noise.set_attention(attention)
    self.low_noise.set_attention(attention)

  def reset_attention_state(self) -> None:
    """Forgets both experts' k-means centroids."""
    self.high_noise.reset_attention_state()
    self.low_noise.reset_attention_state()
