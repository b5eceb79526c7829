#!/usr/bin/env bash
# Every GPU measurement the perf docs lack, in <= 8 minutes: one markdown block for perf/RESULTS.md.
#   bash perf/gpu_all.sh              on a GPU (writes perf/gpu_all.md and prints it)
#   bash perf/gpu_all.sh --dry-run    every row at tiny sizes on the CPU
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec python perf/gpu_all.py "$@"
