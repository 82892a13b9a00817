#!/usr/bin/env bash
# Assembles the untracked bundle that benchmarks/reference_peer.py needs on the GPU machine
# (which has torch, triton, nvcc 13.0 and ninja, but no network and no flashinfer):
#
#   DEST/svg-ref/svg/...   the reference's SVG-EAR code (svg-project/Sparse-VideoGen), --svg-path
#   DEST/site/flashinfer   FlashInfer FLASHINFER_VERSION as JIT sources (its PyPI sdist laid out as
#                          the wheel would be: python package + data/{include,csrc,cutlass,spdlog})
#   DEST/site/loguru       svg/__init__.py imports it (pure Python, from PyPI)
#   DEST/site/cuvs         a stub: svg/kmeans_utils.py imports cuVS at the top, but only
#                          batch_kmeans_rapidai uses it and SVG-EAR never calls that
#
# Usage (on the CPU machine, from the repository root):
#   EAR_KMEANS_UTILS=/tmp/ref/kmeans_utils_9b81185a.py bash benchmarks/reference_peer_bundle.sh [DEST]
# DEST defaults to tmp/peer in the checkout (ignored by .gitignore's /tmp/, so it never gets
# committed; the device tool's carry brings it). Delete it after the session.
#
# Inputs:
#   EAR_KMEANS_UTILS  svg/kmeans_utils.py of svg-project/Sparse-VideoGen at commit
#     9b81185a8dea0c455258d2250fa19a78654df4e4 (PR #80, EAR kernels). No fetchable snapshot of
#     the upstream repository holds it (the fetch tool's newest is main 5ce7b01, Dec 2025, no
#     EAR): save it from the search tool's read_file (repo svg-project/Sparse-VideoGen, path
#     svg/kmeans_utils.py, that commit; 6 pages of 16,000 characters, 82,391 in all) verbatim.
#     This script checks the length (exact) and the sha256 of the copy made on 2026-12-02.
#   UPSTREAM_GIT  a bare git dir with upstream main through 2026-03-07 (PR #71's runtime FlashInfer
#     patch, PR #74): the fetch tool's github:tie-pilot-qxw/Sparse-VideoGen (its main f0abc563 is
#     the upstream merge of PR #74; 5ce7b01 is an ancestor). svg/__init__.py, flashinfer_patch.py,
#     logger.py come from there; timer.py and kernels/triton/permute.py are the same blobs as
#     upstream 5ce7b01 (checked below when SVG_GIT is there).
#   FLASHINFER_VERSION  0.3.1.post1 by default: the last release before FlashInfer moved to
#     TVM-FFI (0.4.0) whose VariableBlockSparseAttentionWrapper still takes the
#     vector_sparse_indices_buffer the reference passes (removed in 0.6.0), with CUTLASS 4.2 and
#     CUDA 13 in its CI; its Hopper (FA3) prefill kernels are unchanged since the reference's
#     submodule pin 2f62643a (Aug 2025). 0.2.14.post1 is the fallback (CUTLASS 4.0).
#   FLASHINFER_AOT  optional: a folder NAME/NAME.so of modules that an earlier GPU call built and
#     saved (reference_peer.py --save-jit); laid into site/flashinfer/data/aot, FlashInfer loads
#     them as AOT modules and the next call needs no nvcc build.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
DEST=${1:-$REPO/tmp/peer}
EAR_KMEANS_UTILS=${EAR_KMEANS_UTILS:-/tmp/ref/kmeans_utils_9b81185a.py}
EAR_CHARS=82391
EAR_SHA256=7169fd4db968a55c2ffe67bcf19aeebdc3ca0620a9cf18a12c93365a67b07e4d
EAR_COMMIT=9b81185a8dea0c455258d2250fa19a78654df4e4
UPSTREAM_GIT=${UPSTREAM_GIT:-/work/.mirror/tie-pilot-qxw+Sparse-VideoGen/repo}
UPSTREAM_REF=f0abc563a0b6d3ccc0e718fd1fb892d8ed92c77e
SVG_GIT=${SVG_GIT:-/work/.mirror/svg-project+Sparse-VideoGen/repo}
SVG_REF=5ce7b0127c0d44383ee8b9e5512431feb625f621
FLASHINFER_VERSION=${FLASHINFER_VERSION:-0.3.1.post1}
LOGURU_VERSION=${LOGURU_VERSION:-0.7.3}
PIP=${PIP:-"$REPO/.venv/bin/python -m pip"}
CACHE=${CACHE:-/tmp/reference_peer_downloads}
LIMIT_MIB=55

die() { echo "reference_peer_bundle: $*" >&2; exit 1; }

