"""Write every YAML template of this folder from one table, so the files cannot drift apart.

    python yaml_templates/generate.py            # rewrite the templates
    python yaml_templates/generate.py --check    # exit 1 if a file differs from what this script writes

Layout of a template: MindFormers' sections (run keys, trainer, runner_config, optimizer, lr_schedule,
train_dataset, parallel, parallel_config, recompute_config, callbacks, context, model{model_config, arch}) plus
the plugin's own top-level ``long_seq:`` section (layout, block_size, device_num).  File names:
``<family>/<size>_<seqlen>_cp<N>_<algo>.yaml`` and ``tiny/<family>_tiny_s<seq>_cp<N>_<algo>.yaml``.

Ascend 910B-class settings (64 GB per device, 8 per node): bfloat16 compute, float32 master weights, AdamW with
the parallel optimizer (states split over dp x cp), full recompute, FlashAttention with the compressed causal
mask, a checkpoint every 1000 steps (tiny: 100) and at the end.  Degrees were chosen so that ``mf_longseq.planner``'s memory model (optimizer states split over dp x cp,
full recompute) stays under 58 GB per device: 7B/14B need model_parallel 2-4 (Qwen's 152k vocabulary makes the
logits large), 70B/72B model_parallel 8 x pipeline_stage 4.  Model shapes are the presets of
``mf_longseq.models`` (published Hugging Face shapes).
"""
import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from mf_longseq.families import FAMILIES  # noqa: E402  (after the sys.path line: the repo's package)

# family -> (config class, model class, title), from the one families table
CLASSES = {name: (f.config_class, f.model_class, f.title) for name, f in FAMILIES.items()}
# the README's main route: absolute paths from any directory (run_mindformer.py joins a relative --config onto
# its own folder)
RUN_VARS = ('REG=$(python -c "import os, mf_longseq; print(os.path.dirname(mf_longseq.__file__))"); '
            'TEMPLATES=$(dirname "$REG")/yaml_templates')
TOKEN_IDS = {name: f.token_ids for name, f in FAMILIES.items()}          # (bos, eos, pad)

# (family, size, seq_len, cp, algo, ulysses_degree_in_cp, dp, mp, pp, micro_batch_num)
ASCEND = [
    ("llama2", "7b", 32768, 2, "colossalai_cp", 1, 2, 2, 1, 1),
    ("llama2", "7b", 32768, 2, "ulysses_cp", 1, 2, 2, 1, 1),
    ("llama2", "7b", 32768, 4, "colossalai_cp", 1, 1, 2, 1, 1),
    ("llama2", "7b", 65536, 4, "colossalai_cp", 1, 1, 2, 1, 1),
    ("llama2", "7b", 65536, 4, "ulysses_cp", 1, 1, 2, 1, 1),
    ("llama2", "7b", 65536, 4, "hybrid_cp", 2, 1, 2, 1, 1),
    ("llama2", "7b", 131072, 8, "colossalai_cp", 1, 1, 2, 1, 1),
    ("llama2", "7b", 131072, 8, "ulysses_cp", 1, 1, 2, 1, 1),
    ("llama2", "7b", 131072, 8, "hybrid_cp", 4, 1, 2, 1, 1),
    ("llama2", "13b", 32768, 4, "colossalai_cp", 1, 1, 4, 1, 1),
    ("llama2", "13b", 65536, 8, "hybrid_cp", 2, 1, 4, 1, 1),
    ("llama2", "70b", 32768, 2, "colossalai_cp", 1, 1, 8, 4, 8),
    ("llama2", "70b", 65536, 4, "hybrid_cp", 2, 1, 8, 4, 8),
    ("llama2", "70b", 131072, 8, "colossalai_cp", 1, 1, 8, 4, 8),
    ("qwen", "7b", 32768, 4, "colossalai_cp", 1, 1, 2, 1, 1),
    ("qwen", "7b", 65536, 8, "ulysses_cp", 1, 1, 2, 1, 1),
    ("qwen", "7b", 131072, 8, "hybrid_cp", 4, 1, 4, 1, 1),
    ("qwen", "14b", 32768, 4, "colossalai_cp", 1, 1, 4, 1, 1),
    ("qwen", "14b", 65536, 8, "hybrid_cp", 2, 1, 4, 1, 1),
    ("qwen", "72b", 32768, 2, "colossalai_cp", 1, 1, 8, 4, 8),
    ("qwen", "72b", 65536, 4, "ulysses_cp", 1, 1, 8, 4, 8),
    ("qwen1_5", "7b", 32768, 4, "colossalai_cp", 1, 1, 2, 1, 1),
    ("qwen1_5", "7b", 65536, 8, "ulysses_cp", 1, 1, 2, 1, 1),
    ("qwen1_5", "7b", 131072, 8, "hybrid_cp", 4, 1, 4, 1, 1),
    ("qwen1_5", "14b", 32768, 4, "colossalai_cp", 1, 1, 4, 1, 1),
    ("qwen1_5", "14b", 65536, 8, "hybrid_cp", 2, 1, 4, 1, 1),
    ("qwen1_5", "72b", 32768, 2, "colossalai_cp", 1, 1, 8, 4, 8),
    ("qwen1_5", "72b", 65536, 4, "ulysses_cp", 1, 1, 8, 4, 8),
    ("qwen1_5", "72b", 131072, 8, "colossalai_cp", 1, 1, 8, 4, 8),
]

