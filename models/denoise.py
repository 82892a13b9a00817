"""The denoising loop shared by the Wan and HunyuanVideo pipelines.

A pipeline decides on the host, before any device work, what every step does (`StepPlan`:
timestep, which DiT, CFG scale, dense or sparse) and how its DiT is called (a
`DenoiserCall`: a frozen, hashable description of the forward's extra inputs); `denoise`
then runs the steps:

  per step: x = model_input(latents)                      (I2V channel concat / blend)
            pred = DiT(x, t, cond)  or  DiT([x; x], t, [cond; uncond]) -> CFG combine
            latents, state = scheduler.step(schedule, state, pred, latents)

The DiT forward is jitted once per graph (dense | dense with k-means | sparse cold start |
sparse warm start) and CFG mode; DiTs of one architecture (the two A14B experts) share the
compiled forward, only their params differ. k-means centroids are carried functionally from
step to step (per CFG branch when the branches run as separate calls) and written back into
the model's `KMeansState` at the end.

With the DiTs on a mesh (`set_mesh`; models/parallel.py) the loop's latents, conditioning
and scheduler state are replicated on it before the first step, so that nothing moves
between one device and the mesh per step (each DiT's shard_map takes its shards of a
replicated input without communication), and the k-means state goes from one forward to
the next as it comes out: sharded by head, P(None, "data", "seq"). Without a mesh nothing
is placed.
"""

import dataclasses
import warnings
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models import parallel, sampling
from models.attention import AttentionDensity, AttentionPolicy, KMeansState
from models.sampling import StepRecord, SvgEarSchedule

# How often each jitted function was traced (tests check there is no retrace per step).
TRACES = {"forward": 0, "scheduler": 0}

# Graphs of one DiT forward: dense, dense with k-means in the sparse layers, sparse. The
# trace kinds add "-cold" / "-warm" (k-means without / with a previous state) to the last
# two: "dense", "dense-kmeans-cold", "dense-kmeans-warm", "sparse-cold", "sparse-warm".
DENSE, DENSE_KMEANS, SPARSE_COLD, SPARSE_WARM = ("dense", "dense-kmeans", "sparse-cold",
                                                 "sparse-warm")


class DenoiserCall:
  """How a pipeline calls its DiT inside the jitted forward; subclasses are frozen
  dataclasses (hashable: a static argument of the jit, so equal calls share a trace).

  `__call__(model, x, timestep, cond)`: x [B', C, F, H, W] in the model dtype (B' = 2B in a
  CFG batch), timestep a float32 scalar, cond the pytree the pipeline passed (already of
  batch B'); returns the model's prediction [B', C_out, F, H, W].
  """

  def __call__(self, model: nnx.Module, x: jax.Array, timestep: jax.Array, cond: Any
               ) -> jax.Array:
    raise NotImplementedError


def _forward_impl(params, empty, kmeans, x, timestep, cond, guidance, *, graphdef,
                  mode: str, kind: str, call: DenoiserCall):
  """One DiT evaluation of a split model.

  Args:
    params: the model's state without KMeansState / AttentionDensity.
    empty: those two None-valued states; an argument, so that their Variables are created
      inside this trace and may be set here.
    kmeans: the sparse layers' `SvgEarState` from the previous step, or None (cold start).
    x: [B, C, F, H, W] float32 DiT input; timestep: scalar; cond: the call's pytree, of
      batch 2B for mode "batch" (cond then uncond); guidance: scalar CFG scale ("batch").
    graphdef, mode ("single" | "batch"), kind (only keys the cache), call: static.

  Returns:
    (prediction [B, C_out, F, H, W] in the model dtype, CFG-combined for mode "batch";
    new k-means state or None; scalar mean density).
  """
  del kind
  TRACES["forward"] += 1
  model = nnx.merge(graphdef, *empty, params)
  model.kmeans_state.set_value(kmeans)
  xin = x.astype(model.config.dtype)
  if mode == "batch":
    xin = sampling.cfg_concat(xin, xin)
  out = call(model, xin, jnp.asarray(timestep, jnp.float32), cond)
  if mode == "batch":
    out = sampling.cfg_combine(*sampling.cfg_split(out), guidance)
  density = sampling.mean_density(model.attention_density.get_value())
  return out, model.kmeans_state.get_value(), density


