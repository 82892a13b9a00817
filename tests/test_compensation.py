"""Second-moment ("variance") centroid compensation (ALGORITHM.md 9): the key statistics,
the logit correction and its clamp, and "variance" through every implementation."""

import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import numpy_reference as npr
from svg_ear_jax import (SvgEarConfig, SvgEarState, dense_attention_reference,
                         svg_ear_attention)
from svg_ear_jax import compensation as comp
from svg_ear_jax import error_probe, pipeline, reference, routing, sparse_attention

pytestmark = pytest.mark.split_cases

sa = importlib.import_module("pallas_kernels.sparse_attention")
sm = importlib.import_module("pallas_kernels.sparse_attention_mgpu")


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


def _clustered(seed, g=2, s=300, d=16, kk=10, spread=0.7, mask_some=False):
  """Keys around kk centres with their labels, sizes and mean centroids (empty cluster kk-1)."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, kk - 1, size=(g, s))
  centres = rng.normal(size=(g, kk, d)) * 2.0
  k = np.take_along_axis(centres, labels[..., None], 1) + spread * rng.normal(size=(g, s, d))
  if mask_some:
    labels[:, :7] = kk  # masked keys: in no cluster
  sizes = np.stack([np.bincount(l[l < kk], minlength=kk) for l in labels])
  cen = np.stack([[k[h][labels[h] == j].mean(0) if sizes[h, j] else centres[h, j]
                   for j in range(kk)] for h in range(g)])
  return k, labels, sizes, cen


@pytest.mark.parametrize("mask_some", [False, True])
def test_key_spread_matches_numpy(mask_some):
  k, labels, sizes, cen = _clustered(0, mask_some=mask_some)
  cen = cen + 0.01  # the centroids in use need not be the exact means
  spread = comp.key_spread(jnp.asarray(k, jnp.float32), jnp.asarray(labels, jnp.int32),
                           jnp.asarray(cen, jnp.float32), jnp.asarray(sizes, jnp.int32))
  for h in range(k.shape[0]):
    for j in range(cen.shape[1]):
      members = k[h][labels[h] == j] - cen[h, j]
      if len(members):
        np.testing.assert_allclose(spread.variance[h, j], (members ** 2).mean(0), rtol=1e-5)
        np.testing.assert_allclose(spread.radius[h, j],
                                   np.sqrt((members ** 2).sum(-1)).max(), rtol=1e-5)
      else:
        assert float(spread.radius[h, j]) == 0 and not np.any(spread.variance[h, j])


def test_key_spread_does_not_cancel_for_far_centroids():
  # |kbar| = 1e3 with a spread of 1e-2: E[k^2] - kbar^2 would lose everything in float32
  k, labels, sizes, cen = _clustered(1, spread=0.01)
  spread = comp.key_spread(jnp.asarray(k + 1e3, jnp.float32), jnp.asarray(labels, jnp.int32),
                           jnp.asarray(cen + 1e3, jnp.float32), jnp.asarray(sizes, jnp.int32))
  nonempty = sizes > 0
  np.testing.assert_allclose(np.asarray(spread.variance)[nonempty].mean(), 1e-4, rtol=0.1)


def test_gaussian_cluster_mass_is_recovered():
  # one cluster of 4,000 Gaussian keys: the paper's pseudo-token misses the analytic factor
  # e^{0.5 scale^2 (q*q) . var} of its softmax mass; the corrected one has it
  rng = np.random.default_rng(2)
  d, n = 16, 4000
  scale = d ** -0.5
  sigma = rng.uniform(0.3, 0.7, size=d)
  keys = rng.normal(size=(n, d)) * sigma + rng.normal(size=d)
  q = rng.choice([-2.0, 2.0], size=d)
  labels = jnp.zeros((1, n), jnp.int32)
  kbar = jnp.asarray(keys.mean(0)[None, None], jnp.float32)
  spread = comp.key_spread(jnp.asarray(keys[None], jnp.float32), labels, kbar,
                           jnp.full((1, 1), n, jnp.int32))
  corr = float(comp.logit_correction(jnp.asarray(q[None, None], jnp.float32), spread,
                                     scale)[0, 0, 0])
  log_true = np.log(np.exp(scale * keys @ q).sum())
  log_mean = np.log(n) + scale * keys.mean(0) @ q
  analytic = 0.5 * scale ** 2 * (q * q) @ sigma ** 2
  assert abs(log_true - log_mean - analytic) < 0.05  # "mean" is short by the factor
  assert abs(log_mean + corr - log_true) < 0.03  # corrected mass within 3%
  assert corr == pytest.approx(analytic, rel=0.05)


def test_clamp_bounds_an_adversarial_cluster():
  # two far-apart groups at +-a e_1: the Gaussian term 0.5 t^2 (t = scale a |q|) would
  # overshoot log cosh(t) ~ t; the clamp keeps the mass under the Cauchy-Schwarz bound
  d, n, a = 8, 100, 6.0
  scale = d ** -0.5
  keys = np.zeros((n, d))
  keys[: n // 2, 0], keys[n // 2:, 0] = a, -a
  q = np.zeros(d)
  q[0] = 3.0
  spread = comp.key_spread(jnp.asarray(keys[None], jnp.float32), jnp.zeros((1, n), jnp.int32),
                           jnp.zeros((1, 1, d), jnp.float32), jnp.full((1, 1), n, jnp.int32))
  corr = float(comp.logit_correction(jnp.asarray(q[None, None], jnp.float32), spread,
                                     scale)[0, 0, 0])
  t = scale * a * 3.0
  assert 0.5 * t * t > t  # the unclamped term would exceed the bound here
  assert corr == pytest.approx(t, rel=1e-5)  # clamped at scale ||q|| r
  log_true = np.log(np.exp(scale * keys @ q).sum())
  assert np.log(n) + corr >= log_true - 1e-4  # still at or above the true mass
  # every (query, cluster) pair of a random problem stays within [0, bound]
  k, labels, sizes, cen = _clustered(3, spread=2.0)
  spread = comp.key_spread(*(jnp.asarray(x) for x in (k.astype(np.float32), labels,
                                                      cen.astype(np.float32), sizes)))
  qs = jnp.asarray(np.random.default_rng(4).normal(size=(2, 50, 16)) * 3, jnp.float32)
  corr = np.asarray(comp.logit_correction(qs, spread, 0.25))
  bound = 0.25 * np.linalg.norm(qs, axis=-1)[..., None] * np.asarray(spread.radius)[:, None]
  assert np.all(corr >= 0) and np.all(corr <= bound * (1 + 1e-6))
  assert np.any(corr < bound * 0.99) and np.any(corr >= bound * (1 - 1e-6))  # both regimes


def _stage(p, spread):
  args = (jnp.asarray(p["q"], jnp.float32), jnp.asarray(p["k"], jnp.float32),
          jnp.asarray(p["v"], jnp.float32), jnp.asarray(p["q_labels"], jnp.int32),
          jnp.asarray(p["k_labels"], jnp.int32), jnp.asarray(p["block_map"]),
          jnp.asarray(p["kc"], jnp.float32), jnp.asarray(p["vc"], jnp.float32),
          jnp.asarray(p["k_sizes"], jnp.int32))
  return args


@pytest.mark.parametrize("seed", [0, 1])
def test_variance_attention_matches_numpy(seed):
  from test_attention import _stage_problem
  p = _stage_problem(seed)
  args = _stage(p, None)
  spread = comp.key_spread(args[1], args[4], args[6], args[8])
  for fn in (sparse_attention.sparse_attention_xla, reference.sparse_attention_reference):
    out = fn(*args, scale=p["scale"], compensation="variance", k_spread=spread)
    for h in range(2):
      want = npr.compensated_attention(
          p["q"][h], p["k"][h], p["v"][h], p["q_labels"][h], p["k_labels"][h],
          p["block_map"][h], p["kc"][h], p["vc"][h], p["k_sizes"][h], p["scale"], True,
          k_variance=np.asarray(spread.variance[h]), k_radius=np.asarray(spread.radius[h]))
      np.testing.assert_allclose(out[h], want, atol=2e-5)
  mean = sparse_attention.sparse_attention_xla(*args, scale=p["scale"], compensation="mean")
  out = sparse_attention.sparse_attention_xla(*args, scale=p["scale"], compensation="variance",
                                              k_spread=spread)
  assert _rel(out, mean) > 1e-3  # the correction is not a no-op here


def test_zero_variance_equals_mean_exactly():
  from test_attention import _stage_problem
  p = _stage_problem(2, identical=True)
  args = _stage(p, None)
  spread = comp.key_spread(args[1], args[4], args[6], args[8])
  assert float(jnp.max(spread.variance)) < 1e-10 and float(jnp.max(spread.radius)) < 1e-5
  spread = comp.KeySpread(jnp.zeros_like(spread.variance), jnp.zeros_like(spread.radius))
  for fn in (sparse_attention.sparse_attention_xla, reference.sparse_attention_reference):
    mean = fn(*args, scale=p["scale"], compensation="mean")
    var = fn(*args, scale=p["scale"], compensation="variance", k_spread=spread)
    np.testing.assert_array_equal(np.asarray(var), np.asarray(mean))


def test_identical_cluster_members_give_mean_through_the_public_api():
  # keys that repeat 16 distinct vectors, k-means warm-started on them: every spread is 0,
  # and "variance" is "mean" to rounding
  rng = np.random.default_rng(5)
  base = rng.normal(size=(1, 16, 2, 32))
  k = jnp.asarray(np.repeat(base, 20, axis=1), jnp.float32)
  q, v = (jnp.asarray(rng.normal(size=k.shape), jnp.float32) for _ in range(2))
  state = SvgEarState(q_centroids=jnp.asarray(q[:, :8].transpose(0, 2, 1, 3)),
                      k_centroids=jnp.asarray(base.transpose(0, 2, 1, 3), jnp.float32))
  cfg = SvgEarConfig(num_q_clusters=8, num_k_clusters=16, kmeans_iters_warm=3, density=0.3,
                     implementation="xla")
  heads_first = lambda x: x.transpose(0, 2, 1, 3).reshape(2, 320, 32)
  clusters = pipeline.cluster(*(heads_first(x) for x in (q, k, v)),
                              cfg.replace(compensation="variance"), "xla",
                              q_init=state.q_centroids.reshape(2, 8, 32),
                              k_init=state.k_centroids.reshape(2, 16, 32))
  assert int(clusters.k.sizes.min()) == 20
  assert float(jnp.max(clusters.k_spread.variance)) < 1e-10
  mean, aux = svg_ear_attention(q, k, v, cfg.replace(compensation="mean"), state=state,
                                return_aux=True)
  var = svg_ear_attention(q, k, v, cfg.replace(compensation="variance"), state=state)
  assert float(aux.density.max()) < 0.5
  np.testing.assert_allclose(np.asarray(var), np.asarray(mean), atol=1e-6)


def test_probe_estimates_the_error_of_the_compensation_in_use():
  # "variance" changes the probe's pseudo-token logit, and the estimate is the direct sum
  # of the corrected block errors (numpy, with the corrected logit)
  from test_routing import _problem
  p = _problem(0, spread=0.8)
  f = lambda x: jnp.asarray(x, jnp.float32)
  labels, sizes = jnp.asarray(p["k_labels"], jnp.int32), jnp.asarray(p["k_sizes"], jnp.int32)
  logits = routing.centroid_logits(f(p["qc"]), f(p["kc"]), p["scale"])
  spread = comp.key_spread(f(p["k"]), labels, f(p["kc"]), sizes)
  corr = comp.logit_correction(f(p["qc"]), spread, p["scale"])
  probe = functools.partial(error_probe.error_probe_xla, f(p["qc"]), f(p["k"]), f(p["v"]),
                            labels, sizes, f(p["vc"]), scale=p["scale"])
  mean_err, var_err = np.asarray(probe(logits)), np.asarray(probe(logits + corr))
  nonempty = np.broadcast_to((p["k_sizes"] > 0)[:, None, :], mean_err.shape)
  assert np.abs(var_err[nonempty] - mean_err[nonempty]).max() > 1e-2
  for h in range(2):
    err = npr.block_error(p["qc"][h], p["k"][h], p["v"][h], p["k_labels"][h], p["kc"][h],
                          p["vc"][h], p["scale"], logit_offset=np.asarray(corr[h]))
    ok = p["k_sizes"][h] > 0
    np.testing.assert_allclose(var_err[h][:, ok], np.log(err[:, ok]), atol=2e-3)
  # the Pallas probe (interpret mode) takes the same corrected logits
  pk = importlib.import_module("pallas_kernels.error_probe")
  lay_order = jnp.argsort(labels, axis=1, stable=True).astype(jnp.int32)
  got = pk.ear_error_probe(f(p["qc"]), f(p["k"]), f(p["v"]), f(p["kc"]), f(p["vc"]), sizes,
                           sm_scale=p["scale"], kv_index=lay_order, pseudo_logits=logits + corr,
                           block_qc=16, block_k=16, interpret=True)
  np.testing.assert_allclose(np.asarray(got)[nonempty], var_err[nonempty], atol=2e-3)


def _qkv(seed, b, s, h, d, dtype, key_scale=1.0):
  ks = jax.random.split(jax.random.PRNGKey(seed), 3)
  q, k, v = (jax.random.normal(x, (b, s, h, d), jnp.float32) for x in ks)
  return q.astype(dtype), (k * key_scale).astype(dtype), v.astype(dtype)


@pytest.mark.parametrize("routing_name", ["ear", "topp"])
def test_implementations_agree_on_variance(routing_name):
  # reference == xla (float32, S not a power of two, B = 2)
  q, k, v = _qkv(6, 2, 333, 2, 16, jnp.float32)
  cfg = SvgEarConfig(routing=routing_name, num_q_clusters=10, num_k_clusters=30,
                     kmeans_iters=5, density=0.3, compensation="variance")
  out_x, aux_x = svg_ear_attention(q, k, v, cfg.replace(implementation="xla"), return_aux=True)
  out_r, aux_r = svg_ear_attention(q, k, v, cfg.replace(implementation="reference"),
                                   return_aux=True)
  np.testing.assert_allclose(out_x, out_r, atol=2e-5)
  np.testing.assert_allclose(aux_x.density, aux_r.density, rtol=1e-6)
  mean = svg_ear_attention(q, k, v, cfg.replace(implementation="xla", compensation="mean"))
  assert _rel(out_x, mean) > 1e-3


@pytest.mark.parametrize("kernel,dtype", [("triton", jnp.float32), ("triton", jnp.bfloat16),
                                          ("mosaic", jnp.bfloat16)])
def test_pallas_kernels_agree_with_xla_on_variance(kernel, dtype):
  # on CPU: interpreted Triton / emulated Mosaic; on the GPU both compiled
  q, k, v = _qkv(7, 2, 300, 2, 64, dtype)
  cfg = SvgEarConfig(num_q_clusters=6, num_k_clusters=20, kmeans_iters=5, density=0.4,
                     compensation="variance")
  out_x = svg_ear_attention(q, k, v, cfg.replace(implementation="xla"))
  out_p = svg_ear_attention(q, k, v, cfg.replace(implementation="pallas",
                                                 attention_kernel=kernel))
  assert out_p.dtype == dtype
  assert _rel(out_p.astype(jnp.float32), out_x.astype(jnp.float32)) < (
      1e-2 if dtype == jnp.bfloat16 else 5e-3)


@pytest.mark.parametrize("impl,kernel,dtype", [("xla", "auto", jnp.float32),
                                               ("xla", "auto", jnp.bfloat16),
                                               ("reference", "auto", jnp.float32),
                                               ("pallas", "triton", jnp.bfloat16),
                                               ("pallas", "mosaic", jnp.bfloat16)])
def test_huge_variance_stays_finite(impl, kernel, dtype):
  # keys 300x larger than the queries: corrections of thousands of nats, clamped, never
  # inf or NaN; B = 2 and S = 777
  q, k, v = _qkv(8, 2, 777, 2, 64, dtype, key_scale=300.0)
  cfg = SvgEarConfig(num_q_clusters=6, num_k_clusters=24, kmeans_iters=3, density=0.2,
                     compensation="variance", implementation=impl, attention_kernel=kernel)
  out = np.asarray(svg_ear_attention(q, k, v, cfg), np.float32)
  assert np.all(np.isfinite(out))
  # with such keys softmax is almost one-hot: the output stays within the values' range
  assert np.abs(out).max() <= np.abs(np.asarray(v, np.float32)).max() + 1e-2


def test_variance_lowers_the_error_on_a_clustered_workload():
  # the point of the mode: on video-like attention it beats "mean" at the same density
  from benchmarks import workloads
  q, k, v = (jnp.asarray(x) for x in workloads.structured(workloads.Grid(4, 12, 16), 2, 64))
  ref = dense_attention_reference(q, k, v)
  cfg = SvgEarConfig(num_q_clusters=12, num_k_clusters=48, kmeans_iters=10, density=0.2,
                     implementation="xla")
  err = {m: _rel(svg_ear_attention(q, k, v, cfg.replace(compensation=m)), ref)
         for m in ("none", "mean", "variance")}
  assert err["variance"] < 0.9 * err["mean"] < 0.9 * err["none"]


def test_stage_calls_need_the_spread():
  with pytest.raises(ValueError, match="k_spread"):
    comp.mode("variance", None)
  with pytest.raises(ValueError, match="compensation"):
    comp.mode("gaussian", None)
  assert comp.mode(True, None) == "mean" and comp.mode(False, None) == "none"


def test_cluster_stage_statistics_for_variance():
  # one scatter gives the value means and the key spread; the query clusters' mean of
  # q*q is the probe's second moment, and q_sq = qbar*qbar reproduces the centroid form
  q, k, v = (x.transpose(0, 2, 1, 3).reshape(4, 200, 16) for x in _qkv(9, 2, 200, 2, 16,
                                                                          jnp.float32))
  cfg = SvgEarConfig(num_q_clusters=6, num_k_clusters=12, kmeans_iters=4,
                     compensation="variance")
  c = pipeline.cluster(q, k, v, cfg, "xla")
  mean_cfg = pipeline.cluster(q, k, v, cfg.replace(compensation="mean"), "xla")
  np.testing.assert_allclose(c.v_centroids, mean_cfg.v_centroids, rtol=1e-5, atol=1e-6)
  assert mean_cfg.k_spread is None and mean_cfg.q_sq_means is None
  alone = comp.key_spread(k, c.k.labels, c.k.centroids, c.k.sizes)
  np.testing.assert_allclose(c.k_spread.variance, alone.variance, rtol=1e-6)
  qn, lab = np.asarray(q, np.float64), np.asarray(c.q.labels)
  for g in range(4):
    for i in range(6):
      if (lab[g] == i).any():
        np.testing.assert_allclose(c.q_sq_means[g, i], (qn[g][lab[g] == i] ** 2).mean(0),
                                   rtol=1e-5)
  qc = c.q.centroids
  np.testing.assert_allclose(comp.logit_correction(qc, c.k_spread, 0.25, q_sq=qc * qc),
                             comp.logit_correction(qc, c.k_spread, 0.25), rtol=1e-6)


def test_pallas_cluster_stage_matches_xla_for_variance():
  # the pallas implementation's sorted-walk moments (interpret mode on CPU) against the
  # XLA scatter-adds, on the same clustering
  q, k, v = (x.transpose(0, 2, 1, 3).reshape(4, 200, 64) for x in _qkv(10, 2, 200, 2, 64,
                                                                          jnp.bfloat16))
  cfg = SvgEarConfig(num_q_clusters=6, num_k_clusters=12, kmeans_iters=4,
                     compensation="variance")
  x = pipeline.cluster(q, k, v, cfg, "xla")
  p = pipeline.cluster(q, k, v, cfg, "pallas")
  np.testing.assert_array_equal(np.asarray(p.k.labels), np.asarray(x.k.labels))
  for name in ("v_centroids", "q_sq_means"):
    np.testing.assert_allclose(getattr(p, name), getattr(x, name), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(p.k_spread.variance, x.k_spread.variance, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(p.k_spread.radius, x.k_spread.radius, rtol=1e-4, atol=1e-5)
