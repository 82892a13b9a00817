"""HunyuanVideo pipeline (`HunyuanVideoPipeline`): prompt (or embeddings) in, latents,
frames or mp4 out.

The denoising math is diffusers' `HunyuanVideoPipeline.__call__`
(pipelines/hunyuan_video/pipeline_hunyuan_video.py): float32 latents
(B, 16, (F - 1) // 4 + 1, H / 8, W / 8), `FlowMatchEulerScheduler` on the unshifted sigmas
linspace(1, 0, N + 1)[:-1], the timestep t (float) per sample, the embedded (distilled)
guidance `guidance_scale * 1000` rounded to the DiT dtype as torch does, and true CFG
`neg + s * (cond - neg)` only when `true_cfg_scale > 1` with a negative prompt. Decoding
divides by the VAE's scaling factor (0.476986) inside `HunyuanVAE.decode`; frames are not
clamped by the VAE, only by the post-processing, as diffusers.

Differences: true CFG runs cond and uncond as one DiT batch of 2 by default; random latents
come from the JAX PRNG; `true_cfg_scale > 1` without a negative prompt is an error (diffusers
silently skips CFG); the text encoders and the VAE are the JAX ports, loaded on first use.
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
from models.hunyuan.transformer import HunyuanVideoTransformer
from models.sampling import StepRecord, SvgEarSchedule
from models.schedulers import FlowMatchEulerScheduler, scheduler_from_pretrained

PathLike = Union[str, pathlib.Path]
MAX_SEQUENCE_LENGTH = 256
# The official repo saves its samples at 24 fps (sample_video.py `save_videos_grid`).
DEFAULT_FPS = 24.0


@dataclasses.dataclass(frozen=True)
class HunyuanVideoPipelineOutput:
  """Result of one `HunyuanVideoPipeline` call (N = number of steps).

  Attributes:
    latents: [B, 16, F_lat, H_lat, W_lat] float32 final latents.
    timesteps: (N,) float32, what the DiT received at each step.
    step_seconds, step_density, step_dense: (N,) per-step wall time (NaN without timings),
      mean attention density, dense flag.
    records: the per-step `StepRecord`s.
    frames: [B, F, H, W, 3] float32 in [0, 1] for output_type "np" / "mp4", else None.
    video_paths: the mp4 files written (output_type "mp4").
    seconds: wall time per phase ("text_encoder", "denoise", "vae_decode", "mp4").
  """

  latents: jax.Array
  timesteps: np.ndarray
  step_seconds: np.ndarray
  step_density: np.ndarray
  step_dense: np.ndarray
  records: Tuple[StepRecord, ...]
  frames: Optional[np.ndarray] = None
  video_paths: Tuple[pathlib.Path, ...] = ()
  seconds: Dict[str, float] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class HunyuanCall(denoise.DenoiserCall):
  """`HunyuanVideoTransformer(x, t, text, mask, pooled, guidance)`; cond = (text
  [B', L, D], mask [B', L], pooled [B', P], guidance scalar (already x 1000, in the DiT
  dtype) or None)."""

  def __call__(self, model, x, timestep, cond):
    text, mask, pooled, guidance = cond
    b = x.shape[0]
    g = None if guidance is None else jnp.broadcast_to(guidance, (b,))
    return model(x, jnp.full((b,), timestep), text, mask, pooled, g)


@dataclasses.dataclass(frozen=True)
class PromptEmbeds:
  """HunyuanVideo's text conditioning of B prompts: Llama states [B, L, 4096], their mask
  [B, L] (1 = prompt token), CLIP's pooled embedding [B, 768]."""

  embeds: jax.Array
  mask: jax.Array
  pooled: jax.Array


def _check_mask(name: str, mask, shape) -> jax.Array:
  got = tuple(getattr(mask, "shape", ()))
  if got != tuple(shape):
    raise ValueError(f"{name} must have shape {tuple(shape)}, got {got}")
  return jnp.asarray(mask)


