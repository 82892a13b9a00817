"""Ulysses sequence parallelism of the DiT ports (Wan2.2, HunyuanVideo) over a device mesh.

JAX's own SPMD machinery is the engine: a `jax.sharding.Mesh` with a sequence axis "seq"
(size P) and optionally a data axis "data" (size P_d, e.g. the CFG batch of 2), and one
`shard_map` around a model's whole block stack. Inside it every device holds
`[B / P_d, S_pad / P, D]` tokens (S_pad = S rounded up to a multiple of P), and everything
of a block but self-attention is per token, so norms, modulation, FFN and Wan's
cross-attention (text context replicated) run locally without communication. Around each
self-attention (DeepSpeed-Ulysses, arXiv 2309.14509):

  q, k, v [B, S_pad/P, H, Dh]  --one all-to-all of the stacked q|k|v-->  [B, S_pad, H/P, Dh]
  slice off the padding -> [B, S, H/P, Dh]: exactly the single-device sequence, per head
  attention, unchanged (dense, or SVG-EAR: k-means, routing and kernel per head)
  pad again -> one all-to-all back -> [B, S_pad/P, H, Dh] -> output projection (local)

so there are exactly two all-to-alls per self-attention (plus one all-gather in HunyuanVideo,
below). Because the padding is cut before the attention core, padded tokens are never
clustered, never routed, never attended to, and their (finite, meaningless) outputs are cut
after the block stack; nothing else needs a mask. Heads must divide by P (a ValueError
names both numbers): Wan 40 heads -> P in {1, 2, 4, 5, 8, 10, ...}, HunyuanVideo and
TI2V-5B 24 heads -> {1, 2, 3, 4, 6, 8, ...}. Device j of the seq axis owns heads
[j H/P, (j+1) H/P).

HunyuanVideo's text tokens (<= 256 of them against 118,800 video tokens at 720p) are
replicated on every device: only the video tokens are sharded and padded. The text
stream of the double-stream blocks and the text rows of the single-stream blocks are
computed redundantly on every device (identical values), a few permille of the FLOPs. In
the joint attention each device takes its H/P heads of the (replicated) text q, k, v by a
local slice, appends them after the gathered, unpadded video tokens, and so calls the
attention core with exactly the single-device [video | text] sequence: SVG-EAR's
`num_dense_tokens` (the trailing text) and the key mask / `kv_len` keep their meaning
exactly. The text rows of the output are all-gathered over the heads (one small
all-gather per joint attention); the video rows go back through the all-to-all.

SVG-EAR state: `KMeansState` [L, B, H, K, D] is sharded P(None, "data", "seq") - by head
like the attention, so every device warm-starts its own heads' k-means; the per-layer
density [L, B, H] likewise. A cold start draws each head's initial centroids with the key
of its *global* (batch, head) index (`svg_ear_attention(..., head_ids=)`), so sharded and
single-device clusterings agree up to float rounding.

Weights: replicated on every device by default (`NamedSharding(mesh, P())`). With
`fsdp=True` the stacked block weights are sharded over all mesh axes (each on its largest
dimension divisible by the mesh size) and every scanned layer all-gathers its own
weights just before use, so a device holds 1/(P_d P) of the block weights plus one layer
(embedders and the head stay replicated). The gathers are not overlapped with compute
by hand (XLA's scheduler decides).

After the block stack the sequence is all-gathered once (one all-gather per forward) and
the head and unpatchify run batch-sharded only.

Multi-host: the same code runs under `jax.distributed.initialize()` (one process per host,
every process running the same program): build the mesh over `jax.devices()` (all hosts'
devices, e.g. `make_mesh(seq=8, data=2)` on 2 x 8 GPUs; keep the seq axis inside a host so
that the all-to-alls stay on NVLink) and feed global arrays (e.g.
`jax.make_array_from_process_local_data`). Only single-host meshes are tested.

Pipelines: `WanPipeline` / `HunyuanVideoPipeline.from_pretrained(..., mesh=)` (or their
`set_mesh`) put the DiT(s) on a mesh this way; the denoising loop replicates its latents,
embeddings and scheduler state on the mesh and carries the k-means state sharded by head
from step to step, while the text encoders and the VAE stay on one device
(models/denoise.py).
"""

import dataclasses
import math
from typing import Any, Callable, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from svg_ear_jax import SvgEarConfig, SvgEarState, global_head_ids

SEQ = "seq"
DATA = "data"
AXES = (DATA, SEQ)

AttentionFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def shard_map(f: Callable, mesh: Mesh, in_specs: Any, out_specs: Any) -> Callable:
  """`jax.shard_map` (jax >= 0.8) or `jax.experimental.shard_map`, replication unchecked."""
  if hasattr(jax, "shard_map"):
    return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
  from jax.experimental.shard_map import shard_map as experimental_shard_map  # pragma: no cover
  return experimental_shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                                check_rep=False)


def make_mesh(seq: Optional[int] = None, data: int = 1,
              devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A ("data", "seq") mesh of `data * seq` devices (default: all of `jax.devices()`).

  Args:
    seq: sequence-parallel degree P (must divide the head count); None -> every device
      not used by `data`.
    data: data-parallel degree (the CFG batch of 2: data=2).
    devices: devices to use, in order (seq fastest); default `jax.devices()`.
  """
  devices = list(jax.devices() if devices is None else devices)
  if data < 1 or len(devices) % data:
    raise ValueError(f"data={data} must be >= 1 and divide the {len(devices)} devices")
  seq = len(devices) // data if seq is None else seq
  if seq < 1 or data * seq > len(devices):
    raise ValueError(f"a mesh of data={data} x seq={seq} needs {data * seq} devices, "
                     f"{len(devices)} given")
  return Mesh(np.array(devices[:data * seq], dtype=object).reshape(data, seq), AXES)


@dataclasses.dataclass(frozen=True)
class SeqParallel:
  """The sharding layout a model runs under: a mesh with axis "seq" and maybe "data".

  Attributes:
    mesh: the mesh (axes a subset of ("data", "seq") containing "seq").
    fsdp: shard the stacked block weights over the mesh (see the module docstring).
  """

  mesh: Mesh
  fsdp: bool = False

  def __post_init__(self):
    if not isinstance(self.mesh, Mesh):
      raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(self.mesh).__name__}")
    names = tuple(self.mesh.axis_names)
    if SEQ not in names or any(n not in AXES for n in names) or len(set(names)) != len(names):
      raise ValueError(f"the mesh must have a {SEQ!r} axis and optionally a {DATA!r} axis, "
                       f"got axes {names}")
    if not isinstance(self.fsdp, bool):
      raise TypeError(f"fsdp must be a bool, got {self.fsdp!r}")

  @property
  def seq_size(self) -> int:
    return int(self.mesh.shape[SEQ])

  @property
  def data_size(self) -> int:
    return int(self.mesh.shape[DATA]) if DATA in self.mesh.axis_names else 1

  @property
  def data_axis(self) -> Optional[str]:
    return DATA if DATA in self.mesh.axis_names else None

  @property
  def axes(self) -> Tuple[str, ...]:
    """Every mesh axis, data first (the FSDP sharding axes)."""
    return tuple(a for a in AXES if a in self.mesh.axis_names)

  def spec(self, layout: str) -> PartitionSpec:
    """PartitionSpec from a layout string: "d" = data axis, "s" = seq axis, "." = none."""
    named = {"d": self.data_axis, "s": SEQ, ".": None}
    return PartitionSpec(*(named[c] for c in layout))

  def check_heads(self, num_heads: int) -> None:
    """ValueError unless the head count divides by the seq axis size."""
    if num_heads % self.seq_size:
      raise ValueError(
          f"Ulysses sequence parallelism shards the attention heads over the mesh's "
          f"{SEQ!r} axis: num_heads={num_heads} is not divisible by its size "
          f"{self.seq_size} (use a sequence-parallel degree that divides {num_heads})")

  def check_batch(self, batch: int) -> None:
    if batch % self.data_size:
      raise ValueError(f"batch size {batch} is not divisible by the mesh's {DATA!r} axis "
                       f"size {self.data_size}")

  def padded(self, num_tokens: int) -> int:
    """`num_tokens` rounded up to a multiple of the seq axis size."""
    return -(-num_tokens // self.seq_size) * self.seq_size

  @staticmethod
  def pad(x: jax.Array, length: int, axis: int) -> jax.Array:
    """Zero-pads axis `axis` of x to `length` (no-op if already that long)."""
    extra = length - x.shape[axis]
    if extra == 0:
      return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths)

  # Weights.

  def weight_spec(self, x: Any) -> PartitionSpec:
    """Spec of one stacked block weight [L, ...]: replicated, or (fsdp) its largest
    non-layer dimension divisible by the mesh size sharded over every mesh axis."""
    shape = getattr(x, "shape", ())
    total = math.prod(self.mesh.shape[a] for a in self.axes)
    if not self.fsdp or total == 1 or len(shape) < 2:
      return PartitionSpec()
    dims = [i for i in range(1, len(shape)) if shape[i] % total == 0]
    if not dims:
      return PartitionSpec()
    best = max(dims, key=lambda i: (shape[i], -i))
    spec = [None] * len(shape)
    spec[best] = self.axes if len(self.axes) > 1 else self.axes[0]
    return PartitionSpec(*spec)

  def weight_specs(self, stacked_params: Any) -> Any:
    return jax.tree.map(self.weight_spec, stacked_params)

  def gather_layer(self, layer_params: Any, stacked_specs: Any) -> Any:
    """Inside the shard_map: all-gathers one layer's FSDP-sharded weights (its slice of the
    stack, so spec dimension i is dimension i - 1 here)."""
    if not self.fsdp:
      return layer_params

    def gather(x, spec):
      for i, axes in enumerate(spec):
        if axes is not None:
          return lax.all_gather(x, axes, axis=i - 1, tiled=True)
      return x

    return jax.tree.map(gather, layer_params, stacked_specs,
                        is_leaf=lambda s: isinstance(s, PartitionSpec))

  def place(self, x: jax.Array, spec: PartitionSpec = PartitionSpec()) -> jax.Array:
    """`x` put on the mesh with `spec` (default replicated)."""
    return jax.device_put(x, NamedSharding(self.mesh, spec))

  def ulysses(self, *, num_heads: int, batch: int, num_tokens: int,
              num_replicated: int = 0) -> "Ulysses":
    """The attention wrapper of one forward (after the checks)."""
    self.check_heads(num_heads)
    self.check_batch(batch)
    return Ulysses(seq_size=self.seq_size, data_axis=self.data_axis, num_heads=num_heads,
                   num_tokens=num_tokens, num_replicated=num_replicated)


@dataclasses.dataclass(frozen=True)
class Ulysses:
  """Ulysses all-to-all around an attention core, for use inside the model's shard_map.

  The local q, k, v of an attention call are `[B_l, S_pad/P + T, H, Dh]`: this device's
  shard of the (padded) sharded tokens, then the `T = num_replicated` tokens every device
  holds whole (HunyuanVideo's text; 0 for Wan).

  Attributes:
    seq_size: P, the size of the "seq" axis.
    data_axis: "data" when the mesh has one (the batch is sharded over it), else None.
    num_heads: H, all heads (the local attention gets H / P).
    num_tokens: N, the true (unpadded) number of sharded tokens.
    num_replicated: T, the trailing replicated tokens of every call.
  """

  seq_size: int
  data_axis: Optional[str]
  num_heads: int
  num_tokens: int
  num_replicated: int = 0

  @property
  def local_heads(self) -> int:
    return self.num_heads // self.seq_size

  def wrap(self, core: AttentionFn) -> AttentionFn:
    """`core` ([B_l, N + T, H/P, Dh] q, k, v -> same) as a function of the local
    sequence-sharded q, k, v (-> [B_l, S_pad/P + T, H, Dh])."""
    return lambda q, k, v: self(core, q, k, v)

  def __call__(self, core: AttentionFn, q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    t = self.num_replicated
    s_local = q.shape[1] - t
    if s_local * self.seq_size < self.num_tokens:
      raise ValueError(f"local shard of {s_local} tokens x {self.seq_size} devices < "
                       f"{self.num_tokens} tokens")
    if q.shape[2] != self.num_heads:
      raise ValueError(f"q has {q.shape[2]} heads, expected {self.num_heads}")
    qkv = jnp.stack([q, k, v])  # [3, B, s + T, H, Dh]
    # sequence-sharded -> head-sharded: [3, B, S_pad, H/P, Dh], then cut the padding
    full = lax.all_to_all(qkv[:, :, :s_local], SEQ, split_axis=3, concat_axis=2, tiled=True)
    full = full[:, :, :self.num_tokens]
    if t:
      rep = lax.dynamic_slice_in_dim(qkv[:, :, s_local:], self.head_offset(), self.local_heads,
                                     axis=3)
      full = jnp.concatenate([full, rep], axis=2)
    out = core(full[0], full[1], full[2])  # [B, N + T, H/P, Dh]
    sharded = SeqParallel.pad(out[:, :self.num_tokens], s_local * self.seq_size, axis=1)
    sharded = lax.all_to_all(sharded, SEQ, split_axis=1, concat_axis=2, tiled=True)
    if not t:
      return sharded
    rep = lax.all_gather(out[:, self.num_tokens:], SEQ, axis=2, tiled=True)  # [B, T, H, Dh]
    return jnp.concatenate([sharded, rep], axis=1)

  def head_offset(self) -> jax.Array:
    """First global head of this device."""
    return lax.axis_index(SEQ) * self.local_heads

  def head_ids(self, local_batch: int) -> jax.Array:
    """[B_l, H/P] int32 global index b * H + h of every local (batch, head): the
    `head_ids` with which `svg_ear_attention` draws the single-device cold start."""
    b0 = 0 if self.data_axis is None else lax.axis_index(self.data_axis) * local_batch
    return global_head_ids(local_batch, self.local_heads, batch_offset=b0,
                           head_offset=self.head_offset(), total_heads=self.num_heads)

  def svg_ear(self, q: jax.Array, k: jax.Array, v: jax.Array, cfg: SvgEarConfig,
              state: Optional[SvgEarState], *, num_dense_tokens: int = 0,
              key_mask: Optional[jax.Array] = None):
    """`models.attention.svg_ear_self_attention` on this device's heads, numbered by
    their global (batch, head) index so that a cold start draws the single-device
    initial centroids."""
    from models.attention import svg_ear_self_attention

    return svg_ear_self_attention(q, k, v, cfg, state, num_dense_tokens=num_dense_tokens,
                                  key_mask=key_mask, head_ids=self.head_ids(q.shape[0]))


def place_model(model: Any, layout: Optional[SeqParallel], stacks: Sequence[str]) -> None:
  """Puts a model's parameters on `layout`'s mesh: replicated, the stacked block modules
  named in `stacks` FSDP-sharded when `layout.fsdp`; `layout` None -> the default device.
  Abstract (not yet materialised) parameters are left alone."""
  from flax import nnx

  def concrete(x):
    return isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer)

  stacked = {id(node) for name in stacks for _, node in nnx.iter_graph(getattr(model, name))
             if isinstance(node, nnx.Param)}
  for _, var in nnx.iter_graph(model):
    if not isinstance(var, nnx.Param):
      continue
    value = var.get_value()
    if not concrete(value):
      continue
    if layout is None:
      var.set_value(jax.device_put(value, jax.devices()[0]))
    else:
      spec = layout.weight_spec(value) if id(var) in stacked else PartitionSpec()
      var.set_value(layout.place(value, spec))


class SequenceParallelMixin:
  """`set_mesh` / `mesh` for a DiT with `config.num_heads` and stacked block modules named
  in `_block_stacks`; the layout lives in the static attribute `seq_parallel`."""

  _block_stacks: Tuple[str, ...] = ()

  @property
  def mesh(self) -> Optional[Mesh]:
    """The mesh the forward is sharded over, None on the single-device path."""
    layout = getattr(self, "seq_parallel", None)
    return None if layout is None else layout.mesh

  def set_mesh(self, mesh: Optional[Mesh], *, fsdp: bool = False) -> None:
    """Runs the forward Ulysses-sequence-parallel over `mesh` (axes "seq" and optionally
    "data"; see models/parallel.py) and puts the weights on it (replicated, or the block
    weights sharded when `fsdp`); None -> back to the single-device path (weights on the
    default device). The k-means state is kept (its shape does not depend on the mesh).

    Raises ValueError when the head count is not divisible by the "seq" axis size.
    """
    if mesh is None:
      if getattr(self, "seq_parallel", None) is not None:
        place_model(self, None, self._block_stacks)
      self.seq_parallel = None
      return
    layout = SeqParallel(mesh, fsdp=fsdp)
    layout.check_heads(self.config.num_heads)
    self.seq_parallel = layout
    place_model(self, layout, self._block_stacks)


def with_mesh(model: Any, mesh: Optional[Mesh]) -> Any:
  """`model.set_mesh(mesh)` (both experts of a `WanExpertPair`), returning the model;
  mesh None leaves it as it is (the `from_pretrained(..., mesh=)` hook)."""
  if mesh is not None:
    experts = getattr(model, "high_noise", None), getattr(model, "low_noise", None)
    for m in experts if experts[0] is not None else (model,):
      m.set_mesh(mesh)
  return model
