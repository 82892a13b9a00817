"""Wan2.2 pipeline (`WanPipeline`): prompt (or embeddings) in, latents, frames or mp4 out.

The denoising math is diffusers' `WanPipeline.__call__` (T2V-A14B, TI2V-5B) and
`WanImageToVideoPipeline.__call__` (I2V-A14B, TI2V-5B with an image), pipelines/wan/, from
the scheduler's `set_timesteps` to the last `scheduler.step`: float32 latents of shape
(B, z, (F - 1) // 4 + 1, H / s, W / s), the high-noise `transformer` while
t >= boundary_ratio * 1000 (with `guidance_scale`) and the low-noise `transformer_2` after
(with `guidance_scale_2`), noise = uncond + g * (cond - uncond) for g > 1, model input cast
to the transformer dtype, TI2V-5B's per-token timesteps (`expand_timesteps`), I2V-A14B's
36-channel input [noise; mask (4); image latents (16)], TI2V-5B's first-frame blend.
Differences: cond and uncond run as one DiT batch of 2 by default (`cfg_batch=False`: two
calls, as diffusers), random latents come from the JAX PRNG, the text encoder and the VAE
are the JAX ports (models/wan/umt5.py, vae.py), loaded on first use.

SVG-EAR: the DiTs' `AttentionPolicy` gives dense layers and the `SvgEarConfig`; an
`SvgEarSchedule` gives the dense warm-up steps, k-means during them and the expert-switch
rule; the loop is `models.denoise.Denoiser`.
"""

import dataclasses
import pathlib
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from models import components as comp
from models import denoise, sampling
from models.attention import AttentionLike
from models.sampling import StepRecord, SvgEarSchedule
from models.schedulers import UniPCFlowScheduler, scheduler_from_pretrained
from models.wan.experts import NUM_TRAIN_TIMESTEPS, WanExpertPair
from models.wan.transformer import WanTransformer

PathLike = Union[str, pathlib.Path]
OPTIONAL_COMPONENTS = ("tokenizer", "text_encoder", "vae")
MAX_SEQUENCE_LENGTH = 512
# Wan's official default negative prompt (wan/configs/shared_config.py `sample_neg_prompt`),
# used by the official repo when none is given; diffusers' default is "".
WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，"
    "低质量，JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，"
    "毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走")


@dataclasses.dataclass(frozen=True)
class WanPipelineOutput:
  """Result of one `WanPipeline` call (N = number of steps).

  Attributes:
    latents: [B, z, F_lat, H_lat, W_lat] float32 final latents (TI2V with an image: after
      the first-frame blend, what is decoded).
    timesteps: (N,) int64, what the DiT received at each step.
    step_seconds: (N,) float64 wall time per step (NaN without timings).
    step_density: (N,) float64 mean attention density per step (1.0 for dense steps).
    step_dense: (N,) bool, whether each step ran dense attention.
    step_expert: per step, "transformer" or "transformer_2".
    records: the per-step `StepRecord`s.
    frames: [B, F, H, W, 3] float32 in [0, 1] for output_type "np" / "mp4", else None.
    video_paths: the mp4 files written (output_type "mp4").
    seconds: wall time per phase ("text_encoder", "image_encoder", "denoise", "vae_decode",
      "mp4"), the phases that ran.
  """

  latents: jax.Array
  timesteps: np.ndarray
  step_seconds: np.ndarray
  step_density: np.ndarray
  step_dense: np.ndarray
  step_expert: Tuple[str, ...]
  records: Tuple[StepRecord, ...]
  frames: Optional[np.ndarray] = None
  video_paths: Tuple[pathlib.Path, ...] = ()
  seconds: Dict[str, float] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class WanCall(denoise.DenoiserCall):
  """`WanTransformer(x, t, context)`; cond = (context [B', L, D], per-token timestep mask
  [N] float32 or None). With the mask (TI2V-5B, `expand_timesteps`) the timestep is
  mask * t per token, else t per sample."""

  def __call__(self, model, x, timestep, cond):
    context, token_mask = cond
    b = x.shape[0]
    if token_mask is None:
      t = jnp.full((b,), timestep)
    else:
      t = jnp.broadcast_to(token_mask * timestep, (b, token_mask.shape[0]))
    return model(x, t, context)


