"""The stages of one SVG-EAR call, per head g = b * H + h.

cluster -> route -> attend, each a pure function of arrays and the static config, so that
benchmarks can time them one by one and a sharded caller can run them per head group.
`impl` picks the backend of the heavy parts: "xla" (any device), "reference" (float32
oracle) or "pallas" (GPU kernels; run in interpret mode off GPU, for tests). `cluster` and
`route` take head-major [G, S, D] or tokens-first [B, S, H, D] arrays and a static
`num_rows` (cluster and route the first num_rows tokens only, e.g. HunyuanVideo's video
tokens): the Pallas kernels read tokens-first arrays in place (strided per head, no
transposed or sliced copies), the other implementations make a head-major copy. `attend`
takes tokens-first arrays.
"""

import dataclasses
import functools
from typing import Optional, Tuple

import jax
import jax.numpy as jnp

from svg_ear_jax import error_probe, kmeans, permutation, reference, routing, sparse_attention
from svg_ear_jax import compensation as comp
from svg_ear_jax.config import SvgEarConfig

# The k-means centroid update of the "pallas" implementation (the others use "segment_sum"):
# "sorted" walks the cluster-sorted order with a Pallas kernel (no atomics) and hands that
# order on to the later stages; "segment_sum" is the XLA scatter-add (on head-major copies).
# Read when a call is traced; `cluster(..., kmeans_update=...)` overrides it. "sorted" is
# 2.9 ms faster per Wan 720p call on an H200 (benchmarks/results/breakdown_h200.md).
KMEANS_UPDATE = "sorted"

# The budgeted step of the "pallas" implementation's routing (forced top blocks, then greedy
# under the budget; the others use "sort"): "kernel" finds each row's last kept block by
# bisection in one Pallas kernel (pallas_kernels.budget_route; 1.33 -> 0.32 ms at Wan 720p
# on an H200), "sort" is routing's XLA argsorts, "auto" the kernel on GPU and the sorts
# elsewhere (in Pallas interpret mode the kernel's bisection loops only add compile time to
# the CPU tests: ~1 minute of the suite; they force "kernel" where they test it). Read when
# a call is traced.
ROUTE_FILL = "auto"
ROUTE_FILLS = ("auto", "kernel", "sort")

# Where the "pallas" EAR probe gets its per-token value terms (||v_t||^2, <vbar_j, v_t>):
# "probe" computes them in its own XLA pass over v (which gathers a cluster mean per
# token), "walk" has the Pallas walk that computes the value means write them too (a
# second walk over each cluster's value rows, from L2; cluster_moments value_stats), so
# one pass over v goes. "walk" is not yet timed on a GPU: "probe" stays the default until
# it is (`benchmarks.breakdown --value-terms walk probe`). Read when a call is traced.
VALUE_TERMS = "probe"
VALUE_TERMS_CHOICES = ("probe", "walk")

# Options of the Mosaic GPU attention kernel beyond its defaults (chunk_rows,
# split_producers, overlap_softmax, ...: pallas_kernels.sparse_attention_mgpu), for
# timing variants of the whole call (`benchmarks/attention.py --mosaic-options`); read
# when a call is traced.
MOSAIC_OPTIONS: dict = {}
MOSAIC_OPTION_NAMES = ("chunk_rows", "split_producers", "sorted_queries", "slot_output",
                       "half_tiles", "pair_half_tiles", "max_concurrent_steps",
                       "overlap_softmax", "heads_per_call")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Clusters:
  """Both clusterings of one call and the values' cluster means.

  Attributes:
    q: KMeansResult of the queries (Kq clusters).
    k: KMeansResult of the keys (Kk clusters).
    v_centroids: [G, Kk, D] float32 mean value of each key cluster (0 when empty).
    k_spread: the key clusters' `KeySpread` (variance, radius) with "variance"
      compensation, else None.
    q_sq_means: [G, Kq, D] float32 mean of q*q of each query cluster with "variance"
      compensation (the EAR probe's second moment), else None.
    value_terms: the EAR probe's per-token value terms (||v_p||^2, <vbar_j, v_p>) [G, N]
      float32 in the key clustering's sorted order, from the value means' walk
      (VALUE_TERMS = "walk"), else None (the probe computes them).
  """

  q: kmeans.KMeansResult
  k: kmeans.KMeansResult
  v_centroids: jax.Array
  k_spread: Optional[comp.KeySpread] = None
  q_sq_means: Optional[jax.Array] = None
  value_terms: Optional[tuple] = None


