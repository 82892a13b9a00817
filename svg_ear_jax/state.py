"""Pytrees carried between calls (k-means warm start) and returned as diagnostics."""

import dataclasses

import jax


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SvgEarState:
  """Centroids of the previous call of one attention layer, to warm-start k-means.

  Attributes:
    q_centroids: [B, H, Kq, D] float32 query centroids.
    k_centroids: [B, H, Kk, D] float32 key centroids.
  """

  q_centroids: jax.Array
  k_centroids: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SvgEarAux:
  """What `svg_ear_attention(..., return_aux=True)` returns beside the output.

  Attributes:
    state: the centroids to pass back as `state=` on the next call of the same layer
      (None for `routing="dense"` called without a state).
    density: [B, H] float32, fraction of the S x S area computed exactly.
  """

  state: "SvgEarState | None"
  density: jax.Array
