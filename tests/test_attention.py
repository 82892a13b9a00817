import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import numpy_reference as npr
from svg_ear_jax import (SvgEarConfig, SvgEarState, dense_attention, dense_attention_reference,
                         global_head_ids, svg_ear_attention)
from svg_ear_jax import reference, sparse_attention

pytestmark = pytest.mark.split_cases

SMALL = dict(num_q_clusters=8, num_k_clusters=16, kmeans_iters=8)


def _qkv(seed, b=1, s=256, h=2, d=32, dtype=jnp.float32):
  ks = jax.random.split(jax.random.PRNGKey(seed), 3)
  return tuple(jax.random.normal(k, (b, s, h, d), jnp.float32).astype(dtype) for k in ks)


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


def _stage_problem(seed, g=2, s=200, d=16, kq=5, kk=9, identical=False):
  """Stage-level inputs with hand-made labels: empty and singleton clusters included."""
  rng = np.random.default_rng(seed)
  q_labels = rng.integers(0, kq, size=(g, s))
  k_labels = rng.integers(0, kk - 2, size=(g, s))
  k_labels[:, 0] = kk - 2  # a singleton cluster; cluster kk-1 stays empty
  k_labels[:, 1:][k_labels[:, 1:] == kk - 2] = 0
  q = rng.normal(size=(g, s, d))
  kc = rng.normal(size=(g, kk, d))
  vc = rng.normal(size=(g, kk, d))
  if identical:
    k = np.take_along_axis(kc, k_labels[..., None], 1)
    v = np.take_along_axis(vc, k_labels[..., None], 1)
  else:
    k = np.take_along_axis(kc, k_labels[..., None], 1) + 0.5 * rng.normal(size=(g, s, d))
    v = rng.normal(size=(g, s, d))
  k_sizes = np.stack([np.bincount(l, minlength=kk) for l in k_labels])
  for h in range(g):
    for j in range(kk):
      if k_sizes[h, j]:
        kc[h, j] = k[h][k_labels[h] == j].mean(0)
        vc[h, j] = v[h][k_labels[h] == j].mean(0)
      else:
        vc[h, j] = 0.0
  block_map = rng.random((g, kq, kk)) < 0.4
  block_map[:, 0, :] = False
  block_map[:, 0, 3] = True  # a row with a single exact cluster
  return dict(q=q, k=k, v=v, q_labels=q_labels, k_labels=k_labels, block_map=block_map, kc=kc,
              vc=vc, k_sizes=k_sizes, scale=d ** -0.5)


def _stage_args(p, dtype=jnp.float32):
  f = lambda x: jnp.asarray(x, dtype)
  i = lambda x: jnp.asarray(x, jnp.int32)
  return (f(p["q"]), f(p["k"]), f(p["v"]), i(p["q_labels"]), i(p["k_labels"]),
          jnp.asarray(p["block_map"]), jnp.asarray(p["kc"], jnp.float32),
          jnp.asarray(p["vc"], jnp.float32), i(p["k_sizes"]))


# ----------------------------------------------------------------------------- stage level

@pytest.mark.parametrize("compensation", [True, False])
@pytest.mark.parametrize("seed", [0, 1])
def test_compensated_attention_matches_numpy(seed, compensation):
  p = _stage_problem(seed)
  args = _stage_args(p)
  xla = sparse_attention.sparse_attention_xla(*args, scale=p["scale"], compensation=compensation)
  ref = reference.sparse_attention_reference(*args, scale=p["scale"], compensation=compensation)
  for h in range(2):
    want = npr.compensated_attention(p["q"][h], p["k"][h], p["v"][h], p["q_labels"][h],
                                     p["k_labels"][h], p["block_map"][h], p["kc"][h],
                                     p["vc"][h], p["k_sizes"][h], p["scale"], compensation)
    np.testing.assert_allclose(xla[h], want, atol=2e-5)
    np.testing.assert_allclose(ref[h], want, atol=2e-5)