[ -f "$EAR_KMEANS_UTILS" ] || die "EAR_KMEANS_UTILS=$EAR_KMEANS_UTILS is missing (see the header)"
python3 - "$EAR_KMEANS_UTILS" "$EAR_CHARS" "$EAR_SHA256" <<'EOF' || die "EAR_KMEANS_UTILS is not commit 9b81185a's svg/kmeans_utils.py"
import hashlib, sys
path, chars, sha = sys.argv[1], int(sys.argv[2]), sys.argv[3]
text = open(path, encoding="utf-8").read()
compile(text, path, "exec")
need = ["def batch_kmeans_Euclid", "def identify_dynamic_map_estimated", "def scatter_mean_fused",
        "def dynamic_block_sparse_prune_fwd_flashinfer", "def _fused_qc_kernel_opt",
        "def _error_estimation_kernel", "def _precompute_v_stats_kernel"]
missing = [n for n in need if n not in text]
if len(text) != chars or missing:
  sys.exit(f"{len(text)} characters (want {chars}), missing {missing}")
got = hashlib.sha256(open(path, "rb").read()).hexdigest()
if got != sha:
  print(f"warning: sha256 {got} differs from the 2026-12-02 copy's {sha} (same length)")
EOF
git --git-dir="$UPSTREAM_GIT" cat-file -e "$UPSTREAM_REF^{commit}" 2>/dev/null \
  || die "UPSTREAM_GIT=$UPSTREAM_GIT lacks $UPSTREAM_REF (fetch github:tie-pilot-qxw/Sparse-VideoGen)"

rm -rf "$DEST"
mkdir -p "$DEST/svg-ref" "$DEST/site" "$CACHE"

# --- the reference ---------------------------------------------------------------------------
git --git-dir="$UPSTREAM_GIT" archive "$UPSTREAM_REF" LICENSE.txt svg/__init__.py \
    svg/flashinfer_patch.py svg/logger.py svg/timer.py svg/kernels/triton/__init__.py \
    svg/kernels/triton/permute.py | tar -x -C "$DEST/svg-ref"
if git --git-dir="$SVG_GIT" cat-file -e "$SVG_REF^{commit}" 2>/dev/null; then
  for f in svg/timer.py svg/kernels/triton/permute.py; do
    [ "$(git --git-dir="$UPSTREAM_GIT" rev-parse "$UPSTREAM_REF:$f")" = \
      "$(git --git-dir="$SVG_GIT" rev-parse "$SVG_REF:$f")" ] || die "$f differs from upstream $SVG_REF"
  done
fi
cp "$EAR_KMEANS_UTILS" "$DEST/svg-ref/svg/kmeans_utils.py"
cat > "$DEST/svg-ref/PROVENANCE.json" <<EOF
{"repository": "svg-project/Sparse-VideoGen",
 "svg/kmeans_utils.py": "$EAR_COMMIT (PR #80, SVG-EAR kernels; saved through read_file)",
 "svg/__init__.py svg/flashinfer_patch.py svg/logger.py": "upstream main at $UPSTREAM_REF (2026-03-07, via the tie-pilot-qxw fork)",
 "svg/timer.py svg/kernels/triton/permute.py": "upstream $SVG_REF (same blobs at $UPSTREAM_REF)",
 "processor call sequence": "WanAttn_EARAttn_Processor.attention_core_logic, dyxg/SVG-EAR@0fa88b229febbf1111b743eb291f30e397692ee7 svg/models/wan/attention.py (re-stated in benchmarks/reference_peer.py)",
 "flashinfer": "$FLASHINFER_VERSION (PyPI sdist, JIT)"}
EOF

# --- FlashInfer, laid out as its wheel would be ------------------------------------------------
SDIST="$CACHE/flashinfer_python-$FLASHINFER_VERSION.tar.gz"
[ -f "$SDIST" ] || $PIP download --no-deps -d "$CACHE" "flashinfer-python==$FLASHINFER_VERSION"
rm -rf "$CACHE/src" && mkdir -p "$CACHE/src" && tar -xzf "$SDIST" -C "$CACHE/src"
SRC="$CACHE/src/flashinfer_python-$FLASHINFER_VERSION"
FI="$DEST/site/flashinfer"
cp -r "$SRC/flashinfer" "$FI"
mkdir -p "$FI/data/cutlass/tools/util" "$FI/data/spdlog"
cp -r "$SRC/include" "$SRC/version.txt" "$FI/data/"
cp -r "$SRC/csrc" "$FI/data/csrc"
rm -rf "$FI/data/csrc/nv_internal"  # TensorRT-LLM kernels: nothing the prefill / page modules include
cp -r "$SRC/3rdparty/cutlass/include" "$FI/data/cutlass/include"
cp -r "$SRC/3rdparty/cutlass/tools/util/include" "$FI/data/cutlass/tools/util/include"
cp -r "$SRC/3rdparty/spdlog/include" "$FI/data/spdlog/include"
cp "$SRC/LICENSE" "$FI/LICENSE"
if [ -n "${FLASHINFER_AOT:-}" ]; then
  [ -d "$FLASHINFER_AOT" ] || die "FLASHINFER_AOT=$FLASHINFER_AOT is not a folder"
  mkdir -p "$FI/data/aot" && cp -r "$FLASHINFER_AOT"/. "$FI/data/aot/"
  echo "AOT modules: $(ls "$FI/data/aot" | tr '\n' ' ')"
