import jax
import jax.numpy as jnp
import numpy as np
import pytest

import numpy_reference as npr
from svg_ear_jax import kmeans, permutation

pytestmark = pytest.mark.split_cases


def _blobs(seed, g=3, n=400, d=8, centers=6, spread=0.3):
  rng = np.random.default_rng(seed)
  mu = rng.normal(size=(g, centers, d)) * 3
  lab = rng.integers(0, centers, size=(g, n))
  x = np.take_along_axis(mu, lab[..., None], 1) + spread * rng.normal(size=(g, n, d))
  return jnp.asarray(x, jnp.float32)


def test_matches_numpy_transcription():
  x = _blobs(0)
  init = kmeans.init_centroids(x, 7, jax.random.PRNGKey(3))
  res = kmeans.kmeans(x, init, max_iters=12, tol=1e-4)
  for h in range(x.shape[0]):
    lab, cen, sizes = npr.kmeans(np.asarray(x[h]), np.asarray(init[h]), 12, 1e-4)
    np.testing.assert_array_equal(np.asarray(res.labels[h]), lab)
    np.testing.assert_array_equal(np.asarray(res.sizes[h]), sizes)
    np.testing.assert_allclose(np.asarray(res.centroids[h]), cen, atol=1e-5)


def test_init_draws_points_with_replacement_per_head():
  x = _blobs(1, n=5, centers=2)
  c = kmeans.init_centroids(x, 20, jax.random.PRNGKey(0))  # K > N forces repeats
  for h in range(x.shape[0]):
    rows = {tuple(r) for r in np.asarray(x[h])}
    assert all(tuple(r) in rows for r in np.asarray(c[h]))
  assert not np.allclose(c[0], c[1])


def test_init_groups_draw_as_the_unsliced_heads():
  """Heads [o, o + 2) of 4 drawn alone with their global indices (offsets traced, under
  jit and vmap) get the unsliced draw (the masked draw; both share the per-head keys)."""
  x = _blobs(1, g=4, n=50, centers=2)
  mask = jnp.arange(50)[None, :] < jnp.array([[50], [30], [40], [20]])
  key = jax.random.PRNGKey(4)

  @jax.jit
  def draws(x, mask, key, offsets):  # arguments, not constants: XLA would fold the draws
    cut = lambda a, o: jax.lax.dynamic_slice_in_dim(a, o, 2)
    part = lambda o: kmeans.init_centroids(cut(x, o), 6, key, cut(mask, o),
                                           groups=o + jnp.arange(2))
    return kmeans.init_centroids(x, 6, key, mask), jax.vmap(part)(offsets)

  full, parts = draws(x, mask, key, jnp.array([0, 2]))
  np.testing.assert_array_equal(np.asarray(parts).reshape(full.shape), np.asarray(full))
  with pytest.raises(ValueError, match=r"groups must be \[G\] = \(4,\)"):
    kmeans.init_centroids(x, 6, key, groups=jnp.arange(2))


def test_labels_are_argmin_and_sizes_count_them():
  x = _blobs(2)
  init = kmeans.init_centroids(x, 9, jax.random.PRNGKey(1))
  res = kmeans.kmeans(x, init, max_iters=3, tol=0.0)
  d = ((x[:, :, None, :] - res.centroids[:, None]) ** 2).sum(-1)
  # labels are w.r.t. the centroids entering the last iteration; one more assignment with
  # the returned (mean) centroids may move points, so check the assignment function itself
  lab = kmeans.assign_xla(x, res.centroids)
  np.testing.assert_array_equal(lab, jnp.argmin(d, -1))
  np.testing.assert_array_equal(res.sizes, jax.vmap(lambda l: jnp.bincount(l, length=9))(
      res.labels))


def test_assign_chunking_is_invisible():
  x = _blobs(3, n=1001)
  c = kmeans.init_centroids(x, 13, jax.random.PRNGKey(2))
  np.testing.assert_array_equal(kmeans.assign_xla(x, c, chunk_mb=1 << 12),
                                kmeans.assign_xla(x, c, chunk_mb=0))


