"""Variable-size block-sparse attention with centroid compensation in one online softmax.

For a query in query cluster i: one softmax over (a) every key of every key cluster j with
block_map[i, j] (logit q.k * sm_scale, value v) and, with compensation, (b) one pseudo-token
per non-empty key cluster j with block_map[i, j] == False (logit q.kbar_j * sm_scale +
log n_j, value vbar_j) (ALGORITHM.md 2(d)); "variance" compensation adds
min(0.5 sm_scale^2 (q*q) . var_j, sm_scale ||q|| r_j) to that logit (ALGORITHM.md 9). One
program per query tile walks the row's exact keys (layouts in sparse_layout.py), then the
centroid tiles, in the same (m, l, acc).

Dots: bf16/f16 inputs use the input dtype with float32 accumulation (p is cast to v's dtype,
as flash attention); float32 inputs use Precision.HIGHEST on GPU (no TF32), so the float32
kernel matches the float32 reference to ~1e-5 on GPU and in interpret mode.
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import common

from pallas_kernels import sparse_layout

_LOG2E = math.log2(math.e)




def _kernel(*refs, names, layout, block_q, block_k, block_c, head_dim, seq_len, num_rows,
            num_k_clusters, num_k_tiles, scale, compensation, precision):
  r = dict(zip(names, refs))
  o_ref = refs[-1]
  kk = num_k_clusters
  t = pl.program_id(0)
  c = r["tile_c"][t]
  q0 = r["tile_q0"][t]
  q_end = r["tile_qend"][t]
  live = q0 < q_end
  dp = common.next_pow2(head_dim)
  cols = jnp.arange(dp)
  col_ok = cols < head_dim

  def mask2(row_ok):  # a constant-true column mask would only cost compares
    return row_ok[:, None] & col_ok[None, :] if dp != head_dim else row_ok[:, None]

  q_pos = q0 + jnp.arange(block_q)
  q_ok = q_pos < q_end
  if "q_index" in r:
    q_rows = plgpu.load(r["q_index"].at[q_pos], mask=q_ok, other=0)
  else:
    q_rows = q_pos
  q_rows = jnp.where(q_ok, q_rows, seq_len)  # dead lanes: out of range (dropped in interpret)
  q = plgpu.load(r["q"].at[q_rows[:, None], cols[None, :]], mask=mask2(q_ok), other=0.)

  def attend(carry, rows, ok):
    """One exact key tile: rows [block_k] permuted key positions, ok [block_k]."""
    rows = jnp.where(ok, rows, 0)
    if "kv_index" in r:
      rows = plgpu.load(r["kv_index"].at[rows], mask=ok, other=0)
    k = plgpu.load(r["k"].at[rows[:, None], cols[None, :]], mask=mask2(ok), other=0.)
    v = plgpu.load(r["v"].at[rows[:, None], cols[None, :]], mask=mask2(ok), other=0.)
    s = plgpu.dot(q, k, trans_b=True, precision=precision) * scale
    return update(carry, jnp.where(ok[None, :], s, -jnp.inf), v)

  def update(carry, s, vals):
    m, l, acc = carry
    m_new = jnp.maximum(m, s.max(axis=-1))
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    alpha = jnp.exp2(m - m_safe)
    p = jnp.exp2(s - m_safe[:, None])
    pv = plgpu.dot(p.astype(vals.dtype), vals, precision=precision)
    return m_new, alpha * l + p.sum(axis=-1), alpha[:, None] * acc + pv

  carry = (jnp.full((block_q,), -jnp.inf, jnp.float32), jnp.zeros((block_q,), jnp.float32),
           jnp.zeros((block_q, dp), jnp.float32))
  pos0 = jnp.arange(block_k)
  if layout == "packed":
    row_len = r["row_len"][c]

    def packed_body(window):
      def body(i, carry):
        idx = c * num_k_tiles + i
        pos = r["tile_j"][idx] * block_k + pos0
        a = r["tile_e"][idx]
        ent = a + jnp.arange(window)
        e_ok = ent < kk
        ends = plgpu.load(r["ends"].at[c * kk + ent], mask=e_ok, other=sparse_layout.BIG)
        steps = plgpu.load(r["dbase"].at[c * kk + ent], mask=e_ok, other=0)
        rows = r["tile_base"][idx] + pos + jnp.sum(
            jnp.where(ends[None, :] <= pos[:, None], steps[None, :], 0), axis=1)
        return attend(carry, rows, pos < row_len)
      return body

    n_fast = jnp.where(live, r["n_fast"][c], 0)
    n_wide = jnp.where(live, r["n_wide"][c], 0)
    carry = lax.fori_loop(0, n_fast, packed_body(min(sparse_layout.W_FAST, block_k)), carry)
    carry = lax.fori_loop(n_fast, n_fast + n_wide, packed_body(block_k), carry)
  else:
    def flat_body(i, carry):
      idx = c * num_k_tiles + i
      rows = r["tile_start"][idx] + pos0
      return attend(carry, rows, rows < r["tile_end"][idx])

    carry = lax.fori_loop(0, jnp.where(live, r["n_tiles"][c], 0), flat_body, carry)

  if compensation != "none":
    idx0 = jnp.arange(block_c)
    if compensation == "variance":
      qf = q.astype(jnp.float32)
      q_sq = (qf * qf).astype(q.dtype)
      q_norm = jnp.sqrt(jnp.sum(qf * qf, axis=-1))

    def centroid_body(jb, carry):
      idx = jb * block_c + idx0
      ok = idx < kk
      kc = plgpu.load(r["kc"].at[idx[:, None], cols[None, :]], mask=mask2(ok), other=0.)
      vc = plgpu.load(r["vc"].at[idx[:, None], cols[None, :]], mask=mask2(ok), other=0.)
      log_n = plgpu.load(r["log_n"].at[idx], mask=ok, other=-jnp.inf)
      pseudo = plgpu.load(r["pseudo"].at[c * kk + idx], mask=ok, other=0)
      s = plgpu.dot(q, kc, trans_b=True, precision=precision) * scale + log_n[None, :]
      if compensation == "variance":
        kw = plgpu.load(r["kw"].at[idx[:, None], cols[None, :]], mask=mask2(ok), other=0.)
        rr = plgpu.load(r["rr"].at[idx], mask=ok, other=0.)
        second = plgpu.dot(q_sq, kw, trans_b=True, precision=precision) * scale
        s = s + jnp.minimum(second, q_norm[:, None] * rr[None, :])
      return update(carry, jnp.where((pseudo != 0)[None, :], s, -jnp.inf), vc)

    # row Kq (positions of no query cluster) gets no pseudo-tokens
    num_c = jnp.where(live & (c < num_rows - 1), jnp.int32(common.cdiv(kk, block_c)),
                      jnp.int32(0))
    carry = lax.fori_loop(jnp.int32(0), num_c, centroid_body, carry)
  _, l, acc = carry
  out = acc / jnp.where(l == 0, 1.0, l)[:, None]
  plgpu.store(o_ref.at[q_rows[:, None], cols[None, :]], out.astype(o_ref.dtype),
              mask=mask2(q_ok & live))


def _call(arrays: dict, table, out, *, block_q, num_warps, num_stages, interpret, heads,
          **static):
  """One pallas_call over one query-tile table; `out` (optional) is updated in place.

  q, k, v (and the output) are [G, S, D], or [B, S, H, D] when `heads` is H: the kernel
  then reads head g = b * H + h through a strided block, with no transposed copy.
  """
  tile_c, tile_q0, tile_qend = table
  arrays = dict(tile_c=tile_c, tile_q0=tile_q0, tile_qend=tile_qend, **arrays)
  names = tuple(arrays)
  inputs = list(arrays.values())
  aliases = {}
  if out is not None:
    aliases = {len(inputs): 0}
    inputs.append(out)
  q = arrays["q"]
  s, d = q.shape[-3 if heads else -2], q.shape[-1]

  def spec(x):
    if heads and x.ndim == 4:  # tokens-first [B, S, H, D]
      return pl.BlockSpec((None, s, None, d), lambda t, g: (g // heads, 0, g % heads, 0))
    return pl.BlockSpec((None,) + x.shape[1:], lambda t, g, _n=x.ndim: (g,) + (0,) * (_n - 1))

  kernel = functools.partial(_kernel, names=names, block_q=block_q, head_dim=d, seq_len=s,
                             **static)
  return pl.pallas_call(
      kernel, grid=(tile_c.shape[1], tile_c.shape[0]), in_specs=[spec(x) for x in inputs],
      out_specs=spec(q), out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      input_output_aliases=aliases, interpret=interpret, name="svg_ear_sparse_attention",
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
  )(*inputs)


@functools.partial(jax.jit, static_argnames=(
    "compensation", "sm_scale", "layout", "block_q", "block_k", "block_c", "tail_block_q",
    "num_warps", "num_stages", "tail_num_warps", "interpret"))
def sparse_attention(q, k, v, q_sizes, k_sizes, block_map, k_centroids, v_centroids, *,
                     compensation, sm_scale: float, q_index=None, kv_index=None,
                     k_variance=None, k_radius=None,
                     layout: str = "packed", block_q: int = 64, block_k: int = 64,
                     block_c: int = 64, tail_block_q=None, num_warps: int = 4,
                     num_stages: int = 3, tail_num_warps: int = 4, interpret: bool = False):
  """Cluster block-sparse attention + centroid compensation on cluster-permuted inputs.

  Args:
    q: [G, S, D] queries sorted by query cluster (cluster i = positions
      [q_off_i, q_off_i + q_sizes_i), q_off = exclusive cumsum of q_sizes); or tokens-first
      [B, S, H, D] with G = B * H (head g = b * H + h), read in place without a transpose.
    k, v: [G, S, D] (or [B, S, H, D], like q) keys / values sorted by key cluster likewise
      with k_sizes.
    q_sizes: [G, Kq] int32; may sum to less than S (the other positions output 0).
    k_sizes: [G, Kk] int32; may sum to less than S (the other keys are never read).
    block_map: [G, Kq, Kk] bool, True = key cluster j is exact for query cluster i.
    k_centroids, v_centroids: [G, Kk, D] any float dtype (cast to q's / v's dtype).
    compensation: "mean" (or True): one pseudo-token per skipped non-empty key cluster;
      "variance": the same with the second-moment logit correction; "none" (or False).
    sm_scale: softmax scale.
    q_index: optional [G, S] int32; if given, q is in original token order, permuted
      position p reads row q_index[g, p] and the output is written to that row (so it is in
      original order too). q_index must be a permutation.
    kv_index: optional [G, S] int32; if given, k and v are in original order and permuted
      key position p reads row kv_index[g, p].
    k_variance, k_radius: [G, Kk, D] / [G, Kk] float per-dimension variance and radius of
      every key cluster about its centroid ("variance" compensation only).
    layout: "packed" (keys of a row packed into full tiles) or "flat" (one tile run per
      cluster); see sparse_layout.py.
    block_q, block_k, block_c: query / key / centroid tile sizes (powers of two >= 16).
    tail_block_q: optional smaller query tile for remainders <= tail_block_q rows (run as
      a second pallas_call with tail_num_warps warps).
    num_warps, num_stages: Triton launch parameters.
    interpret: Pallas interpret mode (CPU tests).

  Returns:
    q's shape ([G, S, D] or [B, S, H, D]) in q.dtype (permuted query order unless q_index is
    given). Positions of no query cluster, and queries with nothing to attend, are 0.
  """
  arrays, tables, static = _prepare(
      q, k, v, q_sizes, k_sizes, block_map, k_centroids, v_centroids, compensation=compensation,
      sm_scale=sm_scale, q_index=q_index, kv_index=kv_index, k_variance=k_variance,
      k_radius=k_radius, layout=layout, block_q=block_q,
      block_k=block_k, block_c=block_c, tail_block_q=tail_block_q)
  static.update(num_stages=num_stages, interpret=interpret)
  out = _call(arrays, tables[0], None, block_q=block_q, num_warps=num_warps, **static)
  if tail_block_q is not None:
    out = _call(arrays, tables[1], out, block_q=tail_block_q, num_warps=tail_num_warps, **static)
  return out


def _prepare(q, k, v, q_sizes, k_sizes, block_map, k_centroids, v_centroids, *, compensation,
             sm_scale, q_index, kv_index, layout, block_q, block_k, block_c, tail_block_q,
             k_variance=None, k_radius=None):
  """Kernel inputs (dict), query-tile tables (one per pass) and kernel statics."""
  g, h = common.check_heads(q, k, v, block_map)
  compensation = common.compensation_mode(compensation, k_variance, k_radius, k_centroids)
  s = q.shape[1]
  kk = block_map.shape[-1]
  for name, b in (("block_q", block_q), ("block_k", block_k), ("block_c", block_c)):
    common.check_block(name, b)
  if tail_block_q is not None:
    common.check_block("tail_block_q", tail_block_q)
    if tail_block_q >= block_q:
      raise ValueError("tail_block_q must be smaller than block_q")
  md = sparse_layout.sparse_attention_metadata(
      block_map, q_sizes, k_sizes, seq_len=s, block_q=block_q, block_k=block_k, layout=layout,
      tail_block_q=tail_block_q)
  tables = md.pop("q_tables")
  k_sizes = k_sizes.astype(jnp.int32)
  arrays = dict(md)
  if compensation != "none":
    log_n = jnp.log2(jnp.maximum(k_sizes, 1).astype(jnp.float32))
    arrays["log_n"] = jnp.where(k_sizes > 0, log_n, -jnp.inf)
    pseudo = ~block_map & (k_sizes > 0)[:, None, :]
    arrays["pseudo"] = jnp.pad(pseudo, ((0, 0), (0, 1), (0, 0))).reshape(g, -1).astype(jnp.int8)
    arrays["kc"] = k_centroids.astype(q.dtype)
    arrays["vc"] = v_centroids.astype(v.dtype)
  if compensation == "variance":
    # in log2 units: (q*q) . kw * scale = log2(e) 0.5 sm_scale^2 (q*q) . var, and
    # ||q|| * rr = log2(e) sm_scale ||q|| r
    arrays["kw"] = (0.5 * sm_scale * k_variance.astype(jnp.float32)).astype(q.dtype)
    arrays["rr"] = (sm_scale * _LOG2E) * k_radius.astype(jnp.float32)
  arrays.update(q=q, k=k, v=v)
  if q_index is not None:
    arrays["q_index"] = q_index.astype(jnp.int32)
  if kv_index is not None:
    arrays["kv_index"] = kv_index.astype(jnp.int32)
  nt = common.cdiv(s, block_k) + (kk if layout == "flat" else 0)
  static = dict(layout=layout, block_k=block_k, block_c=block_c, heads=h,
                num_rows=block_map.shape[1] + 1, num_k_clusters=kk, num_k_tiles=nt,
                scale=sm_scale * _LOG2E, compensation=compensation,
                precision=lax.Precision.HIGHEST if q.dtype == jnp.float32 else None)
  return arrays, tables, static


def sparse_attention_reference(q, k, v, q_sizes, k_sizes, block_map, k_centroids, v_centroids,
                               *, compensation, sm_scale: float, k_variance=None,
                               k_radius=None):
  """Token-level float32 jnp evaluation of `sparse_attention` (permuted inputs; [G, S, D] f32).

  Builds the S x S mask from the map and the cluster ids, appends the pseudo-tokens, and
  takes one softmax; small sizes only.
  """
  compensation = common.compensation_mode(compensation, k_variance, k_radius, k_centroids)
  g, s, _ = q.shape
  kq, kk = block_map.shape[1:]
  label = lambda sizes: common.searchsorted_rows(  # == K past the last cluster
      jnp.cumsum(sizes, axis=-1), jnp.arange(s))
  q_lab, k_lab = label(q_sizes), label(k_sizes)
  bm = jnp.pad(block_map, ((0, 0), (0, 1), (0, 1)))  # row Kq / column Kk: attends nothing
  row = jnp.take_along_axis(bm, q_lab[..., None], axis=1)  # [G, S, Kk + 1]
  exact = jnp.take_along_axis(row, jnp.broadcast_to(k_lab[:, None, :], (g, s, s)), axis=2)
  f32 = lambda x: x.astype(jnp.float32)
  hi = lax.Precision.HIGHEST
  logits = jnp.einsum("gqd,gkd->gqk", f32(q), f32(k), precision=hi) * sm_scale
  logits = jnp.where(exact, logits, -jnp.inf)
  values = f32(v)
  if compensation != "none":
    n = k_sizes.astype(jnp.float32)
    pseudo = jnp.einsum("gqd,gkd->gqk", f32(q), f32(k_centroids), precision=hi) * sm_scale
    pseudo = pseudo + jnp.log(jnp.maximum(n, 1.0))[:, None, :]
    if compensation == "variance":
      pseudo = pseudo + variance_correction_reference(q, k_variance, k_radius, sm_scale)
    on = ~row[..., :kk] & (n > 0)[:, None, :] & (q_lab < kq)[..., None]
    logits = jnp.concatenate([logits, jnp.where(on, pseudo, -jnp.inf)], axis=-1)
    values = jnp.concatenate([values, f32(v_centroids)], axis=1)
  m = jnp.max(logits, axis=-1, keepdims=True)
  p = jnp.exp(logits - jnp.where(jnp.isfinite(m), m, 0.0))
  l = jnp.sum(p, axis=-1, keepdims=True)
  return jnp.einsum("gqk,gkd->gqd", p, values, precision=hi) / jnp.where(l == 0, 1.0, l)


def variance_correction_reference(q, k_variance, k_radius, sm_scale):
  """min(0.5 sm_scale^2 (q*q) . var_j, sm_scale ||q|| r_j) in float32: [G, S, Kk]."""
  qf = q.astype(jnp.float32)
  second = 0.5 * sm_scale ** 2 * jnp.einsum("gqd,gkd->gqk", qf * qf,
                                            k_variance.astype(jnp.float32),
                                            precision=lax.Precision.HIGHEST)
  bound = sm_scale * jnp.linalg.norm(qf, axis=-1)[..., None] * k_radius.astype(
      jnp.float32)[:, None, :]
  return jnp.minimum(second, bound)
