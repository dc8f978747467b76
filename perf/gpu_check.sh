#!/usr/bin/env bash
# One prepared GPU session, under 6 minutes on an H100 by its stage limits:
#   1. the test suite compiled on the GPU (no interpreter)                 <= 130 s
#   2. compute-sanitizer memcheck on a small tritonbn run                   <=  45 s
#   3. bench resnet50 batch 256, the issue-3 target (fp16 channels_last
#      bn_relu; tritonbn, torch, torch.compile)                             <= 110 s
#   4. bench quick, every dtype/layout/op, tritonbn vs torch                <=  55 s
#   5. the report (Markdown + PNG) from the JSON                            <=  15 s
# Writes OUTDIR/<date>-<gpu>.json, OUTDIR/report/ and a log per stage. Nothing to install.
# Usage: perf/gpu_check.sh OUTDIR
set -uo pipefail
out=${1:?usage: perf/gpu_check.sh OUTDIR}
mkdir -p "$out"
cd "$(dirname "$0")/.."
unset TRITON_INTERPRET
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
status=0
stage() { echo "== $1 ($(date +%T))"; }
nvidia-smi > "$out/nvidia-smi.txt" 2>&1
python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())" | tee "$out/env.txt"
name=$(python3 -c "import datetime, re, torch; print(datetime.date.today().isoformat() + '-' + re.sub('[^a-z0-9]+', '-', torch.cuda.get_device_name().lower()).strip('-'))")
json="$out/$name.json"

stage "tests on the GPU (compiled, no interpreter)"
par=""; python3 -c "import xdist" 2>/dev/null && par="-n 8"   # kernel compiles in parallel
timeout 130 python3 -m pytest -q $par -p no:cacheprovider tests 2>&1 | tee "$out/pytest_gpu.log" | tail -8
[ "${PIPESTATUS[0]}" = 0 ] || status=1

stage "compute-sanitizer memcheck (small shapes)"
timeout 45 compute-sanitizer --tool memcheck --error-exitcode 9 \
    python3 perf/check_realistic.py --small --out "$out/sanitizer_small.json" > "$out/sanitizer.log" 2>&1
rc=$?; echo "compute-sanitizer rc=$rc"; tail -3 "$out/sanitizer.log"
[ "$rc" = 0 ] || status=1

bench() { python3 -m tritonbn bench --out "$json" --append --warmup-ms 10 --rep-ms 40 "$@"; }
stage "bench resnet50/b256: fp16 channels_last bn_relu, tritonbn / torch / torch.compile"
timeout 110 bench --shapes resnet50/b256 --dtypes float16 --layouts channels_last --ops bn_relu \
    --budget-s 85 2>&1 | tee "$out/bench_resnet50.log" | tail -12
[ "${PIPESTATUS[0]}" = 0 ] || status=1

stage "bench quick: every dtype, layout and op, tritonbn / torch"
timeout 55 bench --shapes quick --impls tritonbn,torch --budget-s 40 2>&1 \
    | tee "$out/bench_quick.log" | tail -22
[ "${PIPESTATUS[0]}" = 0 ] || status=1

stage "report"
timeout 15 python3 -m tritonbn report "$json" --out "$out/report" 2>&1 | tee "$out/report.log"
[ "${PIPESTATUS[0]}" = 0 ] || status=1
stage "done, status $status: copy $json and $out/report/ to perf/results/"
exit $status
