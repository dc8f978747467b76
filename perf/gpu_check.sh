#!/usr/bin/env bash
# The prepared GPU check: perf/gpu_check.py (its docstring lists the stages and limits).
# Usage: perf/gpu_check.sh OUTDIR [STAGE ...] [--total-s 535] [--dry-run]
#   OUTDIR gets gpu_check.tar.gz (everything, packed after every stage) and summary.txt.
exec python3 "$(dirname "$0")/gpu_check.py" "$@"
