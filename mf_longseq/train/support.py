"""Which MindFormers keys ``mf-longseq train`` honours, and the ones it refuses (before any device work).

One list, run by ``check_run`` on the train route (``train/validation.py``: ``mf-longseq train``, ``run_job`` and
``mf-longseq validate``)::

    errors = refusals(tree)          # [ConfigError(key, value, problem, fix), ...]; [] means runnable

Honoured (besides ``parallel_config``, ``model``, ``long_seq``, ``parallel``, ``context``, read by LongSeqConfig
and the model builder); the values are read once, into ``RunSettings`` (``train/settings.py``):

    seed                                        weights and synthetic data (--seed overrides)
    runner_config.batch_size                    samples per dp rank per step (per micro-batch with pipeline stages)
    optimizer.{type: AdamW, betas, eps, weight_decay, learning_rate}     train/optim.py (= MindFormers' AdamW)
    lr_schedule.*                               MindFormers' registered schedule (build_lr); total_steps -1: --steps
    runner_wrapper.{use_clip_grad, max_grad_norm}                        train/clip.py (MindFormers' formula)
    train_dataset.data_loader.{type: MindDataset, dataset_dir, shuffle}  read through MindFormers' dataset builder
                                                                         (train/mf_data.py); --dataset-dir sets
                                                                         it, --data replaces it
    train_dataset_task.type                     LongSeqCausalLanguageModelDataset or CausalLanguageModelDataset
    train_dataset.data_loader.create_compressed_eod_mask (+ eod, eod_pad_length, eod_mask_loss)   train/packing.py
    callbacks: MFLossMonitor (the per-step line); CheckpointMonitor.save_checkpoint_steps (= --save-every)
    load_checkpoint                             start weights (= --load-checkpoint; ours or MindFormers' names,
                                                models/start_weights.py): the optimizer and the step start fresh

Refused, each with its fix: gradient_accumulation_steps > 1, sink_mode, epochs other than 1 (--steps decides),
any runner_wrapper.scale_sense but 1, other runner_wrapper keys, calculate_per_token_loss, other callbacks and
CheckpointMonitor keys, a missing dataset_dir, other data loaders or input columns, an optimizer other than
AdamW, an unknown lr_schedule type (or lr_schedule keys without a type), optimizer keys AdamW does not read,
select_recompute, a train_dataset.batch_size other than runner_config.batch_size, MFLossMonitor options,
a load_checkpoint that does not exist,
resume_training / auto_trans_ckpt / src_strategy_path_or_dir (use --resume), do_eval, profile,
run_mode other than train, a non-boolean use_clip_grad and a max_grad_norm that is not finite and positive.
"""
import math
import os
from typing import List, Optional

from mf_longseq.config import ConfigError, node_at

WRAPPER_KEYS = ("type", "auto_register", "use_clip_grad", "max_grad_norm", "scale_sense")
CHECKPOINT_KEYS = ("type", "save_checkpoint_steps")
DATASET_TYPES = (None, "LongSeqCausalLanguageModelDataset", "CausalLanguageModelDataset")


def _runner(tree: dict) -> List[ConfigError]:
    out = []
    accumulation = node_at(tree, "runner_config.gradient_accumulation_steps", 1)
    if accumulation != 1:
        out.append(ConfigError("runner_config.gradient_accumulation_steps", accumulation, "mf-longseq train applies "
                               "one update per batch", "set it to 1 and multiply runner_config.batch_size instead "
                               "(the same gradient: the loss is the mean over every token of the step)"))
    if node_at(tree, "runner_config.sink_mode", False):
        out.append(ConfigError("runner_config.sink_mode", True, "mf-longseq train runs PyNative steps (no data "
                               "sinking)", "set sink_mode: False"))
    epochs = node_at(tree, "runner_config.epochs", 1)
    if epochs != 1:
        out.append(ConfigError("runner_config.epochs", epochs, "mf-longseq train runs --steps updates (the data "
                               "repeats as needed)", "set epochs: 1 and pass --steps"))
    start = tree.get("load_checkpoint")
    if start not in (None, False, "") and not (isinstance(start, str) and os.path.exists(start)):
        out.append(ConfigError("load_checkpoint", start, "no such file or folder (mf-longseq train starts from these "
                               "weights: ours or MindFormers' LLaMA2 / Qwen / Qwen1.5 names)",
                               "give the path of a .ckpt / .safetensors file, or remove load_checkpoint"))
    for key, fix in (("resume_training", "pass --resume RUN_DIR (load_checkpoint alone starts from the weights)"), ("auto_trans_ckpt", "remove it (--resume "
                                                                     "reshards across layouts itself)"),
                     ("src_strategy_path_or_dir", "remove it"), ("do_eval", "set do_eval: False"),
                     ("profile", "set profile: False")):
        value = tree.get(key)
        if value not in (None, False, ""):
            out.append(ConfigError(key, value, "mf-longseq train does not honour it", fix))
    mode = tree.get("run_mode") or "train"
    if mode != "train":
        out.append(ConfigError("run_mode", mode, "mf-longseq train only trains", "set run_mode: train"))
    if tree.get("calculate_per_token_loss"):
        out.append(ConfigError("calculate_per_token_loss", True, "the plugin's loss is the global mean",
                               "set calculate_per_token_loss: False"))
    return out


