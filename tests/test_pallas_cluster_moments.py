"""cluster_moments / cluster_means kernels vs their jnp references (GPU class + interpret),
head-major and tokens-first rows, the references vs the XLA scatter-add versions they
replace, and their lowering to Triton for CUDA."""

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import (cluster_means, cluster_means_reference, cluster_moments,
                            cluster_moments_reference)
from pallas_testing import CompiledOrInterpret
from pallas_kernels import error_probe
from svg_ear_jax import compensation, kmeans
from test_pallas_kernels import _lower_for_cuda, abstract_h100  # noqa: F401

pytestmark = [pytest.mark.split_cases, pytest.mark.filterwarnings("ignore::DeprecationWarning")]


def _sizes(rng, g, s, k):
  """[G, K] sizes with empty clusters, singletons, a cluster of several 16-row tiles and a
  total below S."""
  sizes = rng.integers(0, 2 * s // (3 * k), (g, k))
  sizes[:, 0] = 70  # > 4 tiles of 16
  sizes[:, 1] = 0
  sizes[:, 2] = 1
  sizes[:, -1] = 0
  sizes[:, 5] = 1
  assert np.all(sizes.sum(1) < s)
  return jnp.asarray(sizes, jnp.int32)


def _problem(seed, g=2, s=300, d=24, k=20, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  sizes = _sizes(rng, g, s, k)
  x = jnp.asarray(rng.normal(size=(g, s, d)) + 0.5, jnp.float32).astype(dtype)
  v = jnp.asarray(rng.normal(size=(g, s, d)), jnp.float32).astype(dtype)
  c = jnp.asarray(rng.normal(size=(g, k, d)) * 0.3 + 0.5, jnp.float32)
  index = jnp.asarray(np.stack([rng.permutation(s) for _ in range(g)]), jnp.int32)
  return x, sizes, index, c, v


def _assert_close(got, want, rtol, atol):
  assert len(got) == len(want) == 3
  for a, b in zip(got, want):
    if b is None:
      assert a is None
      continue
    assert a.dtype == jnp.float32 and a.shape == b.shape
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol)


class KernelTest(CompiledOrInterpret):
  @pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 1e-3)])
  @pytest.mark.parametrize("d", [24, 128])
  @pytest.mark.parametrize("centred,with_values", [(False, False), (True, False),
                                                   (False, True), (True, True)])
  def test_matches_reference(self, dtype, tol, d, centred, with_values):
    x, sizes, index, c, v = _problem(d, d=d, dtype=dtype)
    kw = dict(centroids=c if centred else None, values=v if with_values else None)
    got = cluster_moments(x, sizes, index, block_rows=16, interpret=self.INTERPRET, **kw)
    want = cluster_moments_reference(x, sizes, index, **kw)
    # bf16 inputs are upcast exactly: only the float32 summation order differs
    _assert_close(got, want, rtol=tol, atol=1e-6)
    empty = np.asarray(sizes) == 0
    for out in got:
      if out is not None:
        assert np.all(np.asarray(out)[empty] == 0)

  @pytest.mark.parametrize("splits", [1, 3, 64])  # one program per head; ragged; > K
  def test_cluster_splits_agree(self, splits):
    x, sizes, index, c, v = _problem(5)
    kw = dict(centroids=c, values=v, block_rows=32, interpret=self.INTERPRET)
    want = cluster_moments(x, sizes, index, cluster_splits=20, **kw)
    got = cluster_moments(x, sizes, index, cluster_splits=splits, **kw)
    for a, b in zip(got, want):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  def test_identity_index_and_full_cover(self):
    # sizes summing to S exactly, sorted layout already in token order
    g, s, d = 1, 64, 16
    x = jnp.asarray(np.random.default_rng(1).normal(size=(g, s, d)), jnp.float32)
    sizes = jnp.asarray([[16, 0, 40, 8]], jnp.int32)
    index = jnp.arange(s, dtype=jnp.int32)[None]
    second, radius, means = cluster_moments(x, sizes, index, interpret=self.INTERPRET)
    assert radius is None and means is None
    want = np.stack([np.mean(np.asarray(x[0, a:b]) ** 2, 0) if b > a else np.zeros(d)
                     for a, b in [(0, 16), (16, 16), (16, 56), (56, 64)]])
    np.testing.assert_allclose(np.asarray(second[0]), want, rtol=1e-5)


  @pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 1e-3)])
  @pytest.mark.parametrize("d", [24, 32])
  def test_means_match_reference(self, dtype, tol, d):
    # empty clusters, singletons, a cluster of several tiles, sizes summing to < S
    x, sizes, index, _, _ = _problem(d + 1, d=d, dtype=dtype)
    got = cluster_means(x, sizes, index, block_rows=16, interpret=self.INTERPRET)
    want = cluster_means_reference(x, sizes, index)
    assert got.dtype == jnp.float32 and got.shape == want.shape
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=tol, atol=1e-6)
    assert np.all(np.asarray(got)[np.asarray(sizes) == 0] == 0)
    # the first moment of x is the value mean of values=x
    np.testing.assert_allclose(np.asarray(got), np.asarray(cluster_moments_reference(
        x, sizes, index, values=x)[2]), rtol=tol, atol=1e-6)

  @pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
  @pytest.mark.parametrize("b,h,n,extra", [(2, 2, 300, 0), (1, 3, 233, 20), (3, 1, 161, 1)])
  def test_tokens_first_rows_in_place(self, dtype, b, h, n, extra):
    # [B, S, H, D] (head g = b * H + h) read to its first n rows equals the head-major copy
    # of those rows; the trailing `extra` rows (text tokens) are junk never read
    rng = np.random.default_rng(n + extra)
    g, d, k = b * h, 24, 20
    sizes = _sizes(rng, g, n, k)
    index = jnp.asarray(np.stack([rng.permutation(n) for _ in range(g)]), jnp.int32)
    rows = lambda: jnp.asarray(rng.normal(size=(g, n, d)) + 0.5, jnp.float32).astype(dtype)
    x, v = rows(), rows()
    c = jnp.asarray(rng.normal(size=(g, k, d)) * 0.3 + 0.5, jnp.float32)
    junk = jnp.full((g, extra, d), jnp.nan, dtype)
    tokens_first = lambda a: (jnp.concatenate([a, junk], 1).reshape(b, h, n + extra, d)
                              .transpose(0, 2, 1, 3))
    xt, vt = tokens_first(x), tokens_first(v)
    kw = dict(block_rows=16, interpret=self.INTERPRET)
    got = cluster_moments(xt, sizes, index, centroids=c, values=vt, num_rows=n, **kw)
    want = cluster_moments(x, sizes, index, centroids=c, values=v, **kw)
    _assert_close(got, want, rtol=0, atol=0)
    _assert_close(cluster_moments_reference(xt, sizes, index, centroids=c, values=vt,
                                            num_rows=n), want, rtol=1e-5, atol=1e-6)
    means = cluster_means(xt, sizes, index, num_rows=n, **kw)
    np.testing.assert_array_equal(np.asarray(means),
                                  np.asarray(cluster_means(x, sizes, index, **kw)))
    np.testing.assert_allclose(np.asarray(cluster_means_reference(xt, sizes, index, num_rows=n)),
                               np.asarray(means), rtol=1e-5, atol=1e-6)
    # a head-major array read to its first n rows alike
    xg = jnp.concatenate([x, junk], 1)
    np.testing.assert_array_equal(np.asarray(cluster_means(xg, sizes, index, num_rows=n, **kw)),
                                  np.asarray(means))


  @pytest.mark.parametrize("tokens_first,dtype", [(False, jnp.float32), (True, jnp.bfloat16)])
  def test_value_stats_are_the_probes_value_terms(self, tokens_first, dtype):
    # the EAR probe's per-token terms from the value means' walk equal its own XLA pass
    # (error_probe.value_stats) at every sorted position of a cluster, 0 past the last
    # one (sizes sum to < N), tokens-first rows read to their first n (junk after them)
    rng = np.random.default_rng(31)
    b, h, n, extra, d, k = 2, 2, 233, 7, 24, 20
    g = b * h
    sizes = _sizes(rng, g, n, k)
    index = jnp.asarray(np.stack([rng.permutation(n) for _ in range(g)]), jnp.int32)
    x, v = (jnp.asarray(rng.normal(size=(g, n, d)) + 0.5, jnp.float32).astype(dtype)
            for _ in range(2))
    c = jnp.asarray(rng.normal(size=(g, k, d)) * 0.3 + 0.5, jnp.float32)
    if tokens_first:
      junk = jnp.full((g, extra, d), jnp.nan, dtype)
      x, v = (jnp.concatenate([a, junk], 1).reshape(b, h, n + extra, d).transpose(0, 2, 1, 3)
              for a in (x, v))
    kw = dict(num_rows=n, block_rows=16, interpret=self.INTERPRET)
    means, (vsq, cross) = cluster_means(v, sizes, index, value_stats=True, **kw)
    np.testing.assert_array_equal(np.asarray(means),
                                  np.asarray(cluster_means(v, sizes, index, **kw)))
    want = error_probe.value_stats(v, sizes, means, index, n)
    covered = np.arange(n)[None] < np.asarray(sizes).sum(1, keepdims=True)
    for got, ref in zip((vsq, cross), want):
      assert got.shape == (g, n) and got.dtype == jnp.float32
      np.testing.assert_allclose(np.asarray(got)[covered], np.asarray(ref)[covered],
                                 rtol=1e-5, atol=1e-5)
      assert np.all(np.asarray(got)[~covered] == 0)
    *moments, terms = cluster_moments(x, sizes, index, centroids=c, values=v,
                                      value_stats=True, **kw)
    _assert_close(moments, cluster_moments(x, sizes, index, centroids=c, values=v, **kw),
                  rtol=0, atol=0)
    for a, b_ in zip(terms, (vsq, cross)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b_))
    with pytest.raises(ValueError, match="value_stats needs values"):
      cluster_moments(x, sizes, index, value_stats=True, **kw)


