"""`svg-ear-convert`: converts local PyTorch checkpoints to Flax (Orbax) folders.

  svg-ear-convert wan SRC DST [--dtype bf16] [--variant NAME] [--overwrite] [--quiet]
  svg-ear-convert hunyuan SRC DST [--dtype bf16] [--variant NAME] [--overwrite] [--quiet]
  svg-ear-convert wan-vae SRC DST [--dtype fp32] [--overwrite] [--quiet]
  svg-ear-convert hunyuan-vae SRC DST [--dtype fp32] [--overwrite] [--quiet]
  svg-ear-convert umt5 SRC DST [--dtype bf16] [--overwrite] [--quiet]
  svg-ear-convert llama SRC DST [--dtype bf16] [--overwrite] [--quiet]
  svg-ear-convert clip SRC DST [--dtype bf16] [--overwrite] [--quiet]

SRC is a local checkpoint:
  * wan: a Wan2.2 DiT folder in diffusers or original layout (an A14B folder with
    `transformer/` + `transformer_2/` or `high_noise_model/` + `low_noise_model/` converts
    both experts);
  * hunyuan: a HunyuanVideo DiT as a diffusers folder (or pipeline with `transformer/`),
    original-layout safetensors, or `mp_rank_00_model_states.pt` (needs torch);
  * wan-vae: a diffusers `AutoencoderKLWan` folder (or pipeline with `vae/`), or the original
    `Wan2.1_VAE.pth` / `Wan2.2_VAE.pth` (needs torch), or a folder holding exactly one;
  * hunyuan-vae: a diffusers `AutoencoderKLHunyuanVideo` folder (or pipeline with `vae/`), or
    the original `vae/` folder (`pytorch_model.pt` + config.json; needs torch);
  * umt5: a transformers `UMT5EncoderModel` save (Wan pipeline `text_encoder/`), or Wan's
    `models_t5_umt5-xxl-enc-bf16.pth` (needs torch), or a folder holding exactly one;
  * llama: HunyuanVideo's Llama text encoder, a transformers `LlamaModel` /
    `LlamaForCausalLM` / `LlavaForConditionalGeneration` save (or pipeline with
    `text_encoder/`; every layer is converted);
  * clip: HunyuanVideo's CLIP-L, a transformers `CLIPTextModel` save (or pipeline with
    `text_encoder_2/`).
DST then loads with the model's `from_pretrained` (no torch needed). Nothing is downloaded;
every source tensor must map to a parameter and vice versa, shapes are checked before any
data is read; nothing is left at DST on failure.
"""

import argparse
import sys
from typing import List, Optional

from models.convert_common import CheckpointError

DTYPES = ["bf16", "fp16", "fp32"]
# subcommand -> (help, SRC help, default dtype, dtype help, has --variant)
COMMANDS = {
    "wan": ("Wan2.2 DiT (T2V-A14B, I2V-A14B, TI2V-5B)", "local source checkpoint folder",
            "bf16", "norms and modulation stay fp32", True),
    "hunyuan": ("HunyuanVideo T2V DiT (13B, guidance-distilled)",
                "local checkpoint: diffusers folder (or pipeline with transformer/), "
                "original-layout safetensors, or mp_rank_00_model_states.pt (needs torch)",
                "bf16", "norms and small embedders stay fp32", True),
    "wan-vae": ("Wan VAE (Wan2.1 z=16, Wan2.2 z=48)",
                "local checkpoint: diffusers vae/ folder (or pipeline with vae/), or "
                "Wan2.1_VAE.pth / Wan2.2_VAE.pth (needs torch) or a folder holding one",
                "fp32", "the reference runs the VAE in fp32", False),
    "hunyuan-vae": ("HunyuanVideo VAE",
                    "local checkpoint: diffusers vae/ folder (or pipeline with vae/), or the "
                    "original vae/ folder with pytorch_model.pt + config.json (needs torch)",
                    "fp32", "the reference runs the VAE in fp32", False),
    "umt5": ("Wan's UMT5-XXL text encoder",
             "local checkpoint: transformers text_encoder/ folder (or pipeline with "
             "text_encoder/), or models_t5_umt5-xxl-enc-bf16.pth (needs torch) or a folder "
             "holding one", "bf16", "Wan runs it in bf16", False),
    "llama": ("HunyuanVideo's Llama text encoder (LLaVA-Llama-3-8B language model)",
              "local checkpoint: transformers LlamaModel / LLaVA save (text_encoder/, or "
              "pipeline with text_encoder/)", "bf16",
              "the pipeline runs it in its DiT dtype (HunyuanVideo: fp16)", False),
    "clip": ("HunyuanVideo's CLIP-L text encoder",
             "local checkpoint: transformers CLIPTextModel save (text_encoder_2/, or pipeline "
             "with text_encoder_2/)", "bf16",
             "the pipeline runs it in its DiT dtype (HunyuanVideo: fp16)", False),
}


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="svg-ear-convert", description=__doc__.split("\n")[0])
  sub = parser.add_subparsers(dest="model", required=True)
  for name, (help_, src_help, dtype, dtype_help, variant) in COMMANDS.items():
    cmd = sub.add_parser(name, help=help_)
    cmd.add_argument("src", help=src_help)
    cmd.add_argument("dst", help="output folder (must not exist unless --overwrite)")
    cmd.add_argument("--dtype", default=dtype, choices=DTYPES,
                     help=f"weight dtype of the output; {dtype_help} (default: {dtype})")
    if variant:
      known = "t2v-a14b, i2v-a14b, ti2v-5b" if name == "wan" else "t2v-720p"
      cmd.add_argument("--variant", default=None,
                       help=f"expected variant ({known}); default: inferred")
    cmd.add_argument("--overwrite", action="store_true", help="replace an existing DST")
    cmd.add_argument("--quiet", action="store_true", help="no progress bar")
  return parser


def _converter(model: str):
  if model == "wan":
    from models.wan.convert import convert
  elif model == "hunyuan":
    from models.hunyuan.convert import convert
  elif model == "wan-vae":
    from models.wan.vae_convert import convert
  elif model == "hunyuan-vae":
    from models.hunyuan.vae_convert import convert
  elif model == "llama":
    from models.hunyuan.text_convert import convert_llama as convert
  elif model == "clip":
    from models.hunyuan.text_convert import convert_clip as convert
  else:
    from models.wan.umt5_convert import convert
  return convert


def main(argv: Optional[List[str]] = None) -> int:
  """Entry point; returns the exit status (0 ok, 1 conversion error, 2 usage error)."""
  args = _parser().parse_args(argv)
  convert = _converter(args.model)
  kw = dict(dtype=args.dtype, overwrite=args.overwrite, progress=not args.quiet)
  if COMMANDS[args.model][4]:
    kw["variant"] = args.variant
  try:
    dst = convert(args.src, args.dst, **kw)
  except (CheckpointError, FileExistsError, ValueError) as err:
    print(f"svg-ear-convert: error: {err}", file=sys.stderr)
    return 1
  print(f"wrote {dst}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
