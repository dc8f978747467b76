#!/usr/bin/env bash
# One prepared GPU session, about 9 minutes on an H100 by its stage limits:
#   tests      the test suite compiled on the GPU (no interpreter)             <= 120 s
#   sanitizer  compute-sanitizer memcheck on a small tritonbn run, relu and
#              relu(bn(x) + z) (the mask's write and read)                     <=  60 s
#   tune       tritonbn tune, resnet50 batch 256, fp16 channels_last, into
#              OUTDIR/tuning-cache; exported to OUTDIR/configs/<gpu>.json     <= 100 s
#   bench      resnet50 batch 256, the issue-3 target (fp16 channels_last
#              bn_relu; tritonbn tuned, tritonbn heuristic, torch, compile)   <= 110 s
#   residual   bench bn_add_relu, relu(bn(x) + z) with dz, against torch's
#              unfused torch.relu(bn(x) + z): resnet50 (batch 256, then 32),
#              channels_last, fp16 and bf16, tritonbn vs torch                <=  55 s
#   compiled   a compiled (Inductor, fullgraph) ResNet-style training step,
#              tritonbn.convert vs torch BatchNorm, bf16 autocast             <=  45 s
#   quick      bench quick, every dtype/layout, the default ops (bn, bn_relu,
#              bn_add_relu), tritonbn vs torch                                <=  35 s
#   report     the report (Markdown + PNG) from the JSON                       <=  15 s
# Writes OUTDIR/<date>-<gpu>.json, OUTDIR/report/ and a log per stage. Nothing to install.
# Usage: perf/gpu_check.sh OUTDIR [STAGE ...]   (default: every stage, in that order;
#        name stages to rerun only those, e.g. `perf/gpu_check.sh OUT bench report`)
set -uo pipefail
out=${1:?usage: perf/gpu_check.sh OUTDIR [STAGE ...]}
shift
stages=" ${*:-tests sanitizer tune bench residual compiled quick report} "
mkdir -p "$out"
cd "$(dirname "$0")/.."
unset TRITON_INTERPRET
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TRITONBN_CACHE_DIR="$out/tuning-cache"   # tuned configs come back with OUTDIR
status=0
want() { [[ "$stages" == *" $1 "* ]]; }
stage() { echo "== $1 ($(date +%T))"; }
nvidia-smi > "$out/nvidia-smi.txt" 2>&1
python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())" | tee "$out/env.txt"
name=$(python3 -c "import datetime, re, torch; print(datetime.date.today().isoformat() + '-' + re.sub('[^a-z0-9]+', '-', torch.cuda.get_device_name().lower()).strip('-'))")
slug=${name#????-??-??-}
json="$out/$name.json"

if want tests; then
    stage "tests on the GPU (compiled, no interpreter)"
    par=""; python3 -c "import xdist" 2>/dev/null && par="-n 8"   # kernel compiles in parallel
    timeout 120 python3 -m pytest -q $par -p no:cacheprovider tests 2>&1 | tee "$out/pytest_gpu.log" | tail -8
    [ "${PIPESTATUS[0]}" = 0 ] || status=1
fi

if want sanitizer; then
    stage "compute-sanitizer memcheck (small shapes)"
    timeout 60 compute-sanitizer --tool memcheck --error-exitcode 9 \
        python3 perf/check_realistic.py --small --out "$out/sanitizer_small.json" > "$out/sanitizer.log" 2>&1
    rc=$?; echo "compute-sanitizer rc=$rc"; tail -3 "$out/sanitizer.log"
    [ "$rc" = 0 ] || status=1
fi

if want tune; then
    stage "tune resnet50/b256 fp16 channels_last (tuned vs heuristic per kernel)"
    mkdir -p "$out/configs"
    timeout 100 python3 -m tritonbn tune --shapes resnet50/b256 --dtype float16 --layout channels_last \
        --budget-s 75 --warmup-ms 2 --rep-ms 10 --no-progress --export "$out/configs/$slug.json" 2>&1 \
        | tee "$out/tune.log" | tail -30
    [ "${PIPESTATUS[0]}" = 0 ] || status=1
fi

bench() { python3 -m tritonbn bench --out "$json" --append --warmup-ms 10 --rep-ms 40 "$@"; }
if want bench; then
    stage "bench resnet50/b256: fp16 channels_last bn_relu, tritonbn (tuned, heuristic) / torch / torch.compile"
    timeout 110 bench --shapes resnet50/b256 --dtypes float16 --layouts channels_last --ops bn_relu \
        --impls tritonbn,tritonbn_heuristic,torch,torch_compile --budget-s 85 2>&1 \
        | tee "$out/bench_resnet50.log" | tail -12
    [ "${PIPESTATUS[0]}" = 0 ] || status=1
fi

if want residual; then
    stage "bench resnet50 bn_add_relu: channels_last fp16 + bf16, tritonbn / torch relu(bn(x) + z)"
    timeout 55 bench --shapes resnet50 --dtypes float16,bfloat16 --layouts channels_last \
        --ops bn_add_relu --impls tritonbn,torch --budget-s 40 2>&1 \
        | tee "$out/bench_residual.log" | tail -12
    [ "${PIPESTATUS[0]}" = 0 ] || status=1
fi

if want compiled; then
    stage "compiled training step (torch.compile fullgraph, Inductor): tritonbn vs torch BatchNorm"
    timeout 45 python3 perf/compiled_step.py --out "$out/compiled_step.json" 2>&1 \
        | tee "$out/compiled_step.log" | tail -4
    [ "${PIPESTATUS[0]}" = 0 ] || status=1
fi

if want quick; then
    stage "bench quick: every dtype and layout, ops bn, bn_relu, bn_add_relu, tritonbn / torch"
    timeout 35 bench --shapes quick --impls tritonbn,torch --budget-s 22 2>&1 \
        | tee "$out/bench_quick.log" | tail -30
    [ "${PIPESTATUS[0]}" = 0 ] || status=1
fi

if want report; then
    stage "report"
    timeout 15 python3 -m tritonbn report "$json" --out "$out/report" 2>&1 | tee "$out/report.log"
    [ "${PIPESTATUS[0]}" = 0 ] || status=1
fi
stage "done, status $status: copy $json, $out/report/ and $out/configs/ to perf/results/ (configs: tritonbn/configs/)"
exit $status