def _pallas():
  try:
    import pallas_kernels
  except ImportError as e:  # pragma: no cover - the package ships with svg_ear_jax
    raise NotImplementedError(f"implementation='pallas' needs pallas_kernels: {e}") from e
  return pallas_kernels


def _interpret() -> bool:
  return jax.default_backend() != "gpu"


def _attention_blocks() -> dict:
  # H100 sweeps at S=75,600, D=128, density 0.25 (benchmarks/kernels.py; results in
  # benchmarks/results/kernels_h100.md): 128x128 tiles, 8 warps, 3 stages, with remainders
  # of <= 64 query rows run as 64-row tiles, was the fastest. Interpret mode (CPU tests)
  # uses small tiles that still exercise the tail pass. One table serves every shape
  # measured so far (Wan 480p / 720p, Hunyuan 720p).
  if _interpret():
    return dict(block_q=32, block_k=16, block_c=16, tail_block_q=16)
  return dict(block_q=128, block_k=128, block_c=64, tail_block_q=64, num_warps=8,
              num_stages=3, tail_num_warps=4)


def _use_mosaic(cfg: SvgEarConfig, q: jax.Array) -> bool:
  """Whether the attend stage runs the Mosaic GPU kernel (cfg.attention_kernel)."""
  fits = q.dtype in (jnp.bfloat16, jnp.float16) and q.shape[-1] % 64 == 0
  if cfg.attention_kernel == "mosaic":
    if not fits:
      raise ValueError(f"attention_kernel='mosaic' needs bf16/f16 inputs with head_dim a "
                       f"multiple of 64, got {q.dtype} and head_dim {q.shape[-1]}")
    return True
  # H100 (benchmarks/results/attention_h100.md): Mosaic wins; other GPUs keep Triton
  return cfg.attention_kernel == "auto" and fits and _pallas().on_hopper()


def attention_kernel(cfg: SvgEarConfig, q: jax.Array):
  """The Pallas attention kernel `attend` runs for q [B, S, H, D], with its settings bound.

  Called as kernel(q, k, v, q_sizes, k_sizes, block_map, k_centroids, v_centroids,
  q_index=..., kv_index=... [, k_variance=..., k_radius=...]); both kernels read through
  the permutations and return q's layout in token order.
  """
  kw = dict(compensation=cfg.compensation, sm_scale=q.shape[-1] ** -0.5)
  if _use_mosaic(cfg, q):
    # Hopper: TMA + wgmma, warp-specialised; reads the caller's query rows in place and
    # sorted, cluster-padded copies of K, V (see pallas_kernels/sparse_attention_mgpu.py)
    unknown = set(MOSAIC_OPTIONS) - set(MOSAIC_OPTION_NAMES)
    if unknown:
      raise ValueError(f"pipeline.MOSAIC_OPTIONS: unknown options {sorted(unknown)}; "
                       f"known: {MOSAIC_OPTION_NAMES}")
    return functools.partial(_pallas().sparse_attention_mgpu, emulate=_interpret(), **kw,
                             **MOSAIC_OPTIONS)
  # reads q, k, v in place (strided per head) and writes token order: no copies
  return functools.partial(_pallas().sparse_attention, interpret=_interpret(), **kw,
                           **_attention_blocks())


def _kmeans_update(impl: str, kmeans_update: Optional[str]) -> str:
  if kmeans_update is not None and kmeans_update not in kmeans.UPDATES:
    raise ValueError(f"kmeans_update must be one of {kmeans.UPDATES}, got {kmeans_update!r}")
  if impl != "pallas":
    return "segment_sum"
  return KMEANS_UPDATE if kmeans_update is None else kmeans_update


