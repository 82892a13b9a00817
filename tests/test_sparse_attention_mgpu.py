"""Mosaic GPU sparse-attention kernel (pallas_kernels.sparse_attention_mgpu).

On CPU: its tables and data path (padded sorted copies, key-row biases, chunk lists,
compensation bias rows, output rows written in the caller's layout) through
`emulate_kernel` against the float32 token-level reference, and the Pallas -> Mosaic GPU
lowering for CUDA (jax >= 0.11; the layout inference that rejects unaligned TMA rows runs
there). On a Hopper GPU: the compiled kernel against the same reference.
"""

import functools
import importlib
import inspect

import jax
from jax import export
import jax.numpy as jnp
import numpy as np
import pytest

from svg_ear_jax import SvgEarConfig, svg_ear_attention
from test_pallas_kernels import (_args, _assert_close, _problem, _spread,  # noqa: F401
                                 abstract_h100, sa)

pytestmark = pytest.mark.split_cases

# the package exports the function `sparse_attention_mgpu`, which shadows the module
sm = importlib.import_module("pallas_kernels.sparse_attention_mgpu")
cl = importlib.import_module("pallas_kernels.chunk_list")

_ON_HOPPER = sm.on_hopper()


def _ref(p, compensation, scale):
  return sa.sparse_attention_reference(*_args(p), compensation=compensation, sm_scale=scale,
                                       **_spread(p, compensation))


@pytest.mark.parametrize("compensation,tiny,seed,chunk,kk", [
    (True, False, 1, 16, 24), (False, False, 2, 16, 24), (True, True, 3, 16, 24),
    (True, True, 4, 8, 24), (True, False, 5, 64, 24), ("variance", False, 6, 16, 24),
    ("variance", True, 7, 8, 150)])
def test_emulated_kernel_matches_reference(compensation, tiny, seed, chunk, kk):
  # clusters of 0, 1, 2 and 40 keys, an empty row, a row with one exact cluster,
  # positions of no query cluster (cover 0.97); kk=150: "variance" compensation steps of
  # 64 centroids, the last one partly padding
  p = _problem(seed, s=333, d=64, kq=5, kk=kk, tiny=tiny)
  out = sm.sparse_attention_mgpu(*_args(p), compensation=compensation, sm_scale=0.125,
                                 chunk_rows=chunk, emulate=True, **_spread(p, compensation))
  _assert_close(out, _ref(p, compensation, 0.125), jnp.float32)


@pytest.mark.parametrize("compensation,pair,chunk,seed", [
    (True, True, 16, 11), (True, False, 16, 12), ("variance", True, 8, 13),
    (False, True, 64, 14)])
def test_emulated_pair_tiles_match_reference(compensation, pair, chunk, seed):
  # kq=9 at s=1000: clusters of ~110 rows, so about half the clusters end in a half tile
  # (paired, or with an idle second warpgroup), some clusters of 1-3 rows
  p = _problem(seed, g=3, s=1000, d=64, kq=9, kk=24, tiny=True)
  lay = sm.sparse_layout_mgpu(p["q_sizes"], p["k_sizes"], p["block_map"], seq_len=1000,
                              chunk=chunk, pair_half_tiles=pair)
  assert bool((lay["tile_mode"] == sm.MODE_PAIR).any()) == pair
  out = sm.sparse_attention_mgpu(*_args(p), compensation=compensation, sm_scale=0.125,
                                 chunk_rows=chunk, pair_half_tiles=pair, emulate=True,
                                 **_spread(p, compensation))
  _assert_close(out, _ref(p, compensation, 0.125), jnp.float32)