# (family, seq_len, cp, algo, ulysses_degree_in_cp, block_size): 2 layers, hidden 64, 4 heads, 2 kv heads (Qwen v1
# has no GQA: 4), vocab 256, float32 on CPU ranks.
TINY = [
    ("llama2", 256, 1, "colossalai_cp", 1, 64),
    ("llama2", 256, 2, "colossalai_cp", 1, 64),
    ("llama2", 256, 2, "ulysses_cp", 1, 64),
    ("llama2", 256, 4, "hybrid_cp", 2, 64),
    ("llama2", 8192, 2, "colossalai_cp", 1, 2048),
    ("qwen1_5", 256, 1, "colossalai_cp", 1, 64),
    ("qwen1_5", 256, 2, "colossalai_cp", 1, 64),
    ("qwen1_5", 256, 2, "ulysses_cp", 1, 64),
    ("qwen1_5", 256, 4, "hybrid_cp", 2, 64),
    ("qwen", 256, 2, "colossalai_cp", 1, 64),
]


def _seq_name(seq_len: int) -> str:
    return f"{seq_len // 1024}k" if seq_len % 1024 == 0 and seq_len >= 1024 else str(seq_len)


def _yaml_float(x: float) -> str:
    """1e-05 -> '1.0e-5' (YAML 1.1, which PyYAML reads, needs the dot to see a float)."""
    mantissa, exponent = f"{x:.1e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def _model_config(family: str, size: str, seq_len: int, dtypes) -> list:
    from mf_longseq.models import CONFIG_CLASSES
    cfg = CONFIG_CLASSES[family].from_preset(size, seq_length=seq_len)
    bos, eos, pad = TOKEN_IDS[family] if size != "tiny" else (1, 2, 0)
    lines = [f"    type: {CLASSES[family][0]}",
             f"    auto_register: registry.{CLASSES[family][0]}",
             f"    seq_length: {seq_len}",
             f"    vocab_size: {cfg.vocab_size}",
             f"    hidden_size: {cfg.hidden_size}",
             f"    num_layers: {cfg.num_layers}",
             f"    num_heads: {cfg.num_heads}",
             f"    n_kv_heads: {cfg.n_kv_heads}",
             f"    intermediate_size: {cfg.intermediate_size}" + (
                 f"    # Qwen v1: both SwiGLU halves (FFN width {cfg.ffn_hidden_size})" if family == "qwen" else ""),
             f"    rms_norm_eps: {_yaml_float(cfg.rms_norm_eps)}",
             f"    theta: {cfg.theta:.1f}",
             f"    qkv_has_bias: {cfg.qkv_has_bias}",
             f"    tie_word_embeddings: {cfg.tie_word_embeddings}",
             f"    compute_dtype: \"{dtypes[0]}\"",
             f"    param_init_type: \"{dtypes[1]}\"",
             f"    initializer_range: 0.02",
             f"    bos_token_id: {bos}",
             f"    eos_token_id: {eos}",
             f"    pad_token_id: {pad}"]
    return lines


