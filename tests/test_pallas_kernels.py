"""Sparse-attention kernel (pallas_kernels.sparse_attention) vs its jnp reference.

`TestSparseAttention` compiles with Triton and runs only on a GPU; the `...Interpret`
subclass runs the same cases in Pallas interpret mode on CPU. Interpret mode hides the
power-of-two rule, TF32 and masked-lane writes, so the GPU run is what proves those
(`test_gpu_model_sizes` runs only there); `TestTritonLowering` runs the Pallas -> Triton
lowering on CPU for an abstract sm90 device, which does enforce the power-of-two rule and
the dot dtype rules for all three kernels. The layout tests are plain jnp/numpy.
Tolerances: float32 runs at Precision.HIGHEST on GPU too (no TF32), so 2e-5; bf16 2e-2.
"""

import functools
import importlib

import jax
from jax import export
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
import numpy as np
import pytest

import pallas_kernels
from pallas_kernels import error_probe
from pallas_kernels import sparse_layout as sl
from pallas_testing import CompiledOrInterpret

# the package exports the function `sparse_attention`, which shadows the module attribute
sa = importlib.import_module("pallas_kernels.sparse_attention")

pytestmark = [pytest.mark.split_cases, pytest.mark.filterwarnings(
    "ignore:The Pallas Triton backend is deprecated:DeprecationWarning")]

_TOL = {jnp.float32: dict(atol=2e-5, rtol=1e-5, mean=1e-6),
        jnp.bfloat16: dict(atol=2e-2, rtol=0.0, mean=3e-3)}


def _sizes(rng, g, s, k, *, cover=1.0, tiny=False, big=40, permute=True):
  """[g, k] cluster sizes (k >= 5) summing to round(cover * s): random sizes (many tiny ones
  when `tiny`) then clusters of size 2, `big`, 1 and 0, shuffled when `permute`."""
  total = int(round(cover * s))
  out = np.zeros((g, k), np.int64)
  for h in range(g):
    if tiny:  # clusters of 1-2 keys, three large ones take the rest
      rest = rng.integers(1, 3, k - 4)
      rest[:3] = rng.multinomial(total - 3 - big - rest[3:].sum(), np.full(3, 1 / 3))
    else:
      rest = rng.multinomial(total - 3 - big, rng.dirichlet(np.full(k - 4, 2.0)))
    sz = np.concatenate([rest, [2, big, 1, 0]])
    out[h] = rng.permutation(sz) if permute else sz
  return out


def _problem(seed, *, g=2, s=333, d=24, kq=5, kk=24, dtype=jnp.float32, cover=0.97,
             tiny=False, density=0.5):
  rng = np.random.default_rng(seed)
  q_sizes = _sizes(rng, g, s, kq, cover=cover, big=3 * 16, permute=False)
  k_sizes = _sizes(rng, g, s, kk, cover=1.0, tiny=tiny)
  block_map = rng.random((g, kq, kk)) < density
  block_map[:, 0] = False
  block_map[np.arange(g), 0, np.argmax(k_sizes, -1)] = True  # a single exact cluster
  block_map[:, 1] = False  # a row with no exact cluster
  f = lambda x: jnp.asarray(x, jnp.float32)
  q, k, v = (f(rng.normal(size=(g, s, d))).astype(dtype) for _ in range(3))
  # spreads for "variance" compensation: radii from 0 to ~1.4x the rms spread, so the clamp
  # is active for some (query, cluster) pairs and not for others
  k_variance = rng.uniform(0.0, 2.0, size=(g, kk, d))
  k_radius = np.sqrt(k_variance.sum(-1)) * rng.uniform(0.0, 1.4, size=(g, kk))
  return dict(q=q, k=k, v=v, q_sizes=jnp.asarray(q_sizes, jnp.int32),
              k_sizes=jnp.asarray(k_sizes, jnp.int32), block_map=jnp.asarray(block_map),
              k_centroids=f(rng.normal(size=(g, kk, d))),
              v_centroids=f(rng.normal(size=(g, kk, d))),
              k_variance=f(k_variance), k_radius=f(k_radius))


_ARGS = ("q", "k", "v", "q_sizes", "k_sizes", "block_map", "k_centroids", "v_centroids")


def _args(p):
  return [p[n] for n in _ARGS]


def _spread(p, compensation):
  """The key-spread keyword arguments of the kernels for `compensation`."""
  if compensation != "variance":
    return {}
  return dict(k_variance=p["k_variance"], k_radius=p["k_radius"])