def test_compensation_is_exact_for_identical_cluster_members():
  p = _stage_problem(2, identical=True)
  args = _stage_args(p)
  out = sparse_attention.sparse_attention_xla(*args, scale=p["scale"], compensation=True)
  q, k, v = (jnp.asarray(p[n], jnp.float32) for n in "qkv")
  dense = jax.nn.softmax(jnp.einsum("gqd,gkd->gqk", q, k, precision="highest") * p["scale"], -1)
  dense = jnp.einsum("gqk,gkd->gqd", dense, v, precision="highest")
  np.testing.assert_allclose(out, dense, atol=1e-5)
  without = sparse_attention.sparse_attention_xla(*args, scale=p["scale"], compensation=False)
  assert _rel(without, dense) > 1e-2  # dropping the skipped blocks is not exact


def test_rows_with_nothing_to_attend_are_zero():
  p = _stage_problem(3)
  p["block_map"][:, 1, :] = False
  args = _stage_args(p)
  out = sparse_attention.sparse_attention_xla(*args, scale=p["scale"], compensation=False)
  rows = p["q_labels"] == 1
  assert np.all(np.asarray(out)[rows] == 0) and np.all(np.isfinite(out))


def test_attention_chunking_is_invisible():
  p = _stage_problem(4, s=333)
  args = _stage_args(p)
  a = sparse_attention.sparse_attention_xla(*args, scale=p["scale"], compensation=True,
                                            chunk_mb=0)
  b = sparse_attention.sparse_attention_xla(*args, scale=p["scale"], compensation=True,
                                            chunk_mb=4096)
  np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- public API

@pytest.mark.parametrize("impl", ["xla", "reference"])
def test_dense_routing_equals_dense(impl):
  q, k, v = _qkv(0)
  out, aux = svg_ear_attention(q, k, v, SvgEarConfig(routing="dense", implementation=impl),
                               return_aux=True)
  assert _rel(out, dense_attention_reference(q, k, v)) < 1e-4
  assert aux.state is None and aux.density.shape == (1, 2) and bool(jnp.all(aux.density == 1))


@pytest.mark.parametrize("masked", [False, True])
def test_dense_kmeans_keeps_dense_output_and_sparse_centroids(masked):
  """routing "dense" + dense_kmeans: dense output, the centroids the sparse path would
  leave (cold, then warm from a state), text tokens and padding keys excluded alike."""
  q, k, v = _qkv(1, b=2, s=192)
  extra = {}
  if masked:
    mask = jnp.ones((2, 192), bool).at[1, 180:].set(False)
    extra = dict(num_dense_tokens=16, key_mask=mask)
  sparse = SvgEarConfig(**SMALL, implementation="xla")
  dense = sparse.replace(routing="dense", dense_kmeans=True)
  out, aux = svg_ear_attention(q, k, v, dense, return_aux=True, **extra)
  want, _ = svg_ear_attention(q, k, v, sparse.replace(routing="dense"), return_aux=True,
                              **extra)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(want))
  _, ref = svg_ear_attention(q, k, v, sparse, return_aux=True, **extra)
  for got, exp in zip(jax.tree.leaves(aux.state), jax.tree.leaves(ref.state)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(exp), rtol=1e-6, atol=1e-6)
  _, warm = svg_ear_attention(q, k, v, dense, state=aux.state, return_aux=True, **extra)
  _, warm_ref = svg_ear_attention(q, k, v, sparse, state=ref.state, return_aux=True, **extra)
  for got, exp in zip(jax.tree.leaves(warm.state), jax.tree.leaves(warm_ref.state)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(exp), rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match="dense_kmeans"):
    SvgEarConfig(dense_kmeans=1)


@pytest.mark.parametrize("impl", ["xla", "reference"])
@pytest.mark.parametrize("changes", [dict(routing="topp", top_p=1.0),
                                     dict(routing="ear", top_p=1.0),
                                     dict(routing="ear", density=1.0),
                                     dict(routing="topp", density=1.0, compensation=False)])
def test_full_budget_equals_dense(impl, changes):
  q, k, v = _qkv(1, s=300)
  cfg = SvgEarConfig(implementation=impl, **SMALL, **changes)
  out, aux = svg_ear_attention(q, k, v, cfg, return_aux=True)
  assert _rel(out, dense_attention_reference(q, k, v)) < 1e-4
  np.testing.assert_allclose(aux.density, 1.0, rtol=1e-6)


