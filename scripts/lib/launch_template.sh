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
# What each rank runs (every path is made absolute first: run_mindformer.py joins a relative --config onto its
# own folder, and the script may be started from any directory):
#   --route mindformers    (the default, the README's main route) MindFormers' own entry point,
#                          DIR/run_mindformer.py --config TEMPLATE --register_path <this repo's mf_longseq package>
#                          --use_parallel True, DIR from --mindformers (the template's trainer, dataset, runner
#                          wrapper and model are the plugin's, found through auto_register); --train-dataset-dir
#                          PATH is passed on as --train_dataset_dir (MindRecord).
#   --route train          'mf-longseq train --config TEMPLATE'; --steps N is passed to it, and
#                          --train-dataset-dir PATH as --dataset-dir PATH (the template's dataset_dir, read by
#                          MindFormers' dataset builder with the template's shuffle, as on the other route).
# --help prints the usage and exits 0.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ROOT="$(dirname "$HERE")"
FAMILY="$1"; shift
SIZE="*"; SEQ="*"; CP="*"; ALGO="*"; TEMPLATE=""; TRAIN_ARGS=(); PASS=(); MINDFORMERS=""; DATASET=""
ROUTE="mindformers"
absolute() {   # an absolute path for $1 (its folder resolved when it exists: no ../ left)
  local dir; dir="$(dirname "$1")"
  if [ -d "$dir" ]; then printf '%s/%s\n' "$(cd "$dir" && pwd)" "$(basename "$1")"
  else case "$1" in /*) printf '%s\n' "$1" ;; *) printf '%s\n' "$PWD/$1" ;; esac; fi
}
usage() {
  cat <<EOF
usage: bash scripts/launch_$FAMILY.sh [--size SIZE] [--seq-len LEN] [--cp N] [--algo ALGO] [--template YAML]
                                  [--route mindformers|train] [--mindformers DIR] [--steps N]
                                  [--train-dataset-dir PATH] [launcher flags]

Picks one template yaml_templates/$FAMILY/<size>_<seqlen>_cp<N>_<algo>.yaml (or --template YAML) and starts
its data_parallel x model_parallel x context_parallel x pipeline_stage ranks with scripts/msrun_launcher.sh.

  --size, --seq-len, --cp, --algo   narrow the template match (each defaults to any)
  --template YAML                   use this YAML instead of matching
  --route mindformers|train         what every rank runs (default mindformers: MindFormers' run_mindformer.py,
                                    the README's main route; train: mf-longseq train)
  --mindformers DIR                 the MindFormers source checkout holding run_mindformer.py (the pip wheel has
                                    none); needed by the mindformers route, whose number of steps is the
                                    template's runner_config.epochs x the dataset's batches
  --steps N                         --route train only: the run ends after update N (default 10)
  --train-dataset-dir PATH          a .mindrecord file or a directory of them (column input_ids, rows of
                                    seq_length + 1 tokens): --train_dataset_dir on the MindFormers route,
                                    --dataset-dir on the default route (both set
                                    train_dataset.data_loader.dataset_dir)
  -h, --help                        this text
Every other flag goes to scripts/msrun_launcher.sh (--local-worker-num, --master-addr, --node-rank,
--master-port, --log-dir, --dry-run, --device CPU, ...; see scripts/msrun_launcher.sh --help).

Routes (what every rank runs; TEMPLATE and PATH made absolute):
  mindformers    python DIR/run_mindformer.py --config TEMPLATE --register_path <mf_longseq> --use_parallel True
  (default)      [--train_dataset_dir PATH]
  train          python -m mf_longseq.cli train --config TEMPLATE [--steps N] [--dataset-dir PATH]

Examples:
  bash scripts/launch_$FAMILY.sh --template yaml_templates/$FAMILY/FILE.yaml --mindformers ~/mindformers --dry-run
  bash scripts/launch_$FAMILY.sh --size 7b --seq-len 32k --cp 4 --algo colossalai_cp \\
       --mindformers ~/mindformers --train-dataset-dir /data/wiki.mindrecord
  bash scripts/launch_$FAMILY.sh --size 7b --seq-len 32k --cp 4 --algo colossalai_cp --route train --steps 100 \\
       --train-dataset-dir /data/wiki.mindrecord
EOF
}
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
    --route) need "$@"; ROUTE="$2"; shift 2 ;;
    --train-dataset-dir) need "$@"; DATASET="$2"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
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
TEMPLATE="$(absolute "$TEMPLATE")"
if [ -n "$DATASET" ]; then DATASET="$(absolute "$DATASET")"; fi
echo "launch_$FAMILY: template $TEMPLATE"
case "$ROUTE" in
  mindformers|train) ;;
  *) echo "launch_$FAMILY: error: --route $ROUTE: unknown route. Fix: --route mindformers (run_mindformer.py)" \
          "or --route train (mf-longseq train)." >&2; exit 2 ;;
esac
if [ "$ROUTE" = train ] && [ -n "$MINDFORMERS" ]; then
  echo "launch_$FAMILY: error: --mindformers $MINDFORMERS with --route train: the train route does not run" \
       "run_mindformer.py. Fix: drop one of them." >&2
  exit 2
fi
if [ "$ROUTE" = mindformers ]; then
  if [ -z "$MINDFORMERS" ]; then
    echo "launch_$FAMILY: error: the default route runs MindFormers' run_mindformer.py and needs --mindformers DIR" \
         "(your MindFormers source checkout; the pip wheel has no run_mindformer.py). Fix: pass --mindformers DIR," \
         "or --route train to run 'mf-longseq train' on every rank." >&2
    exit 2
  fi
  MINDFORMERS="$(absolute "$MINDFORMERS")"
  if [ ! -f "$MINDFORMERS/run_mindformer.py" ]; then
    echo "launch_$FAMILY: error: --mindformers $MINDFORMERS has no run_mindformer.py. Fix: give the root of your" \
         "MindFormers checkout (the directory holding run_mindformer.py)." >&2
    exit 2
  fi
  if [ ${#TRAIN_ARGS[@]} -gt 0 ]; then
    echo "launch_$FAMILY: error: --steps is a 'mf-longseq train' flag. Fix: on the mindformers route set" \
         "runner_config.epochs / the dataset size in the template, or pass --route train." >&2
    exit 2
  fi
  REGISTER="${MF_LONGSEQ_REGISTER_PATH:-$ROOT/mf_longseq}"
  RUN=(python "$MINDFORMERS/run_mindformer.py" --config "$TEMPLATE" --register_path "$REGISTER" --use_parallel True)
  if [ -n "$DATASET" ]; then RUN+=(--train_dataset_dir "$DATASET"); fi
else
  RUN=(python -m mf_longseq.cli train --config "$TEMPLATE" ${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"})
  if [ -n "$DATASET" ]; then RUN+=(--dataset-dir "$DATASET"); fi
fi
exec bash "$HERE/msrun_launcher.sh" --worker-num auto --config "$TEMPLATE" "${PASS[@]}" -- "${RUN[@]}"