_forward = jax.jit(_forward_impl, static_argnames=("graphdef", "mode", "kind", "call"))


def _scheduler_step_impl(scheduler, schedule, state, model_output, sample):
  TRACES["scheduler"] += 1
  return scheduler.step(schedule, state, model_output, sample)


_scheduler_step = jax.jit(_scheduler_step_impl, static_argnums=0)
_combine = jax.jit(sampling.cfg_combine)


def _in_memory(sharding: jax.sharding.Sharding, kind: str):
  """`sharding` with its arrays in memory `kind`, or None where its devices have none."""
  try:
    device = next(iter(sharding.device_set))
    if kind in {m.kind for m in device.addressable_memories()}:
      return sharding.with_memory_kind(kind)
  except (AttributeError, NotImplementedError, jax.errors.JaxRuntimeError):
    pass
  return None


def _device_sharding(x) -> jax.sharding.Sharding:
  """Where weight `x` lives on the device(s): its own sharding (one device, or a mesh)."""
  sharding = getattr(x, "sharding", None) or jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return _in_memory(sharding, "device") or sharding


def _on_host(x) -> bool:
  """Whether weight `x` is in host memory (a NumPy array or a pinned-host jax.Array)."""
  return not isinstance(x, jax.Array) or getattr(x.sharding, "memory_kind", None) in (
      "pinned_host", "unpinned_host")


def _policy_graphdef(model: nnx.Module, policy: AttentionPolicy):
  """The model's graphdef under `policy` (its own policy is restored)."""
  own = model.attention_policy
  model.attention_policy = policy
  try:
    return nnx.split(model, KMeansState, AttentionDensity, ...)[0]
  finally:
    model.attention_policy = own