def _check_tokens_first(p, kw, b, dtype):
  """The kernel on tokens-first [b, S, G / b, D] inputs in token order, read and written
  through random permutations, against the reference in sorted order."""
  g, s, d = p["q"].shape
  h = g // b
  rng = np.random.default_rng(1)
  q_idx = jnp.asarray(np.stack([rng.permutation(s) for _ in range(g)]), jnp.int32)
  kv_idx = jnp.asarray(np.stack([rng.permutation(s) for _ in range(g)]), jnp.int32)
  heads = jnp.arange(g)[:, None]
  unperm = lambda x, idx: jnp.zeros_like(x).at[heads, idx].set(x)
  tokens_first = lambda x: x.reshape(b, h, s, -1).transpose(0, 2, 1, 3)
  args = _args(p)
  args[:3] = [tokens_first(unperm(p[n], i)) for n, i in (("q", q_idx), ("k", kv_idx),
                                                           ("v", kv_idx))]
  out = sm.sparse_attention_mgpu(*args, q_index=q_idx, kv_index=kv_idx, **kw)
  assert out.shape == (b, s, h, d) and out.dtype == p["q"].dtype
  got = out.transpose(0, 2, 1, 3).reshape(g, s, -1)[heads, q_idx]
  _assert_close(got, _ref(p, kw["compensation"], kw["sm_scale"]), dtype)


@pytest.mark.parametrize("slots", [False, True])
def test_emulated_kernel_tokens_first_with_permutations(slots):
  # positions of no query cluster (cover 0.97) map to scattered token rows: zeroed there;
  # slots: the slot-buffer output gathered back by XLA (pair tiles included)
  p = _problem(8, g=6, s=200, d=64, kq=5, kk=12)
  _check_tokens_first(p, dict(compensation=True, sm_scale=0.2, emulate=True,
                              slot_output=slots), 2, jnp.float32)


@pytest.mark.parametrize("tokens_first,heads_per_call", [(False, 2), (True, 4), (True, 1)])
def test_emulated_kernel_in_calls_of_fewer_heads(tokens_first, heads_per_call):
  # G = 5 or 6 heads in calls of 2 (the last call's heads overlap the one before), 4 (of
  # 6: calls at heads 0 and 2) or 1 writing one output: as the reference, and as one call
  p = _problem(21, g=6 if tokens_first else 5, s=200, d=64, kq=5, kk=12)
  kw = dict(compensation="variance", sm_scale=0.2, emulate=True,
            **_spread(p, "variance"))
  if tokens_first:
    _check_tokens_first(p, dict(kw, heads_per_call=heads_per_call), 2, jnp.float32)
    return
  one = sm.sparse_attention_mgpu(*_args(p), **kw)
  out = sm.sparse_attention_mgpu(*_args(p), heads_per_call=heads_per_call, **kw)
  _assert_close(out, _ref(p, "variance", 0.2), jnp.float32)
  np.testing.assert_allclose(np.asarray(out), np.asarray(one), rtol=1e-6, atol=1e-6)


def test_call_heads_and_its_errors(monkeypatch):
  assert [sm.call_heads(g) for g in (1, 2, 24, 40, 41, 80)] == [1, 2, 8, 10, 9, 10]
  assert sm.call_heads(40, 7) == 7 and sm.call_heads(3, 8) == 3
  for bad in (0, -1, 2.0, True, "4"):
    with pytest.raises(ValueError, match="heads_per_call"):
      sm.call_heads(4, bad)
  p = _problem(22, g=3, s=200, d=64, kq=5, kk=12)
  monkeypatch.setattr(sm, "CALL_HEADS", 2)  # slot_output: one call all the same
  out = sm.sparse_attention_mgpu(*_args(p), compensation=True, sm_scale=0.2, emulate=True,
                                 slot_output=True)
  _assert_close(out, _ref(p, True, 0.2), jnp.float32)
  with pytest.raises(ValueError, match="slot_output"):
    sm.sparse_attention_mgpu(*_args(p), compensation=True, sm_scale=0.2, emulate=True,
                             slot_output=True, heads_per_call=2)


