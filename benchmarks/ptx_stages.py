"""Where ptxas will serialize a kernel's wgmmas: its warning C7513 ("wgmma.mma_async
instructions are serialized due to non wgmma instructions defining input registers of a
wgmma between start and end of the pipeline stage") names no instruction, and it costs the
whole kernel (benchmarks/results/kernels_h100.md, session 17: 29% slower). This reads a
PTX dump (MOSAIC_GPU_DUMP_TO=DIR MOSAIC_GPU_DUMP_PTX=1 on the GPU machine) and lists, per
pipeline stage (from a wgmma.mma_async to the wgmma.wait_group 0 after it), the non-wgmma
instructions that define a 32-bit register a wgmma of the stage reads:

- one already issued (its operand or accumulator changes under it: session 17's run 1,
  warned);
- a later wgmma's A operand (copies of it between two wgmmas: run 2, warned even with a
  wgmma.fence before the reader);
- a later wgmma's accumulator with no wgmma.fence before that wgmma. (The shipped kernel
  zeroes the next q.k accumulator between the P.V wgmma and its wait, then fences: no
  warning; so that pattern is not listed.)

These rules are what the three kernels of session 17 showed, not ptxas's documentation.
64-bit registers (the shared-memory descriptors, computed between the wgmmas of every
kernel) are left out.

  python -m benchmarks.ptx_stages DIR/entry_0.ptx
"""

import dataclasses
import re
import sys

_REG = re.compile(r"%r\d+\b")
_GROUP = re.compile(r"\{([^{}]*)\}")
# an instruction's destination: its first operand (after an optional guard predicate)
_DEST = re.compile(r"^(?:@!?%p\d+\s+)?[a-z][\w.]*\s+(%r\d+)\b")


@dataclasses.dataclass(frozen=True)
class Hazard:
  """A non-wgmma instruction at `line` (1-based) defining `register`, which the wgmma at
  `wgmma_line` of the same stage reads."""
  line: int
  register: str
  wgmma_line: int
  text: str


def _operands(line):
  """A wgmma.mma_async line's (accumulator registers, A-operand registers): its first
  brace group after the opcode, and the second when A comes from registers."""
  body = line[line.index("wgmma.mma_async"):]
  groups = [set(_REG.findall(g)) for g in _GROUP.findall(body)]
  return groups[0], (groups[1] if len(groups) > 1 else set())


def stage_hazards(ptx: str) -> list:
  """[(stage start line, stage end line, [Hazard])] for the stages with hazards."""
  lines = ptx.split("\n")
  out, start, wgmmas = [], None, []
  for idx, line in enumerate(lines):
    if "wgmma.mma_async" in line:
      start = idx if start is None else start
      wgmmas.append((idx, *_operands(line)))
    elif "wgmma.wait_group.sync.aligned 0" in line and start is not None:
      fences = [j for j in range(start, idx) if "wgmma.fence" in lines[j]]
      found = []
      for j in range(start, idx):
        text = lines[j].strip()
        m = None if "wgmma" in text or text.startswith("//") else _DEST.match(text)
        if not m:
          continue
        reg = m.group(1)
        for w, acc, a in wgmmas:
          fenced = any(j < f < w for f in fences)
          if (reg in acc or reg in a) and (w < j or reg in a or not fenced):
            found.append(Hazard(j + 1, reg, w + 1, text))
            break
      if found:
        out.append((start + 1, idx + 1, found))
      start, wgmmas = None, []
  return out


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  if len(argv) != 1:
    raise SystemExit("usage: python -m benchmarks.ptx_stages FILE.ptx")
  with open(argv[0]) as f:
    stages = stage_hazards(f.read())
  if not stages:
    print("no non-wgmma definition of a wgmma input inside a pipeline stage")
  for start, end, found in stages:
    print(f"stage at lines {start}-{end}: {len(found)} definitions")
    for h in found[:8]:
      print(f"  line {h.line}: {h.text[:90]}  (read by the wgmma at line {h.wgmma_line})")


if __name__ == "__main__":
  main()