def _assert_close(out, ref, dtype):
  tol = _TOL[dtype]
  out = np.asarray(out.astype(jnp.float32))
  ref = np.asarray(ref)
  assert not np.isnan(out).any()
  np.testing.assert_allclose(out, ref, atol=tol["atol"], rtol=tol["rtol"])
  assert np.abs(out - ref).mean() < tol["mean"]


class TestSparseAttention(CompiledOrInterpret):
  def _run(self, p, compensation, **kw):
    blocks = dict(block_q=16, block_k=16, block_c=16)
    blocks.update(kw)
    return sa.sparse_attention(*_args(p), compensation=compensation,
                               sm_scale=p["q"].shape[-1] ** -0.5, interpret=self.INTERPRET,
                               **_spread(p, compensation), **blocks)

  def _ref(self, p, compensation):
    return sa.sparse_attention_reference(*_args(p), compensation=compensation,
                                         sm_scale=p["q"].shape[-1] ** -0.5,
                                         **_spread(p, compensation))

  @pytest.mark.parametrize("dtype,compensation,layout,kw", [
      (jnp.float32, True, "packed", {}),
      (jnp.float32, False, "packed", {}),
      (jnp.float32, True, "flat", {}),
      (jnp.bfloat16, True, "packed", dict(block_k=32)),
      (jnp.bfloat16, False, "flat", {}),
      (jnp.float32, True, "packed", dict(block_q=32, tail_block_q=16)),
      (jnp.float32, "variance", "packed", dict(block_q=32, tail_block_q=16)),
      (jnp.bfloat16, "variance", "flat", dict(block_c=32)),
  ])
  def test_matches_reference(self, dtype, compensation, layout, kw):
    p = _problem(1, dtype=dtype, s=333 if dtype == jnp.float32 else 300,
                 d=24 if dtype == jnp.float32 else 32)
    out = self._run(p, compensation, layout=layout, **kw)
    assert out.shape == p["q"].shape and out.dtype == dtype
    _assert_close(out, self._ref(p, compensation), dtype)
    for h, covered in enumerate(np.asarray(p["q_sizes"]).sum(-1)):
      assert np.all(np.asarray(out[h, covered:]) == 0)  # positions of no query cluster

  def test_variance_correction_moves_the_output(self):
    # the correction really enters the kernel's softmax: "variance" differs from "mean" by
    # much more than the kernel's own error, and a zero spread gives "mean" (to float32
    # rounding: the two are different programs, and XLA's CPU backend at the suite's
    # optimisation level 0 contracts their arithmetic differently)
    p = _problem(4, s=300, d=32, kq=5, kk=24, density=0.3)
    mean, var = self._run(p, "mean"), self._run(p, "variance")
    assert np.abs(np.asarray(var) - np.asarray(mean)).max() > 0.05
    zero = dict(p, k_variance=jnp.zeros_like(p["k_variance"]))
    np.testing.assert_allclose(np.asarray(self._run(zero, "variance")), np.asarray(mean),
                               rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="k_variance"):
      sa.sparse_attention(*_args(p), compensation="variance", sm_scale=0.1)

  def test_wide_tiles(self):
    # many tiny key clusters: some tiles span more than W_FAST clusters (second loop)
    p = _problem(2, s=300, d=32, kq=5, kk=96, tiny=True, density=0.8, cover=1.0)
    md = sl.sparse_attention_metadata(p["block_map"], p["q_sizes"], p["k_sizes"], seq_len=300,
                                      block_q=16, block_k=16)
    assert int(md["n_wide"].sum()) > 0
    _assert_close(self._run(p, True), self._ref(p, True), jnp.float32)

  def test_empty_rows_are_zero(self):
    # without compensation, query cluster 1 attends to nothing: zeros, not NaN
    p = _problem(3, s=200, d=16, kq=5, kk=12)
    out = np.asarray(self._run(p, False))
    q_off = np.cumsum(np.asarray(p["q_sizes"]), -1) - np.asarray(p["q_sizes"])
    for h in range(out.shape[0]):
      rows = slice(q_off[h, 1], q_off[h, 1] + int(p["q_sizes"][h, 1]))
      assert np.all(out[h, rows] == 0)
    assert not np.isnan(out).any()

  def test_permutation_indices(self):
    # q / k / v in original order, read (and the output written) through index arrays
    p = _problem(4, s=256, d=32, kq=5, kk=16, cover=1.0)
    rng = np.random.default_rng(0)
    g, s = p["q"].shape[:2]
    q_idx = jnp.asarray(np.stack([rng.permutation(s) for _ in range(g)]), jnp.int32)
    kv_idx = jnp.asarray(np.stack([rng.permutation(s) for _ in range(g)]), jnp.int32)
    heads = jnp.arange(g)[:, None]
    unperm = lambda x, idx: jnp.zeros_like(x).at[heads, idx].set(x)
    args = _args(p)
    args[:3] = unperm(p["q"], q_idx), unperm(p["k"], kv_idx), unperm(p["v"], kv_idx)
    out = sa.sparse_attention(*args, compensation=True, sm_scale=32 ** -0.5, q_index=q_idx,
                              kv_index=kv_idx, block_q=16, block_k=16, block_c=16,
                              interpret=self.INTERPRET)
    _assert_close(out[heads, q_idx], self._ref(p, True), jnp.float32)

  def test_tokens_first_layout(self):
    # [B, S, H, D] read in place (strided blocks) == the same heads as [G, S, D]
    b, h = 2, 3
    p = _problem(8, g=b * h, s=200, d=24, kq=5, kk=12)
    rng = np.random.default_rng(1)
    g, s = b * h, 200
    q_idx = jnp.asarray(np.stack([rng.permutation(s) for _ in range(g)]), jnp.int32)
    kv_idx = jnp.asarray(np.stack([rng.permutation(s) for _ in range(g)]), jnp.int32)
    kw = dict(compensation=True, sm_scale=0.2, q_index=q_idx, kv_index=kv_idx, block_q=32,
              block_k=16, block_c=16, tail_block_q=16, interpret=self.INTERPRET)
    want = sa.sparse_attention(*_args(p), **kw)
    tokens_first = lambda x: x.reshape(b, h, s, -1).transpose(0, 2, 1, 3)
    args = _args(p)
    args[:3] = [tokens_first(x) for x in args[:3]]
    got = sa.sparse_attention(*args, **kw)
    assert got.shape == (b, s, h, 24)
    np.testing.assert_allclose(np.asarray(got), np.asarray(tokens_first(want)), atol=1e-6)
    with pytest.raises(ValueError, match="shapes differ"):
      sa.sparse_attention(args[0], *_args(p)[1:], **kw)

  def test_no_out_of_tile_writes(self):
    # the tail pass alone, on a sentinel-filled aliased output: it must write exactly the
    # positions of its own tiles and leave every other element untouched
    p = _problem(5, s=333, d=24, cover=0.9)
    arrays, tables, static = sa._prepare(
        *_args(p), compensation=True, sm_scale=24 ** -0.5, q_index=None, kv_index=None,
        layout="packed", block_q=32, block_k=16, block_c=16, tail_block_q=16)
    sentinel = jnp.full(p["q"].shape, 7.0, jnp.float32)
    out = sa._call(arrays, tables[1], sentinel, block_q=16, num_warps=4, num_stages=2,
                   interpret=self.INTERPRET, **static)
    _, q0, q_end = (np.asarray(x) for x in tables[1])
    mine = np.zeros(p["q"].shape[:2], bool)
    for h in range(mine.shape[0]):
      for a, b in zip(q0[h], q_end[h]):
        mine[h, a:min(a + 16, b)] = True
    assert mine.any() and (~mine).any()
    out = np.asarray(out)
    assert np.all(out[~mine] == 7.0)
    ref = np.asarray(self._ref(p, True))
    np.testing.assert_allclose(out[mine], ref[mine], atol=2e-5, rtol=1e-5)

  def test_gpu_model_sizes(self):
    if self.INTERPRET:
      pytest.skip("model-size tiles are too slow in interpret mode")
    p = _problem(6, s=3000, d=128, kq=12, kk=64, dtype=jnp.bfloat16, density=0.3)
    ref = self._ref(p, True)
    for kw in (dict(block_q=64, block_k=64, block_c=64),
               dict(block_q=128, block_k=64, block_c=64, tail_block_q=64, num_warps=8),
               dict(block_q=128, block_k=128, block_c=64, num_warps=8, num_stages=2),
               dict(block_q=128, block_k=128, block_c=64, tail_block_q=64, num_warps=8,
                    num_stages=2),  # the pipeline's choice
               dict(block_q=64, block_k=64, block_c=64, layout="flat")):
      _assert_close(self._run(p, True, **kw), ref, jnp.bfloat16)

  def test_bad_blocks(self):
    p = _problem(7, s=64, d=16, kq=5, kk=8)
    with pytest.raises(ValueError, match="power of two"):
      self._run(p, True, block_k=48)
    with pytest.raises(ValueError, match="smaller"):
      self._run(p, True, block_q=16, tail_block_q=16)


