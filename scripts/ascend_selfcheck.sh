#!/usr/bin/env bash
# First run on Ascend NPUs: FlashKernel and every context-parallel algorithm against the blockwise kernel; prints
# one table of relative errors (forward out/lse, backward dq/dk/dv) and exits 1 if one exceeds the tolerance.
#
#   scripts/ascend_selfcheck.sh [--devices N] [--seq-len S] [--output-dir DIR] [--port P] [--python PY] [--dry-run]
#
# --devices: NPUs of this node used as one CP group (default 8; 1 runs the kernel checks only).
# --python:  the Python of the environment holding mindspore, mindformers and mf_longseq (default: $PYTHON, else
#            python3 on PATH); its bin directory goes first on PATH because msrun starts workers with `python`.
# --dry-run: print the msrun command, then run rank 0's checks in this process without msrun: under the
#            test-only fake CANN (MS_SIMULATION_LEVEL, RANK_SIZE set by its env.sh) every check, else the kernel
#            checks only.
set -euo pipefail

DEVICES=8
SEQ_LEN=8192
OUTPUT_DIR="output/ascend_selfcheck"
PORT=8129
PY="${PYTHON:-python3}"
DRY_RUN=""

usage() { sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --devices) DEVICES="$2"; shift 2 ;;
    --seq-len) SEQ_LEN="$2"; shift 2 ;;
    --output-dir) OUTPUT_DIR="$2"; shift 2 ;;
    --port) PORT="$2"; shift 2 ;;
    --python) PY="$2"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "ascend_selfcheck.sh: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
  esac
done

if ! [[ "$DEVICES" =~ ^[1-9][0-9]*$ ]]; then
  echo "ascend_selfcheck.sh: --devices $DEVICES: must be a positive integer. Fix: e.g. --devices 8" >&2
  exit 2
fi
if ! PY_PATH="$(command -v "$PY")"; then
  echo "ascend_selfcheck.sh: python '$PY' not found. Fix: pass --python /path/to/venv/bin/python" >&2
  exit 2
fi
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PATH="$(dirname "$PY_PATH"):$PATH"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export LOCAL_DEFAULT_PATH="${LOCAL_DEFAULT_PATH:-$OUTPUT_DIR/mindformers_logs}"
export GLOG_v="${GLOG_v:-3}"

CHECK=(-m mf_longseq.tools.ascend_selfcheck --seq-len "$SEQ_LEN" --output-dir "$OUTPUT_DIR")
if [[ "$DEVICES" -gt 1 ]]; then
  CMD=(msrun --worker_num "$DEVICES" --local_worker_num "$DEVICES" --master_port "$PORT"
       --log_dir "$OUTPUT_DIR/msrun_log" --join True "$PY_PATH" "${CHECK[@]}")
else
  CMD=("$PY_PATH" "${CHECK[@]}")
fi
echo "+ ${CMD[*]}"
if [[ -n "$DRY_RUN" ]]; then
  if [[ -z "${MS_SIMULATION_LEVEL:-}" ]]; then CHECK+=(--kernel-only); export RANK_SIZE=1; fi
  echo "dry run: rank 0 in this process${MS_SIMULATION_LEVEL:+ (simulated device, RANK_SIZE=${RANK_SIZE:-1})}"
  exec "$PY_PATH" "${CHECK[@]}"
fi
rm -f "$OUTPUT_DIR"/selfcheck_rank*.json
"${CMD[@]}" || echo "ascend_selfcheck.sh: the checks exited with $?; see $OUTPUT_DIR/msrun_log" >&2
exec "$PY_PATH" -m mf_longseq.tools.ascend_selfcheck --report "$OUTPUT_DIR"
