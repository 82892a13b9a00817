"""Self-attention policy of the DiT ports: dense, or SVG-EAR with k-means state per layer.

An `AttentionPolicy` says which layers run `svg_ear_attention` (all but the first
`dense_layers`) and with which `SvgEarConfig`. A model keeps the centroids of every
SVG-EAR layer in a `KMeansState` variable (stacked over layers, like the scanned weights)
so that the next call, i.e. the next denoising step, warm-starts k-means.
"""

import dataclasses
from typing import Optional, Tuple, Union

import jax
import jax.numpy as jnp
from flax import nnx

from svg_ear_jax import SvgEarConfig, SvgEarState, svg_ear_attention


class KMeansState(nnx.Variable):
  """SVG-EAR centroids of a model's sparse layers, `SvgEarState` with arrays
  [L_sparse, B, H, K, D] float32 (layer i's own state is slice i); None before the first
  call and after a reset."""


class AttentionDensity(nnx.Variable):
  """[L_sparse, B, H] float32: fraction of the S x S area each sparse layer computed
  exactly in the last call (a diagnostic); None before the first call."""


@dataclasses.dataclass(frozen=True)
class AttentionPolicy:
  """Which self-attention each layer runs.

  Attributes:
    svg_ear: None -> dense everywhere; otherwise the SVG-EAR config of the sparse layers.
    dense_layers: the first `dense_layers` layers stay dense.
  """

  svg_ear: Optional[SvgEarConfig] = None
  dense_layers: int = 0

  def __post_init__(self):
    if self.svg_ear is not None and not isinstance(self.svg_ear, SvgEarConfig):
      raise TypeError(f"AttentionPolicy.svg_ear must be an SvgEarConfig or None, got "
                      f"{type(self.svg_ear).__name__}")
    if isinstance(self.dense_layers, bool) or not isinstance(self.dense_layers, int) or (
        self.dense_layers < 0):
      raise ValueError(f"AttentionPolicy.dense_layers must be an int >= 0, got "
                       f"{self.dense_layers!r}")

  @classmethod
  def dense(cls) -> "AttentionPolicy":
    """Dense attention in every layer."""
    return cls()

  @classmethod
  def sparse(cls, svg_ear: SvgEarConfig, dense_layers: int = 0) -> "AttentionPolicy":
    """SVG-EAR in every layer from `dense_layers` on."""
    return cls(svg_ear=svg_ear, dense_layers=dense_layers)

  @classmethod
  def coerce(cls, attention: "AttentionLike") -> "AttentionPolicy":
    """None or "dense" -> dense; an `SvgEarConfig` -> sparse everywhere; a policy as is."""
    if attention is None or (isinstance(attention, str) and attention == "dense"):
      return cls()
    if isinstance(attention, SvgEarConfig):
      return cls(svg_ear=attention)
    if isinstance(attention, AttentionPolicy):
      return attention
    raise TypeError(f"attention must be None, 'dense', an SvgEarConfig or an AttentionPolicy, "
                    f"got {attention!r}")

  def num_dense(self, num_layers: int) -> int:
    """How many leading layers of a `num_layers` model are dense."""
    return num_layers if self.svg_ear is None else min(self.dense_layers, num_layers)


AttentionLike = Union[None, str, SvgEarConfig, AttentionPolicy]


class SparseAttentionMixin:
  """`set_attention` / `reset_attention_state` for a DiT that holds `attention_policy`,
  `kmeans_state` (KMeansState) and `attention_density` (AttentionDensity)."""

  def set_attention(self, attention: AttentionLike) -> None:
    """Switches the attention policy (dense <-> SVG-EAR) and resets the k-means state."""
    self.attention_policy = AttentionPolicy.coerce(attention)
    self.reset_attention_state()

  def reset_attention_state(self) -> None:
    """Forgets every layer's k-means centroids: the next call cold-starts k-means."""
    self.kmeans_state.set_value(None)
    self.attention_density.set_value(None)


def matching_state(state: Optional[SvgEarState],
                   shape_q: Tuple[int, ...], shape_k: Tuple[int, ...]) -> Optional[SvgEarState]:
  """`state` if its centroid shapes are `shape_q` / `shape_k`, else None (cold restart).

  A stored state stops fitting when the batch size, head count or SVG-EAR config changes;
  k-means then restarts instead of failing.
  """
  if state is None:
    return None
  if (tuple(state.q_centroids.shape), tuple(state.k_centroids.shape)) != (shape_q, shape_k):
    return None
  return state


def svg_ear_self_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, cfg: SvgEarConfig, state: Optional[SvgEarState],
    *, num_dense_tokens: int = 0, key_mask: Optional[jax.Array] = None,
    head_ids: Optional[jax.Array] = None
) -> Tuple[jax.Array, Optional[SvgEarState], jax.Array]:
  """One layer's SVG-EAR attention with its state in and out.

  Args:
    q, k, v: [B, S, H, D].
    cfg: static SVG-EAR config.
    state: this layer's centroids from the previous call, or None (cold k-means).
    num_dense_tokens, key_mask: trailing dense (text) tokens and key validity [B, S], as in
      `svg_ear_attention`.
    head_ids: [B, H] global index of each (batch, head) for the cold-start draw, as in
      `svg_ear_attention` (None: b * H + h).

  Returns:
    (out [B, S, H, D], new state (None only for routing="dense" without a state),
    density [B, H] float32).
  """
  out, aux = svg_ear_attention(q, k, v, cfg, state=state, return_aux=True,
                               num_dense_tokens=num_dense_tokens, key_mask=key_mask,
                               head_ids=head_ids)
  new_state = aux.state
  if new_state is not None:
    new_state = SvgEarState(q_centroids=new_state.q_centroids.astype(jnp.float32),
                            k_centroids=new_state.k_centroids.astype(jnp.float32))
  return out, new_state, aux.density
