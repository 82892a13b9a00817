"""`svg-ear-compare`: Sparse-VideoGen's video quality metrics of two video files.

  svg-ear-compare A.mp4 B.mp4 [--lpips-vgg VGG16 --lpips-heads HEADS] [--lpips-normalize]
                  [--json OUT]

Prints PSNR, SSIM (SVG's definitions, mean over frames, after decoding the mp4s) and
LPIPS-VGG when both local weight files are given (torchvision vgg16 state dict and lpips'
v0.1 `vgg.pth`, each as .pth (needs torch), .safetensors or .npz); otherwise LPIPS is reported
as skipped. Nothing is downloaded. `--json` also writes the numbers to OUT (PSNR of identical
videos as the string "inf").
"""

import argparse
import json
import math
import pathlib
import sys
from typing import List, Optional


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="svg-ear-compare", description=__doc__.split("\n")[0])
  parser.add_argument("video_a", help="reference video (e.g. dense attention)")
  parser.add_argument("video_b", help="video to compare (e.g. sparse attention)")
  parser.add_argument("--lpips-vgg", default=None, metavar="PATH",
                      help="torchvision vgg16 ImageNet state dict (.pth/.safetensors/.npz)")
  parser.add_argument("--lpips-heads", default=None, metavar="PATH",
                      help="lpips v0.1 linear heads, lpips/weights/v0.1/vgg.pth "
                      "(.pth/.safetensors/.npz)")
  parser.add_argument("--lpips-normalize", action="store_true",
                      help="map frames to [-1, 1] before LPIPS (default: feed [0, 1] as SVG does)")
  parser.add_argument("--json", default=None, metavar="OUT", help="also write the results here")
  return parser


def _table(result) -> str:
  psnr = result["psnr"]
  lpips = result["lpips"]
  rows = [
      ("videos", f"{result['path_a']}  vs  {result['path_b']}"),
      ("frames", f"{result['frames']} x {result['height']}x{result['width']}"),
      ("MSE", f"{result['mse']:.6g}"),
      ("PSNR", "inf dB" if math.isinf(psnr) else f"{psnr:.4f} dB"),
      ("SSIM", f"{result['ssim']:.6f}"),
      ("LPIPS", f"{result['lpips_skipped']} (pass --lpips-vgg and --lpips-heads)"
       if lpips is None else f"{lpips:.6f}"),
  ]
  width = max(len(name) for name, _ in rows)
  return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def _jsonable(result):
  return {k: ("inf" if isinstance(v, float) and math.isinf(v) else v) for k, v in result.items()}


def main(argv: Optional[List[str]] = None) -> int:
  """Entry point; returns the exit status (0 ok, 1 input error, 2 usage error)."""
  args = _parser().parse_args(argv)
  if (args.lpips_vgg is None) != (args.lpips_heads is None):
    print("svg-ear-compare: error: --lpips-vgg and --lpips-heads go together", file=sys.stderr)
    return 2
  from models.video_metrics import compare_video_files

  try:
    result = compare_video_files(args.video_a, args.video_b, lpips_vgg=args.lpips_vgg,
                                 lpips_heads=args.lpips_heads,
                                 lpips_normalize=args.lpips_normalize)
  except (FileNotFoundError, ImportError, ValueError, TypeError) as err:
    print(f"svg-ear-compare: error: {err}", file=sys.stderr)
    return 1
  result["lpips_normalize"] = bool(args.lpips_normalize)
  print(_table(result))
  if args.json is not None:
    out = pathlib.Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(_jsonable(result), indent=2) + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
