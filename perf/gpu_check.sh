#!/usr/bin/env bash
# One prepared GPU session: tests compiled on the GPU, realistic-shape check,
# compute-sanitizer on a small run. Writes logs and JSON to OUTDIR.
# Usage: perf/gpu_check.sh OUTDIR     (under 8 minutes on an H100 by its timeouts; nothing to install)
# Benchmarks join this script with the perf suite (issue 3).
set -uo pipefail
out=${1:?usage: perf/gpu_check.sh OUTDIR}
mkdir -p "$out"
cd "$(dirname "$0")/.."
unset TRITON_INTERPRET
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
status=0
nvidia-smi > "$out/nvidia-smi.txt" 2>&1
python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())" | tee "$out/env.txt"
echo "== tests on the GPU (compiled, no interpreter)"
par=""; python3 -c "import xdist" 2>/dev/null && par="-n 8"   # kernel compiles in parallel
timeout 240 python3 -m pytest -q $par -p no:cacheprovider tests 2>&1 | tee "$out/pytest_gpu.log" | tail -15
[ "${PIPESTATUS[0]}" = 0 ] || status=1
echo "== realistic shapes"
timeout 90 python3 perf/check_realistic.py --out "$out/realistic.json" 2>&1 | tee "$out/realistic.log" | tail -12
[ "${PIPESTATUS[0]}" = 0 ] || status=1
echo "== compute-sanitizer memcheck (small shapes)"
timeout 120 compute-sanitizer --tool memcheck --error-exitcode 9 \
    python3 perf/check_realistic.py --small --out "$out/sanitizer_small.json" > "$out/sanitizer.log" 2>&1
rc=$?; echo "compute-sanitizer rc=$rc"; tail -5 "$out/sanitizer.log"
[ "$rc" = 0 ] || status=1
exit $status
