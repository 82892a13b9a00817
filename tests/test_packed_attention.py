"""Packed-key-list sparse attention kernel vs its jnp reference.

`PackedAttentionTest` compiles with Triton and runs only on a GPU (the H100); the
`...InterpretTest` subclass runs the same cases in Pallas interpret mode on CPU. Interpret
mode hides power-of-two limits and TF32, so the GPU run is what proves those.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import packed_attention as pa

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _problem(seed, g=2, s=333, d=32, kq=5, kk=24, many_small=False, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  q_labels = rng.integers(0, kq, (g, s))
  if many_small:  # three big clusters and many tiny ones: tiles spanning > W_FAST clusters
    k_labels = np.where(rng.random((g, s)) < 0.5, rng.integers(0, 3, (g, s)),
                        rng.integers(3, kk - 1, (g, s)))
  else:
    k_labels = rng.integers(0, kk - 2, (g, s))
    k_labels[:, 0] = kk - 2  # a singleton cluster; cluster kk - 1 stays empty
    k_labels[:, 1:][k_labels[:, 1:] == kk - 2] = 0  # cluster 0 is larger than a tile
  q_sizes = np.stack([np.bincount(x, minlength=kq) for x in q_labels])
  k_sizes = np.stack([np.bincount(x, minlength=kk) for x in k_labels])
  block_map = rng.random((g, kq, kk)) < 0.5
  block_map[:, 0] = False
  block_map[:, 0, 1] = True  # a row with one exact cluster
  f = lambda x: jnp.asarray(x, jnp.float32)
  q, k, v = (f(rng.normal(size=(g, s, d))).astype(dtype) for _ in range(3))
  return dict(q=q, k=k, v=v, q_sizes=jnp.asarray(q_sizes, jnp.int32),
              k_sizes=jnp.asarray(k_sizes, jnp.int32), block_map=jnp.asarray(block_map),
              k_centroids=f(rng.normal(size=(g, kk, d))), v_centroids=f(rng.normal(size=(g, kk, d))))


class PackedAttentionTest:
  INTERPRET = False

  @pytest.fixture(autouse=True)
  def _device(self):
    if not self.INTERPRET and jax.default_backend() != "gpu":
      pytest.skip("compiled Pallas-Triton kernels need a GPU (the interpret class runs on CPU)")

  def _run(self, p, compensation, **blocks):
    args = [p[n] for n in ("q", "k", "v", "q_sizes", "k_sizes", "block_map", "k_centroids",
                           "v_centroids")]
    scale = p["q"].shape[-1] ** -0.5
    out = pa.packed_sparse_attention(*args, compensation=compensation, sm_scale=scale,
                                     interpret=self.INTERPRET, **blocks)
    ref = pa.packed_sparse_attention_reference(*args, compensation=compensation, sm_scale=scale)
    return out, ref

  @pytest.mark.parametrize("compensation", [True, False])
  @pytest.mark.parametrize("many_small", [False, True])
  def test_f32_matches_reference(self, compensation, many_small):
    p = _problem(0, many_small=many_small)
    out, ref = self._run(p, compensation, block_q=16, block_k=16, block_c=16)
    # f32 dots are exact in interpret mode and TF32 on the GPU
    np.testing.assert_allclose(out, ref, atol=1e-5 if self.INTERPRET else 5e-3)

  @pytest.mark.parametrize("blocks", [dict(block_q=16, block_k=16, block_c=16),
                                      dict(block_q=64, block_k=32, block_c=64)])
  def test_bf16_odd_head_dim(self, blocks):
    p = _problem(1, s=301, d=24, dtype=jnp.bfloat16)  # D padded to 32 inside
    out, ref = self._run(p, True, **blocks)
    assert out.dtype == jnp.bfloat16 and out.shape == p["q"].shape
    np.testing.assert_allclose(out.astype(jnp.float32), ref, atol=2e-2)

  def test_rows_outside_clusters_and_empty_rows(self):
    p = _problem(2)
    # the last 20 rows belong to no cluster (e.g. masked keys / padding): sizes sum to S - 20
    p["q_sizes"] = p["q_sizes"].at[:, -1].add(-jnp.minimum(p["q_sizes"][:, -1], 20))
    p["k_sizes"] = p["k_sizes"].at[:, 0].add(-10)
    p["block_map"] = p["block_map"].at[:, 2].set(False)  # query cluster 2 attends to nothing
    out, ref = self._run(p, False, block_q=16, block_k=16, block_c=16)
    assert bool(jnp.all(jnp.isfinite(out)))
    np.testing.assert_allclose(out, ref, atol=1e-5 if self.INTERPRET else 5e-3)
    written = int(jnp.sum(p["q_sizes"][0]))
    assert bool(jnp.all(out[:, written:] == 0))

  def test_metadata_visits_exactly_the_selected_keys(self):
    p = _problem(3, many_small=True)
    md = pa.packed_metadata(p["block_map"], p["q_sizes"], p["k_sizes"], 333, 16, 16)
    k_off = np.cumsum(np.asarray(p["k_sizes"]), -1) - np.asarray(p["k_sizes"])
    kk = p["k_sizes"].shape[-1]
    for g in range(2):
      for c in range(5):
        want = sorted(r for j in range(kk) if p["block_map"][g, c, j]
                      for r in range(k_off[g, j], k_off[g, j] + int(p["k_sizes"][g, j])))
        ends = np.asarray(md["ends"][g, c * kk:(c + 1) * kk])
        base = np.asarray(md["base"][g, c * kk:(c + 1) * kk])
        rows = [int(base[np.searchsorted(ends, pos, side="right")] + pos)
                for pos in range(int(md["row_len"][g, c]))]
        assert rows == want
        n_tiles = -(-int(md["row_len"][g, c]) // 16)
        assert int(md["n_fast"][g, c] + md["n_wide"][g, c]) == n_tiles

  def test_padding_waste_is_small(self):
    p = _problem(4, s=512, kk=12)
    waste = pa.padding_waste(p["block_map"], p["q_sizes"], p["k_sizes"], 512, 16, 16)
    assert bool(jnp.all((waste > 0.6) & (waste <= 1.0)))

  def test_rejects_bad_blocks(self):
    p = _problem(5)
    with pytest.raises(ValueError, match="power of two"):
      self._run(p, True, block_q=24)


class PackedAttentionInterpretTest(PackedAttentionTest):
  INTERPRET = True


# pytest collects classes named Test*: bind both explicitly.
TestPackedAttention = PackedAttentionTest
TestPackedAttentionInterpret = PackedAttentionInterpretTest
