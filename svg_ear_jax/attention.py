"""The public entry point: `svg_ear_attention(q, k, v, cfg)`.

Pipeline per (batch, head): k-means of Q and of K (warm-started from `state`) -> value
centroids -> routing (top-p or error-aware) -> exact blocks + centroid compensation in one
softmax -> output in token order. Every stage is pure; `cfg` is static under `jax.jit`.
"""

from typing import Optional

import jax
import jax.numpy as jnp

from svg_ear_jax import dense, pipeline, reference, routing, sparse_attention
from svg_ear_jax.config import SvgEarConfig
from svg_ear_jax.state import SvgEarAux, SvgEarState

MAX_HEAD_DIM = 256


def _check_inputs(q, k, v, cfg, state, num_dense_tokens, key_mask, head_ids):
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
  if isinstance(num_dense_tokens, bool) or not isinstance(num_dense_tokens, int) \
      or not 0 <= num_dense_tokens < s:
    raise ValueError(f"num_dense_tokens must be an int in [0, S={s}), got {num_dense_tokens!r}")
  if key_mask is not None:
    if not hasattr(key_mask, "shape") or tuple(key_mask.shape) != (b, s):
      raise ValueError(f"key_mask must be [B, S] = {(b, s)}, got "
                       f"{getattr(key_mask, 'shape', type(key_mask).__name__)}")
    if key_mask.dtype != jnp.bool_:
      raise TypeError(f"key_mask must be bool, got {key_mask.dtype}")
  if head_ids is not None:
    if not hasattr(head_ids, "shape") or tuple(head_ids.shape) != (b, h):
      raise ValueError(f"head_ids must be [B, H] = {(b, h)}, got "
                       f"{getattr(head_ids, 'shape', type(head_ids).__name__)}")
    if not jnp.issubdtype(head_ids.dtype, jnp.integer):
      raise TypeError(f"head_ids must be integers, got {head_ids.dtype}")
  if cfg.routing != "dense":
    clustered = s - num_dense_tokens
    for field in ("num_q_clusters", "num_k_clusters"):
      if getattr(cfg, field) > clustered:
        raise ValueError(f"sequence length S={s} minus num_dense_tokens={num_dense_tokens} is "
                         f"smaller than cfg.{field}={getattr(cfg, field)}")
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


def global_head_ids(batch: int, num_heads: int, *, batch_offset=0, head_offset=0,
                    total_heads: Optional[int] = None) -> jax.Array:
  """`head_ids` of a slice of a larger call: heads [head_offset, head_offset + num_heads)
  of samples [batch_offset, batch_offset + batch) of a call with `total_heads` heads.

  Args:
    batch, num_heads: static size of the slice (B, H of the local call).
    batch_offset, head_offset: first global sample / head; ints or traced int scalars
      (e.g. from `lax.axis_index` inside a `shard_map`).
    total_heads: heads of the whole call (default `num_heads`: a batch slice only).

  Returns:
    [batch, num_heads] int32, (batch_offset + b) * total_heads + head_offset + h.
  """
  total = num_heads if total_heads is None else total_heads
  b = jnp.asarray(batch_offset, jnp.int32) + jnp.arange(batch, dtype=jnp.int32)
  h = jnp.asarray(head_offset, jnp.int32) + jnp.arange(num_heads, dtype=jnp.int32)
  return b[:, None] * jnp.int32(total) + h[None, :]


def _heads_first(x):  # [B, S, H, D] -> [B*H, S, D]
  b, s, h, d = x.shape
  return x.transpose(0, 2, 1, 3).reshape(b * h, s, d)


def _tokens_first(x, b, h):  # [B*H, S, D] -> [B, S, H, D]
  g, s, d = x.shape
  return x.reshape(b, h, s, d).transpose(0, 2, 1, 3)


def _masked_dense(qg, kg, vg, key_mask, impl):
  """Exact attention over the valid keys only, chunked (no [S, S] at once)."""
  g, s, d = qg.shape
  k_labels = jnp.where(key_mask, 0, 1).astype(jnp.int32)
  zeros = jnp.zeros((g, 1, d), jnp.float32)
  args = (qg, kg, vg, jnp.zeros((g, s), jnp.int32), k_labels, jnp.ones((g, 1, 1), bool),
          zeros, zeros, jnp.sum(key_mask, axis=1, keepdims=True, dtype=jnp.int32))
  if impl == "reference":
    return reference.sparse_attention_reference(*args, scale=d ** -0.5, compensation=False)
  return sparse_attention.sparse_attention_xla(*args, scale=d ** -0.5, compensation=False)


