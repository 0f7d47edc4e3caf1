#!/usr/bin/env bash
# First run on Ascend NPUs: FlashKernel and every context-parallel algorithm against the blockwise kernel; prints
# one table of relative errors (forward out/lse, backward dq/dk/dv) and exits 1 if one exceeds the tolerance.
#
#   scripts/ascend_selfcheck.sh [--python PY] [--devices N] [--seq-len S] [--output-dir DIR] [--port P] [--dry-run]
#
# --python:  the Python of the environment holding mindspore, mindformers and mf_longseq (default: $PYTHON, else
#            python3 on PATH); msrun starts the ranks with it.
# --devices: NPUs of this node used as one CP group (default 8; 1 runs the kernel checks only).
# --dry-run: print the msrun command, then run rank 0's checks in this process without msrun: under the
#            test-only fake CANN (MS_SIMULATION_LEVEL, RANK_SIZE set by its env.sh) every check, else the kernel
#            checks only.
# Every other flag: python -m mf_longseq.tools.ascend_selfcheck --help.
set -euo pipefail
PY="${PYTHON:-python3}"
ARGS=()
while [[ $# -gt 0 ]]; do
  if [[ "$1" == "--python" ]]; then PY="${2:?--python needs a value}"; shift 2; else ARGS+=("$1"); shift; fi
done
if ! PY_PATH="$(command -v "$PY")"; then
  echo "ascend_selfcheck.sh: python '$PY' not found. Fix: pass --python /path/to/venv/bin/python" >&2
  exit 2
fi
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export GLOG_v="${GLOG_v:-3}"
exec "$PY_PATH" -m mf_longseq.tools.ascend_selfcheck --launch ${ARGS[@]+"${ARGS[@]}"}
