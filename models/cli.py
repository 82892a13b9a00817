"""`svg-ear-convert`: converts local PyTorch checkpoints to Flax (Orbax) folders.

  svg-ear-convert wan SRC DST [--dtype bf16] [--variant NAME] [--overwrite] [--quiet]
  svg-ear-convert hunyuan SRC DST [--dtype bf16] [--variant NAME] [--overwrite] [--quiet]

SRC is a local DiT checkpoint: for Wan2.2 a folder in diffusers or original layout (an A14B
folder with `transformer/` + `transformer_2/` or `high_noise_model/` + `low_noise_model/`
converts both experts); for HunyuanVideo a diffusers folder (or pipeline with
`transformer/`), original-layout safetensors, or `mp_rank_00_model_states.pt` (needs
torch). Nothing is downloaded; nothing is left at DST on failure.
"""

import argparse
import sys
from typing import List, Optional

from models.convert_common import CheckpointError


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="svg-ear-convert", description=__doc__.split("\n")[0])
  sub = parser.add_subparsers(dest="model", required=True)
  wan = sub.add_parser("wan", help="Wan2.2 DiT (T2V-A14B, I2V-A14B, TI2V-5B)")
  wan.add_argument("src", help="local source checkpoint folder")
  wan.add_argument("dst", help="output folder (must not exist unless --overwrite)")
  wan.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"],
                   help="weight dtype of the output; norms and modulation stay fp32 "
                   "(default: bf16)")
  wan.add_argument("--variant", default=None,
                   help="expected variant (t2v-a14b, i2v-a14b, ti2v-5b); default: inferred")
  wan.add_argument("--overwrite", action="store_true", help="replace an existing DST")
  wan.add_argument("--quiet", action="store_true", help="no progress bar")
  hy = sub.add_parser("hunyuan", help="HunyuanVideo T2V DiT (13B, guidance-distilled)")
  hy.add_argument("src", help="local checkpoint: diffusers folder (or pipeline with "
                  "transformer/), original-layout safetensors, or mp_rank_00_model_states.pt "
                  "(needs torch)")
  hy.add_argument("dst", help="output folder (must not exist unless --overwrite)")
  hy.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"],
                  help="weight dtype of the output; norms and small embedders stay fp32 "
                  "(default: bf16)")
  hy.add_argument("--variant", default=None, help="expected variant (t2v-720p); default: inferred")
  hy.add_argument("--overwrite", action="store_true", help="replace an existing DST")
  hy.add_argument("--quiet", action="store_true", help="no progress bar")
  return parser


def main(argv: Optional[List[str]] = None) -> int:
  """Entry point; returns the exit status (0 ok, 1 conversion error, 2 usage error)."""
  args = _parser().parse_args(argv)
  if args.model == "wan":
    from models.wan.convert import convert
  else:
    from models.hunyuan.convert import convert
  try:
    dst = convert(args.src, args.dst, dtype=args.dtype, variant=args.variant,
                  overwrite=args.overwrite, progress=not args.quiet)
  except (CheckpointError, FileExistsError, ValueError) as err:
    print(f"svg-ear-convert: error: {err}", file=sys.stderr)
    return 1
  print(f"wrote {dst}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