def _route_fill(impl: str) -> routing.Fill:
  if ROUTE_FILL not in ROUTE_FILLS:
    raise ValueError(f"pipeline.ROUTE_FILL must be one of {ROUTE_FILLS}, got {ROUTE_FILL!r}")
  if impl != "pallas" or ROUTE_FILL == "sort" or (ROUTE_FILL == "auto" and _interpret()):
    return routing.forced_then_greedy

  def fill(priority, num_forced, score, cost, budget, top_p=None, num_floor=0):
    return _pallas().budget_route(priority, score, cost, budget, num_forced=num_forced,
                                  top_p=top_p, num_floor=num_floor, interpret=_interpret())
  return fill


def _rows(x: jax.Array, num_rows: Optional[int]) -> int:
  return kmeans.points_shape(x, num_rows)[1]


def stage_inputs(impl: str, num_rows: Optional[int], *xs: jax.Array):
  """(xs, num_rows) as `impl` reads them in `cluster` / `route`: unchanged (with num_rows)
  for "pallas", whose kernels read tokens-first heads in place; else head-major [G, N, D]
  copies of their first num_rows rows (and num_rows None)."""
  if impl == "pallas":
    return xs, num_rows
  return tuple(kmeans.heads_first(x, num_rows) for x in xs), None


def _kmeans_pair(q, k, cfg, impl, q_init, k_init, k_mask, groups, num_rows, kmeans_update):
  if (q_init is None) != (k_init is None):
    raise ValueError("give both warm-start centroids or neither")
  if q.shape != k.shape:
    raise ValueError(f"q and k must have one shape, got {q.shape} and {k.shape}")
  n = _rows(q, num_rows)
  if q_init is None:
    key = jax.random.PRNGKey(cfg.seed)
    q_init = kmeans.init_centroids(q, cfg.num_q_clusters, jax.random.fold_in(key, 0),
                                   groups=groups, num_points=n)
    k_init = kmeans.init_centroids(k, cfg.num_k_clusters, jax.random.fold_in(key, 1), k_mask,
                                   groups=groups, num_points=n)
    iters = cfg.kmeans_iters
  else:
    iters = cfg.kmeans_iters_warm
  km = dict(max_iters=iters, tol=cfg.kmeans_tol, chunk_mb=cfg.xla_chunk_mb, num_points=n,
            update=_kmeans_update(impl, kmeans_update))
  if impl == "pallas":
    pk, interpret = _pallas(), _interpret()
    km.update(assign_fn=lambda x, c: pk.kmeans_assign(x, c, num_rows=n, interpret=interpret),
              mean_fn=lambda x, sizes, perm: pk.cluster_means(x, sizes, perm, num_rows=n,
                                                              interpret=interpret))
  return kmeans.kmeans(q, q_init, **km), kmeans.kmeans(k, k_init, point_mask=k_mask, **km)


def centroids(q: jax.Array, k: jax.Array, cfg: SvgEarConfig, impl: str,
              q_init: Optional[jax.Array] = None, k_init: Optional[jax.Array] = None,
              k_mask: Optional[jax.Array] = None, groups: Optional[jax.Array] = None,
              num_rows: Optional[int] = None, kmeans_update: Optional[str] = None
              ) -> Tuple[jax.Array, jax.Array]:
  """The k-means stage of `cluster` alone: ([G, Kq, D], [G, Kk, D]) centroids of q and k
  ([G, S, D] or [B, S, H, D]), cold when no init is given (the other arguments as in
  `cluster`)."""
  q_res, k_res = _kmeans_pair(q, k, cfg, impl, q_init, k_init, k_mask, groups, num_rows,
                              kmeans_update)
  return q_res.centroids, k_res.centroids


def layout(res: kmeans.KMeansResult) -> permutation.ClusterLayout:
  """The cluster-sorted layout of a clustering, reusing the order the "sorted" k-means
  update left in `res.perm` (sorted anew when it is None)."""
  return permutation.cluster_layout(res.labels, res.sizes, perm=res.perm)


