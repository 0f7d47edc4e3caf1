#!/usr/bin/env bash
# LLaMA2 (7b, 13b, 70b) with context parallelism, from a template under yaml_templates/llama2/.
#
#   bash scripts/launch_llama2.sh --size SIZE --seq-len LEN --cp N --algo ALGO --mindformers DIR [launcher flags]
#   bash scripts/launch_llama2.sh --template yaml_templates/llama2/FILE.yaml --mindformers DIR --dry-run
#
# Single node (8 NPUs):  bash scripts/launch_llama2.sh --size 7b --cp 8 --algo colossalai_cp --mindformers DIR
# Multi-node, on node R of M (8 NPUs each):
#   bash scripts/launch_llama2.sh --size 70b --cp 8 --algo hybrid_cp --local-worker-num 8 \
#        --master-addr <node-0 ip> --node-rank R --mindformers DIR
# Every rank runs MindFormers' run_mindformer.py (the default route; --mindformers <MindFormers checkout>
#   [--train-dataset-dir <MindRecord>]); --route train [--steps N] runs 'mf-longseq train' instead.
# See scripts/lib/launch_template.sh and scripts/msrun_launcher.sh --help.
exec bash "$(dirname "${BASH_SOURCE[0]}")/lib/launch_template.sh" llama2 "$@"
