#!/usr/bin/env bash
# msrun launcher for mf_longseq: MindFormers' positional forms and named flags, Ascend checks, --dry-run,
# and a supervised run (a failed rank ends the launch, non-zero, naming the rank and showing its log tail).
#
#   bash scripts/msrun_launcher.sh "train.py --config run.yaml" 8                      # MindFormers' form
#   bash scripts/msrun_launcher.sh --worker-num 64 --local-worker-num 8 --master-addr 10.0.0.1 \
#        --node-rank 0 --config run.yaml -- train.py --config run.yaml                 # named flags
#   bash scripts/msrun_launcher.sh --dry-run --worker-num 64 --local-worker-num 8 -- train.py
#
# The logic is mf_longseq/tools/launch.py (run with --help for every form). MF_LONGSEQ_PYTHON picks the
# interpreter (default: python on PATH, which is also the one msrun starts the workers with).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
PYTHON="${MF_LONGSEQ_PYTHON:-python}"
if ! command -v "$PYTHON" >/dev/null 2>&1; then
  echo "msrun_launcher: error: '$PYTHON' not found on PATH. Fix: activate the Python environment where" \
       "mindspore and mf_longseq are installed, or set MF_LONGSEQ_PYTHON." >&2
  exit 2
fi
exec "$PYTHON" -m mf_longseq.tools.launch "$@"