def test_inertia_never_increases():
  x = _blobs(4, spread=1.5)
  init = kmeans.init_centroids(x, 8, jax.random.PRNGKey(5))
  previous = None
  for iters in range(1, 9):
    res = kmeans.kmeans(x, init, max_iters=iters, tol=0.0)
    cur = np.asarray(kmeans.inertia(x, res.labels, res.centroids))
    if previous is not None:
      assert np.all(cur <= previous * (1 + 1e-6)), (iters, cur, previous)
    previous = cur


def test_empty_cluster_keeps_its_centroid():
  x = _blobs(5, g=1, n=50, centers=2, spread=0.01)
  far = jnp.full((1, 1, x.shape[-1]), 1e3)
  init = jnp.concatenate([x[:, :2], far], axis=1)
  res = kmeans.kmeans(x, init, max_iters=4, tol=0.0)
  assert int(res.sizes[0, 2]) == 0
  np.testing.assert_array_equal(res.centroids[0, 2], far[0, 0])


def test_warm_start_converges_faster():
  x = _blobs(6, n=600, centers=10, spread=0.5)
  cold = kmeans.kmeans(x, kmeans.init_centroids(x, 10, jax.random.PRNGKey(0)),
                       max_iters=50, tol=1e-4)
  x2 = x + 0.01 * jax.random.normal(jax.random.PRNGKey(9), x.shape)  # the next step's tokens
  warm = kmeans.kmeans(x2, cold.centroids, max_iters=50, tol=1e-4)
  cold2 = kmeans.kmeans(x2, kmeans.init_centroids(x2, 10, jax.random.PRNGKey(0)),
                        max_iters=50, tol=1e-4)
  assert int(warm.iterations) < int(cold2.iterations)
  two_warm = kmeans.kmeans(x2, cold.centroids, max_iters=2, tol=1e-4)
  two_cold = kmeans.kmeans(x2, kmeans.init_centroids(x2, 10, jax.random.PRNGKey(0)),
                           max_iters=2, tol=1e-4)
  assert np.all(np.asarray(kmeans.inertia(x2, two_warm.labels, two_warm.centroids))
                <= np.asarray(kmeans.inertia(x2, two_cold.labels, two_cold.centroids)))


def test_tolerance_stops_each_head_on_its_own():
  x = _blobs(7, g=2)
  init = kmeans.init_centroids(x, 6, jax.random.PRNGKey(0))
  converged = kmeans.kmeans(x, init, max_iters=100, tol=1e-4)
  # restart from converged centroids: nothing moves, one iteration suffices
  again = kmeans.kmeans(x, converged.centroids, max_iters=100, tol=1e-4)
  assert int(again.iterations) == 1
  np.testing.assert_allclose(again.centroids, converged.centroids, atol=1e-4)


def test_bf16_points():
  x = _blobs(8).astype(jnp.bfloat16)
  res = kmeans.kmeans(x, kmeans.init_centroids(x, 6, jax.random.PRNGKey(0)), max_iters=5,
                      tol=1e-4)
  assert res.centroids.dtype == jnp.float32 and res.labels.dtype == jnp.int32
  assert int(res.sizes.sum()) == x.shape[0] * x.shape[1]


def test_max_iters_must_be_positive():
  with pytest.raises(ValueError, match="max_iters"):
    kmeans.kmeans(_blobs(0), jnp.zeros((3, 2, 8)), max_iters=0, tol=0.0)


def test_permutation_layout():
  rng = np.random.default_rng(0)
  labels = jnp.asarray(rng.integers(0, 5, size=(2, 37)), jnp.int32)
  sizes = jax.vmap(lambda l: jnp.bincount(l, length=7))(labels)  # clusters 5, 6 empty
  lay = permutation.cluster_layout(labels, sizes)
  for g in range(2):
    perm = np.asarray(lay.perm[g])
    assert sorted(perm) == list(range(37))
    sorted_labels = np.asarray(labels[g])[perm]
    assert np.all(np.diff(sorted_labels) >= 0)
    for c in range(7):
      off, n = int(lay.offsets[g, c]), int(lay.sizes[g, c])
      assert np.all(sorted_labels[off:off + n] == c)
      # stable: tokens of one cluster keep their order
      assert np.all(np.diff(perm[off:off + n]) > 0)
  x = jnp.asarray(rng.normal(size=(2, 37, 3)), jnp.float32)
  np.testing.assert_array_equal(permutation.unpermute(permutation.permute(x, lay.perm), lay.perm),
                                x)
  np.testing.assert_array_equal(permutation.labels_of_rows(lay.sizes, 37),
                                jnp.take_along_axis(labels, lay.perm, 1))