def cluster(q: jax.Array, k: jax.Array, v: jax.Array, cfg: SvgEarConfig, impl: str,
            q_init: Optional[jax.Array] = None, k_init: Optional[jax.Array] = None,
            k_mask: Optional[jax.Array] = None, groups: Optional[jax.Array] = None,
            num_rows: Optional[int] = None, kmeans_update: Optional[str] = None
            ) -> Clusters:
  """k-means of q and of k (cold when no init is given), plus value centroids.

  Args:
    q, k, v: [G, S, D], or tokens-first [B, S, H, D] (G = B * H, head g = b * H + h).
    cfg: static configuration.
    impl: "xla", "reference" or "pallas" (the assignment, update and moment kernels).
    q_init, k_init: [G, Kq, D] / [G, Kk, D] warm-start centroids, or None for a cold start.
    k_mask: optional [G, N] bool valid keys; invalid keys get label Kk (in no cluster).
    groups: optional [G] int global index of each head, seeding its cold-start draw
      (`kmeans.init_centroids`; default arange(G)); unused on a warm start.
    num_rows: static N; cluster only the first N tokens of every head (default all S).
    kmeans_update: "sorted" or "segment_sum", the "pallas" k-means centroid update
      (default the module's KMEANS_UPDATE; the other implementations use "segment_sum").

  Returns:
    Clusters of the N tokens (labels [G, N]); with the "sorted" update the k-means
    results carry their cluster-sorted order (`perm`), which `route` reuses.
  """
  (q, k, v), num_rows = stage_inputs(impl, num_rows, q, k, v)
  n = _rows(q, num_rows)
  q_res, k_res = _kmeans_pair(q, k, cfg, impl, q_init, k_init, k_mask, groups, num_rows,
                              kmeans_update)
  pallas_sorted = impl == "pallas" and k_res.perm is not None
  if VALUE_TERMS not in VALUE_TERMS_CHOICES:
    raise ValueError(f"pipeline.VALUE_TERMS must be one of {VALUE_TERMS_CHOICES}, got "
                     f"{VALUE_TERMS!r}")
  terms = impl == "pallas" and cfg.routing == "ear" and VALUE_TERMS == "walk"
  value_terms = None
  if cfg.compensation != "variance":
    if pallas_sorted:  # the value means by a walk of the key clusters' sorted order
      means = _pallas().cluster_means(v, k_res.sizes, k_res.perm, num_rows=n,
                                      interpret=_interpret(), value_stats=terms)
      v_centroids, value_terms = means if terms else (means, None)
    else:  # k_res.sizes already counts k_res.labels: only the value sums are new
      v_centroids, _ = kmeans.cluster_means(kmeans.heads_first(v, n), k_res.labels,
                                            cfg.num_k_clusters, counts=k_res.sizes)
    return Clusters(q=q_res, k=k_res, v_centroids=v_centroids, value_terms=value_terms)
  # "variance": the keys' spread with the value means, and the query clusters' mean of
  # q*q for the probe (benchmarks/results/quality_*_720p.md: it ranks 1-7% better than
  # the query centroid's)
  if impl == "pallas":
    # walks the cluster-sorted order (the layouts `route` and `attend` use too): no
    # atomics, where XLA's scatter-adds contend on a few hundred clusters
    k_lay, q_lay = layout(k_res), layout(q_res)
    variance, radius, v_centroids, *rest = _pallas().cluster_moments(
        k, k_lay.sizes, k_lay.perm, centroids=k_res.centroids, values=v, num_rows=n,
        interpret=_interpret(), value_stats=terms)
    value_terms = rest[0] if terms else None
    spread = comp.KeySpread(variance=variance, radius=radius)
    q_sq_means, _, _ = _pallas().cluster_moments(q, q_lay.sizes, q_lay.perm, num_rows=n,
                                                 interpret=_interpret())
  else:
    spread, v_centroids = comp.key_spread(k, k_res.labels, k_res.centroids, k_res.sizes,
                                          values=v)
    qf = q.astype(jnp.float32)
    q_sq_means, _ = kmeans.cluster_means(qf * qf, q_res.labels, cfg.num_q_clusters,
                                         counts=q_res.sizes)
  return Clusters(q=q_res, k=k_res, v_centroids=v_centroids, k_spread=spread,
                  q_sq_means=q_sq_means, value_terms=value_terms)


