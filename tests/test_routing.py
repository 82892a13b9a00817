import jax.numpy as jnp
import numpy as np
import pytest

import numpy_reference as npr
from svg_ear_jax import SvgEarConfig, error_probe, routing
from svg_ear_jax import compensation as comp

pytestmark = pytest.mark.split_cases


def _problem(seed, g=2, s=240, d=16, kq=6, kk=12, spread=0.6):
  """Clustered keys/values with random sizes (incl. empty clusters) and query centroids."""
  rng = np.random.default_rng(seed)
  k_labels = rng.integers(0, kk - 2, size=(g, s))  # the last two key clusters stay empty
  mu_k = rng.normal(size=(g, kk, d))
  k = np.take_along_axis(mu_k, k_labels[..., None], 1) + spread * rng.normal(size=(g, s, d))
  v = rng.normal(size=(g, s, d))
  k_sizes = np.stack([np.bincount(l, minlength=kk) for l in k_labels])
  kc = np.stack([[k[h][k_labels[h] == j].mean(0) if k_sizes[h, j] else mu_k[h, j]
                  for j in range(kk)] for h in range(g)])
  vc = np.stack([[v[h][k_labels[h] == j].mean(0) if k_sizes[h, j] else np.zeros(d)
                  for j in range(kk)] for h in range(g)])
  qc = rng.normal(size=(g, kq, d)) * 1.5
  q_sizes = rng.integers(1, 60, size=(g, kq))
  return dict(qc=qc, k=k, v=v, k_labels=k_labels, k_sizes=k_sizes, kc=kc, vc=vc,
              q_sizes=q_sizes, scale=d ** -0.5)


def _jax_logits(p):
  return routing.centroid_logits(jnp.asarray(p["qc"], jnp.float32),
                                 jnp.asarray(p["kc"], jnp.float32), p["scale"])


def _jax_log_err(p):
  f = lambda x: jnp.asarray(x, jnp.float32)
  return error_probe.error_probe_xla(
      f(p["qc"]), f(p["k"]), f(p["v"]), jnp.asarray(p["k_labels"], jnp.int32),
      jnp.asarray(p["k_sizes"], jnp.int32), f(p["vc"]), _jax_logits(p), scale=p["scale"])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_error_estimate_matches_direct_sum(seed):
  p = _problem(seed)
  log_err = np.asarray(_jax_log_err(p))
  for h in range(p["qc"].shape[0]):
    err = npr.block_error(p["qc"][h], p["k"][h], p["v"][h], p["k_labels"][h], p["kc"][h],
                          p["vc"][h], p["scale"])
    nonempty = p["k_sizes"][h] > 0
    np.testing.assert_allclose(log_err[h][:, nonempty], np.log(err[:, nonempty]), atol=2e-3)
    assert np.all(np.isneginf(log_err[h][:, ~nonempty]))


def test_error_estimate_survives_huge_logits():
  p = _problem(3)
  p["qc"] = p["qc"] * 40.0  # logits of several hundred: e^{2a} overflows float32
  log_err = np.asarray(_jax_log_err(p))
  nonempty = p["k_sizes"] > 0
  assert np.all(np.isfinite(log_err[nonempty[:, None, :].repeat(log_err.shape[1], 1)]))
  assert log_err.max() > 100.0


def test_error_estimate_head_chunking_is_invisible():
  p = _problem(4, g=3)
  f = lambda x: jnp.asarray(x, jnp.float32)
  args = (f(p["qc"]), f(p["k"]), f(p["v"]), jnp.asarray(p["k_labels"], jnp.int32),
          jnp.asarray(p["k_sizes"], jnp.int32), f(p["vc"]), _jax_logits(p))
  a = error_probe.error_probe_xla(*args, scale=p["scale"], chunk_mb=0)
  b = error_probe.error_probe_xla(*args, scale=p["scale"], chunk_mb=1024)
  np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("top_p,ratio", [(0.9, 0.05), (0.5, 0.0), (0.3, 0.25), (1.0, 0.1)])
def test_topp_matches_numpy(top_p, ratio):
  p = _problem(5, kq=8, kk=40)
  cfg = SvgEarConfig(routing="topp", top_p=top_p, min_kc_ratio=ratio, num_q_clusters=8,
                     num_k_clusters=40)
  got = np.asarray(routing.topp_route(_jax_logits(p), jnp.asarray(p["q_sizes"]),
                                      jnp.asarray(p["k_sizes"]), cfg))
  for h in range(2):
    want = npr.topp_map(p["qc"][h], p["kc"][h], p["k_sizes"][h], p["scale"], top_p,
                        cfg.num_budget_floor)
    np.testing.assert_array_equal(got[h], want)


@pytest.mark.parametrize("top_p,ratio,density,gamma", [
    (0.9, 0.05, None, 1.0), (0.6, 0.1, None, 1.0), (0.9, 0.0, None, 0.5),
    (0.9, 0.05, 0.3, 1.0), (0.9, 0.1, 0.05, 1.0), (1.0, 0.05, None, 1.0)])
