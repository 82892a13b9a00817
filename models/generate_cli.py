"""`svg-ear-generate`: one video (batch) from a local pipeline folder, dense or SVG-EAR.

  svg-ear-generate wan|hunyuan PIPELINE (--prompt TEXT | --prompt-embeds FILE.safetensors)
                   --out OUT.mp4|OUT.safetensors [--negative-prompt TEXT | --wan-negative]
                   [--image IMAGE] [--height H --width W --frames F --steps N --seed S]
                   [--guidance G --guidance-2 G2 --true-cfg S --shift S]
                   [--attention dense|svg-ear --density D --compensation variance|mean|none
                    --dense-steps 0.2|2 --dense-layers 1 --kmeans-during-dense
                    --expert-switch cold|carry --q-clusters K --k-clusters K
                    --kmeans-iters N]
                   [--dtype bf16|fp32 --offload-idle-expert --two-calls --quiet --json FILE]
                   [--seq-parallel P [--data-parallel D]]

PIPELINE is a local diffusers pipeline folder. `--out X.safetensors` writes the final latents
(key `latents`, float32) and needs neither VAE nor, with `--prompt-embeds`, text encoders;
`--out X.mp4` decodes with the folder's VAE. The `--prompt-embeds` file holds:

  wan:     prompt_embeds [B, L, 4096], optional negative_prompt_embeds [B, L, 4096]
           (I2V-A14B / TI2V-5B: optional image_latents, see WanPipeline's image_latents)
  hunyuan: prompt_embeds [B, L, 4096], prompt_attention_mask [B, L],
           pooled_prompt_embeds [B, 768], optional negative_prompt_embeds,
           negative_prompt_attention_mask, negative_pooled_prompt_embeds

Nothing is downloaded. Exit status 0 ok, 1 input / checkpoint error, 2 usage error.
"""

import argparse
import json
import pathlib
import sys
from typing import Any, Dict, List, Optional

MODELS = ("wan", "hunyuan")
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
WAN_KEYS = ("prompt_embeds", "negative_prompt_embeds", "image_latents")
HUNYUAN_KEYS = ("prompt_embeds", "prompt_attention_mask", "pooled_prompt_embeds",
                "negative_prompt_embeds", "negative_prompt_attention_mask",
                "negative_pooled_prompt_embeds")


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="svg-ear-generate", description=__doc__.split("\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog=__doc__.split("\n\n", 1)[1])
  p.add_argument("model", choices=MODELS)
  p.add_argument("pipeline", help="local diffusers pipeline folder")
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--prompt", help="text prompt (needs the folder's tokenizer(s) and text "
                   "encoder(s))")
  src.add_argument("--prompt-embeds", metavar="FILE", help="safetensors of embeddings (keys "
                   "above)")
  neg = p.add_mutually_exclusive_group()
  neg.add_argument("--negative-prompt", default=None, help="negative prompt (default: '', "
                   "diffusers' default)")
  neg.add_argument("--wan-negative", action="store_true",
                   help="Wan's official default negative prompt (wan only)")
  p.add_argument("--out", required=True, help="OUT.mp4 (decoded video) or OUT.safetensors "
                 "(latents)")
  p.add_argument("--image", default=None, help="I2V / TI2V first-frame image (png / jpg, "
                 "already height x width)")
  p.add_argument("--height", type=int, default=None)
  p.add_argument("--width", type=int, default=None)
  p.add_argument("--frames", type=int, default=None, help="4k + 1")
  p.add_argument("--steps", type=int, default=None)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--guidance", type=float, default=None,
                 help="wan: CFG scale (high-noise expert); hunyuan: embedded guidance")
  p.add_argument("--guidance-2", type=float, default=None, help="wan A14B low-noise CFG scale")
  p.add_argument("--true-cfg", type=float, default=1.0, help="hunyuan: true CFG scale")
  p.add_argument("--shift", type=float, default=None, help="scheduler flow shift (Wan2.2 T2V "
                 "official: 12; diffusers' converter writes 3)")
  p.add_argument("--attention", choices=("dense", "svg-ear"), default="svg-ear")
  p.add_argument("--density", type=float, default=0.25, help="SVG-EAR exact-area budget")
  p.add_argument("--compensation", choices=("variance", "mean", "none"), default="variance")
  p.add_argument("--dense-steps", type=_dense_steps, default=0.2,
                 help="leading dense steps: a fraction with a decimal point (0.2: the "
                 "first 20%%, 1.0: all) or an integer count (2: the first two)")
  p.add_argument("--dense-layers", type=int, default=1, help="leading dense DiT layers")
  p.add_argument("--kmeans-during-dense", action="store_true")
  p.add_argument("--expert-switch", choices=("cold", "carry"), default="cold")
  p.add_argument("--q-clusters", type=int, default=None)
  p.add_argument("--k-clusters", type=int, default=None)
  p.add_argument("--kmeans-iters", type=int, default=None,
                 help="k-means iterations of a cold start (default: the preset's 50; 10 "
                      "costs ~0.001 attention error, benchmarks/results/kmeans_start_h200.md)")
  p.add_argument("--seq-parallel", type=int, default=None, metavar="P",
                 help="Ulysses sequence parallelism over the first P local devices (the "
                      "DiTs; P must divide the head count)")
  p.add_argument("--data-parallel", type=int, default=1, metavar="D",
                 help="with --seq-parallel: also split the CFG batch over D groups of P "
                      "devices (D = 2 for cond + uncond)")
  p.add_argument("--dtype", choices=tuple(DTYPES), default="bf16", help="DiT dtype")
  p.add_argument("--offload-idle-expert", action="store_true", help="wan A14B")
  p.add_argument("--two-calls", action="store_true", help="CFG as two DiT calls, not a batch")
  p.add_argument("--quiet", action="store_true", help="no progress bar")
  p.add_argument("--json", default=None, metavar="FILE", help="write a run summary here")
  return p