fi
grep -q "vector_sparse_indices_buffer" "$FI/sparse.py" \
  || die "flashinfer $FLASHINFER_VERSION's VariableBlockSparseAttentionWrapper lacks vector_sparse_indices_buffer"

# --- loguru, and the cuVS stub ---------------------------------------------------------------
WHL="$CACHE/loguru-$LOGURU_VERSION-py3-none-any.whl"
[ -f "$WHL" ] || $PIP download --no-deps -d "$CACHE" "loguru==$LOGURU_VERSION"
python3 -c "import sys, zipfile; z = zipfile.ZipFile(sys.argv[1]); \
z.extractall(sys.argv[2], [n for n in z.namelist() if n.startswith('loguru/')])" "$WHL" "$DEST/site"
mkdir -p "$DEST/site/cuvs/cluster"
: > "$DEST/site/cuvs/__init__.py"
: > "$DEST/site/cuvs/cluster/__init__.py"
cat > "$DEST/site/cuvs/cluster/kmeans.py" <<'EOF'
"""Stub for svg/kmeans_utils.py's top-level `from cuvs.cluster.kmeans import KMeansParams, fit`
(cuVS is CUDA 12 only); only batch_kmeans_rapidai calls them, and SVG-EAR never does."""


class KMeansParams:
  def __init__(self, *args, **kwargs):
    raise RuntimeError("cuVS is not in the reference_peer bundle (not on SVG-EAR's path)")


def fit(*args, **kwargs):
  raise RuntimeError("cuVS is not in the reference_peer bundle (not on SVG-EAR's path)")
EOF
find "$DEST" -name __pycache__ -prune -exec rm -rf {} +

# --- sizes -----------------------------------------------------------------------------------
bytes() { du -sb "$1" | cut -f1; }
total=$(bytes "$DEST")
echo "bundle $DEST: $total bytes ($((total / 1048576)) MiB, $(find "$DEST" -type f | wc -l) files)"
for p in "$DEST/svg-ref" "$FI" "$FI/data/cutlass" "$FI/data/include" "$FI/data/csrc" \
         "$DEST/site/loguru" "$DEST/site/cuvs"; do
  echo "  $(bytes "$p") ${p#$DEST/}"
done
tree=$(cd "$REPO" && git ls-files -z --cached --others --exclude-standard | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
echo "working tree that travels anyway: $tree bytes; both: $(((total + tree) / 1048576)) MiB of the 64 MiB a call carries"
[ "$total" -le $((LIMIT_MIB * 1048576)) ] || die "bundle is over $LIMIT_MIB MiB"

rel=${DEST#$REPO/}
cat <<EOF

On the GPU machine (device tool, carry ["$rel"]; a command has 600 s). Call 1 JIT-builds
FlashInfer's FA3 batch-prefill module (bf16, head dim 128; the page module is not needed: page
size 1) with nvcc, times Wan 720p and saves the module:
  TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS=16 FLASHINFER_WORKSPACE_BASE=\$PWD/tmp/peer-jit \\
    python3 benchmarks/reference_peer.py --svg-path $rel/svg-ref --site $rel/site \\
    --shapes smoke wan22_720p --save-jit \$OUT/flashinfer-aot --out \$OUT/reference_peer_wan720.json
Then here, with the returned files: FLASHINFER_AOT=<files_at>/flashinfer-aot \\
  EAR_KMEANS_UTILS=$EAR_KMEANS_UTILS bash benchmarks/reference_peer_bundle.sh $DEST
Call 2 (the module loads as AOT, no build):
  python3 benchmarks/reference_peer.py --svg-path $rel/svg-ref --site $rel/site \\
    --shapes wan22_480p hunyuan_720p --out \$OUT/reference_peer_rest.json
EOF