def _i2v_input(latents, condition):
  return jnp.concatenate([latents, condition], axis=1)


def _first_frame_blend(latents, condition, mask):
  return (1 - mask) * condition + mask * latents


_i2v_input_jit = jax.jit(_i2v_input)
_blend_jit = jax.jit(_first_frame_blend)


def _to_video(image, height: int, width: int) -> jax.Array:
  """An I2V conditioning image -> [B, 3, H, W] float32 in [-1, 1].

  Accepted: [H, W, 3] or [B, H, W, 3] uint8 (0..255) or float in [0, 1] (PIL / imageio
  frames), or [B, 3, H, W] float in [-1, 1] (what diffusers' `VideoProcessor.preprocess`
  returns). The size must already be height x width (no resizing here)."""
  arr = np.asarray(image)
  if arr.ndim == 3:
    arr = arr[None]
  if arr.ndim != 4:
    raise ValueError(f"image must be [H, W, 3], [B, H, W, 3] or [B, 3, H, W], got shape "
                     f"{arr.shape}")
  if arr.shape[-1] == 3 and arr.shape[1] != 3:
    if arr.dtype == np.uint8:
      arr = arr.astype(np.float32) / 255.0
    elif not np.issubdtype(arr.dtype, np.floating):
      raise TypeError(f"image of dtype {arr.dtype}: expected uint8 or float in [0, 1]")
    arr = np.transpose(arr.astype(np.float32), (0, 3, 1, 2)) * 2.0 - 1.0
  elif arr.shape[1] == 3:
    if not np.issubdtype(arr.dtype, np.floating):
      raise TypeError(f"a [B, 3, H, W] image must be float in [-1, 1], got {arr.dtype}")
    arr = arr.astype(np.float32)
  else:
    raise ValueError(f"image must have 3 channels, got shape {arr.shape}")
  if arr.shape[2:] != (height, width):
    raise ValueError(f"image is {arr.shape[2]} x {arr.shape[3]}, the video {height} x {width}: "
                     f"resize it first")
  if not np.isfinite(arr).all():
    raise ValueError("image has non-finite values")
  return jnp.asarray(arr)


