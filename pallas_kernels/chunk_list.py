"""Per-query-cluster key-chunk lists of the Mosaic GPU kernel, as one Pallas-Triton kernel.

Query cluster i of head g visits its chunk runs in run order (the Mosaic kernel's layout
passes 2 Kk runs: each selected key cluster's full chunks, then each one's partial last
chunk): slot s of its list belongs to the run j whose [c_start_j, c_end_j) holds s and
reads chunk pch_start_j + s - c_start_j of the padded keys. In jnp
(`chunk_list_reference`) that is a scatter of run starts, a cumulative max over the
[G, Kq, W] list and a gather (~1 ms and several [G, Kq, W] int32 temporaries at Wan 720p,
W = 5,728); here each program finds the run of each slot by binary search in c_end (11
steps for 2,000 runs, loads that stay in L1) and writes the list once.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import common


def _kernel(c_end_ref, cnt_ref, start_ref, out_ref, *, num_k, width, block, fill):
  # refs: c_end, cnt [Kk] (this query cluster), start [Kk] (this head), out [W]
  n = c_end_ref[num_k - 1]
  steps = max(num_k, 1).bit_length()  # binary search steps over num_k entries

  def fill_block(b, carry):
    slots = b * block + jnp.arange(block)
    inside = slots < width

    @pl.when(b * block < n)
    def _():
      lo = jnp.zeros((block,), jnp.int32)
      hi = jnp.full((block,), num_k, jnp.int32)
      for _ in range(steps):  # first j with c_end[j] > slot (searchsorted, side="right")
        mid = (lo + hi) // 2
        right = plgpu.load(c_end_ref.at[jnp.minimum(mid, num_k - 1)]) <= slots
        open_ = lo < hi
        lo = jnp.where(open_ & right, mid + 1, lo)
        hi = jnp.where(open_ & ~right, mid, hi)
      run = jnp.minimum(lo, num_k - 1)
      src = (plgpu.load(start_ref.at[run]) + slots - plgpu.load(c_end_ref.at[run])
             + plgpu.load(cnt_ref.at[run]))
      plgpu.store(out_ref.at[slots], jnp.where(slots < n, src, fill), mask=inside)

    @pl.when(b * block >= n)
    def _():
      plgpu.store(out_ref.at[slots], jnp.full((block,), fill, jnp.int32), mask=inside)

    return carry

  lax.fori_loop(0, common.cdiv(width, block), fill_block, 0)


@functools.partial(jax.jit, static_argnames=("width", "fill", "block", "interpret"))
def chunk_list(cnt, run_start, *, width: int, fill: int, block: int = 512,
               interpret: bool = False):
  """Chunk lists: out[g, i, s] = run_start[g, j] + s - c_start[g, i, j] for the run j of
  query cluster i that holds slot s, `fill` past the list's end.

  Args:
    cnt: [G, Kq, Kk] int32 chunks of key cluster j in query cluster i's list (0: not in it);
      run j occupies slots [c_start, c_start + cnt) with c_start the exclusive cumsum over j.
    run_start: [G, Kk] int32 first chunk of key cluster j in the padded keys.
    width: W, list slots per query cluster (>= the largest sum over j of cnt).
    fill: the value past the end of a list (the all-padding chunk).
    block: slots per vector step (a power of two).
    interpret: Pallas interpret mode (CPU).

  Returns:
    [G, Kq, W] int32.
  """
  g, kq, kk = cnt.shape
  cnt = cnt.astype(jnp.int32)
  c_end = jnp.cumsum(cnt, axis=-1, dtype=jnp.int32)
  kernel = functools.partial(_kernel, num_k=kk, width=width, block=block, fill=fill)
  row = pl.BlockSpec((None, None, kk), lambda i, h: (h, i, 0))
  return pl.pallas_call(
      kernel, grid=(kq, g),
      in_specs=[row, row, pl.BlockSpec((None, kk), lambda i, h: (h, 0))],
      out_specs=pl.BlockSpec((None, None, width), lambda i, h: (h, i, 0)),
      out_shape=jax.ShapeDtypeStruct((g, kq, width), jnp.int32), interpret=interpret,
      name="svg_ear_chunk_list",
      compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
  )(c_end, cnt, run_start.astype(jnp.int32))


def chunk_list_reference(cnt, run_start, *, width: int, fill: int):
  """The same lists in jnp: mark each run's first slot with j, carry it forward with a
  cumulative max, gather the run's offset."""
  g, kq, kk = cnt.shape
  cnt = cnt.astype(jnp.int32)
  c_end = jnp.cumsum(cnt, axis=-1)
  c_start = c_end - cnt
  j_ids = jnp.broadcast_to(jnp.arange(kk, dtype=jnp.int32), (g, kq, kk))
  gi = jnp.arange(g)[:, None, None]
  ci = jnp.arange(kq)[None, :, None]
  # non-empty runs have distinct starts; empty ones write -1 under max
  mark = jnp.full((g, kq, width), -1, jnp.int32).at[gi, ci, c_start].max(
      jnp.where(cnt > 0, j_ids, -1), mode="drop")
  run = jnp.maximum(lax.cummax(mark, axis=2), 0)
  slot = jnp.arange(width, dtype=jnp.int32)
  # one gather: slot s of run j reads chunk run_start[j] + (s - c_start[j])
  src = jnp.take_along_axis(run_start[:, None, :].astype(jnp.int32) - c_start, run, 2) + slot
  return jnp.where(slot < c_end[..., -1:], src, fill).astype(jnp.int32)