def _common_head(title: str, devices_line: str, run_line: str, seed_lr, *, devices: int, workers: int,
                 clip: bool, optimizer: str = "type: AdamW") -> str:
    lr, lr_end, warmup, schedule = seed_lr
    return f"""# {title}
# {devices_line}
# {run_line}
seed: 0
output_dir: './output'
load_checkpoint: ''
resume_training: False
run_mode: 'train'
use_parallel: {devices > 1}                 # True when msrun starts more than one rank

# The plugin's classes, found through run_mindformer.py --register_path <dir of the installed mf_longseq package>
trainer:
  type: LongSeqTrainer              # keeps parallel_config's CP degrees (MindFormers' trainer resets them)
  auto_register: registry.LongSeqTrainer
  model_name: '{title.split(',')[0].lower().replace(' ', '_')}'

runner_wrapper:
  type: LongSeqTrainOneStepCell     # sums gradients over dp x cp; see docs (Ascend: MFTrainOneStepCell when mp = 1)
  auto_register: registry.LongSeqTrainOneStepCell
  use_clip_grad: {clip}
  max_grad_norm: 1.0

runner_config:
  epochs: 1
  batch_size: 1
  sink_mode: False
  sink_size: 1

optimizer:
  {optimizer}
  betas: [0.9, 0.95]
  eps: 1.e-8
  weight_decay: 0.1

lr_schedule:
  type: {schedule}
  learning_rate: {lr}
  lr_end: {lr_end}
  warmup_steps: {warmup}
  total_steps: -1

train_dataset: &train_dataset
  data_loader:
    type: MindDataset
    dataset_dir: ""                 # a .mindrecord file or a directory of them, column input_ids of seq_length + 1
                                    # tokens (run_mindformer.py --train_dataset_dir; mf-longseq train reads it too)
    shuffle: True
  input_columns: ["input_ids"]
  num_parallel_workers: {workers}
  python_multiprocessing: False
  drop_remainder: True
  batch_size: 1
  repeat: 1
  numa_enable: False
  prefetch_size: 1
train_dataset_task:
  type: LongSeqCausalLanguageModelDataset   # shards samples over data_parallel only (CP ranks share a sample)
  auto_register: registry.LongSeqCausalLanguageModelDataset
  dataset_config: *train_dataset
"""


def _parallel(dp, mp, pp, cp, algo, u, mbn, alltoall: bool, optimizer_shard: bool, recompute: bool,
              save_steps: int) -> str:
    return f"""
parallel:
  parallel_mode: 0                  # mf_longseq runs its own collectives (PyNative); see docs
  gradients_mean: False
  enable_alltoall: {alltoall}
  full_batch: False
  enable_parallel_optimizer: {optimizer_shard}
parallel_config:
  data_parallel: {dp}
  model_parallel: {mp}
  context_parallel: {cp}
  context_parallel_algo: {algo}
  ulysses_degree_in_cp: {u}
  pipeline_stage: {pp}
  micro_batch_num: {mbn}
  use_seq_parallel: False
  vocab_emb_dp: False
  gradient_aggregation_group: 4
micro_batch_interleave_num: 1

recompute_config:
  recompute: {recompute}
  select_recompute: False
  parallel_optimizer_comm_recompute: False
  mp_comm_recompute: True
  recompute_slice_activation: False

callbacks:
  - type: MFLossMonitor
  - type: CheckpointMonitor         # every N steps and at the end: run_mindformer.py writes rank files under
    save_checkpoint_steps: {save_steps}     # output_dir/checkpoint; mf-longseq train its checkpoints/step_NNNNNN
"""


