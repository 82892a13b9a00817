"""The PyTorch peer of benchmarks/model.py: the same dense forward in diffusers, same card.

Run in its own process (JAX preallocates GPU memory), then pass its JSON to
`benchmarks.model --peer-json`. Random bf16 weights, SDPA attention, CUDA events.

  python benchmarks/model_diffusers_peer.py --model wan --out /tmp/peer_wan.json
  python benchmarks/model_diffusers_peer.py --model wan --preset tiny --out /tmp/peer.json  # CPU
"""

import argparse
import json
import statistics
import sys
import time

import torch

# The DiTs need nothing from transformers or peft, and a transformers release newer than
# the diffusers one breaks `import diffusers.loaders.peft` (seen on the H100 image:
# transformers 5.17 with diffusers 0.42.1). find_spec() is None for a None entry, so
# diffusers treats both as absent.
for _name in ("transformers", "peft"):
  sys.modules.setdefault(_name, None)

SHAPES = {"wan": {"full": ((16, 21, 90, 160), 512), "tiny": ((4, 3, 8, 8), 8)},
          "hunyuan": {"full": ((16, 33, 90, 160), 256), "tiny": ((4, 3, 8, 8), 8)}}


def build(model_name, preset, device, dtype):
  import diffusers
  if model_name == "wan":
    kw = {} if preset == "full" else dict(num_layers=2, num_attention_heads=2, attention_head_dim=16,
                                           ffn_dim=32, in_channels=4, out_channels=4, text_dim=16,
                                           freq_dim=256, rope_max_seq_len=32)
    if preset == "full":  # Wan2.2 T2V-A14B expert
      kw = dict(num_layers=40, num_attention_heads=40, attention_head_dim=128, ffn_dim=13824,
                in_channels=16, out_channels=16, text_dim=4096, freq_dim=256)
    with torch.device("meta"):
      model = diffusers.WanTransformer3DModel(**kw)
  else:
    kw = {} if preset == "full" else dict(num_layers=2, num_single_layers=2, num_refiner_layers=1,
                                           num_attention_heads=2, attention_head_dim=12,
                                           in_channels=4, out_channels=4, text_embed_dim=16,
                                           pooled_projection_dim=8, rope_axes_dim=(4, 4, 4))
    with torch.device("meta"):
      model = diffusers.HunyuanVideoTransformer3DModel(**kw)
  model = model.to_empty(device=device).to(dtype)
  # what from_pretrained(torch_dtype=bf16) keeps in float32 (norms, time embedding, ...)
  keep = getattr(model, "_keep_in_fp32_modules", None) or []
  for name, module in model.named_modules():
    if any(k in name.split(".") for k in keep):
      module.float()
  for name, param in model.named_parameters():
    if any(k in name.split(".") for k in keep):
      param.data = param.data.float()
  with torch.no_grad():
    for p in model.parameters():
      p.normal_(0.0, 0.02)
  return model.eval()


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model", choices=["wan", "hunyuan"], default="wan")
  parser.add_argument("--preset", choices=["full", "tiny"], default="full")
  parser.add_argument("--iters", type=int, default=3)
  parser.add_argument("--out", required=True)
  args = parser.parse_args()
  device = "cuda" if torch.cuda.is_available() else "cpu"
  dtype = torch.bfloat16 if device == "cuda" else torch.float32
  model = build(args.model, args.preset, device, dtype)
  (c, f, h, w), text = SHAPES[args.model][args.preset]
  cfg = model.config
  x = torch.randn(1, cfg.in_channels, f, h, w, device=device, dtype=dtype)
  t = torch.tensor([500.0], device=device)
  text_dim = cfg.text_dim if args.model == "wan" else cfg.text_embed_dim
  ctx = torch.randn(1, text, text_dim, device=device, dtype=dtype)
  kwargs = dict(hidden_states=x, timestep=t, encoder_hidden_states=ctx, return_dict=False)
  if args.model == "hunyuan":
    mask = torch.ones(1, text, device=device, dtype=torch.int64)
    mask[:, text // 2:] = 0
    kwargs.update(encoder_attention_mask=mask, guidance=torch.tensor([6000.0], device=device),
                  pooled_projections=torch.randn(1, cfg.pooled_projection_dim, device=device,
                                                 dtype=dtype))
  times = []
  with torch.no_grad():
    model(**kwargs)
    for _ in range(args.iters):
      if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        model(**kwargs)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
      else:
        t0 = time.perf_counter()
        model(**kwargs)
        times.append((time.perf_counter() - t0) * 1e3)
  row = dict(framework="diffusers", torch=torch.__version__, model=args.model, preset=args.preset,
             device=torch.cuda.get_device_name() if device == "cuda" else "cpu",
             forward_ms=statistics.median(times),
             peak_mem_gb=torch.cuda.max_memory_allocated() / 1e9 if device == "cuda" else None)
  with open(args.out, "w") as fh:
    json.dump(row, fh, indent=1)
  print(json.dumps(row))


if __name__ == "__main__":
  main()
