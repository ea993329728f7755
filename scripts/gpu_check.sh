#!/usr/bin/env bash
# GPU check (at most 8 minutes on an H200): float64 comparisons of the training steps on the device
# against the CPU, the chunked losses, the precision modes, every method through the real scripts,
# kill-and-resume, and speed figures. One PASS/FAIL/SKIP line per check; exit status 1 if any fails.
#
#   bash scripts/gpu_check.sh                 # device cuda
#   bash scripts/gpu_check.sh cuda:1
#   bash scripts/gpu_check.sh cpu --quick     # a dry run of the check itself on the CPU
#
# Every further argument goes to scripts/gpu_check.py (see its --help). A hard stop at 9 minutes
# backs up the script's own 8-minute budget.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
device=cuda
if [[ $# -gt 0 && $1 != -* ]]; then
  device=$1
  shift
fi
timeout -k 10 540 python scripts/gpu_check.py --device "$device" "$@"
status=$?
if [[ $status -eq 124 || $status -eq 137 ]]; then
  echo "FAIL gpu_check: stopped after 9 minutes (its budget is 8)"
fi
exit $status