@pytest.mark.parametrize("chunk,impl", [(8, "jnp"), (16, "jnp"), (16, "interpret")])
def test_layout_chunks_cover_exactly_the_selected_keys(chunk, impl):
  p = _problem(5, s=333, d=8, kq=5, kk=24, tiny=True)
  lay = sm.sparse_layout_mgpu(p["q_sizes"], p["k_sizes"], p["block_map"], seq_len=333,
                              chunk=chunk, chunk_impl=impl)
  per_step = sm.BLOCK_K // chunk
  ks = np.asarray(p["k_sizes"])
  bm = np.asarray(p["block_map"])
  key_rows = np.asarray(lay["key_rows"])
  chunks = np.asarray(lay["chunks"])
  n_exact = np.asarray(lay["n_exact"])
  k_lab = [np.repeat(np.arange(ks.shape[1]), ks[h]) for h in range(ks.shape[0])]
  for h in range(bm.shape[0]):
    # each padded row holds a distinct sorted key; padding only in a cluster's last chunk
    real = key_rows[h][key_rows[h] >= 0]
    np.testing.assert_array_equal(np.sort(real), np.arange(ks[h].sum()))
    for c in range(bm.shape[1]):
      lst = chunks[h, c]
      used = lst[:n_exact[h, c] * per_step]
      assert (lst[n_exact[h, c] * per_step:] == lay["fill_chunk"]).all()
      rows = (used[used != lay["fill_chunk"]][:, None] * chunk + np.arange(chunk)).ravel()
      keys = key_rows[h][rows]
      keys = keys[keys >= 0]
      want = np.flatnonzero(bm[h, c][k_lab[h]])
      np.testing.assert_array_equal(np.sort(keys), want)
      assert len(np.unique(keys)) == len(keys)