@pytest.mark.parametrize("s", [1000, 777])
@pytest.mark.parametrize("routing_name", ["ear", "topp"])
def test_xla_equals_reference(s, routing_name):
  q, k, v = _qkv(2, b=2, s=s, h=2, d=16)
  cfg = SvgEarConfig(routing=routing_name, num_q_clusters=20, num_k_clusters=60, kmeans_iters=6,
                     top_p=0.7)
  out_x, aux_x = svg_ear_attention(q, k, v, cfg.replace(implementation="xla"), return_aux=True)
  out_r, aux_r = svg_ear_attention(q, k, v, cfg.replace(implementation="reference"),
                                   return_aux=True)
  np.testing.assert_allclose(out_x, out_r, atol=2e-5)
  np.testing.assert_allclose(aux_x.density, aux_r.density, rtol=1e-6)
  assert float(aux_x.density.max()) < 0.95


def test_jit_batch_and_warm_state():
  q, k, v = _qkv(3, b=2, s=256)
  cfg = SvgEarConfig(**SMALL)
  fn = jax.jit(functools.partial(svg_ear_attention, cfg=cfg, return_aux=True))
  out, aux = fn(q, k, v)
  assert out.shape == q.shape and out.dtype == q.dtype
  assert aux.state.q_centroids.shape == (2, 2, 8, 32)
  assert aux.state.k_centroids.shape == (2, 2, 16, 32)
  assert aux.density.shape == (2, 2)
  out2, aux2 = fn(q, k, v, state=aux.state)
  # 8 cold iterations then 2 warm ones are 10 Lloyd iterations from the same start
  out10, aux10 = svg_ear_attention(q, k, v, cfg.replace(kmeans_iters=10), return_aux=True)
  np.testing.assert_allclose(aux2.state.k_centroids, aux10.state.k_centroids, atol=1e-5)
  np.testing.assert_allclose(aux2.state.q_centroids, aux10.state.q_centroids, atol=1e-5)
  np.testing.assert_allclose(out2, out10, atol=1e-5)
  # batch elements are independent: the second batch row alone gives the same result
  one = svg_ear_attention(q[1:], k[1:], v[1:], cfg, state=SvgEarState(
      aux.state.q_centroids[1:], aux.state.k_centroids[1:]))
  np.testing.assert_allclose(one, out2[1:], atol=1e-5)


def test_bf16_inputs():
  q, k, v = _qkv(4, s=320, dtype=jnp.bfloat16)
  cfg = SvgEarConfig(**SMALL, density=1.0)
  out = jax.jit(svg_ear_attention, static_argnums=3)(q, k, v, cfg)
  assert out.dtype == jnp.bfloat16
  assert _rel(out.astype(jnp.float32), dense_attention_reference(q, k, v)) < 1e-2


def test_dense_attention_wrapper():
  q, k, v = _qkv(5, b=2, s=64)
  assert _rel(dense_attention(q, k, v), dense_attention_reference(q, k, v)) < 1e-5


def test_sparse_output_is_a_reasonable_approximation():
  # plain random data: the sparse result must still be far closer to dense than 0
  q, k, v = _qkv(6, s=512)
  cfg = SvgEarConfig(num_q_clusters=16, num_k_clusters=32, kmeans_iters=10)
  out, aux = svg_ear_attention(q, k, v, cfg, return_aux=True)
  assert float(aux.density.mean()) < 0.98
  assert _rel(out, dense_attention_reference(q, k, v)) < 0.5


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("make,exc,match", [
    (lambda q: (q[0], q, q), ValueError, "must be \\[B, S, H, D\\]"),
    (lambda q: (q, q[:, :50], q), ValueError, "same shape"),
    (lambda q: (q, q, q.astype(jnp.bfloat16)), TypeError, "one dtype"),
    (lambda q: ((q * 4).astype(jnp.int32),) * 3, TypeError, "floating"),
    (lambda q: (q[:, :10], q[:, :10], q[:, :10]), ValueError, "smaller than cfg.num_k_clusters"),
    (lambda q: (jnp.zeros((1, 64, 1, 300)),) * 3, ValueError, "head dim"),
    (lambda q: (np.asarray(q).tolist(), q, q), TypeError, "must be an array"),
])
def test_bad_inputs_raise(make, exc, match):
  q, _, _ = _qkv(7, s=64)
  with pytest.raises(exc, match=match):
    svg_ear_attention(*make(q), SvgEarConfig(**SMALL))


