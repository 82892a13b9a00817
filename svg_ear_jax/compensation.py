"""What stands in for a skipped key cluster: the centroid pseudo-token and its
second-moment correction (ALGORITHM.md 2(d) and 9).

The paper's pseudo-token of key cluster j has the logit q . kbar_j * scale + log n_j. Its
softmax mass n_j e^{q.kbar_j scale} is a lower bound of the cluster's true mass
Z_j(q) = sum_t e^{q.k_t scale} (Jensen), short by log mean_t e^{X_t}, X_t = q.(k_t - kbar_j)
scale, whose leading term is half the variance of X. With the keys' per-dimension variance
var_j and radius r_j = max_t ||k_t - kbar_j||, "variance" compensation adds

  corr_j(q) = min(0.5 * scale^2 * (q*q) . var_j,  scale * ||q|| * r_j)

to the logit: exact in expectation for Gaussian keys, 0 for identical keys, and never above
Cauchy-Schwarz's bound log Z_j <= log n_j + q.kbar_j scale + scale ||q|| r_j, so the
corrected mass stays between the two provable bounds of the true one.
"""

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax

@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KeySpread:
  """How far the keys of every cluster spread around its centroid.

  Attributes:
    variance: [G, Kk, D] float32 per-dimension mean of (k - kbar)^2 over the cluster
      (0 for empty clusters).
    radius: [G, Kk] float32 max_t ||k_t - kbar|| over the cluster (0 for empty ones).
  """

  variance: jax.Array
  radius: jax.Array


def key_spread(k: jax.Array, labels: jax.Array, centroids: jax.Array, sizes: jax.Array,
               values: Optional[jax.Array] = None):
  """Per-cluster spread of k about `centroids` (the pseudo-tokens' keys).

  The squares are of k - kbar_label (one gather of the centroids per key), not
  sum k^2 / n - kbar^2: the radius needs these distances anyway, and the centred sum does
  not cancel catastrophically when |kbar| >> the spread.

  Args:
    k: [G, S, D] keys in token order (any float dtype).
    labels: [G, S] int32 cluster of every key; label Kk (a masked key) counts nowhere.
    centroids: [G, Kk, D] float32 centroids the pseudo-tokens use.
    sizes: [G, Kk] int32 keys per cluster (of these labels).
    values: optional [G, S, D] values: their cluster means come out of the same
      scatter-add (one pass instead of two).

  Returns:
    KeySpread, or (KeySpread, value means [G, Kk, D] float32, 0 for empty clusters) when
    `values` is given.
  """
  kk, d = centroids.shape[1:]
  own = jnp.take_along_axis(centroids, labels[..., None], axis=1, mode="clip")
  diff = k.astype(jnp.float32) - own
  sq = diff * diff
  summed = sq if values is None else jnp.concatenate([sq, values.astype(jnp.float32)], -1)

  def one(x_h, sq_h, lab_h):  # labels == Kk fall outside the segments and are dropped
    return (jax.ops.segment_sum(x_h, lab_h, num_segments=kk),
            jax.ops.segment_max(jnp.sum(sq_h, -1), lab_h, num_segments=kk))

  sums, max_sq = jax.vmap(one)(summed, sq, labels)
  means = sums / jnp.maximum(sizes.astype(jnp.float32), 1.0)[..., None]
  radius = jnp.where(sizes > 0, jnp.sqrt(jnp.maximum(max_sq, 0.0)), 0.0)
  spread = KeySpread(variance=means[..., :d], radius=radius)
  return spread if values is None else (spread, means[..., d:])


def logit_correction(q: jax.Array, spread: KeySpread, scale: float,
                     q_sq: Optional[jax.Array] = None) -> jax.Array:
  """corr[g, n, j] = min(0.5 scale^2 (q*q) . var_j, scale ||q|| r_j): [G, N, Kk] float32.

  Low-precision q computes as the kernels do: q*q and 0.5 * scale * var rounded to q's
  dtype, one dot with float32 accumulation; float32 q is exact (HIGHEST precision).

  Args:
    q: [G, N, D] queries (or query centroids).
    spread: the key clusters' `KeySpread`.
    scale: softmax scale.
    q_sq: optional [G, N, D] float32 stand-in for q*q (e.g. a query cluster's mean of q*q,
      for the probe); ||q|| is then sqrt(sum q_sq).
  """
  if q_sq is None:
    qf = q.astype(jnp.float32)
    q_sq = qf * qf
  w = 0.5 * scale * spread.variance
  precision = lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
  dt = q.dtype if q.dtype != jnp.float32 else jnp.float32
  second = jnp.einsum("gnd,gkd->gnk", q_sq.astype(dt), w.astype(dt), precision=precision,
                      preferred_element_type=jnp.float32) * scale
  bound = scale * jnp.sqrt(jnp.sum(q_sq, -1))[..., None] * spread.radius[:, None, :]
  return jnp.minimum(second, bound)


def mode(compensation, spread) -> str:
  """The compensation mode of a stage call ("none" / "mean" / "variance"; True / False
  mean "mean" / "none"), checking that "variance" comes with its key spread."""
  if isinstance(compensation, bool):
    compensation = "mean" if compensation else "none"
  if compensation not in ("none", "mean", "variance"):
    raise ValueError(f"compensation must be 'none', 'mean' or 'variance', got {compensation!r}")
  if compensation == "variance" and spread is None:
    raise ValueError("compensation='variance' needs the key clusters' spread (k_spread)")
  return compensation