def route(q: jax.Array, k: jax.Array, v: jax.Array, clusters: Clusters, cfg: SvgEarConfig,
          impl: str, num_rows: Optional[int] = None) -> jax.Array:
  """Block map [G, Kq, Kk] bool (True = exact) for `cfg.routing`.

  q, k, v: [G, S, D] or tokens-first [B, S, H, D], with `clusters` of their first
  num_rows (static, default all S) tokens, as `cluster` returned them.
  With "variance" compensation the EAR probe's pseudo-token logit carries the correction
  evaluated with the query cluster's mean of q*q (`clusters.q_sq_means`; with None there,
  with the centroid's qbar*qbar).
  """
  scale = q.shape[-1] ** -0.5
  logits = routing.centroid_logits(clusters.q.centroids, clusters.k.centroids, scale)
  log_err = None
  if cfg.routing == "ear":
    # the error of the pseudo-token in use: with "variance" its logit at the query
    # centroid carries the correction too (ALGORITHM.md 9)
    pseudo = logits
    if cfg.compensation == "variance":
      if clusters.k_spread is None:
        raise ValueError("compensation='variance' needs clusters with k_spread (cluster() "
                         "with the same config computes it)")
      pseudo = logits + comp.logit_correction(clusters.q.centroids, clusters.k_spread, scale,
                                              q_sq=clusters.q_sq_means)
    if impl == "pallas":
      # keys are read in place through the key clustering's permutation: no sorted,
      # transposed or sliced copies of k, v
      lay = layout(clusters.k)
      log_err = _pallas().ear_error_probe(
          clusters.q.centroids, k, v, clusters.k.centroids, clusters.v_centroids,
          clusters.k.sizes, sm_scale=scale, kv_index=lay.perm, pseudo_logits=pseudo,
          num_rows=_rows(k, num_rows), value_terms=clusters.value_terms,
          interpret=_interpret(),
          **({"block_qc": 16, "block_k": 16} if _interpret() else {}))
    else:
      (k, v), _ = stage_inputs(impl, num_rows, k, v)
      log_err = error_probe.error_probe_xla(
          clusters.q.centroids, k, v, clusters.k.labels, clusters.k.sizes,
          clusters.v_centroids, pseudo, scale=scale, chunk_mb=cfg.xla_chunk_mb)
  return routing.route(cfg, logits, clusters.q.sizes, clusters.k.sizes, log_err,
                       fill=_route_fill(impl))


def attend(q: jax.Array, k: jax.Array, v: jax.Array, clusters: Clusters, block_map: jax.Array,
           cfg: SvgEarConfig, impl: str) -> jax.Array:
  """Exact selected blocks + centroid compensation, in token order.

  Args:
    q, k, v: tokens-first [B, S, H, D] (the caller's layout; G = B * H heads, g = b * H + h).
    clusters, block_map: per head g, as returned by `cluster` / `route` (or
      `append_dense_tokens`).

  Returns:
    [B, S, H, D] in q.dtype.
  """
  b, s, h, d = q.shape
  scale = d ** -0.5
  spread = clusters.k_spread
  if impl == "pallas":
    q_lay, k_lay = layout(clusters.q), layout(clusters.k)
    extra = {} if spread is None else dict(k_variance=spread.variance, k_radius=spread.radius)
    out = attention_kernel(cfg, q)(
        q, k, v, q_lay.sizes, k_lay.sizes, block_map, clusters.k.centroids,
        clusters.v_centroids, q_index=q_lay.perm, kv_index=k_lay.perm, **extra)
    return out.astype(q.dtype)
  heads_first = lambda x: x.transpose(0, 2, 1, 3).reshape(b * h, s, d)
  args = (heads_first(q), heads_first(k), heads_first(v), clusters.q.labels,
          clusters.k.labels, block_map, clusters.k.centroids, clusters.v_centroids,
          clusters.k.sizes)
  if impl == "reference":
    out = reference.sparse_attention_reference(*args, scale=scale,
                                               compensation=cfg.compensation, k_spread=spread)
  else:
    out = sparse_attention.sparse_attention_xla(*args, scale=scale,
                                                compensation=cfg.compensation, k_spread=spread,
                                                chunk_mb=cfg.xla_chunk_mb)
  return out.reshape(b, h, s, d).transpose(0, 2, 1, 3).astype(q.dtype)


