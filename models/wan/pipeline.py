"""Wan2.2 denoising loop (`WanPipeline`): prompt embeddings in, latents out.

The math is diffusers' `WanPipeline.__call__` (pipelines/wan/pipeline_wan.py) from the
scheduler's `set_timesteps` to the last `scheduler.step`: float32 latents of shape
(B, C_in, (F - 1) // 4 + 1, H / 8, W / 8), the high-noise `transformer` while
t >= boundary_ratio * 1000 (with `guidance_scale`) and the low-noise `transformer_2` after
(with `guidance_scale_2`), noise = uncond + g * (cond - uncond) for g > 1, model input cast
to the transformer dtype, TI2V-5B's per-token timesteps (`expand_timesteps`).
Differences: cond and uncond run as one DiT batch of 2 by default (`cfg_batch=False`: two
calls, as diffusers), random latents come from the JAX PRNG, and text encoding / VAE
decoding are not part of this loop.

SVG-EAR: the DiTs' `AttentionPolicy` gives dense layers and the `SvgEarConfig`; an
`SvgEarSchedule` gives the dense warm-up steps and the expert-switch rule. The DiT forward
is jitted once per graph (dense | sparse cold start | sparse warm start) and CFG mode; the
two A14B experts share one graph, so they share the compiled forward (only params differ);
k-means centroids are carried functionally from step to step (per CFG branch when the
branches run as separate calls) and written back into the model's `KMeansState` at the end.
"""

import dataclasses
import json
import pathlib
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models import sampling
from models.attention import AttentionDensity, AttentionLike, AttentionPolicy, KMeansState
from models.sampling import StepRecord, SvgEarSchedule
from models.schedulers import UniPCFlowScheduler, scheduler_from_pretrained
from models.wan.experts import NUM_TRAIN_TIMESTEPS, WanExpertPair
from models.wan.transformer import WanTransformer

PathLike = Union[str, pathlib.Path]
OPTIONAL_COMPONENTS = ("tokenizer", "text_encoder", "vae")


@dataclasses.dataclass(frozen=True)
class WanPipelineOutput:
  """Result of one `WanPipeline` call (N = number of steps).

  Attributes:
    latents: [B, C, F_lat, H_lat, W_lat] float32 final latents.
    timesteps: (N,) int64, what the DiT received at each step.
    step_seconds: (N,) float64 wall time per step (NaN without timings).
    step_density: (N,) float64 mean attention density per step (1.0 for dense steps).
    step_dense: (N,) bool, whether each step ran dense attention.
    step_expert: per step, "transformer" or "transformer_2".
    records: the per-step `StepRecord`s.
  """

  latents: jax.Array
  timesteps: np.ndarray
  step_seconds: np.ndarray
  step_density: np.ndarray
  step_dense: np.ndarray
  step_expert: Tuple[str, ...]
  records: Tuple[StepRecord, ...]


def _memory_sharding(device: jax.Device, kind: str):
  try:
    if kind in {m.kind for m in device.addressable_memories()}:
      return jax.sharding.SingleDeviceSharding(device, memory_kind=kind)
  except (AttributeError, NotImplementedError, jax.errors.JaxRuntimeError):
    pass
  return None


_TRACES = {"forward": 0, "scheduler": 0}


def _forward_impl(params, empty, kmeans, x, timestep, context, guidance, *, graphdef,
                  mode: str, kind: str, expand: Optional[int]):
  """One DiT evaluation of a split `WanTransformer`.

  Args:
    params: the model's state without KMeansState / AttentionDensity.
    empty: those two None-valued states; an argument, so that their Variables are created
      inside this trace and may be set here.
    kmeans: the sparse layers' `SvgEarState` from the previous step, or None (cold start).
    x: [B, C, F, H, W] float32 latents; timestep: scalar; context: [B | 2B, L, D] (2B for
      mode "batch": cond then uncond); guidance: scalar CFG scale (mode "batch").
    graphdef, mode ("single" | "batch"), kind (only keys the cache), expand: static; expand
      is the token count of per-token timesteps or None.

  Returns:
    (prediction [B, C_out, F, H, W] in the model dtype, CFG-combined for mode "batch";
    new k-means state or None; scalar mean density).
  """
  del kind
  _TRACES["forward"] += 1
  model = nnx.merge(graphdef, *empty, params)
  model.kmeans_state.set_value(kmeans)
  xin = x.astype(model.config.dtype)
  if mode == "batch":
    xin = sampling.cfg_concat(xin, xin)
  b = xin.shape[0]
  t = jnp.full((b,) if expand is None else (b, expand), jnp.asarray(timestep, jnp.float32))
  out = model(xin, t, context)
  if mode == "batch":
    out = sampling.cfg_combine(*sampling.cfg_split(out), guidance)
  density = sampling.mean_density(model.attention_density.get_value())
  return out, model.kmeans_state.get_value(), density


