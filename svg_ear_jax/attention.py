"""The public entry point: `svg_ear_attention(q, k, v, cfg)`.

Pipeline per (batch, head): k-means of Q and of K (warm-started from `state`) -> value
centroids -> routing (top-p or error-aware) -> exact blocks + centroid compensation in one
softmax -> output in token order. Every stage is pure; `cfg` is static under `jax.jit`.
"""

from typing import Optional

import jax
import jax.numpy as jnp

from svg_ear_jax import dense, pipeline, reference, routing
from svg_ear_jax.config import SvgEarConfig
from svg_ear_jax.state import SvgEarAux, SvgEarState

MAX_HEAD_DIM = 256


def _check_inputs(q, k, v, cfg, state):
  if not isinstance(cfg, SvgEarConfig):
    raise TypeError(f"cfg must be an SvgEarConfig, got {type(cfg).__name__}")
  for name, x in (("q", q), ("k", k), ("v", v)):
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
      raise TypeError(f"{name} must be an array, got {type(x).__name__}")
    if x.ndim != 4:
      raise ValueError(f"{name} must be [B, S, H, D], got shape {tuple(x.shape)}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise TypeError(f"{name} must have a floating dtype, got {x.dtype}")
  if not q.shape == k.shape == v.shape:
    raise ValueError(f"q, k, v must have the same shape [B, S, H, D], got {tuple(q.shape)}, "
                     f"{tuple(k.shape)}, {tuple(v.shape)}")
  if not q.dtype == k.dtype == v.dtype:
    raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
  b, s, h, d = q.shape
  if min(b, s, h, d) == 0:
    raise ValueError(f"q has an empty dimension: {tuple(q.shape)}")
  if d > MAX_HEAD_DIM:
    raise ValueError(f"head dim D={d} > {MAX_HEAD_DIM} is not supported")
  if cfg.routing != "dense":
    for field in ("num_q_clusters", "num_k_clusters"):
      if getattr(cfg, field) > s:
        raise ValueError(f"sequence length S={s} is smaller than cfg.{field}="
                         f"{getattr(cfg, field)}")
  if state is not None:
    if not isinstance(state, SvgEarState):
      raise TypeError(f"state must be an SvgEarState or None, got {type(state).__name__}")
    for name, kc in (("q_centroids", cfg.num_q_clusters), ("k_centroids", cfg.num_k_clusters)):
      got = tuple(getattr(state, name).shape)
      if got != (b, h, kc, d):
        raise ValueError(f"state.{name} has shape {got}, expected {(b, h, kc, d)} for "
                         f"q {tuple(q.shape)} and this config")


def resolve_implementation(cfg: SvgEarConfig) -> str:
  """The implementation `cfg.implementation` means on the current default backend."""
  if cfg.implementation != "auto":
    return cfg.implementation
  return "pallas" if jax.default_backend() == "gpu" else "xla"


def _heads_first(x):  # [B, S, H, D] -> [B*H, S, D]
  b, s, h, d = x.shape
  return x.transpose(0, 2, 1, 3).reshape(b * h, s, d)


def _tokens_first(x, b, h):  # [B*H, S, D] -> [B, S, H, D]
  g, s, d = x.shape
  return x.reshape(b, h, s, d).transpose(0, 2, 1, 3)


def svg_ear_attention(q: jax.Array, k: jax.Array, v: jax.Array, cfg: SvgEarConfig, *,
                      state: Optional[SvgEarState] = None, return_aux: bool = False):
  """SVG-EAR sparse attention with centroid compensation.

  Args:
    q, k, v: [B, S, H, D], one float dtype, any S >= the cluster counts, D <= 256.
    cfg: static configuration (hashable: pass it as a static argument under `jax.jit`).
    state: centroids returned by the previous call of the same layer (warm start with
      `cfg.kmeans_iters_warm` iterations); None -> cold start with `cfg.kmeans_iters`.
    return_aux: also return an `SvgEarAux` (next state, per-head density).

  Returns:
    out [B, S, H, D] in q.dtype, or (out, aux) when `return_aux`.
  """
  _check_inputs(q, k, v, cfg, state)
  b, s, h, d = q.shape
  q_dtype = q.dtype
  impl = resolve_implementation(cfg)

  if cfg.routing == "dense":
    if impl == "reference":
      out = reference.dense_attention_reference(q, k, v).astype(q.dtype)
    else:
      out = dense.dense_attention(q, k, v)
    aux = SvgEarAux(state=state, density=jnp.ones((b, h), jnp.float32))
    return (out, aux) if return_aux else out

  if impl == "reference":
    q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
  qg, kg, vg = _heads_first(q), _heads_first(k), _heads_first(v)
  kq_n, kk_n = cfg.num_q_clusters, cfg.num_k_clusters
  warm = {}
  if state is not None:
    warm = dict(q_init=state.q_centroids.reshape(b * h, kq_n, d),
                k_init=state.k_centroids.reshape(b * h, kk_n, d))
  clusters = pipeline.cluster(qg, kg, vg, cfg, impl, **warm)
  block_map = pipeline.route(qg, kg, vg, clusters, cfg, impl)
  out = pipeline.attend(qg, kg, vg, clusters, block_map, cfg, impl)
  out = _tokens_first(out, b, h).astype(q_dtype)

  if not return_aux:
    return out
  new_state = SvgEarState(q_centroids=clusters.q.centroids.reshape(b, h, kq_n, d),
                          k_centroids=clusters.k.centroids.reshape(b, h, kk_n, d))
  density = routing.block_density(block_map, clusters.q.sizes, clusters.k.sizes).reshape(b, h)
  return out, SvgEarAux(state=new_state, density=density)