class TestSparseAttentionInterpret(TestSparseAttention):
  INTERPRET = True


def _visited_keys(md, layout, h, c, kk, block_k):
  """Key positions the kernel's loops visit for row c of head h (numpy re-enactment)."""
  get = lambda name: np.asarray(md[name][h])
  out = []
  if layout == "packed":
    nt = get("tile_j").size // (get("row_len").size)
    n_fast, n_wide = int(get("n_fast")[c]), int(get("n_wide")[c])
    ends, dbase = get("ends"), get("dbase")
    for i in range(n_fast + n_wide):
      idx = c * nt + i
      window = sl.W_FAST if i < n_fast else block_k
      pos = get("tile_j")[idx] * block_k + np.arange(block_k)
      ent = get("tile_e")[idx] + np.arange(window)
      e_ok = ent < kk
      e = np.where(e_ok, ends[c * kk + np.minimum(ent, kk - 1)], sl.BIG)
      st = np.where(e_ok, dbase[c * kk + np.minimum(ent, kk - 1)], 0)
      rows = get("tile_base")[idx] + pos + np.sum(np.where(e[None] <= pos[:, None], st[None], 0),
                                                  axis=1)
      out.append(rows[pos < get("row_len")[c]])
  else:
    nt = get("tile_start").size // get("n_tiles").size
    for i in range(int(get("n_tiles")[c])):
      rows = get("tile_start")[c * nt + i] + np.arange(block_k)
      out.append(rows[rows < get("tile_end")[c * nt + i]])
  return np.sort(np.concatenate(out)) if out else np.zeros((0,), np.int64)