class KernelInterpretTest(KernelTest):
  INTERPRET = True


TestKernels = KernelTest
TestKernelsInterpret = KernelInterpretTest


@pytest.mark.parametrize("masked", [False, True])
def test_reference_matches_xla_scatter_versions(masked):
  g, s, d, k = 2, 200, 24, 13
  rng = np.random.default_rng(7)
  labels = rng.integers(0, k - 2, (g, s))  # clusters k-2, k-1 empty
  labels[:, :3] = 4  # some cluster of several
  if masked:  # label K: a token of no cluster (the sorted order puts it last)
    labels[:, 10:30] = k
  labels = jnp.asarray(labels, jnp.int32)
  sizes = jnp.asarray(np.stack([np.bincount(l, minlength=k + 1)[:k] for l in np.asarray(labels)]),
                      jnp.int32)
  index = jnp.argsort(labels, axis=1, stable=True).astype(jnp.int32)
  x = jnp.asarray(rng.normal(size=(g, s, d)) + 2.0, jnp.float32)
  v = jnp.asarray(rng.normal(size=(g, s, d)), jnp.float32)
  means, counts = kmeans.cluster_means(x, labels, k)
  np.testing.assert_array_equal(np.asarray(counts), np.asarray(sizes))
  spread, v_means = compensation.key_spread(x, labels, means, sizes, values=v)
  second, radius, value_means = cluster_moments_reference(x, sizes, index, centroids=means,
                                                          values=v)
  np.testing.assert_allclose(np.asarray(second), np.asarray(spread.variance), rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_allclose(np.asarray(radius), np.asarray(spread.radius), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(value_means), np.asarray(v_means), rtol=1e-5,
                             atol=1e-6)
  x_means = cluster_moments_reference(x, sizes, index, values=x)[2]
  np.testing.assert_allclose(np.asarray(x_means), np.asarray(means), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("change,match", [
    (dict(x=jnp.zeros((2, 300), jnp.float32)), "x must be"),
    (dict(x=jnp.zeros((2, 300, 24), jnp.int32)), "x must be"),
    (dict(index=jnp.zeros((2, 299), jnp.int32)), "index must be"),
    (dict(num_rows=299), "index must be"),
    (dict(num_rows=301), "num_rows"),
    (dict(index=jnp.zeros((2, 300), jnp.float32)), "index must be"),
    (dict(sizes=jnp.zeros((3, 20), jnp.int32)), "sizes must be"),
    (dict(centroids=jnp.zeros((2, 19, 24), jnp.float32)), "centroids must be"),
    (dict(values=jnp.zeros((2, 300, 16), jnp.float32)), "values must be"),
    (dict(values=jnp.zeros((1, 300, 2, 24), jnp.float32)), "values must be"),
    (dict(block_rows=24), "power of two"),
    (dict(block_rows=8), "power of two"),
    (dict(cluster_splits=0), "cluster_splits"),
])
def test_bad_arguments(change, match):
  x, sizes, index, _, _ = _problem(0)
  args = dict(x=x, sizes=sizes, index=index, interpret=True)
  args.update(change)
  with pytest.raises(ValueError, match=match):
    cluster_moments(args.pop("x"), args.pop("sizes"), args.pop("index"), **args)
  if "block_rows" not in change and "cluster_splits" not in change:
    args = dict(x=x, sizes=sizes, index=index)
    args.update(change)
    with pytest.raises(ValueError, match=match):
      cluster_moments_reference(args.pop("x"), args.pop("sizes"), args.pop("index"), **args)
  if "centroids" not in change and "values" not in change:
    args = dict(x=x, sizes=sizes, index=index, interpret=True)
    args.update(change)
    with pytest.raises(ValueError, match=match):
      cluster_means(args.pop("x"), args.pop("sizes"), args.pop("index"), **args)


@pytest.mark.usefixtures("abstract_h100")
@pytest.mark.parametrize("dtype,d,kw", [
    (jnp.bfloat16, 128, dict(centroids=True, values=True)),
    (jnp.bfloat16, 128, dict()),
    (jnp.float32, 24, dict(centroids=True, values=True, block_rows=16)),
    (jnp.float32, 24, dict(values=True, block_rows=64, cluster_splits=7)),
])
def test_lowers_to_one_triton_kernel(dtype, d, kw):
  x, sizes, index, c, v = _problem(3, d=d, dtype=dtype)
  kw = dict(kw)
  centred, with_values = kw.pop("centroids", False), kw.pop("values", False)

  def fn(x, sizes, index, c, v):
    return cluster_moments(x, sizes, index, centroids=c if centred else None,
                           values=v if with_values else None, **kw)

  assert _lower_for_cuda(fn, x, sizes, index, c, v) == 1


@pytest.mark.usefixtures("abstract_h100")
@pytest.mark.parametrize("dtype,d", [(jnp.bfloat16, 128), (jnp.float32, 24)])
def test_tokens_first_forms_lower_to_one_triton_kernel(dtype, d):
  b, s, h, n, k = 2, 300, 3, 270, 20
  x = jnp.zeros((b, s, h, d), dtype)
  sizes = jnp.full((b * h, k), 10, jnp.int32)
  index = jnp.zeros((b * h, n), jnp.int32)
  c = jnp.zeros((b * h, k, d), jnp.float32)
  means = lambda x, sizes, index: cluster_means(x, sizes, index, num_rows=n)
  assert _lower_for_cuda(means, x, sizes, index) == 1
  moments = lambda x, sizes, index, c, v: cluster_moments(x, sizes, index, centroids=c,
                                                          values=v, num_rows=n)
  assert _lower_for_cuda(moments, x, sizes, index, c, x) == 1
  stats = lambda x, sizes, index: cluster_means(x, sizes, index, num_rows=n, value_stats=True)
  assert _lower_for_cuda(stats, x, sizes, index) == 1