def ascend_template(row) -> tuple:
    family, size, seq, cp, algo, u, dp, mp, pp, mbn = row
    devices = dp * mp * cp * pp
    name = f"{family}/{size}_{_seq_name(seq)}_cp{cp}_{algo}.yaml"
    inner = f" (Ulysses {u} x ring {cp // u})" if algo == "hybrid_cp" else ""
    title = f"{CLASSES[family][2]} {size.upper()}, {_seq_name(seq)} tokens, context parallel {cp} {algo}{inner}"
    devices_line = (f"Ascend 910B: {devices} devices = data_parallel {dp} x model_parallel {mp} x context_parallel "
                    f"{cp} x pipeline_stage {pp}" + (f" ({devices // 8} nodes of 8)" if devices > 8 else " (1 node)"))
    run_line = (f"Run (any directory; {RUN_VARS}):\n#   bash $(dirname \"$REG\")/scripts/launch_{family}.sh "
                f"--template $TEMPLATES/{name} --mindformers <MindFormers checkout>")
    text = _common_head(title, devices_line, run_line, ("1.e-4", "1.e-5", 100, "CosineWithWarmUpLR"),
                        devices=devices, workers=8, clip=True)
    text += _parallel(dp, mp, pp, cp, algo, u, mbn, alltoall=algo != "colossalai_cp", optimizer_shard=True,
                      recompute=True, save_steps=1000)
    text += """
context:
  mode: 1                           # PyNative
  device_target: "Ascend"
  max_call_depth: 10000
  max_device_memory: "58GB"
  device_id: 0

model:
  model_config:
"""
    text += "\n".join(_model_config(family, size, seq, ("bfloat16", "float32")))
    text += """
    use_flash_attention: True
    use_attn_mask_compression: True
  arch:
    type: {arch}
    auto_register: registry.{arch}

long_seq:
  layout: zigzag
  block_size: 2048
  device_num: {devices}
""".format(arch=CLASSES[family][1], devices=devices)
    return name, text


def tiny_template(row) -> tuple:
    family, seq, cp, algo, u, block = row
    name = f"tiny/{family}_tiny_s{seq}_cp{cp}_{algo}.yaml"
    inner = f" (Ulysses {u} x ring {cp // u})" if algo == "hybrid_cp" else ""
    title = f"{CLASSES[family][2]} tiny, {seq} tokens, context parallel {cp} {algo}{inner}, CPU"
    devices_line = f"CPU: {cp} ranks = context_parallel {cp} (msrun CPU workers; tests and the demo)"
    launch = f"msrun --worker_num {cp} --local_worker_num {cp} --join True " if cp > 1 else ""
    run_line = (f"Run (any directory; {RUN_VARS}):\n#   {launch}python <MindFormers>/run_mindformer.py --config "
                f"$TEMPLATES/{name} --register_path $REG --train_dataset_dir <MindRecord>\n# or:  mf-longseq train "
                f"--config $TEMPLATES/{name}" + (f" --workers {cp}" if cp > 1 else ""))
    text = _common_head(title, devices_line, run_line, ("1.e-2", "0.0", 2, "ConstantWarmUpLR"),
                        devices=cp, workers=1, clip=True,       # MindFormers' AdamW on one flat buffer (CPU speed)
                        optimizer="type: LongSeqAdamW\n  auto_register: registry.LongSeqAdamW")
    text += _parallel(1, 1, 1, cp, algo, u, 1, alltoall=False, optimizer_shard=False, recompute=False,
                      save_steps=100)
    text += """
context:
  mode: 1                           # PyNative
  device_target: "CPU"
  runtime_num_threads: 1

model:
  model_config:
"""
    text += "\n".join(_model_config(family, "tiny", seq, ("float32", "float32")))
    text += """
    use_flash_attention: False
    use_attn_mask_compression: True
  arch:
    type: {arch}
    auto_register: registry.{arch}

long_seq:
  layout: zigzag
  block_size: {block}
  device_num: {devices}
""".format(arch=CLASSES[family][1], block=block, devices=cp)
    return name, text


def all_templates() -> dict:
    """{relative path: text} of every template."""
    return dict([ascend_template(r) for r in ASCEND] + [tiny_template(r) for r in TINY])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args(argv)
    stale = []
    for rel, text in all_templates().items():
        path = os.path.join(HERE, rel)
        if args.check:
            if not os.path.exists(path) or open(path, encoding="utf-8").read() != text:
                stale.append(rel)
            continue
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(text)
    for rel in stale:
        print(f"stale: yaml_templates/{rel} (run python yaml_templates/generate.py)")
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
