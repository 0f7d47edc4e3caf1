"""What MindFormers' Trainer route (``run_mindformer.py`` with ``LongSeqTrainer``) cannot run with the plugin:
``route_refusals(tree, long_seq)`` -> every ConfigError at once.  Read by ``LongSeqTrainer`` (before any device
work) and by ``mf-longseq validate --route mindformers`` (``train/validation.py``); ``mf-longseq adopt`` writes
the values these rules want.
"""
from mf_longseq.config import ConfigError, LongSeqConfig, node_at

OUR_TRAINER = "LongSeqTrainer"
OUR_DATASET = "LongSeqCausalLanguageModelDataset"
OUR_WRAPPER = "LongSeqTrainOneStepCell"
# The columns the plugin's models take from MindFormers' datasets (mf_route/inputs.py).
PRETRAIN_COLUMNS = ["input_ids"]
PACKED_COLUMNS = ["input_ids", "labels", "loss_mask", "position_ids", "actual_seq_len"]


def route_refusals(tree: dict, long_seq: LongSeqConfig) -> list:
    """ConfigErrors for settings MindFormers' Trainer route cannot run with the plugin (empty: runnable).

    ``mf-longseq validate --route mindformers`` and ``LongSeqTrainer`` report all of them at once."""
    from mf_longseq.train.context import resolve_parallel_mode
    out = _trainer_refusals(tree, long_seq)
    parallel = tree.get("parallel") or {}
    mode = resolve_parallel_mode(parallel.get("parallel_mode", "stand_alone"))
    if long_seq.pipeline_stage > 1:
        out.append(ConfigError("parallel_config.pipeline_stage", long_seq.pipeline_stage,
                               "MindFormers' Trainer route runs dp x cp x mp; pipeline stages run in the plugin's "
                               "own loop", "run this YAML with `mf-longseq train`, or set pipeline_stage: 1"))
    context_mode = (tree.get("context") or {}).get("mode", 0)            # MindFormers' default: graph mode
    if context_mode not in (1, "PYNATIVE_MODE"):
        out.append(ConfigError("context.mode", context_mode, "the plugin's attention runs host-side schedules in "
                               "PyNative mode", "set context.mode: 1 (PYNATIVE_MODE)"))
    if mode not in ("stand_alone", "data_parallel"):
        out.append(ConfigError("parallel.parallel_mode", parallel.get("parallel_mode"), "MindSpore's automatic "
                               "sharding would split the plugin's explicitly split layers again",
                               "set parallel.parallel_mode: 0 (data_parallel) or STAND_ALONE"))
    out += _wrapper_refusals(tree, long_seq, mode, parallel)
    dataset = ((tree.get("train_dataset_task") or {}).get("type"))
    if (long_seq.context_parallel > 1 or long_seq.model_parallel > 1) and dataset != OUR_DATASET:
        out.append(ConfigError("train_dataset_task.type", dataset, "it shards samples over every rank, so the CP/MP "
                               "ranks of one sequence would read different samples", f"set type: {OUR_DATASET}"))
    return out + _data_refusals(tree)


def _trainer_refusals(tree: dict, long_seq: LongSeqConfig) -> list:
    trainer = node_at(tree, "trainer.type")
    if trainer == OUR_TRAINER or long_seq.world_size == 1:
        return []
    return [ConfigError("trainer.type", trainer, f"MindFormers' trainer resets parallel_config to 1 in stand_alone / "
                        f"data_parallel mode, so the plugin's model would not get the YAML's {long_seq.world_size}-rank "
                        "layout", f"set trainer.type: {OUR_TRAINER} (auto_register: registry.{OUR_TRAINER})")]


def _data_refusals(tree: dict) -> list:
    out = []
    if node_at(tree, "runner_config.sink_mode", False):
        out.append(ConfigError("runner_config.sink_mode", node_at(tree, "runner_config.sink_mode"), "data sinking "
                               "needs graph mode; in PyNative MindFormers repeats every epoch once per sample (N "
                               "samples run N x N steps)", "set runner_config.sink_mode: False"))
    columns = node_at(tree, "train_dataset.input_columns", PRETRAIN_COLUMNS)
    if list(columns or []) != PRETRAIN_COLUMNS and sorted(columns or []) != sorted(PACKED_COLUMNS):
        out.append(ConfigError("train_dataset.input_columns", columns, "the plugin's models take MindFormers' "
                               "pretraining column (input_ids of seq_length + 1 tokens) or the 5 packed columns",
                               f"write input_columns: {PRETRAIN_COLUMNS} or {PACKED_COLUMNS}"))
    return out


def _wrapper_refusals(tree: dict, long_seq: LongSeqConfig, mode: str, parallel: dict) -> list:
    wrapper = (tree.get("runner_wrapper") or {}).get("type")
    if wrapper == OUR_WRAPPER or long_seq.world_size == 1:
        return []
    if long_seq.model_parallel > 1:
        return [ConfigError("runner_wrapper.type", wrapper, "with model_parallel > 1 only the plugin's wrapper sums "
                            "gradients over dp x cp alone (not over the model-parallel shards)",
                            f"set runner_wrapper.type: {OUR_WRAPPER}")]
    if mode != "data_parallel" or parallel.get("gradients_mean", False):
        return [ConfigError("runner_wrapper.type", wrapper, "MindSpore's wrappers sum the gradients over the ranks "
                            "only with parallel.parallel_mode: 0 and gradients_mean: False",
                            f"set those, or runner_wrapper.type: {OUR_WRAPPER}")]
    return []


__all__ = ["route_refusals", "OUR_TRAINER", "OUR_DATASET", "OUR_WRAPPER", "PRETRAIN_COLUMNS",
           "PACKED_COLUMNS"]