def test_bad_state_raises():
  q, k, v = _qkv(8, s=64)
  cfg = SvgEarConfig(**SMALL)
  good = SvgEarState(jnp.zeros((1, 2, 8, 32)), jnp.zeros((1, 2, 16, 32)))
  svg_ear_attention(q, k, v, cfg, state=good)
  with pytest.raises(ValueError, match="state.k_centroids"):
    svg_ear_attention(q, k, v, cfg, state=SvgEarState(good.q_centroids, jnp.zeros((1, 2, 9, 32))))
  with pytest.raises(ValueError, match="state.q_centroids"):
    svg_ear_attention(q, k, v, cfg, state=SvgEarState(jnp.zeros((2, 2, 8, 32)), good.k_centroids))
  with pytest.raises(TypeError, match="SvgEarState"):
    svg_ear_attention(q, k, v, cfg, state=(good.q_centroids, good.k_centroids))
  with pytest.raises(TypeError, match="SvgEarConfig"):
    svg_ear_attention(q, k, v, dict(routing="ear"))


def test_head_ids_values_and_bad_head_ids():
  """(That a head slice with its global head_ids cold-starts as the unsliced call: in
  test_kmeans for the draw, in tests/parallel through the sharded models.)"""
  np.testing.assert_array_equal(np.asarray(global_head_ids(2, 4)), np.arange(8).reshape(2, 4))
  np.testing.assert_array_equal(
      np.asarray(global_head_ids(1, 2, batch_offset=1, head_offset=jnp.int32(2), total_heads=4)),
      [[6, 7]])
  q = k = v = jnp.zeros((2, 32, 4, 8))
  cfg = SvgEarConfig(num_q_clusters=4, num_k_clusters=8)
  with pytest.raises(ValueError, match=r"head_ids must be \[B, H\] = \(2, 4\)"):
    svg_ear_attention(q, k, v, cfg, head_ids=jnp.zeros((2, 3), jnp.int32))
  with pytest.raises(TypeError, match="head_ids must be integers"):
    svg_ear_attention(q, k, v, cfg, head_ids=jnp.zeros((2, 4)))


def test_inside_flax_nnx_module():
  nnx = pytest.importorskip("flax.nnx")

  class Centroids(nnx.Variable):
    pass

  class SparseSelfAttention(nnx.Module):
    def __init__(self, cfg, b, h, d):
      self.cfg = cfg
      self.q_c = Centroids(jnp.zeros((b, h, cfg.num_q_clusters, d)))
      self.k_c = Centroids(jnp.zeros((b, h, cfg.num_k_clusters, d)))
      self.calls = Centroids(jnp.zeros((), jnp.int32))

    def __call__(self, q, k, v):
      warm = SvgEarState(self.q_c[...], self.k_c[...])
      out_w, aux_w = svg_ear_attention(q, k, v, self.cfg.replace(kmeans_iters=1), state=warm,
                                       return_aux=True)
      out_c, aux_c = svg_ear_attention(q, k, v, self.cfg, return_aux=True)
      first = self.calls[...] == 0
      pick = lambda c, w: jnp.where(first, c, w)
      self.q_c[...] = pick(aux_c.state.q_centroids, aux_w.state.q_centroids)
      self.k_c[...] = pick(aux_c.state.k_centroids, aux_w.state.k_centroids)
      self.calls[...] = self.calls[...] + 1
      return pick(out_c, out_w)

  q, k, v = _qkv(9, s=128)
  mod = SparseSelfAttention(SvgEarConfig(**SMALL), 1, 2, 32)

  @nnx.jit
  def step(m, q, k, v):
    return m(q, k, v)

  out1 = step(mod, q, k, v)
  c1 = np.asarray(mod.k_c[...])
  out2 = step(mod, q, k, v)
  assert int(mod.calls[...]) == 2 and np.abs(c1).sum() > 0
  assert _rel(out2, out1) < 0.05


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("routing_name", ["ear", "topp"])
def test_pallas_matches_xla(dtype, routing_name):
  # On CPU the kernels run in Pallas interpret mode; on the H100 they are compiled.
  q, k, v = _qkv(10, b=2, s=300, h=2, d=32, dtype=dtype)
  cfg = SvgEarConfig(routing=routing_name, num_q_clusters=6, num_k_clusters=20, kmeans_iters=5)
  out_x, aux_x = svg_ear_attention(q, k, v, cfg.replace(implementation="xla"), return_aux=True)
  out_p, aux_p = svg_ear_attention(q, k, v, cfg.replace(implementation="pallas"),
                                   return_aux=True)
  assert out_p.dtype == dtype
  np.testing.assert_allclose(aux_p.density, aux_x.density, atol=0.02)
  assert _rel(out_p.astype(jnp.float32), out_x.astype(jnp.float32)) < (
      1e-2 if dtype == jnp.bfloat16 else 5e-3)


