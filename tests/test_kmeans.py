import jax
import jax.numpy as jnp
import numpy as np
import pytest

import numpy_reference as npr
from svg_ear_jax import kmeans, permutation


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