_forward = jax.jit(_forward_impl, static_argnames=("graphdef", "mode", "kind", "expand"))


def _scheduler_step_impl(scheduler, schedule, state, model_output, sample):
  _TRACES["scheduler"] += 1
  return scheduler.step(schedule, state, model_output, sample)


_scheduler_step = jax.jit(_scheduler_step_impl, static_argnums=0)
_combine = jax.jit(sampling.cfg_combine)


class _Expert:
  """One DiT of the pipeline: split once per call into a graphdef per attention mode
  (the model's policy, and dense) and params, with its k-means states per CFG branch."""

  def __init__(self, name: str, model: WanTransformer):
    self.name = name
    self.model = model
    self.trace_counts: Dict[Tuple[str, str], int] = {}
    self.states: Dict[str, Any] = {}
    self.on_host = False
    self.device = None
    self._host_sharding = None

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
    if self.sparse:
      # Same params, dense graph: the exact dense path for the warm-up steps.
      model.attention_policy = AttentionPolicy.dense()
      try:
        self.graphdef_dense = nnx.split(model, KMeansState, AttentionDensity, ...)[0]
      finally:
        model.attention_policy = policy
    else:
      self.graphdef_dense = self.graphdef
    self.states = {}
    if self.device is None:
      leaf = jax.tree.leaves(self.params)[0]
      devices = getattr(leaf, "devices", lambda: set())()
      self.device = next(iter(devices)) if devices else jax.devices()[0]
      self._host_sharding = _memory_sharding(self.device, "pinned_host")

  # Host offload of the weights.

  def _set_params(self, params) -> None:
    self.params = params
    nnx.update(self.model, params)

  def to_host(self) -> None:
    if not self.on_host:
      if self._host_sharding is not None:
        self._set_params(jax.device_put(self.params, self._host_sharding))
      else:
        self._set_params(jax.device_get(self.params))  # numpy copies
      self.on_host = True

  def to_device(self) -> None:
    if self.on_host:
      target = _memory_sharding(self.device, "device") or self.device
      self._set_params(jax.device_put(self.params, target))
      self.on_host = False

  # The forward (jitted once per graph, shared by both experts and by pipelines).

  def forward(self, branch: str, x, timestep, context, guidance, *, dense: bool, mode: str,
              expand: Optional[int]):
    """Runs one DiT call, carrying the k-means state of `branch`; returns (out, density)."""
    if dense:
      kind, graphdef, state = "dense", self.graphdef_dense, None
    else:
      state = self.states.get(branch)
      kind = "sparse-warm" if state is not None else "sparse-cold"
      graphdef = self.graphdef
    before = _TRACES["forward"]
    out, new_state, density = _forward(self.params, self.empty, state, x, timestep, context,
                                       guidance, graphdef=graphdef, mode=mode, kind=kind,
                                       expand=expand)
    if _TRACES["forward"] != before:
      key = (kind, mode)
      self.trace_counts[key] = self.trace_counts.get(key, 0) + _TRACES["forward"] - before
    if not dense:
      self.states[branch] = new_state
    return out, density

  def write_back(self, branch: Optional[str]) -> None:
    """Puts `branch`'s final k-means state into the model's KMeansState."""
    if branch is not None and self.states.get(branch) is not None:
      self.model.kmeans_state.set_value(self.states[branch])


