"""The budgeted block selection kernel (pallas_kernels.budget_route) vs its sort-based jnp
reference and routing's XLA version (GPU class + interpret), its lowering to Triton, and the
pipeline's switch between the two (pipeline.ROUTE_FILL)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import budget_route, budget_route_reference
from pallas_testing import CompiledOrInterpret
from svg_ear_jax import SvgEarConfig, pipeline, routing, svg_ear_attention
from test_pallas_kernels import _lower_for_cuda, abstract_h100  # noqa: F401

pytestmark = [pytest.mark.split_cases, pytest.mark.filterwarnings("ignore::DeprecationWarning")]


def _integer_problem(seed, g=2, r=11, k=37):
  """Integer-valued inputs with many ties, whose float32 sums are exact (so every
  summation order agrees); budgets from nothing to more than the row, and +inf."""
  rng = np.random.default_rng(seed)
  priority = rng.integers(0, 6, (g, r, k)) / 4
  score = rng.integers(-5, 5, (g, r, k)).astype(np.float64)
  score[0, 0] = 0.0  # a row whose order is all ties
  cost = rng.integers(0, 20, (g, r, k)).astype(np.float64)
  cost[1, 2] = 0.0  # a row of empty blocks
  budget = rng.integers(0, 400, (g, r)).astype(np.float64)
  budget[0, 1], budget[1, 3], budget[1, 4] = 0.0, np.inf, 1e9
  f = lambda x: jnp.asarray(x, jnp.float32)
  return f(priority), f(score), f(cost), f(budget)


class KernelTest(CompiledOrInterpret):
  @pytest.mark.parametrize("num_forced", [0, 1, 5, 40])
  @pytest.mark.parametrize("seed,block_rows", [(0, 1), (1, 4)])
  def test_matches_reference_and_routing(self, seed, block_rows, num_forced):
    args = _integer_problem(seed)
    got = budget_route(*args, num_forced=num_forced, block_rows=block_rows,
                       interpret=self.INTERPRET)
    want = budget_route_reference(*args, num_forced=num_forced)
    xla = routing.forced_then_greedy(args[0], num_forced, *args[1:])
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    np.testing.assert_array_equal(np.asarray(want), np.asarray(xla))
    kept = np.asarray(got).sum(-1)
    assert kept.min() >= min(num_forced, 37) and kept.mean() > 0
    if num_forced < 37:
      assert kept.mean() < 37  # the budget bites

  @pytest.mark.parametrize("top_p,num_floor,num_forced", [(0.3, 0, 1), (0.6, 3, 2),
                                                           (0.0, 0, 0), (1.0, 0, 1),
                                                           (0.999, 40, 5)])
  def test_top_p_budget_matches_reference_and_routing(self, top_p, num_floor, num_forced):
    # priorities that are multiples of 1/64 with rows summing to 1: exact mass sums
    priority, score, cost, _ = _integer_problem(5)
    priority = jnp.asarray(np.random.default_rng(6).multinomial(
        64, np.ones(37) / 37, size=priority.shape[:2]) / 64, jnp.float32)
    got = budget_route(priority, score, cost, num_forced=num_forced, top_p=top_p,
                       num_floor=num_floor, interpret=self.INTERPRET)
    kw = dict(num_forced=num_forced, top_p=top_p, num_floor=num_floor)
    want = budget_route_reference(priority, score, cost, **kw)
    xla = routing.forced_then_greedy(priority, num_forced, score, cost, None, top_p=top_p,
                                     num_floor=num_floor)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    np.testing.assert_array_equal(np.asarray(want), np.asarray(xla))
    if top_p >= 1.0 or num_floor >= 37:
      assert np.all(np.asarray(got))  # the whole row is the budget: +inf
    elif top_p <= 0.3:
      assert np.asarray(got).mean() < 0.9

  def test_float_inputs_agree_but_for_rounding(self):
    # random float costs: the kernel's row sums and the sort's running sums round
    # differently, so a block whose prefix lands within rounding of the budget may flip
    k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(3), 4)
    shape = (2, 24, 300)
    priority = jax.random.uniform(k1, shape)
    score = jax.random.normal(k2, shape)
    cost = jax.random.uniform(k3, shape) * 1e4
    budget = jnp.sum(cost, -1) * jax.random.uniform(k4, shape[:2])
    got = np.asarray(budget_route(priority, score, cost, budget, num_forced=7,
                                  interpret=self.INTERPRET))
    want = np.asarray(budget_route_reference(priority, score, cost, budget, num_forced=7))
    assert np.mean(got != want) <= 1e-3 and np.all(np.abs(got.sum(-1) - want.sum(-1)) <= 1)

  def test_signed_zeros_tie(self):
    # jnp.argsort sees -0.0 == 0.0: the lower index goes first either way
    priority = jnp.asarray([[[0.0, -0.0, 0.0, -0.0, 1.0]]])
    score = jnp.asarray([[[-0.0, 0.0, -0.0, 0.0, 2.0]]])
    cost = jnp.ones((1, 1, 5))
    for forced, budget in ((2, 1.0), (1, 2.0), (0, 3.0)):
      b = jnp.full((1, 1), budget)
      got = budget_route(priority, score, cost, b, num_forced=forced, interpret=self.INTERPRET)
      want = budget_route_reference(priority, score, cost, b, num_forced=forced)
      np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


class TestBudgetRoute(KernelTest):
  pass


class TestBudgetRouteInterpret(KernelTest):
  INTERPRET = True


@pytest.mark.parametrize("change,match", [
    (dict(score=jnp.zeros((2, 5, 7))), "share one"),
    (dict(budget=jnp.zeros((2, 6))), "budget must be"),
    (dict(top_p=0.5), "not both"),
    (dict(budget=None), "not both or neither"),
    (dict(budget=None, top_p=-0.1), "top_p must be"),
    (dict(budget=None, top_p=0.5, num_floor=-2), "num_floor"),
    (dict(num_forced=-1), "num_forced"),
    (dict(num_forced=True), "num_forced"),
    (dict(block_rows=3), "power of two"),
])
def test_bad_arguments(change, match):
  x = jnp.zeros((2, 5, 8))
  kw = dict(priority=x, score=x, cost=x, budget=jnp.zeros((2, 5)), num_forced=2,
            interpret=True)
  with pytest.raises(ValueError, match=match):
    budget_route(**{**kw, **change})


@pytest.mark.usefixtures("abstract_h100")
@pytest.mark.parametrize("block_rows,k", [(1, 1000), (4, 37)])
def test_lowers_to_one_triton_kernel(block_rows, k):
  x = jnp.zeros((2, 9, k))
  call = lambda p, s, c, b: budget_route(p, s, c, b, num_forced=5, block_rows=block_rows)
  assert _lower_for_cuda(call, x, x, x, jnp.zeros((2, 9))) == 1


@pytest.mark.parametrize("routing_name,density", [("ear", 0.3), ("ear", None), ("topp", 0.3)])
def test_pipeline_route_fills_agree(routing_name, density, monkeypatch):
  """pipeline.ROUTE_FILL: the kernel and the XLA sorts give the pallas call one block map
  (and so one output), and a bad value is an error (at trace time of the call: "auto" is
  the kernel on GPU, the sorts here)."""
  ks = jax.random.split(jax.random.PRNGKey(4), 3)
  q, k, v = (jax.random.normal(x, (1, 160, 2, 16)) for x in ks)
  cfg = SvgEarConfig(routing=routing_name, density=density, num_q_clusters=5,
                     num_k_clusters=12, kmeans_iters=3, implementation="pallas", top_p=0.7)
  clusters = pipeline.cluster(q, k, v, cfg, "pallas")
  maps = {}
  for fill in pipeline.ROUTE_FILLS:
    monkeypatch.setattr(pipeline, "ROUTE_FILL", fill)
    maps[fill] = np.asarray(pipeline.route(q, k, v, clusters, cfg, "pallas"))
  np.testing.assert_array_equal(maps["kernel"], maps["sort"])
  np.testing.assert_array_equal(maps["auto"], maps["sort"])
  assert 0 < maps["kernel"].mean() < 1
  monkeypatch.setattr(pipeline, "ROUTE_FILL", "bisect")
  with pytest.raises(ValueError, match="ROUTE_FILL"):
    svg_ear_attention(q, k, v, cfg)


@pytest.mark.parametrize("compensation", ["mean", "variance"])
def test_pipeline_value_terms_agree(compensation, monkeypatch):
  """pipeline.VALUE_TERMS: the EAR probe's value terms from the value means' walk ("walk")
  or from the probe's own pass ("probe") give one block map, and so one output; a bad value
  is an error."""
  ks = jax.random.split(jax.random.PRNGKey(5), 3)
  q, k, v = (jax.random.normal(x, (1, 160, 2, 16)) for x in ks)
  cfg = SvgEarConfig(routing="ear", density=0.3, num_q_clusters=5, num_k_clusters=12,
                     kmeans_iters=3, implementation="pallas", compensation=compensation)
  out, maps = {}, {}
  for terms in pipeline.VALUE_TERMS_CHOICES:
    monkeypatch.setattr(pipeline, "VALUE_TERMS", terms)
    clusters = pipeline.cluster(q, k, v, cfg, "pallas")
    assert (clusters.value_terms is not None) == (terms == "walk")
    maps[terms] = np.asarray(pipeline.route(q, k, v, clusters, cfg, "pallas"))
    out[terms] = np.asarray(svg_ear_attention(q, k, v, cfg))
  np.testing.assert_array_equal(maps["walk"], maps["probe"])
  assert 0 < maps["walk"].mean() < 1
  np.testing.assert_allclose(out["walk"], out["probe"], rtol=1e-6, atol=1e-6)
  # trailing dense tokens and masked keys (positions past the clusters: never walked)
  mask = jnp.ones((1, 160), bool).at[0, 140:150].set(False)
  dense = {}
  for terms in pipeline.VALUE_TERMS_CHOICES:
    monkeypatch.setattr(pipeline, "VALUE_TERMS", terms)
    dense[terms] = svg_ear_attention(q, k, v, cfg, num_dense_tokens=10, key_mask=mask,
                                     return_aux=True)
  np.testing.assert_allclose(np.asarray(dense["walk"][0]), np.asarray(dense["probe"][0]),
                             rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(dense["walk"][1].density),
                                np.asarray(dense["probe"][1].density))
  monkeypatch.setattr(pipeline, "VALUE_TERMS", "xla")
  with pytest.raises(ValueError, match="VALUE_TERMS"):
    svg_ear_attention(q, k, v, cfg)