class Expert:
  """One DiT of a pipeline: split once per call into a graphdef per attention kind and its
  params, with its k-means states per CFG branch; optionally parked in host memory (every
  weight in the host memory of the device(s) it lives on, a mesh's included, and back to
  the same sharding)."""

  def __init__(self, name: str, model: nnx.Module):
    self.name = name
    self.model = model
    self.trace_counts: Dict[Tuple[str, str], int] = {}
    self.states: Dict[str, Any] = {}
    self.on_host = False
    self.device = None  # the (first) device of the weights
    self._device_shardings = None  # per weight, read while the weights are on the device
    # The weights never change during sampling, so their host copy is made once and kept:
    # moving out is then dropping the device copy, and only the first move pays for the
    # pinned allocation (~2 GB/s on the H200, vs ~50 GB/s back to the device).
    self._host_params = None
    self._placed = ()  # the weight leaves this expert last put into the model

  @property
  def sparse(self) -> bool:
    return self.model.attention_policy.svg_ear is not None

  def refresh(self) -> None:
    """Re-reads graphdefs and params from the model (its policy or weights may change) and
    forgets the k-means state (a new video)."""
    model = self.model
    model.reset_attention_state()
    policy = model.attention_policy
    self.graphdef, kmeans_empty, density_empty, self.params = nnx.split(
        model, KMeansState, AttentionDensity, ...)
    self.empty = (kmeans_empty, density_empty)
    self.graphdefs = {SPARSE_COLD: self.graphdef, SPARSE_WARM: self.graphdef}
    if self.sparse:
      # Same params, dense graphs: the exact dense path of the warm-up steps, and the same
      # with k-means still running in the sparse layers (`kmeans_during_dense`).
      self.graphdefs[DENSE] = _policy_graphdef(model, AttentionPolicy.dense())
      self.graphdefs[DENSE_KMEANS] = _policy_graphdef(model, dataclasses.replace(
          policy, svg_ear=policy.svg_ear.replace(routing="dense", dense_kmeans=True)))
    else:
      self.graphdefs[DENSE] = self.graphdefs[DENSE_KMEANS] = self.graphdef
    self.states = {}
    leaves = jax.tree.leaves(self.params)
    if self._placed and (len(leaves) != len(self._placed)
                         or any(a is not b for a, b in zip(leaves, self._placed))):
      # the model's weights were replaced since this expert placed them: forget its copy,
      # and take the new ones where they are (host arrays become the host copy)
      self.on_host = any(_on_host(x) for x in leaves)
      self._host_params = self.params if self.on_host else None
      self._placed = tuple(leaves)
      self._device_shardings = self.device = None
    if self._device_shardings is None:
      self._device_shardings = jax.tree.map(_device_sharding, self.params)
      self.device = next(iter(jax.tree.leaves(self._device_shardings)[0].device_set))

  # Host offload of the weights.

  def _set_params(self, params) -> None:
    self.params = params
    nnx.update(self.model, params)
    self._placed = tuple(jax.tree.leaves(params))

  def to_host(self) -> None:
    if not self.on_host:
      if self._host_params is None:
        leaves, treedef = jax.tree.flatten(self._device_shardings)
        host = [_in_memory(s, "pinned_host") for s in leaves]
        if all(s is not None for s in host):
          self._host_params = jax.block_until_ready(
              jax.device_put(self.params, treedef.unflatten(host)))
        else:
          self._host_params = jax.device_get(self.params)  # numpy copies
      self._set_params(self._host_params)
      self.on_host = True

  def to_device(self, *, commit: bool = False) -> None:
    """Moves the weights to the device; `commit` also places weights that never left it."""
    if self.on_host or commit:
      self._set_params(jax.device_put(self.params, self._device_shardings))
      self.on_host = False

  def forget_placement(self) -> None:
    """After the model's weights moved (`set_mesh`): the next `refresh` reads where they
    live now (and makes a new host copy). Only while they are on the device."""
    if self.on_host:
      raise RuntimeError(f"{self.name}'s weights are on the host: to_device() first")
    self._device_shardings = self.device = None
    self._host_params, self._placed = None, ()

  def forward(self, branch: str, x, timestep, cond, guidance, *, kind: str, mode: str,
              call: DenoiserCall):
    """Runs one DiT call of graph `kind` (DENSE, DENSE_KMEANS or "sparse"; k-means warm
    from the state of `branch` when there is one); returns (out, density)."""
    carries = kind != DENSE and self.sparse
    state = self.states.get(branch) if carries else None
    graphdef = self.graphdefs[DENSE_KMEANS if kind == DENSE_KMEANS else
                              DENSE if kind == DENSE else SPARSE_COLD]
    if carries:  # cold and warm k-means are different programs
      kind = (DENSE_KMEANS if kind == DENSE_KMEANS else "sparse") + (
          "-warm" if state is not None else "-cold")
    elif kind == DENSE_KMEANS:
      kind = DENSE
    before = TRACES["forward"]
    out, new_state, density = _forward(self.params, self.empty, state, x, timestep, cond,
                                       guidance, graphdef=graphdef, mode=mode, kind=kind,
                                       call=call)
    if TRACES["forward"] != before:
      key = (kind, mode)
      self.trace_counts[key] = self.trace_counts.get(key, 0) + TRACES["forward"] - before
    if carries:
      self.states[branch] = new_state
    self.last_kind = kind
    return out, density

  def write_back(self, branch: Optional[str]) -> None:
    """Puts `branch`'s final k-means state into the model's KMeansState."""
    if branch is not None and self.states.get(branch) is not None:
      self.model.kmeans_state.set_value(self.states[branch])


@dataclasses.dataclass(frozen=True)
class StepPlan:
  """What each of the N steps does, decided on the host before any device work.

  Attributes:
    timesteps: (N,) what the DiT receives (int64 for UniPC, float32 for FlowMatch).
    experts: per step, the name of the DiT that runs.
    scales: per step, the CFG scale (<= 1: no CFG, one DiT call).
    dense: per step, whether attention is dense.
  """

  timesteps: np.ndarray
  experts: Tuple[str, ...]
  scales: Tuple[float, ...]
  dense: Tuple[bool, ...]

  @property
  def any_cfg(self) -> bool:
    return any(sampling.cfg_enabled(g) for g in self.scales)


@dataclasses.dataclass
class LoopResult:
  """Output of `denoise`: final latents [B, C, F, H, W] float32 and per-step records."""

  latents: jax.Array
  records: Tuple[StepRecord, ...]


