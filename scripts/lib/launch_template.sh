#!/usr/bin/env bash
# Launch training from one template yaml_templates/<family>/<size>_<seqlen>_cp<N>_<algo>.yaml (used by
# scripts/launch_<family>.sh).  The template is looked up when the script runs; if none or several match, the
# matching and available templates are listed and nothing starts.
#
#   bash scripts/launch_llama2.sh --size 70b --seq-len 128k --cp 8 --algo colossalai_cp [launcher flags]
#   bash scripts/launch_qwen1_5.sh --template yaml_templates/qwen1_5/72b_32k_cp8_ulysses_cp.yaml --dry-run
#
# The device count is the template's data_parallel x model_parallel x context_parallel x pipeline_stage
# (msrun_launcher.sh --worker-num auto); 8 workers per node unless --local-worker-num says otherwise.  Every
# other flag goes to scripts/msrun_launcher.sh: --local-worker-num, --master-addr, --node-rank, --master-port,
# --log-dir, --dry-run, --device CPU, ...  --steps N is passed to 'mf-longseq train'.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ROOT="$(dirname "$HERE")"
FAMILY="$1"; shift
SIZE="*"; SEQ="*"; CP="*"; ALGO="*"; TEMPLATE=""; TRAIN_ARGS=(); PASS=()
need() { if [ $# -lt 2 ]; then echo "launch_$FAMILY: error: $1 needs a value." >&2; exit 2; fi; }
while [ $# -gt 0 ]; do
  case "$1" in
    --size) need "$@"; SIZE="$2"; shift 2 ;;
    --seq-len) need "$@"; SEQ="$2"; shift 2 ;;
    --cp) need "$@"; CP="$2"; shift 2 ;;
    --algo) need "$@"; ALGO="$2"; shift 2 ;;
    --template) need "$@"; TEMPLATE="$2"; shift 2 ;;
    --steps) need "$@"; TRAIN_ARGS+=(--steps "$2"); shift 2 ;;
    *) PASS+=("$1"); shift ;;
  esac
done
TEMPLATES="${MF_LONGSEQ_TEMPLATES:-$ROOT/yaml_templates}"
if [ -z "$TEMPLATE" ]; then
  pattern="$TEMPLATES/$FAMILY/${SIZE}_${SEQ}_cp${CP}_${ALGO}.yaml"
  shopt -s nullglob
  matches=($pattern)
  shopt -u nullglob
  if [ ${#matches[@]} -ne 1 ]; then
    echo "launch_$FAMILY: error: ${#matches[@]} templates match $pattern." >&2
    if [ ${#matches[@]} -gt 1 ]; then printf '  %s\n' "${matches[@]}" >&2; fi
    echo "Fix: narrow it with --size, --seq-len, --cp and --algo (or give --template PATH). Available:" >&2
    ls "$TEMPLATES/$FAMILY"/*.yaml 2>/dev/null | sed 's/^/  /' >&2 || echo "  (none under $TEMPLATES/$FAMILY)" >&2
    exit 1
  fi
  TEMPLATE="${matches[0]}"
fi
if [ ! -f "$TEMPLATE" ]; then
  echo "launch_$FAMILY: error: template $TEMPLATE does not exist. Fix: pass an existing YAML." >&2
  exit 1
fi
echo "launch_$FAMILY: template $TEMPLATE"
exec bash "$HERE/msrun_launcher.sh" --worker-num auto --config "$TEMPLATE" "${PASS[@]}" \
  -- python -m mf_longseq.cli train --config "$TEMPLATE" ${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"}