def _appended_perm(perm: Optional[jax.Array], num_valid: jax.Array,
                   dense_valid: jax.Array) -> Optional[jax.Array]:
  """The stable argsort of `append_dense_tokens`' labels from the video tokens' one, with
  no sort of S rows: the clustered video tokens (perm's first num_valid [G] rows), the
  valid dense tokens (label K), then label K + 1: the invalid video tokens (perm's tail,
  in token order) and the invalid dense ones. None when perm is None."""
  if perm is None:
    return None
  n = perm.shape[1]
  t = dense_valid.shape[1]
  dense = n + jnp.argsort(~dense_valid, axis=-1, stable=True).astype(jnp.int32)  # [G, T]
  n_dense = jnp.sum(dense_valid, axis=1, keepdims=True, dtype=jnp.int32)
  nv = num_valid.astype(jnp.int32)[:, None]
  p = jnp.arange(n + t, dtype=jnp.int32)[None, :]
  take = lambda a, i: jnp.take_along_axis(a, jnp.clip(i, 0, a.shape[1] - 1), axis=1)
  return jnp.where(p < nv, take(perm, p),
                   jnp.where(p < nv + n_dense, take(dense, p - nv),
                             jnp.where(p < n + n_dense, take(perm, p - n_dense),
                                       take(dense, p - n))))


def append_dense_tokens(clusters: Clusters, block_map: jax.Array, num_dense: int,
                        dense_key_mask: Optional[jax.Array]):
  """Adds trailing dense tokens (e.g. text) as one extra query and one extra key cluster.

  The extra query cluster (label Kq, the last `num_dense` queries) attends exactly to every
  valid key; the extra key cluster (label Kk, the valid dense keys) is exact for every
  query, so it never becomes a pseudo-token. Invalid keys, video or dense, get label Kk + 1
  and are attended by no one and compensated by no one.

  Args:
    clusters: clustering of the first S - num_dense tokens (masked keys labelled Kk).
    block_map: [G, Kq, Kk] routed map of those tokens.
    num_dense: number of trailing dense tokens T.
    dense_key_mask: [G, T] bool validity of the dense keys, or None (all valid).

  Returns:
    (Clusters over all S tokens with Kq + 1 / Kk + 1 clusters, block map [G, Kq+1, Kk+1]).
  """
  g, kq, kk = block_map.shape
  q, k = clusters.q, clusters.k
  if dense_key_mask is None:
    dense_key_mask = jnp.ones((g, num_dense), bool)
  q_labels = jnp.concatenate([q.labels, jnp.full((g, num_dense), kq, jnp.int32)], axis=1)
  q_sizes = jnp.concatenate([q.sizes, jnp.full((g, 1), num_dense, jnp.int32)], axis=1)
  video_k = jnp.where(k.labels == kk, kk + 1, k.labels)
  dense_k = jnp.where(dense_key_mask, kk, kk + 1).astype(jnp.int32)
  k_labels = jnp.concatenate([video_k, dense_k], axis=1)
  k_sizes = jnp.concatenate(
      [k.sizes, jnp.sum(dense_key_mask, axis=1, keepdims=True, dtype=jnp.int32)], axis=1)
  pad_row = lambda x: jnp.pad(x, ((0, 0), (0, 1)) + ((0, 0),) * (x.ndim - 2))
  spread = clusters.k_spread
  if spread is not None:  # the dense key cluster is exact for everyone: never a pseudo-token
    spread = comp.KeySpread(variance=pad_row(spread.variance), radius=pad_row(spread.radius))
  q_sq = None if clusters.q_sq_means is None else pad_row(clusters.q_sq_means)
  # the sorted orders of the new labels follow from the video ones (`layout` reuses them)
  q_perm = _appended_perm(q.perm, jnp.full((g,), q.labels.shape[1], jnp.int32),
                          jnp.ones((g, num_dense), bool))
  k_perm = _appended_perm(k.perm, jnp.sum(k.sizes, axis=1), dense_key_mask)
  ext = Clusters(
      q=dataclasses.replace(q, labels=q_labels, sizes=q_sizes, centroids=pad_row(q.centroids),
                            perm=q_perm),
      k=dataclasses.replace(k, labels=k_labels, sizes=k_sizes, centroids=pad_row(k.centroids),
                            perm=k_perm),
      v_centroids=pad_row(clusters.v_centroids), k_spread=spread, q_sq_means=q_sq)
  ext_map = jnp.pad(block_map, ((0, 0), (0, 1), (0, 1)), constant_values=True)
  return ext, ext_map