# ----------------------------------------------------------------- the sort-based update

def _pallas_means(interpret=True, num_points=None):
  import pallas_kernels
  return lambda x, sizes, perm: pallas_kernels.cluster_means(
      x, sizes, perm, num_rows=num_points, block_rows=16, interpret=interpret)


def _assert_same_result(got, want, rtol=1e-5):
  np.testing.assert_array_equal(np.asarray(got.labels), np.asarray(want.labels))
  np.testing.assert_array_equal(np.asarray(got.sizes), np.asarray(want.sizes))
  assert int(got.iterations) == int(want.iterations)
  np.testing.assert_allclose(np.asarray(got.centroids), np.asarray(want.centroids), rtol=rtol,
                             atol=1e-6)


@pytest.mark.parametrize("mean_fn", ["xla", "pallas"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_sorted_update_equals_segment_sum(mean_fn, dtype):
  """Several iterations with an empty cluster (a far centroid), one-point clusters and a
  per-head tol stop: the same labels, sizes and iterations, centroids within rounding,
  and the order it returns is the stable argsort of its labels."""
  x = _blobs(10, g=3, n=201, centers=5, spread=0.4).astype(dtype)
  x = x.at[:, 0].set(40.0)  # a lone far point: its own cluster once it is a centroid
  init = kmeans.init_centroids(x, 8, jax.random.PRNGKey(2))
  init = init.at[:, 1].set(x[:, 0].astype(jnp.float32)).at[:, 7].set(1e3)  # 7 stays empty
  fn = None if mean_fn == "xla" else _pallas_means()
  for iters, tol in ((1, 0.0), (6, 0.0), (60, 1e-3)):
    want = kmeans.kmeans(x, init, max_iters=iters, tol=tol)
    got = kmeans.kmeans(x, init, max_iters=iters, tol=tol, update="sorted", mean_fn=fn)
    _assert_same_result(got, want)
    assert want.perm is None
    lay = permutation.cluster_layout(got.labels, got.sizes)
    np.testing.assert_array_equal(np.asarray(got.perm), np.asarray(lay.perm))
    assert np.all(np.asarray(got.sizes[:, 7]) == 0)
    np.testing.assert_array_equal(np.asarray(got.centroids[:, 7]), 1e3)
  assert np.all(np.asarray(got.sizes[:, 1]) == 1)
  assert int(got.iterations) < 60  # the tol stop fired


def test_sorted_update_with_point_mask_and_a_stopped_head():
  """Masked points (label K) sort last and count nowhere; a head that converged first
  keeps its labels and order while the others iterate."""
  x = _blobs(11, g=2, n=150, centers=4, spread=0.5)
  # head 0: six far-apart blobs, one start in each: converged after two iterations
  rng = np.random.default_rng(12)
  lab = np.arange(150) % 6
  x = x.at[0].set(jnp.asarray(20.0 * np.eye(8)[lab] + 0.1 * rng.normal(size=(150, 8)),
                              jnp.float32))
  mask = jnp.arange(150)[None, :] < jnp.array([[150], [120]])
  init = kmeans.init_centroids(x, 6, jax.random.PRNGKey(3), mask).at[0].set(x[0, :6])
  want = kmeans.kmeans(x, init, max_iters=30, tol=1e-4, point_mask=mask)
  got = kmeans.kmeans(x, init, max_iters=30, tol=1e-4, point_mask=mask, update="sorted",
                      mean_fn=_pallas_means())
  _assert_same_result(got, want)
  assert int(got.iterations) > 2 and np.all(np.asarray(got.sizes[0]) == 25)
  assert np.all(np.asarray(got.labels[1, 120:]) == 6)
  np.testing.assert_array_equal(np.asarray(got.perm),
                                np.asarray(permutation.cluster_layout(got.labels, got.sizes).perm))


@pytest.mark.parametrize("update", ["segment_sum", "sorted"])
def test_tokens_first_points_equal_head_major(update):
  """[B, S, H, D] points (head g = b * H + h), the first n rows only, with the Pallas
  assignment / means reading them in place: the result of the head-major copy."""
  import pallas_kernels
  b, s, h, n, d = 2, 157, 2, 131, 16
  x = _blobs(13, g=b * h, n=s, d=d, centers=5)
  tokens_first = x.reshape(b, h, s, d).transpose(0, 2, 1, 3)
  heads = x[:, :n]
  init = kmeans.init_centroids(tokens_first, 7, jax.random.PRNGKey(4), num_points=n)
  np.testing.assert_array_equal(np.asarray(init), np.asarray(
      kmeans.init_centroids(heads, 7, jax.random.PRNGKey(4))))
  want = kmeans.kmeans(heads, init, max_iters=5, tol=1e-4, update=update)
  assign = lambda pts, c: pallas_kernels.kmeans_assign(pts, c, num_rows=n, block_n=32,
                                                       block_k=16, interpret=True)
  got = kmeans.kmeans(tokens_first, init, max_iters=5, tol=1e-4, update=update,
                      assign_fn=assign, mean_fn=_pallas_means(num_points=n), num_points=n)
  _assert_same_result(got, want)
  # the XLA defaults take the same tokens-first points (through a head-major copy)
  _assert_same_result(kmeans.kmeans(tokens_first, init, max_iters=5, tol=1e-4, update=update,
                                    num_points=n), want)


def test_sort_by_label_counts_without_scatter():
  rng = np.random.default_rng(1)
  labels = jnp.asarray(rng.integers(0, 6, size=(3, 41)), jnp.int32).at[:, :5].set(7)  # 7: K
  lay = permutation.sort_by_label(labels, 7)  # cluster 6 empty, label 7 in none
  np.testing.assert_array_equal(np.asarray(lay.sizes), np.stack(
      [np.bincount(np.asarray(l), minlength=8)[:7] for l in labels]))
  ref = permutation.cluster_layout(labels, lay.sizes)
  for a, b in zip((lay.perm, lay.offsets), (ref.perm, ref.offsets)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  given = permutation.cluster_layout(labels, lay.sizes, perm=lay.perm)
  np.testing.assert_array_equal(np.asarray(given.perm), np.asarray(ref.perm))


@pytest.mark.parametrize("num_labels", [8, 1001, 1 << 16, (1 << 16) + 1])
def test_narrow_label_sort_keys_give_the_same_order(num_labels, monkeypatch):
  # permutation.LABEL_SORT_KEYS = "narrow" (uint16 keys where the labels fit) is the same
  # stable order as the int32 sort, ties in token order; past 65,536 labels the int32 keys
  rng = np.random.default_rng(num_labels)
  labels = jnp.asarray(rng.integers(0, num_labels, size=(3, 700)), jnp.int32)
  labels = labels.at[:, 100:160].set(num_labels - 1)  # many ties at the largest label
  want = np.argsort(np.asarray(labels), axis=-1, kind="stable")
  for keys in permutation.LABEL_SORT_KEYS_CHOICES:
    monkeypatch.setattr(permutation, "LABEL_SORT_KEYS", keys)
    got = permutation.argsort_labels(labels, num_labels)
    assert got.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(got), want)
    lay = permutation.sort_by_label(jnp.minimum(labels, 7), 7)
    np.testing.assert_array_equal(np.asarray(lay.perm), np.argsort(
        np.minimum(np.asarray(labels), 7), axis=-1, kind="stable"))
  monkeypatch.setattr(permutation, "LABEL_SORT_KEYS", "int16")
  with pytest.raises(ValueError, match="LABEL_SORT_KEYS"):
    permutation.argsort_labels(labels, num_labels)


@pytest.mark.parametrize("kwargs,match", [
    (dict(update="scatter"), "update must be"),
    (dict(num_points=401), "num_points"),
    (dict(point_mask=jnp.ones((3, 399), bool)), "point_mask"),
])
def test_bad_kmeans_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    kmeans.kmeans(_blobs(0), jnp.zeros((3, 2, 8)), max_iters=1, tol=0.0, **kwargs)
  with pytest.raises(ValueError, match="init must be"):
    kmeans.kmeans(_blobs(0), jnp.zeros((3, 2, 7)), max_iters=1, tol=0.0)