def test_ear_matches_numpy(top_p, ratio, density, gamma):
  p = _problem(6, kq=8, kk=40, s=400)
  cfg = SvgEarConfig(routing="ear", top_p=top_p, min_kc_ratio=ratio, density=density,
                     gamma=gamma, num_q_clusters=8, num_k_clusters=40)
  got = np.asarray(routing.ear_route(_jax_logits(p), _jax_log_err(p), jnp.asarray(p["q_sizes"]),
                                     jnp.asarray(p["k_sizes"]), cfg))
  for h in range(2):
    err = npr.block_error(p["qc"][h], p["k"][h], p["v"][h], p["k_labels"][h], p["kc"][h],
                          p["vc"][h], p["scale"])
    want = npr.ear_map(p["qc"][h], p["kc"][h], p["q_sizes"][h], p["k_sizes"][h], err,
                       p["scale"], top_p, ratio, gamma, density)
    np.testing.assert_array_equal(got[h], want)


@pytest.mark.parametrize("variance", [False, True])
def test_ear_spends_the_topp_area_on_high_error_blocks(variance):
  # with "variance" the probe scores the corrected pseudo-tokens; the budget is the same
  p = _problem(7, kq=8, kk=40, s=400)
  cfg = SvgEarConfig(routing="ear", num_q_clusters=8, num_k_clusters=40, min_kc_ratio=0.05)
  q_sizes, k_sizes = jnp.asarray(p["q_sizes"]), jnp.asarray(p["k_sizes"])
  log_err = _jax_log_err(p)
  if variance:
    f = lambda x: jnp.asarray(x, jnp.float32)
    spread = comp.key_spread(f(p["k"]), jnp.asarray(p["k_labels"], jnp.int32), f(p["kc"]),
                             k_sizes.astype(jnp.int32))
    corrected = _jax_logits(p) + comp.logit_correction(f(p["qc"]), spread, p["scale"])
    new_err = error_probe.error_probe_xla(
        f(p["qc"]), f(p["k"]), f(p["v"]), jnp.asarray(p["k_labels"], jnp.int32),
        k_sizes.astype(jnp.int32), f(p["vc"]), corrected, scale=p["scale"])
    assert float(jnp.max(jnp.abs(jnp.where(jnp.isfinite(log_err), new_err - log_err, 0)))) > 1e-3
    log_err = new_err
  ear = routing.ear_route(_jax_logits(p), log_err, q_sizes, k_sizes, cfg)
  topp = routing.topp_route(_jax_logits(p), q_sizes, k_sizes, cfg.replace(routing="topp"))
  area = np.asarray(routing.block_area(q_sizes, k_sizes))
  ear_area = (np.asarray(ear) * area).sum(-1)
  topp_area = (np.asarray(topp) * area).sum(-1)
  # same budget, overshoot by at most one block per row
  assert np.all(ear_area >= np.minimum(topp_area, area.sum(-1)) - area.max(-1))
  assert np.all(ear_area <= topp_area + area.max(-1))


@pytest.mark.parametrize("routing_name", ["topp", "ear"])
@pytest.mark.parametrize("density", [0.1, 0.25, 0.5])
def test_fixed_density_budget(routing_name, density):
  p = _problem(8, kq=10, kk=60, s=600)
  cfg = SvgEarConfig(routing=routing_name, density=density, num_q_clusters=10,
                     num_k_clusters=60, min_kc_ratio=0.0)
  q_sizes, k_sizes = jnp.asarray(p["q_sizes"]), jnp.asarray(p["k_sizes"])
  m = routing.route(cfg, _jax_logits(p), q_sizes, k_sizes, _jax_log_err(p))
  area = np.asarray(routing.block_area(q_sizes, k_sizes))
  row = (np.asarray(m) * area).sum(-1)
  budget = density * np.asarray(q_sizes) * 600
  assert np.all(row >= budget * (1 - 1e-6)) and np.all(row < budget + area.max(-1))
  got = np.asarray(routing.block_density(m, q_sizes, k_sizes))
  np.testing.assert_allclose(got, density, atol=0.06)


def test_dense_routing_and_density():
  p = _problem(9)
  q_sizes, k_sizes = jnp.asarray(p["q_sizes"]), jnp.asarray(p["k_sizes"])
  m = routing.route(SvgEarConfig(routing="dense"), _jax_logits(p), q_sizes, k_sizes)
  assert bool(m.all())
  np.testing.assert_allclose(routing.block_density(m, q_sizes, k_sizes), 1.0)


def test_ear_needs_the_error():
  p = _problem(9)
  with pytest.raises(ValueError, match="log_err"):
    routing.route(SvgEarConfig(), _jax_logits(p), jnp.asarray(p["q_sizes"]),
                  jnp.asarray(p["k_sizes"]))


@pytest.mark.parametrize("seed", [0, 1])
def test_prefix_mask_equals_scattering_the_sorted_prefix(seed):
  # the gather-and-compare form of "the first count entries of the stable descending
  # order" against the scatter it replaces: values with many ties, -inf and +inf, counts
  # from 0 to K
  rng = np.random.default_rng(seed)
  k = 37
  x = rng.integers(-3, 4, size=(4, 9, k)).astype(np.float32)
  x[rng.random(x.shape) < 0.1] = -np.inf
  x[rng.random(x.shape) < 0.05] = np.inf
  x = jnp.asarray(x)
  count = jnp.asarray(rng.integers(0, k + 1, size=(4, 9)), jnp.int32)
  count = count.at[0, :3].set(jnp.asarray([0, k, 1]))
  order = routing._descending(x)
  # the scatter: each sorted rank's flag back to its place in the row
  want = jnp.put_along_axis(jnp.zeros(x.shape, bool), order,
                            jnp.arange(k) < count[..., None], axis=-1, inplace=False)
  got = routing._prefix_mask(x, order, count)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  assert int(got.sum()) == int(count.sum())