@pytest.mark.parametrize("compensation,chunk", [(True, 16), ("variance", 8)])
def test_padding_rows_are_zero_keys_past_each_chunks_real_rows(compensation, chunk):
  # the kernel biases the slots past each chunk's real rows (chunk_valid) by -inf instead
  # of testing for NaN keys: a cluster's rows must fill its chunks from the first, padding
  # rows (a cluster's last chunk, the fill chunk) be finite zeros with values 0
  p = _problem(9, s=333, d=64, kq=5, kk=24, tiny=True)
  tables, _, k_pad, v_pad, statics, lay = sm.prepare_mgpu(
      *_args(p), compensation=compensation, chunk=chunk, sm_scale=0.125,
      **_spread(p, compensation))
  valid = np.asarray(tables.chunk_valid)
  rows = np.asarray(lay["key_rows"])
  g, n = rows.shape
  assert valid.shape == (g, statics["comp_base"] // chunk) == (g, n // chunk + 1)
  real = np.arange(chunk) < valid[..., None]  # [G, chunks, chunk]
  np.testing.assert_array_equal(real.reshape(g, -1)[:, :n], rows >= 0)
  assert not real[:, -1].any() and (~real).sum() > chunk * g
  kp, vp = (np.asarray(x[:, :statics["comp_base"]], np.float32) for x in (k_pad, v_pad))
  pad = ~real.reshape(g, -1)
  assert np.all(kp[pad] == 0) and np.all(vp[pad] == 0) and np.isfinite(kp).all()
  for h in range(g):
    np.testing.assert_array_equal(kp[h, :n][rows[h] >= 0],
                                  np.asarray(p["k"][h], np.float32)[rows[h][rows[h] >= 0]])


def test_tables_are_named_in_the_order_of_the_kernels_refs():
  # _call passes the tables positionally (*tables): their field order must be the order of
  # _kernel's first refs, whatever either is renamed to
  refs = list(inspect.signature(sm._kernel).parameters)[:len(sm.KernelTables._fields)]
  assert [r.removesuffix("_ref") for r in refs] == list(sm.KernelTables._fields)
  p = _problem(3, s=1000, d=64, kq=9, kk=24, density=0.5)
  tables = sm.prepare_mgpu(*_args(p), compensation=True)[0]
  assert isinstance(tables, sm.KernelTables)
  assert tables.tile_mode.shape == tables.tile_exact.shape == tables.wg_c.shape[:2]


@pytest.mark.parametrize("chunk,pair", [(16, True), (8, False), (16, False)])
def test_clean_steps_hold_no_padding_and_are_all_of_them(chunk, pair):
  # each list has its selected clusters' full chunks first, so a warpgroup's first
  # wg_clean exact steps (where the kernel adds no bias) hold only real key rows, and the
  # step after them holds a padding slot (a partial chunk or the fill chunk)
  p = _problem(10, s=1000, d=64, kq=9, kk=24, density=0.5)
  tables, _, _, _, _, lay = sm.prepare_mgpu(*_args(p), compensation=True, chunk=chunk,
                                            pair_half_tiles=pair)
  valid, clean = np.asarray(tables.chunk_valid), np.asarray(tables.wg_clean)
  np.testing.assert_array_equal(clean, np.asarray(lay["wg_clean"]))
  mode, exact, wg_c = (np.asarray(lay[n]) for n in ("tile_mode", "tile_exact", "wg_c"))
  chunks = np.asarray(lay["chunks"])
  per_step = sm.BLOCK_K // chunk
  assert (mode == sm.MODE_PAIR).any() == pair
  seen_dirty = 0
  live = [(h, t, w) for h, t in zip(*np.nonzero(mode > 0)) for w in range(2)
          if mode[h, t] != sm.MODE_HALF or w == 0]  # a half tile's warpgroup 1 idles
  for h, t, w in live:
    per = per_step // 2 if mode[h, t] == sm.MODE_PAIR else per_step
    lst = chunks[h, wg_c[h, t, w]]
    n = clean[h, t, w] * per
    assert (valid[h, lst[:n]] == chunk).all()
    if clean[h, t, w] < exact[h, t]:  # the next step has a padding slot
      seen_dirty += 1
      assert (valid[h, lst[n:n + per]] < chunk).any()
    # the whole list: full chunks, then partial ones, then the fill chunk
    full = valid[h, lst] == chunk
    first_short = np.argmin(full) if not full.all() else len(full)
    assert not full[first_short:].any()
  assert seen_dirty and clean.max() > 0


@pytest.mark.parametrize("seed,kk,width,block", [(0, 24, 100, 16), (1, 37, 64, 32),
                                                 (2, 5, 300, 128)])
def test_chunk_list_kernel_matches_reference(seed, kk, width, block):
  # the Pallas-Triton chunk lists (interpret mode) equal the jnp ones slot for slot: runs of
  # 0-9 chunks, lists that end mid-block, fill the whole width or are empty; the width is
  # not a multiple of the block (masked stores)
  rng = np.random.default_rng(seed)
  g, kq = 2, 6
  cnt = rng.integers(0, 10, size=(g, kq, kk)) * (rng.random((g, kq, kk)) < 0.5)
  cnt[:, 0] = 0  # an empty list
  cnt[0, 1] = 0
  cnt[0, 1, : width // 9] = 9  # a list that fills the width (almost)
  cnt = jnp.asarray(np.minimum(cnt, width // kk + 1), jnp.int32)
  assert int(jnp.sum(cnt, -1).max()) <= width
  start = jnp.asarray(np.cumsum(rng.integers(0, 12, size=(g, kk)), -1), jnp.int32)
  kw = dict(width=width, fill=-7)
  want = cl.chunk_list_reference(cnt, start, **kw)
  got = cl.chunk_list(cnt, start, block=block, interpret=True, **kw)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  assert (np.asarray(want)[:, 0] == -7).all()


@pytest.mark.parametrize("half,pair", [(True, True), (True, False), (False, False)])
def test_layout_tiles_write_each_query_once_in_its_cluster(half, pair):
  # the rows each warpgroup writes (its first wg_n rows, read through query_rows) are every
  # sorted position of a query cluster exactly once, each by a warpgroup of its own
  # cluster; pair tiles join two clusters' half tiles and step over the longer list
  p = _problem(6, g=3, s=700, d=8, kq=9, kk=24)
  lay = sm.sparse_layout_mgpu(p["q_sizes"], p["k_sizes"], p["block_map"], seq_len=700,
                              half_tiles=half, pair_half_tiles=pair)
  qs = np.asarray(p["q_sizes"])
  mode, exact = np.asarray(lay["tile_mode"]), np.asarray(lay["tile_exact"])
  wg_c, wg_q0, wg_n = (np.asarray(lay[n]) for n in ("wg_c", "wg_q0", "wg_n"))
  rows, n_exact = np.asarray(lay["query_rows"]), np.asarray(lay["n_exact"])
  n_chunks_half = np.asarray([[np.sum(np.asarray(lay["chunks"])[h, c] != lay["fill_chunk"])
                               for c in range(qs.shape[1])] for h in range(qs.shape[0])])
  n_half = -(-n_chunks_half // (sm.BLOCK_K // sm.CHUNK // 2))
  for h in range(qs.shape[0]):
    lab = np.repeat(np.arange(qs.shape[1]), qs[h])
    written = []
    for t in np.flatnonzero(mode[h] != sm.MODE_NONE):
      for w in range(2 if mode[h, t] != sm.MODE_HALF else 1):
        pos = rows[h][wg_q0[h, t, w] * sm.CHUNK + np.arange(wg_n[h, t, w])]
        assert (pos >= 0).all() and (lab[pos] == wg_c[h, t, w]).all()
        written.append(pos)
      if mode[h, t] == sm.MODE_PAIR:
        a, b = wg_c[h, t]
        assert a != b and 0 < wg_n[h, t, 0] <= sm.BLOCK_Q and 0 < wg_n[h, t, 1] <= sm.BLOCK_Q
        assert exact[h, t] == max(n_half[h, a], n_half[h, b])
      else:
        assert wg_c[h, t, 0] == wg_c[h, t, 1] and exact[h, t] == n_exact[h, wg_c[h, t, 0]]
        if mode[h, t] == sm.MODE_HALF:
          assert wg_n[h, t, 0] <= sm.BLOCK_Q and wg_n[h, t, 1] == 0
    written = np.concatenate(written)
    np.testing.assert_array_equal(np.sort(written), np.arange(qs[h].sum()))
    assert (wg_n[h][mode[h] == sm.MODE_NONE] == 0).all()
    # pair tiles follow the other tiles; at most one half tile stays unpaired
    live = np.flatnonzero(mode[h] != sm.MODE_NONE)
    assert (live == np.arange(len(live))).all()
    pairs = np.flatnonzero(mode[h] == sm.MODE_PAIR)
    assert (pairs == np.arange(len(pairs)) + len(live) - len(pairs)).all()
    assert (mode[h] == sm.MODE_PAIR).any() == pair
    assert (mode[h] == sm.MODE_HALF).sum() <= (1 if pair else qs.shape[1])
    assert ((mode[h] == sm.MODE_HALF).any() or (mode[h] == sm.MODE_PAIR).any()) == half


def test_flat_rows_address_both_layouts():
  # the rows the kernel reads and writes: x.reshape(-1, D)[flat] is sorted position p of
  # head g, for head-major and tokens-first inputs, with and without a permutation
  b, h, s, d = 2, 3, 7, 4
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((b, s, h, d)), jnp.float32)
  heads_first = x.transpose(0, 2, 1, 3).reshape(b * h, s, d)
  idx = jnp.asarray(np.stack([rng.permutation(s) for _ in range(b * h)]), jnp.int32)
  pos = jnp.asarray(np.stack([rng.permutation(s) for _ in range(b * h)]), jnp.int32)
  pos = pos.at[:, 0].set(-1)
  want = jnp.take_along_axis(jnp.take_along_axis(heads_first, idx[..., None], 1),
                             jnp.maximum(pos, 0)[..., None], 1)
  for arr in (x, heads_first):
    flat = sm._flat_rows(pos, idx, arr.shape)
    assert (np.asarray(flat[:, 0]) == -1).all()
    got = arr.reshape(-1, d)[jnp.maximum(flat, 0)]
    np.testing.assert_array_equal(np.asarray(got)[:, 1:], np.asarray(want)[:, 1:])
  flat = sm._flat_rows(jnp.maximum(pos, 0), None, heads_first.shape)
  np.testing.assert_array_equal(
      np.asarray(heads_first.reshape(-1, d)[flat]),
      np.asarray(jnp.take_along_axis(heads_first, jnp.maximum(pos, 0)[..., None], 1)))


def test_rejects_bad_inputs():
  p = _problem(7, s=200, d=24, kq=5, kk=12)
  kw = dict(compensation=True, sm_scale=0.2)
  with pytest.raises(ValueError, match="multiple of 64"):
    sm.sparse_attention_mgpu(*_args(p), **kw)
  p = _problem(7, s=200, d=64, kq=5, kk=12)
  with pytest.raises(ValueError, match="bf16 or f16"):
    sm.sparse_attention_mgpu(*_args(p), **kw)
  args = _args(p)
  with pytest.raises(ValueError, match="shape"):
    sm.sparse_attention_mgpu(args[0][:, :100], *args[1:], **kw)
  bf16 = [a.astype(jnp.bfloat16) if i < 3 else a for i, a in enumerate(args)]
  with pytest.raises(ValueError, match="max_concurrent_steps"):
    sm.sparse_attention_mgpu(*bf16, max_concurrent_steps=1, **kw)
  with pytest.raises(ValueError, match="chunk_rows"):
    sm.sparse_attention_mgpu(*bf16, chunk_rows=12, **kw)
  p = _problem(7, s=200, d=128, kq=5, kk=12, dtype=jnp.bfloat16)
  with pytest.raises(ValueError, match="shared memory"):
    sm.sparse_attention_mgpu(*_args(p), max_concurrent_steps=3, **kw)


def test_pipeline_mosaic_matches_triton_kernel():
  # svg_ear_attention with each attention kernel (CPU: emulated Mosaic vs interpreted
  # Triton; H100: both compiled), same clustering and routing
  ks = jax.random.split(jax.random.PRNGKey(3), 3)
  q, k, v = (jax.random.normal(x, (1, 400, 2, 64), jnp.float32).astype(jnp.bfloat16)
             for x in ks)
  cfg = SvgEarConfig(num_q_clusters=6, num_k_clusters=20, kmeans_iters=5, density=0.4,
                     implementation="pallas")
  out_t = svg_ear_attention(q, k, v, cfg.replace(attention_kernel="triton"))
  out_m = svg_ear_attention(q, k, v, cfg.replace(attention_kernel="mosaic"))
  diff = np.abs(np.asarray(out_m, np.float32) - np.asarray(out_t, np.float32))
  assert diff.max() < 3e-2 and diff.mean() < 3e-3
  with pytest.raises(ValueError, match="attention_kernel"):
    SvgEarConfig(attention_kernel="cuda")
  with pytest.raises(ValueError, match="multiple of 64"):
    svg_ear_attention(q[..., :32], k[..., :32], v[..., :32],
                      cfg.replace(attention_kernel="mosaic"))


def test_pipeline_mosaic_options(monkeypatch):
  # pipeline.MOSAIC_OPTIONS reach the kernel (benchmarks/attention.py --mosaic-options):
  # 8-row chunks with split producers compute the same call
  from benchmarks import attention as attention_bench
  from svg_ear_jax import pipeline
  ks = jax.random.split(jax.random.PRNGKey(4), 3)
  q, k, v = (jax.random.normal(x, (1, 300, 2, 64), jnp.float32).astype(jnp.bfloat16)
             for x in ks)
  cfg = SvgEarConfig(num_q_clusters=5, num_k_clusters=16, kmeans_iters=4, density=0.4,
                     implementation="pallas", attention_kernel="mosaic")
  base = svg_ear_attention(q, k, v, cfg)
  options = attention_bench.parse_mosaic_options("chunk_rows=8, split_producers=1")
  assert options == {"chunk_rows": 8, "split_producers": True}
  seen = {}
  real = sm.sparse_attention_mgpu

  def spy(*args, **kw):
    seen.update(kw)
    return real(*args, **kw)

  monkeypatch.setattr(pipeline._pallas(), "sparse_attention_mgpu", spy)
  monkeypatch.setattr(pipeline, "MOSAIC_OPTIONS", options)
  out = svg_ear_attention(q, k, v, cfg)
  assert seen["chunk_rows"] == 8 and seen["split_producers"] is True
  diff = np.abs(np.asarray(out, np.float32) - np.asarray(base, np.float32))
  assert diff.max() < 2e-2
  monkeypatch.setattr(pipeline, "MOSAIC_OPTIONS", {"chunk": 8})
  with pytest.raises(ValueError, match="unknown options"):
    svg_ear_attention(q, k, v, cfg)
  for bad in ("chunk_rows", "chunk=8", "chunk_rows=eight"):
    with pytest.raises(ValueError, match="--mosaic-options"):
      attention_bench.parse_mosaic_options(bad)


@pytest.mark.skipif(tuple(map(int, jax.__version__.split(".")[:2])) < (0, 11),
                    reason="the Mosaic GPU kernel API used here needs jax >= 0.11")
@pytest.mark.usefixtures("abstract_h100")
@pytest.mark.parametrize("chunk,compensation,variant", [(16, True, None), (8, True, None),
                                                        (16, "variance", None),
                                                        (16, True, "sorted"), (16, True, "slots"),
                                                        (16, True, "one_producer"),
                                                        (8, "variance", "one_producer"),
                                                        (16, True, "no_overlap"),
                                                        (16, "variance", "no_overlap"),
                                                        (16, "variance", "calls")])
def test_lowers_to_mosaic_gpu_for_cuda(chunk, compensation, variant):
  # the whole Mosaic GPU pipeline up to the serialized kernel (incl. layout inference),
  # and the Triton lowering of the chunk-list kernel that builds its tables
  p = _problem(11, s=1000, d=128, kq=5, kk=24, dtype=jnp.bfloat16)
  fn = functools.partial(sm.sparse_attention_mgpu, compensation=compensation, sm_scale=0.1,
                         chunk_rows=chunk, sorted_queries=variant in ("sorted", "slots"),
                         slot_output=variant == "slots",
                         split_producers=variant != "one_producer",
                         overlap_softmax=variant != "no_overlap",
                         heads_per_call=1 if variant == "calls" else None,
                         **_spread(p, compensation))
  triton_call = export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")
  exp = export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=[triton_call])(
      *_args(p))
  module = exp.mlir_module()
  # "calls": one call per head (the first, then a loop whose call writes in place)
  calls = 2 if variant == "calls" else 1
  assert module.count("custom_call @mosaic_gpu") == calls
  assert module.count("__gpu$xla.gpu.triton") == 1  # (one function, called in each call)
  assert module.count("output_operand_alias<") == (1 if variant == "calls" else 0)


@pytest.mark.skipif(not _ON_HOPPER, reason="the compiled Mosaic GPU kernel needs a Hopper GPU")
@pytest.mark.parametrize("compensation,tiny,seed,mcs,d,chunk,half,pair,s,density,b",
                         [(True, False, 1, 2, 128, 16, True, True, 1000, 0.5, 1),
                          (False, True, 2, 2, 128, 16, True, True, 1000, 0.5, 1),
                          (True, True, 3, 3, 64, 16, True, False, 1000, 0.5, 1),
                          (True, True, 4, 2, 128, 8, True, True, 1000, 0.5, 2),
                          (True, False, 5, 2, 128, 16, False, False, 1000, 0.5, 1),
                          (True, False, 6, 2, 128, 16, True, True, 4096, 0.9, 1),
                          ("variance", False, 7, 2, 128, 16, True, True, 1000, 0.5, 2),
                          ("variance", True, 8, 3, 64, 8, True, False, 1000, 0.3, 1),
                          (True, True, 9, 2, 128, 64, True, True, 1001, 0.5, 1),
                          (True, False, 10, 2, 128, 16, True, True, 1000, 0.5, -2),
                          (True, False, 11, 2, 128, 16, True, True, 1000, 0.5, -3),
                          (True, False, 12, 2, 128, 16, True, True, 4096, 0.9, 3),
                          ("variance", True, 13, 3, 64, 8, True, False, 1000, 0.3, 3),
                          (True, False, 14, 2, 128, 16, True, True, 4096, 0.9, 4),
                          ("variance", True, 15, 2, 64, 16, True, True, 1000, 0.3, 4)])
def test_compiled_kernel_matches_reference(compensation, tiny, seed, mcs, d, chunk, half, pair,
                                           s, density, b):
  # kq=9: clusters of ~110 rows at s=1000, so full tiles and half tiles (paired, or with
  # an idle second warpgroup); s=4096 at density 0.9: chunk lists of ~30 steps, so the key
  # ring wraps many times within a tile; b=2: tokens-first [2, S, 2, D] read and written in
  # place through permutations; b=-2: the same, the queries from a sorted copy; b=-3: and
  # the output through the slot buffer (b=2 then); b=3: B = 1 with one producer warpgroup
  # for keys and values (split_producers=False); b=4: B = 1, each exact step's softmax
  # not overlapped with the previous step's P.V (overlap_softmax=False)
  sorted_q, slots, split, overlap = b < 0, b == -3, b != 3, b != 4
  b = 1 if b in (3, 4) else min(abs(b), 2)
  p = _problem(seed, g=2 * b, s=s, d=d, kq=9, kk=24, tiny=tiny, dtype=jnp.bfloat16,
               density=density)
  kw = dict(compensation=compensation, sm_scale=d ** -0.5, chunk_rows=chunk, half_tiles=half,
            pair_half_tiles=pair, sorted_queries=sorted_q, slot_output=slots,
            split_producers=split, overlap_softmax=overlap, **_spread(p, compensation))
  lay = sm.sparse_layout_mgpu(p["q_sizes"], p["k_sizes"], p["block_map"], seq_len=s,
                              chunk=chunk, half_tiles=half, pair_half_tiles=pair)
  mode = lay["tile_mode"]
  # (with pairs, an odd one out per head keeps its idle second warpgroup)
  assert bool((mode == sm.MODE_PAIR).any()) == (half and pair)
  halves = (mode == sm.MODE_HALF).sum(axis=1)
  assert bool((halves > 1).any()) == (half and not pair) and bool((mode == sm.MODE_FULL).any())
  if s > 1001:
    assert int(lay["n_exact"].max()) > 16
  if b > 1:
    _check_tokens_first(p, dict(kw, max_concurrent_steps=mcs), b, jnp.bfloat16)
    return
  out = sm.sparse_attention_mgpu(*_args(p), max_concurrent_steps=mcs, **kw)
  emu = sm.sparse_attention_mgpu(*_args(p), emulate=True, **kw)
  _assert_close(out, _ref(p, compensation, d ** -0.5), jnp.bfloat16)
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(emu, np.float32),
                             atol=2e-2)


@pytest.mark.skipif(not _ON_HOPPER, reason="the compiled Mosaic GPU kernel needs a Hopper GPU")
@pytest.mark.parametrize("compensation,tokens_first,heads_per_call", [
    (True, False, 2), ("variance", True, 4)])
def test_compiled_kernel_in_calls_of_fewer_heads(compensation, tokens_first, heads_per_call):
  # G = 5 heads in calls of 2 (the last overlapping the one before: heads 3, 4 after 2, 3)
  # or tokens-first [2, S, 3, D] in calls of 4 (heads 0-3, then 2-5): the output written in
  # place by each call is the one call's, bit for bit, and the reference's
  p = _problem(23, g=6 if tokens_first else 5, s=1000, d=128, kq=9, kk=24,
               dtype=jnp.bfloat16)
  kw = dict(compensation=compensation, sm_scale=128 ** -0.5, **_spread(p, compensation))
  if tokens_first:
    _check_tokens_first(p, dict(kw, heads_per_call=heads_per_call), 2, jnp.bfloat16)
    return
  one = sm.sparse_attention_mgpu(*_args(p), **kw)
  out = sm.sparse_attention_mgpu(*_args(p), heads_per_call=heads_per_call, **kw)
  _assert_close(out, _ref(p, compensation, 128 ** -0.5), jnp.bfloat16)
  np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(one, np.float32))