def _attention(args):
  from models.attention import AttentionPolicy
  from svg_ear_jax import SvgEarConfig

  if args.attention == "dense":
    return AttentionPolicy.dense()
  preset = SvgEarConfig.wan22_720p if args.model == "wan" else SvgEarConfig.hunyuan_720p
  changes: Dict[str, Any] = dict(density=args.density, compensation=args.compensation)
  if args.q_clusters is not None:
    changes["num_q_clusters"] = args.q_clusters
  if args.k_clusters is not None:
    changes["num_k_clusters"] = args.k_clusters
  if args.kmeans_iters is not None:
    changes["kmeans_iters"] = args.kmeans_iters
  return AttentionPolicy.sparse(preset(**changes), dense_layers=args.dense_layers)


def _mesh(args):
  """The ("data", "seq") mesh of --seq-parallel / --data-parallel, None without them;
  ValueError (before anything loads) when this process has too few devices."""
  if args.seq_parallel is None:
    if args.data_parallel != 1:
      raise ValueError("--data-parallel needs --seq-parallel")
    return None
  import jax

  from models.parallel import make_mesh

  if args.seq_parallel < 1 or args.data_parallel < 1:
    raise ValueError("--seq-parallel and --data-parallel must be >= 1")
  need, have = args.seq_parallel * args.data_parallel, jax.local_devices()
  if need > len(have):
    raise ValueError(f"--seq-parallel {args.seq_parallel} x --data-parallel "
                     f"{args.data_parallel} needs {need} devices, this process has "
                     f"{len(have)}")
  return make_mesh(seq=args.seq_parallel, data=args.data_parallel, devices=have[:need])


def _dense_steps(text: str):
  try:
    return float(text) if "." in text else int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"{text!r} is neither a fraction nor a step count")


def _schedule(args):
  from models.sampling import SvgEarSchedule

  return SvgEarSchedule(dense_steps=args.dense_steps, expert_switch=args.expert_switch,
                        kmeans_during_dense=args.kmeans_during_dense)


def _read_embeds(path: str, allowed) -> Dict[str, Any]:
  from safetensors.numpy import load_file

  file = pathlib.Path(path)
  if not file.is_file():
    raise FileNotFoundError(f"{file}: no such embeddings file")
  try:
    tensors = load_file(str(file))
  except Exception as err:  # safetensors raises its own error types
    raise ValueError(f"{file}: not a readable safetensors file ({err})") from err
  unknown = sorted(set(tensors) - set(allowed))
  if unknown:
    raise ValueError(f"{file}: unknown keys {unknown}; expected some of {list(allowed)}")
  if "prompt_embeds" not in tensors:
    raise ValueError(f"{file}: no prompt_embeds")
  return tensors


def _read_image(path: str):
  import imageio.v3 as iio
  import numpy as np

  file = pathlib.Path(path)
  if not file.is_file():
    raise FileNotFoundError(f"{file}: no such image")
  image = np.asarray(iio.imread(file))
  if image.ndim == 2:
    image = np.repeat(image[..., None], 3, axis=-1)
  return image[..., :3]


def _sizes(args, defaults):
  return {k: (getattr(args, a) if getattr(args, a) is not None else defaults[k])
          for k, a in (("height", "height"), ("width", "width"), ("num_frames", "frames"),
                       ("num_inference_steps", "steps"))}