@pytest.mark.parametrize("layout", ["packed", "flat"])
@pytest.mark.parametrize("block_k,tiny", [(16, False), (32, True)])
def test_layout_visits_exactly_the_selected_keys(layout, block_k, tiny):
  p = _problem(8, s=300, kq=6, kk=64, tiny=tiny, density=0.6, cover=0.95)
  bm, qs, ks = (np.asarray(p[n]) for n in ("block_map", "q_sizes", "k_sizes"))
  g, kq, kk = bm.shape
  md = sl.sparse_attention_metadata(p["block_map"], p["q_sizes"], p["k_sizes"], seq_len=300,
                                    block_q=16, block_k=block_k, layout=layout, tail_block_q=None)
  k_off = np.cumsum(ks, -1) - ks
  for h in range(g):
    for c in range(kq + 1):
      sel = [np.arange(k_off[h, j], k_off[h, j] + ks[h, j]) for j in range(kk)
             if c < kq and bm[h, c, j]]
      want = np.sort(np.concatenate(sel)) if sel else np.zeros((0,), np.int64)
      np.testing.assert_array_equal(_visited_keys(md, layout, h, c, kk, block_k), want)


@pytest.mark.parametrize("tail", [None, 16])
def test_query_tiles_cover_every_position_once(tail):
  p = _problem(9, s=333, kq=7, kk=8, cover=0.9)
  qs = np.asarray(p["q_sizes"])
  block_q = 32 if tail else 16
  md = sl.sparse_attention_metadata(p["block_map"], p["q_sizes"], p["k_sizes"], seq_len=333,
                                    block_q=block_q, block_k=16, tail_block_q=tail)
  assert len(md["q_tables"]) == (2 if tail else 1)
  for h in range(qs.shape[0]):
    owner = np.full(333, -1)
    label = np.repeat(np.arange(qs.shape[1] + 1), np.append(qs[h], 333 - qs[h].sum()))
    for (tc, q0, qe), bq in zip(md["q_tables"], (block_q, tail)):
      for c, a, b in zip(*(np.asarray(x[h]) for x in (tc, q0, qe))):
        if a < b:
          rows = np.arange(a, min(a + bq, b))
          assert np.all(owner[rows] == -1) and np.all(label[rows] == c)
          owner[rows] = c
    assert np.all(owner >= 0)