def _wrapper(tree: dict) -> List[ConfigError]:
    wrapper = tree.get("runner_wrapper") or {}
    out = [ConfigError(f"runner_wrapper.{key}", wrapper[key], "mf-longseq train does not use it",
                       f"remove it (honoured: {', '.join(WRAPPER_KEYS)})") for key in wrapper if key not in WRAPPER_KEYS]
    scale = wrapper.get("scale_sense")
    if scale is not None and not (isinstance(scale, (int, float)) and float(scale) == 1.0):
        out.append(ConfigError("runner_wrapper.scale_sense", scale, "mf-longseq train does no loss scaling "
                               "(float32 / bfloat16 need none)", "remove scale_sense"))
    if isinstance(scale, bool):
        out.append(ConfigError("runner_wrapper.scale_sense", scale, "a loss scale is a number, not True/False",
                               "remove scale_sense"))
    clip = wrapper.get("use_clip_grad", False)
    if not isinstance(clip, bool):
        out.append(ConfigError("runner_wrapper.use_clip_grad", clip, "must be True or False (a string is not read "
                               "as a boolean)", "write use_clip_grad: True or False"))
    norm = wrapper.get("max_grad_norm", 1.0)
    if clip is True and (isinstance(norm, bool) or not isinstance(norm, (int, float)) or not math.isfinite(norm)
                         or norm <= 0):
        out.append(ConfigError("runner_wrapper.max_grad_norm", norm, "must be a finite positive number (inf or nan "
                               "turns every update into NaN)", "e.g. max_grad_norm: 1.0, or use_clip_grad: False"))
    return out


def _callbacks(tree: dict) -> List[ConfigError]:
    callbacks = tree.get("callbacks") or []
    if not isinstance(callbacks, list):
        return [ConfigError("callbacks", callbacks, "must be a list of {type: ...} entries",
                            "write callbacks: [{type: MFLossMonitor}]")]
    out = []
    for i, callback in enumerate(callbacks):
        if not isinstance(callback, dict):
            out.append(ConfigError(f"callbacks[{i}]", callback, "must be a mapping with a type",
                                   "write e.g. {type: MFLossMonitor}"))
            continue
        kind = callback.get("type")
        if kind == "MFLossMonitor":
            out += [ConfigError(f"callbacks[{i}].{key}", callback[key], "mf-longseq train prints every step",
                                "remove it") for key in callback if key not in ("type", "auto_register")]
            continue
        if kind != "CheckpointMonitor":
            out.append(ConfigError(f"callbacks[{i}].type", kind, "mf-longseq train runs only MFLossMonitor's "
                                   "per-step line and CheckpointMonitor's period", "remove the callback"))
            continue
        out += [ConfigError(f"callbacks[{i}].{key}", callback[key], "mf-longseq train writes its own checkpoints "
                            "(train/checkpoint.py)", "remove it (honoured: save_checkpoint_steps, as --save-every)")
                for key in callback if key not in CHECKPOINT_KEYS]
        period = callback.get("save_checkpoint_steps", 0)
        if isinstance(period, bool) or not isinstance(period, int) or period < 0:
            out.append(ConfigError(f"callbacks[{i}].save_checkpoint_steps", period, "must be a whole number >= 0",
                                   "e.g. save_checkpoint_steps: 100"))
    return out