def _kmeans_only(q, k, cfg, impl, state, num_dense_tokens, g_mask, groups) -> SvgEarState:
  """The k-means stage alone (routing "dense" with `dense_kmeans`): the next centroids."""
  b, s, h, d = q.shape
  n_video = s - num_dense_tokens
  (qg, kg), rows = pipeline.stage_inputs(impl, n_video, q, k)
  warm = {}
  if state is not None:
    warm = dict(q_init=state.q_centroids.reshape(b * h, cfg.num_q_clusters, d),
                k_init=state.k_centroids.reshape(b * h, cfg.num_k_clusters, d))
  k_mask = None if g_mask is None else g_mask[:, :n_video]
  q_c, k_c = pipeline.centroids(qg, kg, cfg, impl, k_mask=k_mask, groups=groups,
                                num_rows=rows, **warm)
  return SvgEarState(q_centroids=q_c.reshape(b, h, cfg.num_q_clusters, d),
                     k_centroids=k_c.reshape(b, h, cfg.num_k_clusters, d))


def svg_ear_attention(q: jax.Array, k: jax.Array, v: jax.Array, cfg: SvgEarConfig, *,
                      state: Optional[SvgEarState] = None, return_aux: bool = False,
                      num_dense_tokens: int = 0, key_mask: Optional[jax.Array] = None,
                      head_ids: Optional[jax.Array] = None):
  """SVG-EAR sparse attention with centroid compensation.

  Args:
    q, k, v: [B, S, H, D], one float dtype, D <= 256; S - num_dense_tokens must be at
      least the cluster counts.
    cfg: static configuration (hashable: pass it as a static argument under `jax.jit`).
    state: centroids returned by the previous call of the same layer (warm start with
      `cfg.kmeans_iters_warm` iterations); None -> cold start with `cfg.kmeans_iters`.
    return_aux: also return an `SvgEarAux` (next state, per-head density).
    num_dense_tokens: static T; the last T tokens (e.g. HunyuanVideo's text) are not
      clustered: their queries attend exactly to every valid key, and every query attends
      exactly to the valid ones among them.
    key_mask: optional [B, S] bool, False = padding key: never attended and never part of a
      compensation pseudo-token (the reference adds a zero-value pseudo-token for the text
      padding, which dilutes every softmax; we do not).
    head_ids: optional [B, H] int (may be traced): the index g with which each (batch,
      head) draws its cold-start centroids (`fold_in(key, g)`); default b * H + h. A
      caller holding a slice of a larger call's heads (sequence parallelism: H/P heads
      per device) passes their indices in that call (`global_head_ids`), so that its cold
      start equals the unsliced one. Only a cold start reads it.

  Returns:
    out [B, S, H, D] in q.dtype, or (out, aux) when `return_aux`. aux.density counts the
    exact area over all S queries x valid keys.
  """
  _check_inputs(q, k, v, cfg, state, num_dense_tokens, key_mask, head_ids)
  b, s, h, d = q.shape
  q_dtype = q.dtype
  impl = resolve_implementation(cfg)
  groups = None if head_ids is None else head_ids.reshape(b * h)  # g = b * H + h order

  g_mask = None if key_mask is None else jnp.repeat(key_mask, h, axis=0)  # [B*H, S]

  if cfg.routing == "dense":
    if key_mask is not None:
      out = _masked_dense(_heads_first(q), _heads_first(k), _heads_first(v), g_mask, impl)
      out = _tokens_first(out, b, h).astype(q_dtype)
    elif impl == "reference":
      out = reference.dense_attention_reference(q, k, v).astype(q_dtype)
    else:
      out = dense.dense_attention(q, k, v)
    if cfg.dense_kmeans and return_aux:
      state = _kmeans_only(q, k, cfg, impl, state, num_dense_tokens, g_mask, groups)
    aux = SvgEarAux(state=state, density=jnp.ones((b, h), jnp.float32))
    return (out, aux) if return_aux else out

  if impl == "reference":
    q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
  kq_n, kk_n = cfg.num_q_clusters, cfg.num_k_clusters
  n_video = s - num_dense_tokens
  warm = {}
  if state is not None:
    warm = dict(q_init=state.q_centroids.reshape(b * h, kq_n, d),
                k_init=state.k_centroids.reshape(b * h, kk_n, d))
  video_mask = None if g_mask is None else g_mask[:, :n_video]
  qkv, rows = pipeline.stage_inputs(impl, n_video, q, k, v)
  clusters = pipeline.cluster(*qkv, cfg, impl, k_mask=video_mask, groups=groups,
                              num_rows=rows, **warm)
  block_map = pipeline.route(*qkv, clusters, cfg, impl, num_rows=rows)
  attn_clusters, attn_map = clusters, block_map
  if num_dense_tokens or key_mask is not None:
    attn_clusters, attn_map = pipeline.append_dense_tokens(
        clusters, block_map, num_dense_tokens,
        None if g_mask is None else g_mask[:, n_video:])
  out = pipeline.attend(q, k, v, attn_clusters, attn_map, cfg, impl).astype(q_dtype)

  if not return_aux:
    return out
  new_state = SvgEarState(q_centroids=clusters.q.centroids.reshape(b, h, kq_n, d),
                          k_centroids=clusters.k.centroids.reshape(b, h, kk_n, d))
  density = routing.block_density(attn_map, attn_clusters.q.sizes,
                                  attn_clusters.k.sizes).reshape(b, h)
  return out, SvgEarAux(state=new_state, density=density)