class HunyuanVideoPipeline:
  """The HunyuanVideo T2V pipeline (see module doc).

  Args:
    transformer: a `HunyuanVideoTransformer`.
    scheduler: `FlowMatchEulerScheduler` (shift 7 in diffusers' conversion).
    vae_scale_factor_temporal, vae_scale_factor_spatial: 4 and 8 (taken from `vae` when
      given).
    tokenizer, text_encoder, tokenizer_2, text_encoder_2, vae: the Llama tokenizer and
      encoder, the CLIP tokenizer and text model, the `HunyuanVAE`; or None (with
      `from_pretrained` they load from the folder on first use).
    fps: frames per second of mp4 output (default 24, the official repo's).

  Sequence parallelism (`from_pretrained(..., mesh=)` or `set_mesh`): the DiT runs
  Ulysses-sharded over the mesh (models/parallel.py; true CFG's batch of 2 can go over a
  "data" axis of 2); the loop's latents, embeddings and scheduler state are replicated on
  it and the k-means state stays sharded by head from step to step (models/denoise.py).
  The tokenizers, Llama, CLIP and the VAE stay single-device: prompt embeddings are moved
  onto the mesh, the final latents off it (onto this process's first device) for decoding.
  """

  TEXT_COMPONENTS = ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2")

  def __init__(self, transformer: HunyuanVideoTransformer, scheduler, *,
               vae_scale_factor_temporal: int = 4, vae_scale_factor_spatial: int = 8,
               tokenizer=None, text_encoder=None, tokenizer_2=None, text_encoder_2=None,
               vae=None, fps: float = DEFAULT_FPS,
               _loaders: Optional[Dict[str, Any]] = None):
    if not isinstance(transformer, HunyuanVideoTransformer):
      raise TypeError(f"transformer must be a HunyuanVideoTransformer, got "
                      f"{type(transformer).__name__}")
    if not isinstance(scheduler, FlowMatchEulerScheduler):
      raise TypeError(f"scheduler must be a FlowMatchEulerScheduler, got "
                      f"{type(scheduler).__name__}")
    if vae is not None:
      vae_scale_factor_temporal = vae.config.temporal_compression_ratio
      vae_scale_factor_spatial = vae.config.spatial_compression_ratio
    self.transformer = transformer
    self.scheduler = scheduler
    self.vae_scale_factor_temporal = sampling.check_int("vae_scale_factor_temporal",
                                                        vae_scale_factor_temporal)
    self.vae_scale_factor_spatial = sampling.check_int("vae_scale_factor_spatial",
                                                       vae_scale_factor_spatial)
    self.fps = sampling.check_real("fps", fps)
    self.parts = comp.Components(
        dict(tokenizer=tokenizer, text_encoder=text_encoder, tokenizer_2=tokenizer_2,
             text_encoder_2=text_encoder_2, vae=vae), _loaders or {}, "HunyuanVideoPipeline")
    self.negative_cache = comp.PromptCache()
    self._denoiser = denoise.Denoiser({"transformer": transformer}, scheduler)

  @property
  def components(self) -> Tuple[str, ...]:
    return self.parts.names

  @property
  def trace_counts(self) -> Dict[Tuple[str, ...], int]:
    """(expert, graph, cfg mode) -> traces of the forward, ("scheduler",) -> traces."""
    return self._denoiser.trace_counts

  @property
  def mesh(self) -> Optional[jax.sharding.Mesh]:
    """The mesh the DiT runs on, None on the single-device path."""
    return self._denoiser.mesh

  def set_mesh(self, mesh: Optional[jax.sharding.Mesh], *, fsdp: bool = False) -> None:
    """The DiT onto `mesh` (`HunyuanVideoTransformer.set_mesh`: replicated weights, or the
    block weights sharded with `fsdp`); None: back to one device."""
    self._denoiser.set_mesh(mesh, fsdp=fsdp)

  # Loading.

  @classmethod
  def from_pretrained(cls, path: PathLike, *, dtype: Any = jnp.bfloat16,
                      attention: AttentionLike = None, flow_shift: Optional[float] = None,
                      vae_dtype: Any = jnp.float32, text_encoder_dtype: Any = None,
                      mesh: Optional[jax.sharding.Mesh] = None) -> "HunyuanVideoPipeline":
    """From a local diffusers HunyuanVideo pipeline folder (`model_index.json`,
    `transformer/`, `scheduler/`; tokenizers, text encoders and VAE optional, loaded on
    first use). Nothing is downloaded.

    Args:
      dtype: DiT weights / compute.
      attention: the DiT's joint-attention policy.
      flow_shift: overrides the scheduler's shift (diffusers' conversion: 7.0).
      vae_dtype: VAE weights / compute (float32 by default; diffusers' HunyuanVideo
        examples run it in float16, bfloat16 halves its memory too).
      text_encoder_dtype: Llama / CLIP weights (default: `dtype`).
      mesh: run the DiT Ulysses sequence-parallel over this mesh (axes "seq" and
        optionally "data"; see the class doc); None: one device. The VAE and the text
        encoders load single-device either way.
    """
    from models.hunyuan import convert

    folder = comp.PipelineFolder(path)
    folder.require("transformer", "scheduler")
    root, present = folder.root, folder.has
    transformer = convert.from_pretrained(root / "transformer", dtype=dtype,
                                          attention=attention, mesh=mesh)
    overrides = {}
    if flow_shift is not None:
      overrides["shift"] = sampling.check_real("flow_shift", flow_shift)
    scheduler = scheduler_from_pretrained(root, **overrides)
    te_dtype = dtype if text_encoder_dtype is None else text_encoder_dtype
    loaders = {}
    temporal, spatial = 4, 8
    if present("vae"):
      from models.hunyuan.vae import HunyuanVAE
      loaders["vae"] = lambda: HunyuanVAE.from_pretrained(root / "vae", dtype=vae_dtype)
      from models.hunyuan.vae_convert import read_config
      vae_cfg = read_config(root / "vae")  # any layout, converted included; no weights read
      temporal, spatial = vae_cfg.temporal_compression_ratio, vae_cfg.spatial_compression_ratio
    for name in ("tokenizer", "tokenizer_2"):
      if present(name):
        from models.tokenizer import Tokenizer
        loaders[name] = (lambda n=name: Tokenizer.from_pretrained(root / n))
    if present("text_encoder"):
      from models.hunyuan.llama import LlamaEncoder
      from models.hunyuan.text import LLAMA_HIDDEN_STATE
      # only the layers up to hidden_states[-3] are read (the last two are never used)
      loaders["text_encoder"] = lambda: LlamaEncoder.from_pretrained(
          root / "text_encoder", dtype=te_dtype, up_to_hidden_state=LLAMA_HIDDEN_STATE)
    if present("text_encoder_2"):
      from models.hunyuan.clip import CLIPTextEncoder
      loaders["text_encoder_2"] = lambda: CLIPTextEncoder.from_pretrained(
          root / "text_encoder_2", dtype=te_dtype)
    return cls(transformer, scheduler, vae_scale_factor_temporal=temporal,
               vae_scale_factor_spatial=spatial, _loaders=loaders)

  def latent_shape(self, batch: int, num_frames: int, height: int, width: int):
    """(B, in_channels, (F - 1) // 4 + 1, H / 8, W / 8), as diffusers' `prepare_latents`."""
    s = self.vae_scale_factor_spatial
    return (batch, self.transformer.config.in_channels,
            (num_frames - 1) // self.vae_scale_factor_temporal + 1, height // s, width // s)

  # Text.

  def encode_prompt(self, prompt: Union[str, Sequence[str]], *,
                    max_sequence_length: int = MAX_SEQUENCE_LENGTH) -> PromptEmbeds:
    """Llama states, mask and CLIP pooled embedding of `prompt` (diffusers'
    `encode_prompt` with the default prompt template)."""
    from models.hunyuan.text import encode_prompt

    prompts = comp.as_prompts("prompt", prompt)
    why = "encoding a prompt"
    embeds, mask, pooled = encode_prompt(
        prompts, tokenizer=self.parts.get("tokenizer", why),
        text_encoder=self.parts.get("text_encoder", why),
        tokenizer_2=self.parts.get("tokenizer_2", why),
        text_encoder_2=self.parts.get("text_encoder_2", why),
        max_sequence_length=max_sequence_length)
    return PromptEmbeds(embeds=embeds, mask=mask, pooled=pooled)

  def _require(self, names: Sequence[str], why: str) -> None:
    missing = [n for n in names if not self.parts.has(n)]
    if missing:
      raise comp.MissingComponentError(
          f"{why} needs the {', '.join(missing)}, which this pipeline does not have (absent "
          f"from the pipeline folder; pass embeddings, or the components to "
          f"HunyuanVideoPipeline(...))")

  def _embeds(self, name: str, embeds, mask, pooled, batch: Optional[int]) -> PromptEmbeds:
    cfg = self.transformer.config
    embeds = sampling.check_embeddings(f"{name}_embeds", embeds, cfg.text_dim, batch)
    b, length = embeds.shape[:2]
    if pooled is None:
      raise ValueError(f"{name}_embeds need pooled_{name}_embeds [B, "
                       f"{cfg.pooled_projection_dim}] (CLIP's pooled output)")
    shape = tuple(getattr(pooled, "shape", ()))
    if shape != (b, cfg.pooled_projection_dim):
      raise ValueError(f"pooled_{name}_embeds must have shape "
                       f"{(b, cfg.pooled_projection_dim)}, got {shape}")
    mask = (jnp.ones((b, length), jnp.int32) if mask is None
            else _check_mask(f"{name}_attention_mask", mask, (b, length)))
    return PromptEmbeds(embeds=jnp.asarray(embeds), mask=mask, pooled=jnp.asarray(pooled))

  # The call.

  def __call__(self, prompt_embeds: Optional[jax.Array] = None,
               pooled_prompt_embeds: Optional[jax.Array] = None,
               prompt_attention_mask: Optional[jax.Array] = None, *,
               prompt: Union[None, str, Sequence[str]] = None,
               negative_prompt: Union[None, str, Sequence[str]] = None,
               negative_prompt_embeds: Optional[jax.Array] = None,
               negative_pooled_prompt_embeds: Optional[jax.Array] = None,
               negative_prompt_attention_mask: Optional[jax.Array] = None,
               height: int = 720, width: int = 1280, num_frames: int = 129,
               num_inference_steps: int = 50, guidance_scale: float = 6.0,
               true_cfg_scale: float = 1.0, seed: Optional[int] = None,
               latents: Optional[jax.Array] = None, schedule: Optional[SvgEarSchedule] = None,
               output_type: str = "latent", output_path: Optional[PathLike] = None,
               max_sequence_length: int = MAX_SEQUENCE_LENGTH, progress: bool = True,
               callback: Optional[sampling.Callback] = None, cfg_batch: bool = True,
               timings: bool = True) -> HunyuanVideoPipelineOutput:
    """Generates one batch of videos.

    Args:
      prompt_embeds: [B, L, 4096] Llama states (diffusers: hidden_states[-3] after the
        template crop, 256 tokens); with `pooled_prompt_embeds` [B, 768] and
        `prompt_attention_mask` [B, L] (default: all ones). Or `prompt`.
      prompt, negative_prompt: str or list of B str (needs both tokenizers and encoders).
      negative_prompt_embeds, negative_pooled_prompt_embeds, negative_prompt_attention_mask:
        the negative branch of true CFG (or `negative_prompt`; encoded once and cached).
      height, width: multiples of 16; num_frames: 4k + 1; num_inference_steps: N >= 1.
      guidance_scale: the embedded (distilled) guidance, fed to the DiT as scale * 1000.
      true_cfg_scale: > 1 runs true CFG against the negative prompt (two DiT branches).
      seed / latents: JAX PRNG seed of the initial latents, or [B, 16, F_lat, h, w].
      schedule: `SvgEarSchedule` (dense warm-up steps, k-means during them).
      output_type: "latent", "np" or "mp4" (to `output_path`).
      progress, callback, cfg_batch, timings: as `WanPipeline`.

    Returns:
      `HunyuanVideoPipelineOutput`.
    """
    schedule = sampling.check_schedule(schedule)
    comp.check_output_type(output_type, output_path)
    cfg = self.transformer.config
    num_inference_steps = sampling.check_int("num_inference_steps", num_inference_steps)
    num_frames = sampling.check_num_frames(num_frames, self.vae_scale_factor_temporal)
    height, width = sampling.check_spatial(
        height, width, self.vae_scale_factor_spatial * cfg.patch_size,
        f"vae scale {self.vae_scale_factor_spatial} x patch {cfg.patch_size}")
    guidance_scale = sampling.check_real("guidance_scale", guidance_scale)
    true_cfg_scale = sampling.check_real("true_cfg_scale", true_cfg_scale)
    max_sequence_length = sampling.check_int("max_sequence_length", max_sequence_length)
    if (prompt is None) == (prompt_embeds is None):
      raise ValueError("pass exactly one of prompt and prompt_embeds")
    if prompt is not None:
      if pooled_prompt_embeds is not None or prompt_attention_mask is not None:
        raise ValueError("pooled_prompt_embeds / prompt_attention_mask go with "
                         "prompt_embeds, not with prompt")
      batch = len(comp.as_prompts("prompt", prompt))
      self._require(self.TEXT_COMPONENTS, "prompt=")
      positive = None
    else:
      positive = self._embeds("prompt", prompt_embeds, prompt_attention_mask,
                              pooled_prompt_embeds, None)
      batch = positive.embeds.shape[0]
    negative = None
    has_negative = negative_prompt is not None or negative_prompt_embeds is not None
    if negative_prompt is not None and negative_prompt_embeds is not None:
      raise ValueError("pass at most one of negative_prompt and negative_prompt_embeds")
    if negative_prompt_embeds is not None:
      negative = self._embeds("negative_prompt", negative_prompt_embeds,
                              negative_prompt_attention_mask, negative_pooled_prompt_embeds,
                              batch)
    if negative_prompt is not None:
      self._require(self.TEXT_COMPONENTS, "negative_prompt=")
    do_cfg = sampling.cfg_enabled(true_cfg_scale)
    if do_cfg and not has_negative:
      raise ValueError(f"true_cfg_scale={true_cfg_scale} > 1 needs negative_prompt or "
                       f"negative_prompt_embeds (diffusers would silently skip CFG)")
    if seed is not None and latents is not None:
      raise ValueError("pass either seed or latents, not both")
    shape = self.latent_shape(batch, num_frames, height, width)
    if latents is not None:
      latents = sampling.check_latents(latents, shape)
    if output_type != "latent":
      self._require(["vae"], f"output_type={output_type!r}")
    if do_cfg and cfg_batch and positive is not None and negative is not None and (
        negative.embeds.shape[1] != positive.embeds.shape[1]):
      raise ValueError(f"prompt_embeds and negative_prompt_embeds have lengths "
                       f"{positive.embeds.shape[1]} and {negative.embeds.shape[1]}: cfg_batch "
                       f"needs equal lengths (pad them with a zero mask, or cfg_batch=False)")

    sigmas = np.linspace(1.0, 0.0, num_inference_steps + 1)[:-1]
    sched = self.scheduler.set_timesteps(sigmas=sigmas)
    timesteps = np.asarray(sched.timesteps)
    plan = denoise.StepPlan(
        timesteps=timesteps, experts=("transformer",) * num_inference_steps,
        scales=(true_cfg_scale if do_cfg else 1.0,) * num_inference_steps,
        dense=schedule.dense_flags(num_inference_steps))
    self._denoiser.check_batch(plan, batch, cfg_batch)

    # ---- device work
    watch = comp.Stopwatch()
    if positive is None:
      positive = watch.run("text_encoder", lambda: self.encode_prompt(
          prompt, max_sequence_length=max_sequence_length))
    if do_cfg and negative is None:
      prompts = comp.as_prompts("negative_prompt", negative_prompt)
      prompts = prompts * batch if len(prompts) == 1 else prompts
      if len(prompts) != batch:
        raise ValueError(f"{len(prompts)} negative prompts for {batch} prompts")
      negative = watch.run("text_encoder", lambda: self.negative_cache.get(
          (tuple(prompts), max_sequence_length),
          lambda: self.encode_prompt(prompts, max_sequence_length=max_sequence_length)))
    if latents is None:
      latents = sampling.random_latents(0 if seed is None else seed, shape)
    dtype = cfg.dtype
    guidance = None
    if cfg.guidance_embeds:
      # torch: tensor([g] * B, dtype=transformer_dtype) * 1000.0, in that dtype
      guidance = jnp.asarray(guidance_scale, dtype) * jnp.asarray(1000.0, dtype)

    def pack(p: PromptEmbeds):
      return (p.embeds.astype(dtype), p.mask.astype(dtype), p.pooled.astype(dtype), guidance)

    cond = pack(positive)
    uncond = both = None
    if do_cfg:
      uncond = pack(negative)
      if cfg_batch:
        if uncond[0].shape[1] != cond[0].shape[1]:
          raise ValueError("prompt and negative prompt embeddings differ in length: "
                           "cfg_batch needs equal lengths")
        both = tuple(sampling.cfg_concat(a, b) for a, b in zip(cond[:3], uncond[:3])) + (
            guidance,)
    loop = self._denoiser.run_timed(
        watch, plan, latents, call=HunyuanCall(), cond=cond, uncond=uncond, both=both,
        schedule=schedule, scheduler_schedule=sched, cfg_batch=cfg_batch, progress=progress,
        callback=callback, timings=timings)
    frames, paths = None, ()
    if output_type != "latent":
      vae = self.parts.get("vae", f"output_type={output_type!r}")
      video = watch.run("vae_decode",
                        lambda: vae.decode(self._denoiser.to_one_device(loop.latents)))
      frames = comp.postprocess_video(video)
      if output_type == "mp4":
        paths = tuple(watch.run("mp4", lambda: comp.write_videos(frames, output_path,
                                                                 self.fps)))
    return HunyuanVideoPipelineOutput(
        latents=loop.latents, timesteps=timesteps, **denoise.step_arrays(loop.records),
        records=loop.records, frames=frames, video_paths=paths, seconds=dict(watch.seconds))