def _dataset(tree: dict) -> List[ConfigError]:
    out = []
    loader = node_at(tree, "train_dataset.data_loader", {}) or {}
    if not isinstance(loader, dict):
        return [ConfigError("train_dataset.data_loader", loader, "must be a mapping",
                            "write data_loader: {type: MindDataset, dataset_dir: ...}")]
    directory = loader.get("dataset_dir") or ""
    if not isinstance(directory, str):
        return [ConfigError("train_dataset.data_loader.dataset_dir", directory, "must be a path",
                            "give a .mindrecord file or a directory of them")]
    if not directory:
        return out
    if loader.get("type", "MindDataset") != "MindDataset":
        out.append(ConfigError("train_dataset.data_loader.type", loader.get("type"), "mf-longseq train reads "
                               "MindRecord files", "set type: MindDataset"))
    if not os.path.exists(directory):
        out.append(ConfigError("train_dataset.data_loader.dataset_dir", directory, "no such file or directory",
                               "give an existing .mindrecord file or a directory of them"))
    columns = node_at(tree, "train_dataset.input_columns", ["input_ids"])
    if columns != ["input_ids"]:
        out.append(ConfigError("train_dataset.input_columns", columns, "mf-longseq train reads the input_ids column "
                               "(packing comes from create_compressed_eod_mask)", "set input_columns: [input_ids]"))
    kind = node_at(tree, "train_dataset_task.type")
    if kind not in DATASET_TYPES:
        out.append(ConfigError("train_dataset_task.type", kind, "mf-longseq train builds MindFormers' causal-LM "
                               "dataset", f"use one of {', '.join(t for t in DATASET_TYPES if t)}"))
    return out


OPTIMIZER_KEYS = ("type", "auto_register", "betas", "eps", "weight_decay", "learning_rate")


def _unread_keys(tree: dict) -> List[ConfigError]:
    """Keys that would change a MindFormers run but that mf-longseq train does not read."""
    out = [ConfigError(f"optimizer.{key}", value, "mf-longseq train's AdamW does not read it",
                       f"remove it (read: {', '.join(OPTIMIZER_KEYS)})")
           for key, value in (node_at(tree, "optimizer", {}) or {}).items() if key not in OPTIMIZER_KEYS]
    if node_at(tree, "recompute_config.select_recompute", False):
        out.append(ConfigError("recompute_config.select_recompute", node_at(tree, "recompute_config.select_recompute"),
                               "mf-longseq train recomputes whole layers only", "set select_recompute: False and "
                               "use recompute: True"))
    ours, theirs = node_at(tree, "runner_config.batch_size", 1), node_at(tree, "train_dataset.batch_size")
    if theirs is not None and theirs != ours:
        out.append(ConfigError("train_dataset.batch_size", theirs, f"differs from runner_config.batch_size = {ours}, "
                               "which mf-longseq train uses", f"set train_dataset.batch_size: {ours}"))
    return out


def _optimizer(tree: dict, steps: int, parsed: Optional[dict]) -> List[ConfigError]:
    """AdamW's settings, parsed once (``OptimSettings.from_mindformers``, the schedule built for ``steps``) into
    ``parsed["optimizer"]`` for ``RunSettings``; the error when they cannot be honoured."""
    from mf_longseq.train.optim import OptimSettings
    try:
        settings = OptimSettings.from_mindformers(tree, steps=steps)
    except ConfigError as err:
        return [err]
    if parsed is not None:
        parsed["optimizer"] = settings
    return []


def refusals(tree: dict, *, steps: int = 1, parsed: Optional[dict] = None) -> List[ConfigError]:
    """Every MindFormers key of ``tree`` (a plain dict) that ``mf-longseq train`` cannot honour; [] when none.
    ``parsed``: receives the run's ``OptimSettings`` (``check_run`` passes it; the other values honoured are read
    by ``train/settings.py read_settings``)."""
    return (_runner(tree) + _wrapper(tree) + _callbacks(tree) + _dataset(tree) + _unread_keys(tree)
            + _optimizer(tree, steps, parsed))


__all__ = ["refusals"]