def test_padding_waste():
  p = _problem(10, s=333, kq=6, kk=40, density=0.5)
  args = (p["block_map"], p["q_sizes"], p["k_sizes"])
  packed = np.asarray(sl.padding_waste(*args, seq_len=333, block_q=16, block_k=16))
  flat = np.asarray(sl.padding_waste(*args, seq_len=333, block_q=16, block_k=16, layout="flat"))
  tail = np.asarray(sl.padding_waste(*args, seq_len=333, block_q=32, block_k=16,
                                     tail_block_q=16))
  assert np.all((0 < flat) & (flat < packed) & (packed <= 1))
  assert np.all(tail <= packed + 1e-6)
  # one query cluster, all keys exact, sizes multiples of the tiles: no waste
  ones = sl.padding_waste(jnp.ones((1, 1, 4), bool), jnp.array([[64]]), jnp.array([[16] * 4]),
                          seq_len=64, block_q=16, block_k=16)
  np.testing.assert_allclose(np.asarray(ones), 1.0)


@pytest.fixture
def abstract_h100(monkeypatch):
  """Lets the Triton lowering run without a GPU (jax 0.12 asks for the device's info;
  0.10 falls back to sm90 by itself)."""
  from jax._src.pallas.triton import pallas_call_registration as pcr
  lib = getattr(pcr, "gpu_info_lib", None)
  if lib is not None:
    info = lib.GpuInfo(gpu_version=None, arch_name="9.0", compute_capability=90)
    monkeypatch.setattr(lib, "get_gpu_info", lambda: info)


def _lower_for_cuda(fn, *args):
  """Runs the Pallas -> Triton lowering (power-of-two sizes, dot dtypes, supported ops)
  for CUDA; returns the number of Triton kernels in the module."""
  triton_call = export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")
  exp = export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=[triton_call])(*args)
  return exp.mlir_module().count("__gpu$xla.gpu.triton")


@pytest.mark.usefixtures("abstract_h100")
class TestTritonLowering:
  """What interpret mode cannot check, checked on CPU: the kernels lower to Triton IR."""

  def test_rejects_non_power_of_two(self):
    def kernel(x_ref, o_ref):
      i = jnp.arange(48)
      plgpu.store(o_ref.at[i], plgpu.load(x_ref.at[i]) * 2.0)

    call = pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((64,), jnp.float32),
                          compiler_params=plgpu.CompilerParams())
    with pytest.raises(Exception, match="power of 2"):
      _lower_for_cuda(call, jnp.zeros((64,), jnp.float32))

  @pytest.mark.parametrize("dtype,d,kw,kernels", [
      (jnp.bfloat16, 128, dict(block_q=64, block_k=64, block_c=64), 1),
      (jnp.bfloat16, 128, dict(block_q=128, block_k=64, block_c=64, tail_block_q=64,
                               num_warps=8), 2),
      (jnp.bfloat16, 128, dict(block_q=128, block_k=128, block_c=64, num_warps=8,
                               num_stages=2, layout="flat"), 1),
      (jnp.float32, 24, dict(block_q=16, block_k=16, block_c=16, index=True), 1),
  ])
  def test_sparse_attention_lowers(self, dtype, d, kw, kernels):
    p = _problem(11, s=300, d=d, kq=5, kk=24, dtype=dtype)
    kw = dict(kw)
    if kw.pop("index", False):
      idx = jnp.zeros(p["q"].shape[:2], jnp.int32)
      kw.update(q_index=idx, kv_index=idx)
    fn = functools.partial(sa.sparse_attention, compensation=True, sm_scale=0.1, **kw)
    assert _lower_for_cuda(fn, *_args(p)) == kernels
    fn = functools.partial(sa.sparse_attention, compensation="variance", sm_scale=0.1,
                           **_spread(p, "variance"), **kw)
    assert _lower_for_cuda(fn, *_args(p)) == kernels

  @pytest.mark.parametrize("dtype,d", [(jnp.bfloat16, 128), (jnp.float32, 24)])
  def test_kmeans_assign_and_probe_lower(self, dtype, d):
    p = _problem(12, s=300, d=d, kq=5, kk=24, dtype=dtype)
    x = p["k"]
    # the package attribute (the module name is shadowed by the function)
    assert _lower_for_cuda(pallas_kernels.kmeans_assign, x, p["k_centroids"]) == 1
    probe = functools.partial(error_probe.ear_error_probe, sm_scale=0.1)
    assert _lower_for_cuda(probe, p["q"][:, :20].astype(jnp.float32), p["k"], p["v"],
                           p["k_centroids"], p["v_centroids"], p["k_sizes"]) == 1
