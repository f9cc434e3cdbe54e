#!/usr/bin/env bash
# The prepared device check for a session that is lent a GPU (see BENCHMARKS.md, "GPU").
# Two parts, each within one 10-minute device call; everything lands in $OUT (default ./gpu-out):
#
#   bash loadtests/gpu_check.sh tests   # GPU-only tests: Triton kernels compiled for real,
#                                       # CUDA-graph sampling, backends agreeing with eager
#   bash loadtests/gpu_check.sh bench   # python -m loadtests.bench --preset gpu (8-min budget)
#
# The device machine cannot reach the network: torch with CUDA must already be installed
# there; the rest of the test extra is installed from the working tree when missing.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu-out}"
mkdir -p "$OUT"
part="${1:-tests}"

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
} 2>&1 | tee "$OUT/machine.txt"

python3 -c "import fastapi, safetensors, pytest" 2>/dev/null ||
  python3 -m pip install -q --no-deps -e . 2>&1 | tail -2

case "$part" in
  tests)
    # Everything CUDA-gated is skipped on the CPU; here it runs.
    timeout 540 python3 -m pytest -q -x -p no:cacheprovider \
      tests/test_kernels.py tests/test_backends.py tests/test_sampling.py \
      2>&1 | tee "$OUT/gpu-tests.txt"
    ;;
  bench)
    timeout 560 python3 -m loadtests.bench --preset gpu --out "$OUT/bench-gpu" \
      2>&1 | tee "$OUT/bench-gpu.log"
    ;;
  *)
    echo "usage: $0 tests|bench" >&2
    exit 2
    ;;
esac
