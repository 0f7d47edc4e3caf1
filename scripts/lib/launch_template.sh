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
# --log-dir, --dry-run, --device CPU, ...
#
# What each rank runs:
#   --mindformers DIR      MindFormers' own entry point, DIR/run_mindformer.py --config TEMPLATE --register_path
#                          <this repo's mf_longseq package> --use_parallel True (the template's trainer, dataset,
#                          runner wrapper and model are the plugin's, found through auto_register);
#                          --train-dataset-dir PATH is passed on as --train_dataset_dir (MindRecord).
#   (default)              'mf-longseq train --config TEMPLATE'; --steps N is passed to it, and
#                          --train-dataset-dir PATH as --data PATH.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ROOT="$(dirname "$HERE")"
FAMILY="$1"; shift
SIZE="*"; SEQ="*"; CP="*"; ALGO="*"; TEMPLATE=""; TRAIN_ARGS=(); PASS=(); MINDFORMERS=""; DATASET=""
need() { if [ $# -lt 2 ]; then echo "launch_$FAMILY: error: $1 needs a value." >&2; exit 2; fi; }
while [ $# -gt 0 ]; do
  case "$1" in
    --size) need "$@"; SIZE="$2"; shift 2 ;;
    --seq-len) need "$@"; SEQ="$2"; shift 2 ;;
    --cp) need "$@"; CP="$2"; shift 2 ;;
    --algo) need "$@"; ALGO="$2"; shift 2 ;;
    --template) need "$@"; TEMPLATE="$2"; shift 2 ;;
    --steps) need "$@"; TRAIN_ARGS+=(--steps "$2"); shift 2 ;;
    --mindformers) need "$@"; MINDFORMERS="$2"; shift 2 ;;
    --train-dataset-dir) need "$@"; DATASET="$2"; shift 2 ;;
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
if [ -n "$MINDFORMERS" ]; then
  if [ ! -f "$MINDFORMERS/run_mindformer.py" ]; then
    echo "launch_$FAMILY: error: --mindformers $MINDFORMERS has no run_mindformer.py. Fix: give the root of your" \
         "MindFormers checkout (the directory holding run_mindformer.py)." >&2
    exit 2
  fi
  if [ ${#TRAIN_ARGS[@]} -gt 0 ]; then
    echo "launch_$FAMILY: error: --steps is a 'mf-longseq train' flag. Fix: with --mindformers set" \
         "runner_config.epochs / the dataset size in the template, or drop --mindformers." >&2
    exit 2
  fi
  REGISTER="${MF_LONGSEQ_REGISTER_PATH:-$ROOT/mf_longseq}"
  RUN=(python "$MINDFORMERS/run_mindformer.py" --config "$TEMPLATE" --register_path "$REGISTER" --use_parallel True)
  if [ -n "$DATASET" ]; then RUN+=(--train_dataset_dir "$DATASET"); fi
else
  RUN=(python -m mf_longseq.cli train --config "$TEMPLATE" ${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"})
  if [ -n "$DATASET" ]; then RUN+=(--data "$DATASET"); fi
fi
exec bash "$HERE/msrun_launcher.sh" --worker-num auto --config "$TEMPLATE" "${PASS[@]}" -- "${RUN[@]}"