@pytest.mark.parametrize("compensation,update", [("mean", "segment_sum"),
                                                 ("variance", "segment_sum"),
                                                 ("mean", "sorted"), ("variance", "sorted")])
def test_pallas_matches_xla_with_text_tokens_and_padding(compensation, update, monkeypatch):
  # HunyuanVideo's layout: trailing text tokens (num_dense_tokens) with padded keys; the
  # pallas path reads the video rows of the tokens-first arrays in place; with the
  # "sorted" k-means update every later stage reuses its orders (append_dense_tokens
  # extends them, attend reads them)
  from svg_ear_jax import pipeline
  monkeypatch.setattr(pipeline, "KMEANS_UPDATE", update)
  q, k, v = _qkv(11, b=2, s=233, h=2, d=16)
  mask = jnp.ones((2, 233), bool).at[0, 225:].set(False).at[1, 100:104].set(False)
  cfg = SvgEarConfig(num_q_clusters=6, num_k_clusters=16, kmeans_iters=4, density=0.3,
                     compensation=compensation)
  run = lambda impl, **kw: svg_ear_attention(q, k, v, cfg.replace(implementation=impl),
                                             num_dense_tokens=21, key_mask=mask,
                                             return_aux=True, **kw)
  out_x, aux_x = run("xla")
  out_p, aux_p = run("pallas")
  np.testing.assert_allclose(aux_p.density, aux_x.density, atol=0.02)
  assert _rel(out_p, out_x) < 5e-3
  for got, want in zip(jax.tree.leaves(aux_p.state), jax.tree.leaves(aux_x.state)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
  # warm start from the state, as the next denoising step does
  out_x2, _ = run("xla", state=aux_x.state)
  out_p2, _ = run("pallas", state=aux_p.state)
  assert _rel(out_p2, out_x2) < 5e-3


def test_pallas_kmeans_updates_agree():
  """pipeline.KMEANS_UPDATE: the sort-based update (the default) and the XLA segment sum
  give the same call up to float rounding."""
  from svg_ear_jax import pipeline
  q, k, v = _qkv(12, b=2, s=200, h=2, d=16, dtype=jnp.bfloat16)
  cfg = SvgEarConfig(num_q_clusters=6, num_k_clusters=16, kmeans_iters=4, density=0.3,
                     implementation="pallas", compensation="mean")
  assert pipeline.KMEANS_UPDATE == "sorted"
  qkv = (q, k, v)
  sorted_ = pipeline.cluster(*qkv, cfg, "pallas", num_rows=180)
  segment = pipeline.cluster(*qkv, cfg, "pallas", num_rows=180, kmeans_update="segment_sum")
  assert sorted_.k.perm is not None and segment.k.perm is None
  for a, b in ((sorted_.q, segment.q), (sorted_.k, segment.k)):
    np.testing.assert_array_equal(np.asarray(a.labels), np.asarray(b.labels))
    np.testing.assert_allclose(np.asarray(a.centroids), np.asarray(b.centroids), rtol=1e-5,
                               atol=1e-6)
  np.testing.assert_allclose(np.asarray(sorted_.v_centroids), np.asarray(segment.v_centroids),
                             rtol=1e-5, atol=1e-6)
  maps = [pipeline.route(*qkv, c, cfg, "pallas", num_rows=180) for c in (sorted_, segment)]
  np.testing.assert_array_equal(np.asarray(maps[0]), np.asarray(maps[1]))
  with pytest.raises(ValueError, match="kmeans_update"):
    pipeline.cluster(*qkv, cfg, "pallas", kmeans_update="atomic")


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_stages_take_tokens_first_or_head_major(impl):
  """cluster / route on [B, S, H, D] with num_rows equal the same stages on head-major
  copies of the first num_rows tokens (the pallas kernels read the former in place)."""
  from svg_ear_jax import pipeline
  b, s, h, d, n = 2, 190, 2, 16, 170
  q, k, v = _qkv(13, b=b, s=s, h=h, d=d)
  heads = lambda x: x.transpose(0, 2, 1, 3).reshape(b * h, s, d)[:, :n]
  cfg = SvgEarConfig(num_q_clusters=5, num_k_clusters=12, kmeans_iters=3, density=0.3,
                     compensation="variance")
  tokens = pipeline.cluster(q, k, v, cfg, impl, num_rows=n)
  major = pipeline.cluster(heads(q), heads(k), heads(v), cfg, impl)
  for got, want in zip(jax.tree.leaves(tokens), jax.tree.leaves(major)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(
      np.asarray(pipeline.route(q, k, v, tokens, cfg, impl, num_rows=n)),
      np.asarray(pipeline.route(heads(q), heads(k), heads(v), major, cfg, impl)))


@pytest.mark.parametrize("masked", [False, True])
def test_appended_dense_tokens_keep_the_sorted_order(masked):
  """append_dense_tokens derives the sorted order of its labels from the k-means one (no
  sort): pipeline.layout of the result is the stable argsort of the extended labels."""
  from svg_ear_jax import permutation, pipeline
  b, s, h, d, t = 2, 150, 2, 16, 22
  q, k, v = _qkv(14, b=b, s=s, h=h, d=d)
  mask = jnp.ones((b * h, s), bool)
  if masked:
    mask = mask.at[1, 120:125].set(False).at[2, 140:].set(False).at[3, :3].set(False)
  cfg = SvgEarConfig(num_q_clusters=5, num_k_clusters=12, kmeans_iters=3, density=0.3,
                     compensation="mean")
  n = s - t
  clusters = pipeline.cluster(q, k, v, cfg, "pallas", k_mask=mask[:, :n], num_rows=n,
                              kmeans_update="sorted")
  block_map = pipeline.route(q, k, v, clusters, cfg, "pallas", num_rows=n)
  ext, _ = pipeline.append_dense_tokens(clusters, block_map, t, mask[:, n:])
  for res in (ext.q, ext.k):
    assert res.perm is not None
    want = permutation.cluster_layout(res.labels, res.sizes)
    got = pipeline.layout(res)
    for a, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(w))


@pytest.mark.parametrize("impl", ["pallas", "xla"])
def test_narrow_label_sort_keys_give_the_same_call(impl, monkeypatch):
  # permutation.LABEL_SORT_KEYS: every label argsort of the call (k-means updates, layouts)
  # with uint16 keys gives the int32 keys' orders, so the same output bit for bit
  from svg_ear_jax import permutation
  q, k, v = _qkv(15, s=192)
  cfg = SvgEarConfig(implementation=impl, routing="ear", density=0.3, **SMALL)
  out = {}
  for keys in permutation.LABEL_SORT_KEYS_CHOICES:
    monkeypatch.setattr(permutation, "LABEL_SORT_KEYS", keys)
    out[keys] = np.asarray(svg_ear_attention(q, k, v, cfg))
  np.testing.assert_array_equal(out["narrow"], out["int32"])