class WanPipeline:
  """The Wan2.2 pipeline (T2V-A14B, I2V-A14B, TI2V-5B; see module doc).

  Build with `WanPipeline.from_pretrained(folder)` (a diffusers Wan pipeline folder) or
  directly from models and a scheduler.

  Args:
    transformer: the high-noise (or only) `WanTransformer`, or a `WanExpertPair`.
    scheduler: `UniPCFlowScheduler` (Wan) or `FlowMatchEulerScheduler`.
    transformer_2: the low-noise expert (A14B), or None.
    boundary_ratio: expert switch at t >= boundary_ratio * 1000; None -> `transformer` only.
    expand_timesteps: TI2V-5B per-token timesteps.
    vae_scale_factor_temporal, vae_scale_factor_spatial: latent compression (4, 8; TI2V-5B's
      VAE: 4, 16); taken from `vae` when it is given.
    offload_idle_expert: keep the expert not in use in host memory (pinned host memory
      where the device has it, else numpy copies) and move it in at the switch. With the
      DiTs on a mesh, every device's copy (or FSDP shard) goes to its host memory and
      comes back to the same sharding.
    tokenizer, text_encoder, vae: `Tokenizer`, `UMT5Encoder`, `WanVAE` (or None); with
      `from_pretrained` they load from the folder on first use.
    fps: frames per second of mp4 output (Wan's official: 16 for A14B, 24 for TI2V-5B;
      default by model type).

  Sequence parallelism (`from_pretrained(..., mesh=)` or `set_mesh`): both experts run
  Ulysses-sharded over one mesh (models/parallel.py); the loop's latents, embeddings and
  scheduler state are replicated on it and the k-means state stays sharded by head from
  step to step (models/denoise.py). The tokenizer, UMT5 and the VAE stay single-device:
  prompt embeddings and image latents are moved onto the mesh, the final latents off it
  (onto this process's first device) for decoding. `transformer` and `transformer_2`
  given on meshes must share one.
  """

  def __init__(self, transformer: Union[WanTransformer, WanExpertPair], scheduler, *,
               transformer_2: Optional[WanTransformer] = None,
               boundary_ratio: Optional[float] = None, expand_timesteps: bool = False,
               vae_scale_factor_temporal: int = 4, vae_scale_factor_spatial: int = 8,
               offload_idle_expert: bool = False, tokenizer=None, text_encoder=None,
               vae=None, fps: Optional[float] = None,
               _loaders: Optional[Dict[str, Any]] = None):
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
    cfg = transformer.config
    if cfg.in_channels != cfg.out_channels and cfg.in_channels != 2 * cfg.out_channels + 4:
      raise ValueError(f"transformer in/out channels {cfg.in_channels}/{cfg.out_channels}: "
                       f"expected equal (T2V, TI2V) or 2 z + 4 (I2V)")
    if vae is not None:
      vae_scale_factor_temporal = vae.config.scale_factor_temporal
      vae_scale_factor_spatial = vae.config.scale_factor_spatial
      if vae.config.z_dim != cfg.out_channels:
        raise ValueError(f"the VAE's z_dim {vae.config.z_dim} != the transformer's "
                         f"out_channels {cfg.out_channels}")
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
    self.fps = float(fps) if fps is not None else (24.0 if self.expand_timesteps else 16.0)
    self.parts = comp.Components(
        dict(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae), _loaders or {},
        "WanPipeline")
    self.negative_cache = comp.PromptCache()
    experts = {"transformer": transformer}
    if transformer_2 is not None:
      experts["transformer_2"] = transformer_2
    self._denoiser = denoise.Denoiser(experts, scheduler, offload_idle=self.offload_idle_expert)

  @property
  def image_to_video(self) -> bool:
    """I2V-A14B: the DiT input is [noise; mask; image latents] (in = 2 z + 4)."""
    cfg = self.transformer.config
    return cfg.in_channels != cfg.out_channels

  @property
  def components(self) -> Tuple[str, ...]:
    """The optional components this pipeline has (loaded or loadable)."""
    return self.parts.names

  @property
  def _experts(self) -> Dict[str, denoise.Expert]:
    return self._denoiser.experts

  @property
  def mesh(self) -> Optional[jax.sharding.Mesh]:
    """The mesh the DiTs run on, None on the single-device path."""
    return self._denoiser.mesh

  def set_mesh(self, mesh: Optional[jax.sharding.Mesh], *, fsdp: bool = False) -> None:
    """Both experts onto `mesh` (`WanTransformer.set_mesh`: replicated weights, or the
    block weights sharded with `fsdp`); None: back to one device. ValueError when an
    expert's head count does not divide by the mesh's "seq" size (nothing moved then)."""
    self._denoiser.set_mesh(mesh, fsdp=fsdp)

  # Loading.

  @classmethod
  def from_pretrained(cls, path: PathLike, *, dtype: Any = jnp.bfloat16,
                      attention: AttentionLike = None, flow_shift: Optional[float] = None,
                      offload_idle_expert: bool = False, vae_dtype: Any = jnp.float32,
                      text_encoder_dtype: Any = None,
                      mesh: Optional[jax.sharding.Mesh] = None) -> "WanPipeline":
    """From a local diffusers Wan pipeline folder (`model_index.json`, `transformer/`
    (+ `transformer_2/`), `scheduler/`); tokenizer, text encoder and VAE may be absent (a
    call that needs one names it) and load on first use.

    Args:
      path: the folder; nothing is downloaded.
      dtype: DiT weight / compute dtype.
      attention: self-attention policy of both DiTs (None / "dense", an `SvgEarConfig`, an
        `AttentionPolicy`).
      flow_shift: overrides the scheduler's shift (Wan2.2 T2V official: 12; the diffusers
        converter writes 3.0).
      offload_idle_expert: see the class doc.
      vae_dtype: VAE weights / compute (diffusers' Wan examples keep the VAE in float32).
      text_encoder_dtype: UMT5 weights / compute (default: `dtype`).
      mesh: run both DiTs Ulysses sequence-parallel over this mesh (axes "seq" and
        optionally "data"; see the class doc); None: one device. The VAE and the text
        encoder load single-device either way.
    """
    from models.wan import convert

    folder = comp.PipelineFolder(path)
    folder.require("transformer", "scheduler")
    root, index, present = folder.root, folder.index, folder.has
    kw = dict(dtype=dtype, attention=attention, mesh=mesh)
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
    if present("vae"):
      from models.wan.vae_convert import read_config
      vae_cfg = read_config(root / "vae")  # any layout, converted included; no weights read
      if vae_cfg is not None:
        temporal, spatial = vae_cfg.scale_factor_temporal, vae_cfg.scale_factor_spatial
      elif transformer.config.out_channels == 48:
        # an original Wan2.2_VAE.pth (its config is only in its tensor shapes): the z = 48
        # VAE is the 16x one (checked against the VAE itself when it loads)
        spatial = 16
    loaders = {}
    if present("vae"):
      from models.wan.vae import WanVAE

      def load_vae():
        vae = WanVAE.from_pretrained(root / "vae", dtype=vae_dtype)
        got = (vae.config.scale_factor_temporal, vae.config.scale_factor_spatial)
        if got != (temporal, spatial):
          raise ValueError(f"{root / 'vae'}: the VAE compresses {got[0]}x in time and "
                           f"{got[1]}x in space, not the {temporal}x / {spatial}x this "
                           f"pipeline assumed for a {transformer.config.out_channels}-channel "
                           f"transformer")
        return vae

      loaders["vae"] = load_vae
    if present("text_encoder"):
      from models.wan.umt5 import UMT5Encoder
      te_dtype = dtype if text_encoder_dtype is None else text_encoder_dtype
      loaders["text_encoder"] = lambda: UMT5Encoder.from_pretrained(root / "text_encoder",
                                                                    dtype=te_dtype)
    if present("tokenizer"):
      from models.tokenizer import Tokenizer
      loaders["tokenizer"] = lambda: Tokenizer.from_pretrained(root / "tokenizer")
    boundary_ratio = index.get("boundary_ratio")
    return cls(transformer, scheduler, transformer_2=transformer_2,
               boundary_ratio=boundary_ratio,
               expand_timesteps=bool(index.get("expand_timesteps", False)),
               vae_scale_factor_temporal=temporal, vae_scale_factor_spatial=spatial,
               offload_idle_expert=offload_idle_expert, _loaders=loaders)

  # Introspection.

  @property
  def trace_counts(self) -> Dict[Tuple[str, ...], int]:
    """How often each jitted function was traced: (expert, kind, cfg mode) -> n, with kind
    as in `StepRecord.graph`, and ("scheduler",) -> n."""
    return self._denoiser.trace_counts

  def latent_shape(self, batch: int, num_frames: int, height: int, width: int
                   ) -> Tuple[int, int, int, int, int]:
    """(B, z, (F - 1) // 4 + 1, H / s, W / s), as diffusers' `prepare_latents`."""
    s = self.vae_scale_factor_spatial
    return (batch, self.transformer.config.out_channels,
            (num_frames - 1) // self.vae_scale_factor_temporal + 1, height // s, width // s)

  # Text.

  def encode_prompt(self, prompt: Union[str, Sequence[str]], *,
                    max_sequence_length: int = MAX_SEQUENCE_LENGTH) -> jax.Array:
    """[B, max_sequence_length, 4096] embeddings of `prompt` (diffusers'
    `_get_t5_prompt_embeds`: cleaned, tokenized, zero past each prompt's tokens)."""
    from models.wan.text import encode_prompt

    prompts = comp.as_prompts("prompt", prompt)
    why = "encoding a prompt"
    return encode_prompt(prompts, tokenizer=self.parts.get("tokenizer", why),
                         text_encoder=self.parts.get("text_encoder", why),
                         max_sequence_length=max_sequence_length)

  def _negative_embeds(self, negative_prompt, batch: int, max_sequence_length: int):
    prompts = comp.as_prompts("negative_prompt", negative_prompt)
    if len(prompts) == 1:
      prompts = prompts * batch
    if len(prompts) != batch:
      raise ValueError(f"{len(prompts)} negative prompts for {batch} prompts")
    key = (tuple(prompts), max_sequence_length)
    return self.negative_cache.get(
        key, lambda: self.encode_prompt(prompts, max_sequence_length=max_sequence_length))

  # The call.

  def __call__(self, prompt_embeds: Optional[jax.Array] = None,
               negative_prompt_embeds: Optional[jax.Array] = None, *,
               prompt: Union[None, str, Sequence[str]] = None,
               negative_prompt: Union[None, str, Sequence[str]] = None,
               image=None, image_latents: Optional[jax.Array] = None,
               height: int = 480, width: int = 832, num_frames: int = 81,
               num_inference_steps: int = 50, guidance_scale: float = 5.0,
               guidance_scale_2: Optional[float] = None, seed: Optional[int] = None,
               latents: Optional[jax.Array] = None, schedule: Optional[SvgEarSchedule] = None,
               output_type: str = "latent", output_path: Optional[PathLike] = None,
               max_sequence_length: int = MAX_SEQUENCE_LENGTH, progress: bool = True,
               callback: Optional[sampling.Callback] = None, cfg_batch: bool = True,
               timings: bool = True) -> WanPipelineOutput:
    """Generates one batch of videos.

    Args:
      prompt_embeds: [B, L, text_dim] float text-encoder states (diffusers: zero-padded to
        512 tokens); or `prompt`.
      negative_prompt_embeds: [B, L', text_dim]; or `negative_prompt`. With CFG and
        neither, the negative prompt is "" (diffusers' default; `WAN_NEGATIVE_PROMPT` is
        the official repo's), encoded once and cached across calls.
      prompt, negative_prompt: str or list of B str (needs tokenizer + text_encoder).
      image: I2V-A14B / TI2V-5B image conditioning (the first frame), height x width:
        [H, W, 3] or [B, H, W, 3] uint8 / float in [0, 1], or [B, 3, H, W] in [-1, 1];
        encoded with the VAE as diffusers does.
      image_latents: instead of `image`, its normalised VAE latents: I2V-A14B
        [B, z, F_lat, h, w] (the encoding of the image followed by F - 1 black frames),
        TI2V-5B [B, z, 1, h, w] (the image alone).
      height, width: pixels, multiples of vae_scale_factor_spatial * patch (16 for Wan2.2
        A14B, 32 for TI2V-5B).
      num_frames: 4k + 1.
      num_inference_steps: N >= 1.
      guidance_scale: CFG scale of the high-noise expert (and of a single transformer);
        <= 1: no CFG, one DiT call per step.
      guidance_scale_2: CFG scale of the low-noise expert (default guidance_scale); only with
        a boundary_ratio.
      seed: JAX PRNG seed of the initial latents (default 0). JAX randoms: equal seeds do not
        give diffusers' torch latents; pass `latents` to compare.
      latents: [B, z, F_lat, H_lat, W_lat] initial latents instead of `seed`.
      schedule: `SvgEarSchedule` (default `SvgEarSchedule()`: 20% dense warm-up steps;
        irrelevant for dense DiTs).
      output_type: "latent", "np" (decoded frames) or "mp4" (frames written to
        `output_path`; B > 1 videos go to `stem_{i}.mp4`).
      max_sequence_length: token length of encoded prompts.
      progress: tqdm bar with step time, dense/sparse and density.
      callback: `callback(record, latents)` after every step; may return new latents.
      cfg_batch: cond and uncond as one DiT batch of 2 (False: two calls, as diffusers).
      timings: block on every step to time it (also implied by `progress` / `callback`);
        False with progress off runs without a host sync per step.

    Returns:
      `WanPipelineOutput`.
    """
    # ---- validation (host only)
    schedule = sampling.check_schedule(schedule)
    comp.check_output_type(output_type, output_path)
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
    max_sequence_length = sampling.check_int("max_sequence_length", max_sequence_length)
    if (prompt is None) == (prompt_embeds is None):
      raise ValueError("pass exactly one of prompt and prompt_embeds")
    if negative_prompt is not None and negative_prompt_embeds is not None:
      raise ValueError("pass at most one of negative_prompt and negative_prompt_embeds")
    if prompt is not None:
      batch = len(comp.as_prompts("prompt", prompt))
      self._require_text("prompt=")
    else:
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
    if output_type != "latent":
      self._require("vae", f"output_type={output_type!r}")

    conditioning = self._conditioning_kind(image, image_latents)
    if image is not None:
      self._require("vae", "image=")
      image = _to_video(image, height, width)
      if image.shape[0] not in (1, batch):
        raise ValueError(f"{image.shape[0]} images for a batch of {batch}")
    if image_latents is not None:
      frames = shape[2] if conditioning == "concat" else 1
      image_latents = sampling.check_latents(image_latents,
                                             (batch, shape[1], frames, *shape[3:]))

    sched = self.scheduler.set_timesteps(num_inference_steps)
    timesteps = np.asarray(sched.timesteps)
    boundary = (None if self.boundary_ratio is None
                else self.boundary_ratio * NUM_TRAIN_TIMESTEPS)
    high = [boundary is None or float(t) >= boundary for t in timesteps]
    if not all(high) and self.transformer_2 is None:
      raise ValueError(f"steps below the boundary timestep {boundary} need transformer_2, "
                       f"which this pipeline does not have")
    plan = denoise.StepPlan(
        timesteps=timesteps,
        experts=tuple("transformer" if h else "transformer_2" for h in high),
        scales=tuple(guidance_scale if h else guidance_scale_2 for h in high),
        dense=schedule.dense_flags(num_inference_steps))
    self._denoiser.check_batch(plan, batch, cfg_batch)
    if plan.any_cfg and negative_prompt_embeds is None:
      self._require_text("CFG without negative_prompt_embeds (the empty negative prompt is "
                         "encoded)")
    if plan.any_cfg and cfg_batch and negative_prompt_embeds is not None and (
        prompt_embeds is not None and
        negative_prompt_embeds.shape[1] != prompt_embeds.shape[1]):
      raise ValueError(f"prompt_embeds and negative_prompt_embeds have lengths "
                       f"{prompt_embeds.shape[1]} and {negative_prompt_embeds.shape[1]}: "
                       f"cfg_batch needs equal lengths (pad them, or cfg_batch=False)")
    token_count = None
    if self.expand_timesteps:
      if tuple(cfg.patch_size) != (1, 2, 2):
        raise ValueError(f"expand_timesteps takes every 2nd latent row / column (diffusers), "
                         f"which needs patch size (1, 2, 2), got {tuple(cfg.patch_size)}")
      token_count = shape[2] * (shape[3] // 2) * (shape[4] // 2)

    # ---- device work
    watch = comp.Stopwatch()
    if prompt is not None:
      prompt_embeds = watch.run("text_encoder", lambda: self.encode_prompt(
          prompt, max_sequence_length=max_sequence_length))
    if plan.any_cfg and negative_prompt_embeds is None:
      negative_prompt_embeds = watch.run("text_encoder", lambda: self._negative_embeds(
          "" if negative_prompt is None else negative_prompt, batch, max_sequence_length))
    if plan.any_cfg and cfg_batch and negative_prompt_embeds.shape[1] != prompt_embeds.shape[1]:
      raise ValueError(f"prompt and negative prompt embeddings have lengths "
                       f"{prompt_embeds.shape[1]} and {negative_prompt_embeds.shape[1]}: "
                       f"cfg_batch needs equal lengths")
    if image is not None:
      image_latents = watch.run("image_encoder",
                                lambda: self._encode_image(image, batch, shape, conditioning))
    if latents is None:
      latents = sampling.random_latents(0 if seed is None else seed, shape)
    dtype = cfg.dtype
    place = self._denoiser.place  # onto the DiTs' mesh (identity without one)
    model_input, token_mask, blend = None, None, None
    if conditioning == "concat":
      condition = place(jnp.concatenate([_i2v_mask(shape), image_latents.astype(jnp.float32)],
                                        axis=1))
      model_input = lambda x: _i2v_input_jit(x, condition)
    elif conditioning == "first_frame":
      mask, image_f32 = place((jnp.ones((1, 1, *shape[2:]), jnp.float32).at[:, :, 0].set(0.0),
                               image_latents.astype(jnp.float32)))
      blend = lambda x: _blend_jit(x, image_f32, mask)
      model_input = blend
      token_mask = mask[0, 0][:, ::2, ::2].reshape(-1)
    if token_count is not None and token_mask is None:
      token_mask = jnp.ones((token_count,), jnp.float32)
    cond = (jnp.asarray(prompt_embeds).astype(dtype), token_mask)
    uncond = both = None
    if plan.any_cfg:
      uncond = (jnp.asarray(negative_prompt_embeds).astype(dtype), token_mask)
      if cfg_batch:
        both = (sampling.cfg_concat(cond[0], uncond[0]), token_mask)
    loop = self._denoiser.run_timed(
        watch, plan, latents, call=WanCall(), cond=cond, uncond=uncond, both=both,
        schedule=schedule, scheduler_schedule=sched, cfg_batch=cfg_batch,
        model_input=model_input, progress=progress, callback=callback, timings=timings)
    result, records = loop.latents, loop.records
    final = result if blend is None else blend(result)
    frames, paths = None, ()
    if output_type != "latent":
      vae = self.parts.get("vae", f"output_type={output_type!r}")
      video = watch.run("vae_decode", lambda: vae.decode(self._denoiser.to_one_device(final)))
      frames = comp.postprocess_video(video)
      if output_type == "mp4":
        paths = tuple(watch.run("mp4", lambda: comp.write_videos(frames, output_path,
                                                                 self.fps)))
    return WanPipelineOutput(
        latents=final, timesteps=timesteps, **denoise.step_arrays(records),
        step_expert=tuple(r.expert for r in records), records=records, frames=frames,
        video_paths=paths, seconds=dict(watch.seconds))

  # Helpers.

  def _require(self, name: str, why: str) -> None:
    if not self.parts.has(name):
      raise comp.MissingComponentError(
          f"{why} needs the {name}, which this pipeline does not have (absent from the "
          f"pipeline folder; pass it to WanPipeline(...))")

  def _require_text(self, why: str) -> None:
    missing = [n for n in ("text_encoder", "tokenizer") if not self.parts.has(n)]
    if missing:
      raise comp.MissingComponentError(
          f"{why} needs the {' and the '.join(missing)}, which this pipeline does not have "
          f"(absent from the pipeline folder; pass embeddings, or the components to "
          f"WanPipeline(...))")

  def _conditioning_kind(self, image, image_latents) -> Optional[str]:
    """None (text only), "concat" (I2V-A14B) or "first_frame" (TI2V-5B with an image)."""
    if image is not None and image_latents is not None:
      raise ValueError("pass either image or image_latents, not both")
    given = image is not None or image_latents is not None
    if self.image_to_video:
      if not given:
        raise ValueError(f"this transformer takes {self.transformer.config.in_channels} "
                         f"input channels (I2V): pass image= or image_latents=")
      return "concat"
    if given:
      if not self.expand_timesteps:
        raise ValueError("image conditioning needs an I2V transformer (in = 2 z + 4 "
                         "channels) or TI2V-5B (expand_timesteps)")
      return "first_frame"
    return None

  def _encode_image(self, image, batch: int, shape, conditioning: str) -> jax.Array:
    vae = self.parts.get("vae", "image=")
    video = image[:, :, None]
    if conditioning == "concat":  # the image, then F - 1 black frames, as diffusers
      num_frames = (shape[2] - 1) * self.vae_scale_factor_temporal + 1
      video = jnp.concatenate(
          [video, jnp.zeros((video.shape[0], 3, num_frames - 1, *video.shape[3:]),
                            video.dtype)], axis=2)
    z = vae.encode(video.astype(vae.config.dtype)).astype(jnp.float32)
    if z.shape[0] != batch:
      z = jnp.repeat(z, batch, axis=0)
    return z


def _i2v_mask(shape) -> jax.Array:
  """[B, 4, F_lat, h, w] I2V-A14B mask channels: 1 on the first latent frame (the image's 4
  temporal slots, diffusers' repeat of frame 0), 0 after."""
  b, _, f, h, w = shape
  return jnp.zeros((b, 4, f, h, w), jnp.float32).at[:, :, 0].set(1.0)
