#!/usr/bin/env bash
# Nsight Compute profiles of the Mosaic sparse kernel (and of jax's dense Mosaic flash
# attention, its ceiling) on the kernel benchmark's Wan 720p problem, on the GPU machine:
#
#   bash benchmarks/profile_ncu.sh OUTDIR [VARIANT ...]      (default: shipped one_producer dense)
#
# VARIANT: a `python -m benchmarks.kernels profile` name (shipped, one_producer, chunk8,
# sorted, dense). Per variant: OUTDIR/ncu_VARIANT.ncu-rep and a text report
# OUTDIR/ncu_VARIANT.txt of the second call's kernel (the first compiles and warms L2):
# speed of light, memory workload (L2 hit rates, DRAM bytes), warp states (stall reasons),
# scheduler, compute (tensor pipe), occupancy and launch statistics. --clock-control none
# leaves the clocks alone (the device notes say so); a replayed kernel saves and restores
# the memory it writes, so each variant takes ~1-2 minutes.
set -euo pipefail
OUTDIR=${1:?usage: profile_ncu.sh OUTDIR [VARIANT ...]}
shift
VARIANTS=${*:-shipped one_producer dense}
NCU=${NCU:-ncu}
mkdir -p "$OUTDIR"
for v in $VARIANTS; do
  # the dense kernel's name differs; "mosaic_gpu" matches both Mosaic GPU kernels, and the
  # tables' Triton kernels (chunk lists) are named svg_ear_*
  PYTHONPATH=. "$NCU" --clock-control none --kernel-name regex:mosaic_gpu \
      --launch-skip 1 --launch-count 1 \
      --section SpeedOfLight --section MemoryWorkloadAnalysis \
      --section MemoryWorkloadAnalysis_Chart --section WarpStateStats \
      --section SchedulerStats --section ComputeWorkloadAnalysis --section Occupancy \
      --section LaunchStats --section SourceCounters \
      -o "$OUTDIR/ncu_$v" -f python3 -m benchmarks.kernels profile "$v"
  "$NCU" -i "$OUTDIR/ncu_$v.ncu-rep" --page details > "$OUTDIR/ncu_$v.txt"
  grep -E "Duration|Memory Throughput|L2 Hit Rate|L1/TEX Hit Rate|DRAM Throughput|Compute \(SM\) Throughput|Registers Per Thread|Achieved Occupancy|Stall" \
      "$OUTDIR/ncu_$v.txt" | head -40 || true
done
