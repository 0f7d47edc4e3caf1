#!/usr/bin/env bash
# CPU demo of mf_longseq: a tiny LLaMA2 at S = 8192, CP = 2 (ring attention, zigzag layout) on 2 msrun CPU
# workers, 20 training steps; prints the loss per step, tokens/s and the peak memory of each rank.
#
#   scripts/demo_cpu.sh [--steps N] [--seq-len S] [--output-dir DIR] [--port P] [--python PY] [--dry-run]
#
# --python: the Python of the environment holding mindspore and mindformers (default: $PYTHON, else the
#           python3 on PATH); its bin directory goes first on PATH because msrun starts workers with `python`.
# --dry-run: print the demo config and the msrun command, run nothing.
set -euo pipefail

STEPS=20
SEQ_LEN=8192
OUTPUT_DIR="output/mf_longseq_demo"
PORT=""
PY="${PYTHON:-python3}"
DRY_RUN=""

usage() { sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --steps) STEPS="$2"; shift 2 ;;
    --seq-len) SEQ_LEN="$2"; shift 2 ;;
    --output-dir) OUTPUT_DIR="$2"; shift 2 ;;
    --port) PORT="$2"; shift 2 ;;
    --python) PY="$2"; shift 2 ;;
    --dry-run) DRY_RUN="--dry-run"; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "demo_cpu.sh: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
  esac
done

if ! PY_PATH="$(command -v "$PY")"; then
  echo "demo_cpu.sh: python '$PY' not found. Fix: pass --python /path/to/venv/bin/python" >&2
  exit 2
fi
if ! "$PY_PATH" -c "import importlib.util as u, sys; sys.exit(not (u.find_spec('mindspore') and u.find_spec('mindformers')))" \
     >/dev/null 2>&1; then
  echo "demo_cpu.sh: $PY_PATH cannot import mindspore and mindformers. Fix: pass --python of the environment" \
       "where mf_longseq is installed" >&2
  exit 2
fi
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PATH="$(dirname "$PY_PATH"):$PATH"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export LOCAL_DEFAULT_PATH="${LOCAL_DEFAULT_PATH:-$OUTPUT_DIR/mindformers_logs}"
export GLOG_v="${GLOG_v:-2}"

CMD=("$PY_PATH" -m mf_longseq.cli demo --steps "$STEPS" --seq-len "$SEQ_LEN" --output-dir "$OUTPUT_DIR")
[[ -n "$PORT" ]] && CMD+=(--port "$PORT")
[[ -n "$DRY_RUN" ]] && CMD+=("$DRY_RUN")
echo "+ ${CMD[*]}"
exec "${CMD[@]}"