class WanPipeline:
  """The Wan2.2 sampling loop on prompt embeddings (T2V-A14B, TI2V-5B; see module doc).

  Build with `WanPipeline.from_pretrained(folder)` (a diffusers Wan pipeline folder) or
  directly from models and a scheduler.

  Args:
    transformer: the high-noise (or only) `WanTransformer`, or a `WanExpertPair`.
    scheduler: `UniPCFlowScheduler` (Wan) or `FlowMatchEulerScheduler`.
    transformer_2: the low-noise expert (A14B), or None.
    boundary_ratio: expert switch at t >= boundary_ratio * 1000; None -> `transformer` only.
    expand_timesteps: TI2V-5B per-token timesteps.
    vae_scale_factor_temporal, vae_scale_factor_spatial: latent compression (4, 8; TI2V-5B's
      VAE: 4, 16).
    offload_idle_expert: keep the expert not in use in host memory (pinned host memory
      where the device has it, else numpy copies) and move it in at the switch.
    components: names of the optional components (tokenizer, text_encoder, vae) that the
      source folder holds; they are not loaded, only named in errors.
  """

  def __init__(self, transformer: Union[WanTransformer, WanExpertPair], scheduler, *,
               transformer_2: Optional[WanTransformer] = None,
               boundary_ratio: Optional[float] = None, expand_timesteps: bool = False,
               vae_scale_factor_temporal: int = 4, vae_scale_factor_spatial: int = 8,
               offload_idle_expert: bool = False, components: Sequence[str] = ()):
    if isinstance(transformer, WanExpertPair):
      if transformer_2 is not None:
        raise ValueError("pass either a WanExpertPair or transformer + transformer_2")
      boundary_ratio = transformer.boundary_ratio if boundary_ratio is None else boundary_ratio
      transformer, transformer_2 = transformer.high_noise, transformer.low_noise
    if not isinstance(transformer, WanTransformer):
      raise TypeError(f"transformer must be a WanTransformer, got {type(transformer).__name__}")
    if transformer_2 is not None:
      if not isinstance(transformer_2, WanTransformer):
        raise TypeError(f"transformer_2 must be a WanTransformer, got "
                        f"{type(transformer_2).__name__}")
      if transformer.config.architecture() != transformer_2.config.architecture():
        raise ValueError("transformer and transformer_2 must share one architecture")
    if boundary_ratio is not None:
      boundary_ratio = sampling.check_real("boundary_ratio", boundary_ratio)
      if not 0.0 < boundary_ratio < 1.0:
        raise ValueError(f"boundary_ratio={boundary_ratio}: must be in (0, 1)")
    if transformer_2 is not None and boundary_ratio is None:
      raise ValueError("transformer_2 is given but boundary_ratio is None: it would never run")
    self.transformer = transformer
    self.transformer_2 = transformer_2
    self.scheduler = scheduler
    self.boundary_ratio = boundary_ratio
    self.expand_timesteps = bool(expand_timesteps)
    self.vae_scale_factor_temporal = sampling.check_int("vae_scale_factor_temporal",
                                                        vae_scale_factor_temporal)
    self.vae_scale_factor_spatial = sampling.check_int("vae_scale_factor_spatial",
                                                       vae_scale_factor_spatial)
    self.offload_idle_expert = bool(offload_idle_expert)
    self.components = tuple(components)
    self._experts = {"transformer": _Expert("transformer", transformer)}
    if transformer_2 is not None:
      self._experts["transformer_2"] = _Expert("transformer_2", transformer_2)
    self._scheduler_traces = 0
    if self.offload_idle_expert and transformer_2 is not None:
      self._experts["transformer_2"].refresh()
      self._experts["transformer_2"].to_host()

  # Loading.

  @classmethod
  def from_pretrained(cls, path: PathLike, *, dtype: Any = jnp.bfloat16,
                      attention: AttentionLike = None, flow_shift: Optional[float] = None,
                      offload_idle_expert: bool = False) -> "WanPipeline":
    """From a local diffusers Wan pipeline folder (`model_index.json`, `transformer/`
    (+ `transformer_2/`), `scheduler/`); tokenizer, text encoder and VAE may be absent.

    Args:
      path: the folder; nothing is downloaded.
      dtype: DiT weight / compute dtype.
      attention: self-attention policy of both DiTs (None / "dense", an `SvgEarConfig`, an
        `AttentionPolicy`).
      flow_shift: overrides the scheduler's shift (Wan2.2 T2V official: 12; the diffusers
        converter writes 3.0).
      offload_idle_expert: see the class doc.
    """
    from models.wan import convert

    root = pathlib.Path(path)
    index_path = root / "model_index.json"
    if not index_path.is_file():
      raise FileNotFoundError(f"{root}: no model_index.json (not a diffusers pipeline folder)")
    index = json.loads(index_path.read_text(encoding="utf-8"))

    def present(name):
      entry = index.get(name)
      return (isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[0] is not None
              and (root / name).is_dir())

    if not present("transformer"):
      raise FileNotFoundError(f"{root}: the pipeline has no transformer/ (required)")
    if not present("scheduler"):
      raise FileNotFoundError(f"{root}: the pipeline has no scheduler/ (required)")
    kw = dict(dtype=dtype, attention=attention)
    transformer = convert.from_pretrained(root / "transformer", **kw)
    transformer_2 = (convert.from_pretrained(root / "transformer_2", **kw)
                     if present("transformer_2") else None)
    overrides = {}
    if flow_shift is not None:
      scheduler_cls = scheduler_from_pretrained(root)
      key = "flow_shift" if isinstance(scheduler_cls, UniPCFlowScheduler) else "shift"
      overrides[key] = sampling.check_real("flow_shift", flow_shift)
    scheduler = scheduler_from_pretrained(root, **overrides)
    temporal, spatial = 4, 8  # diffusers' values without a VAE
    vae_config = root / "vae" / "config.json"
    if present("vae") and vae_config.is_file():
      vae = json.loads(vae_config.read_text(encoding="utf-8"))
      temporal = int(vae.get("scale_factor_temporal", temporal))
      spatial = int(vae.get("scale_factor_spatial", spatial))
    boundary_ratio = index.get("boundary_ratio")
    return cls(transformer, scheduler, transformer_2=transformer_2,
               boundary_ratio=boundary_ratio,
               expand_timesteps=bool(index.get("expand_timesteps", False)),
               vae_scale_factor_temporal=temporal, vae_scale_factor_spatial=spatial,
               offload_idle_expert=offload_idle_expert,
               components=[n for n in OPTIONAL_COMPONENTS if present(n)])

  # Introspection.

  @property
  def trace_counts(self) -> Dict[Tuple[str, ...], int]:
    """How often each jitted function was traced: (expert, kind, cfg mode) -> n, with kind
    "dense" | "sparse-cold" | "sparse-warm", and ("scheduler",) -> n."""
    counts = {(name, *key): n for name, ex in self._experts.items()
              for key, n in ex.trace_counts.items()}
    counts[("scheduler",)] = self._scheduler_traces
    return counts

  def latent_shape(self, batch: int, num_frames: int, height: int, width: int
                   ) -> Tuple[int, int, int, int, int]:
    """(B, C_in, (F - 1) // 4 + 1, H / s, W / s), as diffusers' `prepare_latents`."""
    s = self.vae_scale_factor_spatial
    return (batch, self.transformer.config.in_channels,
            (num_frames - 1) // self.vae_scale_factor_temporal + 1, height // s, width // s)

  def _missing(self, name: str, why: str) -> Exception:
    if name in self.components:
      return NotImplementedError(f"{why} needs the {name}, which this JAX pipeline does not "
                                 f"run: pass embeddings / use output_type='latent'")
    return ValueError(f"{why} needs the {name}, which this pipeline does not have (absent "
                      f"from the pipeline folder)")

  def _step(self, schedule, state, noise, latents):
    before = _TRACES["scheduler"]
    out = _scheduler_step(self.scheduler, schedule, state, noise, latents)
    self._scheduler_traces += _TRACES["scheduler"] - before
    return out

  def _activate(self, expert: _Expert) -> None:
    if self.offload_idle_expert:
      for other in self._experts.values():
        if other is not expert:
          other.to_host()
      expert.to_device()

  # The loop.

  def __call__(self, prompt_embeds: jax.Array, negative_prompt_embeds: Optional[jax.Array] = None,
               *, height: int = 480, width: int = 832, num_frames: int = 81,
               num_inference_steps: int = 50, guidance_scale: float = 5.0,
               guidance_scale_2: Optional[float] = None, seed: Optional[int] = None,
               latents: Optional[jax.Array] = None, schedule: Optional[SvgEarSchedule] = None,
               output_type: str = "latent", progress: bool = True,
               callback: Optional[sampling.Callback] = None, cfg_batch: bool = True,
               timings: bool = True) -> WanPipelineOutput:
    """Denoises one batch of videos.

    Args:
      prompt_embeds: [B, L, text_dim] float text-encoder states (diffusers: zero-padded to
        512 tokens).
      negative_prompt_embeds: [B, L', text_dim]; required when CFG is on (diffusers would
        encode "" with the text encoder). L' == L for `cfg_batch`.
      height, width: pixels, multiples of vae_scale_factor_spatial * patch (16 for Wan2.2
        A14B).
      num_frames: 4k + 1.
      num_inference_steps: N >= 1.
      guidance_scale: CFG scale of the high-noise expert (and of a single transformer);
        <= 1: no CFG, one DiT call per step.
      guidance_scale_2: CFG scale of the low-noise expert (default guidance_scale); only with
        a boundary_ratio.
      seed: JAX PRNG seed of the initial latents (default 0). JAX randoms: equal seeds do not
        give diffusers' torch latents; pass `latents` to compare.
      latents: [B, C_in, F_lat, H_lat, W_lat] initial latents instead of `seed`.
      schedule: `SvgEarSchedule` (default `SvgEarSchedule()`: 20% dense warm-up steps;
        irrelevant for dense DiTs).
      output_type: only "latent" (decoding needs the VAE).
      progress: tqdm bar with step time, dense/sparse and density.
      callback: `callback(record, latents)` after every step; may return new latents.
      cfg_batch: cond and uncond as one DiT batch of 2 (False: two calls, as diffusers).
      timings: block on every step to time it (also implied by `progress` / `callback`);
        False with progress off runs without a host sync per step.

    Returns:
      `WanPipelineOutput`.
    """
    # ---- validation (host only)
    schedule = SvgEarSchedule() if schedule is None else schedule
    if not isinstance(schedule, SvgEarSchedule):
      raise TypeError(f"schedule must be an SvgEarSchedule, got {type(schedule).__name__}")
    schedule.require_supported()
    if output_type != "latent":
      raise self._missing("vae", f"output_type={output_type!r}")
    cfg = self.transformer.config
    num_inference_steps = sampling.check_int("num_inference_steps", num_inference_steps)
    num_frames = sampling.check_num_frames(num_frames, self.vae_scale_factor_temporal)
    multiple = self.vae_scale_factor_spatial * max(cfg.patch_size[1], cfg.patch_size[2])
    height, width = sampling.check_spatial(
        height, width, multiple,
        f"vae scale {self.vae_scale_factor_spatial} x patch {tuple(cfg.patch_size[1:])}")
    guidance_scale = sampling.check_real("guidance_scale", guidance_scale)
    if guidance_scale_2 is not None:
      if self.boundary_ratio is None:
        raise ValueError("guidance_scale_2 is only supported when the pipeline's "
                         "boundary_ratio is not None")
      guidance_scale_2 = sampling.check_real("guidance_scale_2", guidance_scale_2)
    if self.boundary_ratio is not None and guidance_scale_2 is None:
      guidance_scale_2 = guidance_scale
    prompt_embeds = sampling.check_embeddings("prompt_embeds", prompt_embeds, cfg.text_dim)
    batch = prompt_embeds.shape[0]
    if negative_prompt_embeds is not None:
      negative_prompt_embeds = sampling.check_embeddings(
          "negative_prompt_embeds", negative_prompt_embeds, cfg.text_dim, batch)
    if seed is not None and latents is not None:
      raise ValueError("pass either seed or latents, not both")
    shape = self.latent_shape(batch, num_frames, height, width)
    if latents is not None:
      latents = sampling.check_latents(latents, shape)

    sched = self.scheduler.set_timesteps(num_inference_steps)
    timesteps = np.asarray(sched.timesteps)
    boundary = (None if self.boundary_ratio is None
                else self.boundary_ratio * NUM_TRAIN_TIMESTEPS)
    high = [boundary is None or float(t) >= boundary for t in timesteps]
    if not all(high) and self.transformer_2 is None:
      raise ValueError(f"steps below the boundary timestep {boundary} need transformer_2, "
                       f"which this pipeline does not have")
    names = ["transformer" if h else "transformer_2" for h in high]
    scales = [guidance_scale if h else guidance_scale_2 for h in high]
    any_cfg = any(sampling.cfg_enabled(g) for g in scales)
    if any_cfg and negative_prompt_embeds is None:
      raise self._missing("text_encoder", "CFG without negative_prompt_embeds (diffusers "
                          "encodes the empty prompt)")
    if any_cfg and cfg_batch and negative_prompt_embeds.shape[1] != prompt_embeds.shape[1]:
      raise ValueError(f"prompt_embeds and negative_prompt_embeds have lengths "
                       f"{prompt_embeds.shape[1]} and {negative_prompt_embeds.shape[1]}: "
                       f"cfg_batch needs equal lengths (pad them, or cfg_batch=False)")
    expand = None
    if self.expand_timesteps:
      if tuple(cfg.patch_size) != (1, 2, 2):
        raise ValueError(f"expand_timesteps takes every 2nd latent row / column (diffusers), "
                         f"which needs patch size (1, 2, 2), got {tuple(cfg.patch_size)}")
      expand = shape[2] * (shape[3] // 2) * (shape[4] // 2)
    dense_flags = schedule.dense_flags(num_inference_steps)

    # ---- device work
    if latents is None:
      latents = sampling.random_latents(0 if seed is None else seed, shape)
    dtype = cfg.dtype
    cond = jnp.asarray(prompt_embeds).astype(dtype)
    uncond = None if negative_prompt_embeds is None else (
        jnp.asarray(negative_prompt_embeds).astype(dtype))
    both = sampling.cfg_concat(cond, uncond) if any_cfg and cfg_batch else None
    for ex in self._experts.values():
      ex.refresh()
    sched_dev = jax.device_put(sched)
    state = self.scheduler.init_state(sched, shape)
    log = sampling.StepLog(num_inference_steps, progress=progress, sync=timings,
                           callback=callback)
    previous = None
    branch_used = {}
    for i, t in enumerate(timesteps):
      log.start_step()
      ex = self._experts[names[i]]
      if ex is not previous:
        self._activate(ex)
        if previous is not None and schedule.expert_switch == "carry" and (
            previous.model.attention_policy == ex.model.attention_policy):
          ex.states = dict(previous.states)
        previous = ex
      g = scales[i]
      dense = dense_flags[i] or not ex.sparse
      t_in = float(t)
      if not sampling.cfg_enabled(g):
        noise, density = ex.forward("cond", latents, t_in, cond, g, dense=dense,
                                    mode="single", expand=expand)
        branch_used[ex.name] = "cond"
      elif cfg_batch:
        noise, density = ex.forward("batch", latents, t_in, both, g, dense=dense,
                                    mode="batch", expand=expand)
        branch_used[ex.name] = "batch"
      else:
        out_c, d_c = ex.forward("cond", latents, t_in, cond, g, dense=dense, mode="single",
                                expand=expand)
        out_u, d_u = ex.forward("uncond", latents, t_in, uncond, g, dense=dense,
                                mode="single", expand=expand)
        noise, density = _combine(out_c, out_u, g), (d_c + d_u) / 2
        branch_used[ex.name] = "cond"
      latents, state = self._step(sched_dev, state, noise, latents)
      latents = log.end_step(latents, density, index=i, timestep=int(t), expert=ex.name,
                             dense=dense, guidance_scale=g)
    for name, ex in self._experts.items():
      ex.write_back(branch_used.get(name))
    records = tuple(log.finish())
    return WanPipelineOutput(
        latents=latents, timesteps=timesteps,
        step_seconds=np.array([r.seconds for r in records], np.float64),
        step_density=np.array([r.density for r in records], np.float64),
        step_dense=np.array([r.dense for r in records], bool),
        step_expert=tuple(r.expert for r in records), records=records)