class Denoiser:
  """The pipelines' experts and scheduler, and the loop over a `StepPlan`."""

  def __init__(self, experts: Mapping[str, nnx.Module], scheduler, *,
               offload_idle: bool = False):
    self.experts = {name: Expert(name, model) for name, model in experts.items()}
    self.scheduler = scheduler
    self.offload_idle = bool(offload_idle)
    self.scheduler_traces = 0
    _ = self.mesh  # ValueError unless the DiTs share one mesh (or none)
    self._offload_idle_experts()

  def _offload_idle_experts(self) -> None:
    if self.offload_idle:
      first, *rest = self.experts.values()
      # Weights back from the host are committed to the device; a jitted call keys its
      # compiled program on that, so the resident expert's freshly initialised (uncommitted)
      # weights are committed too: otherwise each switch compiles every program again.
      first.refresh()
      first.to_device(commit=True)
      for ex in rest:
        ex.refresh()
        ex.to_host()

  # Sequence parallelism.

  @property
  def mesh(self) -> Optional[jax.sharding.Mesh]:
    """The mesh the DiTs run on, None on the single-device path; ValueError when the
    DiTs are on different meshes."""
    meshes = {name: ex.model.mesh for name, ex in self.experts.items()}
    first = next(iter(meshes.values()))
    if any(m != first for m in meshes.values()):
      raise ValueError(f"the DiTs are on different meshes ({meshes}): put them on one "
                       f"(the pipeline's set_mesh)")
    return first

  def set_mesh(self, mesh: Optional[jax.sharding.Mesh], *, fsdp: bool = False) -> None:
    """Every DiT's `set_mesh(mesh, fsdp=fsdp)` (None: back to one device), an offloaded
    idle expert included (it stays offloaded, now from the mesh). Checks every DiT's head
    count against the mesh before moving any."""
    if mesh is not None:
      for ex in self.experts.values():
        parallel.SeqParallel(mesh, fsdp=fsdp).check_heads(ex.model.config.num_heads)
    for ex in self.experts.values():
      ex.to_device()
      ex.model.set_mesh(mesh, fsdp=fsdp)
      ex.forget_placement()
    self._offload_idle_experts()

  def place(self, tree: Any) -> Any:
    """`tree`'s arrays replicated on the DiTs' mesh (the loop's latents, conditioning and
    scheduler state); `tree` itself without a mesh."""
    mesh = self.mesh
    if mesh is None:
      return tree
    return jax.device_put(tree, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))

  def to_one_device(self, x: jax.Array) -> jax.Array:
    """`x` whole on this process's first device, for the single-device VAE (with several
    hosts each process takes its own copy of the replicated value); `x` itself without a
    mesh."""
    if self.mesh is None:
      return x
    whole = self.place(x).addressable_shards[0].data
    return jax.device_put(whole, jax.local_devices()[0])

  def check_batch(self, plan: "StepPlan", batch: int, cfg_batch: bool) -> None:
    """ValueError (host only) when a step's DiT batch does not split over the "data" axis
    of the DiTs' mesh: B without CFG or with CFG as two calls, 2B for the CFG batch."""
    mesh = self.mesh
    data = 1 if mesh is None else parallel.SeqParallel(mesh).data_size
    for i, g in enumerate(plan.scales):
      both = sampling.cfg_enabled(g) and cfg_batch
      size = 2 * batch if both else batch
      if size % data:
        how = ("cond and uncond as one batch" if both else
               "CFG as two calls" if sampling.cfg_enabled(g) else "no CFG")
        raise ValueError(f"step {i} runs {plan.experts[i]} on a batch of {size} ({how}), "
                         f"which does not split over the mesh's {parallel.DATA!r} axis of "
                         f"size {data}: use a batch divisible by it (with CFG batched, 2B), "
                         f"or a mesh without a {parallel.DATA!r} axis")

  @property
  def trace_counts(self) -> Dict[Tuple[str, ...], int]:
    """(expert, kind, cfg mode) -> traces of the forward, and ("scheduler",) -> traces."""
    counts = {(name, *key): n for name, ex in self.experts.items()
              for key, n in ex.trace_counts.items()}
    counts[("scheduler",)] = self.scheduler_traces
    return counts

  def _activate(self, expert: Expert) -> None:
    if self.offload_idle:
      for other in self.experts.values():
        if other is not expert:
          other.to_host()
      expert.to_device()

  def _step(self, schedule, state, noise, latents):
    before = TRACES["scheduler"]
    out = _scheduler_step(self.scheduler, schedule, state, noise, latents)
    self.scheduler_traces += TRACES["scheduler"] - before
    return out

  def __call__(self, plan: StepPlan, latents: jax.Array, *, call: DenoiserCall, cond: Any,
               uncond: Any = None, both: Any = None, schedule: SvgEarSchedule,
               scheduler_schedule, cfg_batch: bool = True,
               model_input: Optional[Callable[[jax.Array], jax.Array]] = None,
               progress: bool = True, callback: Optional[sampling.Callback] = None,
               timings: bool = True) -> LoopResult:
    """Runs the steps of `plan` from `latents` ([B, C, F, H, W] float32).

    Args:
      plan: the per-step decisions.
      call: how the DiTs are called.
      cond, uncond: the call's conditioning pytrees of batch B (uncond only with CFG).
      both: the CFG batch's conditioning, batch 2B (cond first); required when a CFG step
        runs with `cfg_batch`.
      schedule: the SVG-EAR schedule (expert switch, k-means during dense steps).
      scheduler_schedule: what `scheduler.set_timesteps` returned.
      model_input: latents -> DiT input (e.g. I2V conditioning), jitted by the caller.
    """
    for ex in self.experts.values():
      ex.refresh()
    if self.mesh is not None:
      latents, cond, uncond, both = self.place((latents, cond, uncond, both))
      sched_dev = self.place(scheduler_schedule)
      state = self.place(self.scheduler.init_state(scheduler_schedule, latents.shape))
    else:
      if self.offload_idle:  # committed like every later step's latents (see __init__)
        latents = jax.device_put(latents, next(iter(self.experts.values())).device)
      sched_dev = jax.device_put(scheduler_schedule)
      state = self.scheduler.init_state(scheduler_schedule, latents.shape)
    n = len(plan.timesteps)
    log = sampling.StepLog(n, progress=progress, sync=timings, callback=callback)
    previous = None
    branch_used = {}
    dense_kind = DENSE_KMEANS if schedule.kmeans_during_dense else DENSE
    for i, t in enumerate(plan.timesteps):
      log.start_step()
      ex = self.experts[plan.experts[i]]
      if ex is not previous:
        self._activate(ex)
        if previous is not None and schedule.expert_switch == "carry" and (
            previous.model.attention_policy == ex.model.attention_policy):
          ex.states = dict(previous.states)
        previous = ex
      g = plan.scales[i]
      dense = plan.dense[i] or not ex.sparse
      kind = dense_kind if dense else "sparse"
      t_in = float(t)
      x = latents if model_input is None else model_input(latents)
      if not sampling.cfg_enabled(g):
        noise, density = ex.forward("cond", x, t_in, cond, g, kind=kind, mode="single",
                                    call=call)
        branch_used[ex.name] = "cond"
      elif cfg_batch:
        noise, density = ex.forward("batch", x, t_in, both, g, kind=kind, mode="batch",
                                    call=call)
        branch_used[ex.name] = "batch"
      else:
        out_c, d_c = ex.forward("cond", x, t_in, cond, g, kind=kind, mode="single", call=call)
        out_u, d_u = ex.forward("uncond", x, t_in, uncond, g, kind=kind, mode="single",
                                call=call)
        noise, density = _combine(out_c, out_u, g), (d_c + d_u) / 2
        branch_used[ex.name] = "cond"
      latents, state = self._step(sched_dev, state, noise, latents)
      latents = log.end_step(latents, density, index=i, timestep=float(t), expert=ex.name,
                             dense=dense, guidance_scale=g, graph=ex.last_kind)
    for name, ex in self.experts.items():
      ex.write_back(branch_used.get(name))
    records = tuple(log.finish())
    message = sampling.density_overshoot(
        records, {name: ex.model.attention_policy.svg_ear for name, ex in self.experts.items()})
    if message is not None:
      warnings.warn(message, sampling.DensityBudgetWarning, stacklevel=3)
    return LoopResult(latents=latents, records=records)


  def run_timed(self, watch, *args, **kwargs) -> LoopResult:
    """`self(*args, **kwargs)` timed as the "denoise" phase of `watch` (a
    `components.Stopwatch`)."""
    out = {}

    def run():
      out["result"] = self(*args, **kwargs)
      return out["result"].latents

    watch.run("denoise", run)
    return out["result"]


def step_arrays(records: Sequence[StepRecord]) -> Dict[str, np.ndarray]:
  """Per-step seconds / density / dense flags of `records` as arrays."""
  return dict(step_seconds=np.array([r.seconds for r in records], np.float64),
              step_density=np.array([r.density for r in records], np.float64),
              step_dense=np.array([r.dense for r in records], bool))