def _run(args) -> Dict[str, Any]:
  import jax.numpy as jnp

  out = pathlib.Path(args.out)
  suffix = out.suffix.lower()
  if suffix not in (".mp4", ".safetensors"):
    raise ValueError(f"--out {out}: must end in .mp4 or .safetensors")
  dtype = getattr(jnp, DTYPES[args.dtype])
  attention = _attention(args)
  mesh = _mesh(args)
  kw: Dict[str, Any] = dict(seed=args.seed, schedule=_schedule(args),
                            progress=not args.quiet, cfg_batch=not args.two_calls)
  if suffix == ".mp4":
    kw.update(output_type="mp4", output_path=out)
  if args.model == "wan":
    from models.wan.pipeline import WAN_NEGATIVE_PROMPT, WanPipeline

    if args.true_cfg != 1.0:
      raise ValueError("--true-cfg is a hunyuan option (wan: --guidance)")
    pipe = WanPipeline.from_pretrained(args.pipeline, dtype=dtype, attention=attention,
                                       flow_shift=args.shift, mesh=mesh,
                                       offload_idle_expert=args.offload_idle_expert)
    defaults = dict(height=480, width=832, num_frames=81, num_inference_steps=50)
    kw.update(guidance_scale=5.0 if args.guidance is None else args.guidance)
    if args.guidance_2 is not None:
      kw["guidance_scale_2"] = args.guidance_2
    if args.wan_negative:
      kw["negative_prompt"] = WAN_NEGATIVE_PROMPT
    elif args.negative_prompt is not None:
      kw["negative_prompt"] = args.negative_prompt
    keys = WAN_KEYS
  else:
    from models.hunyuan.pipeline import HunyuanVideoPipeline

    for flag, bad in (("--wan-negative", args.wan_negative),
                      ("--guidance-2", args.guidance_2 is not None),
                      ("--offload-idle-expert", args.offload_idle_expert),
                      ("--image", args.image is not None)):
      if bad:
        raise ValueError(f"{flag} is not a hunyuan option")
    pipe = HunyuanVideoPipeline.from_pretrained(args.pipeline, dtype=dtype,
                                                attention=attention, flow_shift=args.shift,
                                                mesh=mesh)
    defaults = dict(height=720, width=1280, num_frames=129, num_inference_steps=50)
    kw.update(guidance_scale=6.0 if args.guidance is None else args.guidance,
              true_cfg_scale=args.true_cfg)
    if args.negative_prompt is not None:
      kw["negative_prompt"] = args.negative_prompt
    keys = HUNYUAN_KEYS
  kw.update(_sizes(args, defaults))
  if args.prompt is not None:
    kw["prompt"] = args.prompt
  else:
    tensors = {k: jnp.asarray(v) for k, v in _read_embeds(args.prompt_embeds, keys).items()}
    if "negative_prompt" in kw and "negative_prompt_embeds" in tensors:
      raise ValueError("the embeddings file has negative_prompt_embeds and a negative prompt "
                       "was given: pick one")
    kw.update(tensors)
  if args.image is not None:
    if "image_latents" in kw:
      raise ValueError("--image and image_latents in the embeddings file: pick one")
    kw["image"] = _read_image(args.image)
  result = pipe(**kw)
  if suffix == ".safetensors":
    from safetensors.numpy import save_file
    import numpy as np

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    save_file({"latents": np.asarray(result.latents, np.float32)}, str(tmp),
              metadata={"model": args.model, "timesteps": json.dumps(
                  [float(t) for t in result.timesteps])})
    tmp.replace(out)
  steps = result.records
  dense_s = [r.seconds for r in steps if r.dense]
  sparse_s = [r.seconds for r in steps if not r.dense]
  return dict(
      model=args.model, out=str(out), latents_shape=list(result.latents.shape),
      steps=len(steps), dense_steps=len(dense_s),
      seconds_total=float(sum(r.seconds for r in steps)),
      seconds_per_dense_step=float(sum(dense_s) / len(dense_s)) if dense_s else None,
      seconds_per_sparse_step=float(sum(sparse_s) / len(sparse_s)) if sparse_s else None,
      mean_sparse_density=(float(sum(r.density for r in steps if not r.dense) / len(sparse_s))
                           if sparse_s else None),
      phases=result.seconds)


def main(argv: Optional[List[str]] = None) -> int:
  """Entry point; returns the exit status."""
  args = _parser().parse_args(argv)
  from models.components import MissingComponentError
  from models.convert_common import CheckpointError

  try:
    summary = _run(args)
  except (CheckpointError, FileNotFoundError, MissingComponentError, ValueError,
          TypeError) as err:
    print(f"svg-ear-generate: error: {err}", file=sys.stderr)
    return 1
  width = max(len(k) for k in summary)
  for key, value in summary.items():
    print(f"{key:<{width}}  {value}")
  if args.json is not None:
    path = pathlib.Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=2, default=str) + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
