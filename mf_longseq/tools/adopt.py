"""``mf-longseq adopt MY.yaml [-o OUT.yaml] [--cp N --algo A] [--route mindformers|train]``: a MindFormers
LLaMA2 / Qwen / Qwen1.5 YAML rewritten to run with the plugin, every change printed with its reason.

    mf-longseq adopt pretrain_llama2_7b.yaml --cp 4 --algo colossalai_cp -o llama2_7b_cp4.yaml

What changes (each line of the printed diff says why): the model and config classes become the plugin's (the
family read from MindFormers' classes; Qwen v1's ``intermediate_size`` doubled to the plugin's convention), the
trainer, runner wrapper and dataset task become the plugin's (with ``auto_register`` for ``--register_path``),
``context.mode`` 1, ``parallel.parallel_mode`` 0 without full_batch or the parallel optimizer, ``sink_mode``
off, the CP degree and algorithm set, model keys that only serve inference or MindFormers' own kernels removed,
optimizers MindFormers 1.9 no longer registers replaced by the one with the same update.  On the ``train`` route
the keys ``mf-longseq train`` refuses are rewritten too (epochs, callbacks, optimizer betas).

What cannot be carried over is refused, naming the key (exit status 1, nothing written): a model the plugin has
no class for, RoPE scaling, dropout, a finetuning dataset with label columns (unless ``--pretraining-columns``),
and whatever ``mf-longseq validate --route ROUTE`` still refuses on the rewritten file.
"""
import argparse
import copy
import sys
from dataclasses import dataclass, field
from typing import Any, List, Mapping, Optional

from mf_longseq.config import ConfigError, node_at
from mf_longseq.families import FAMILIES as FAMILY_TABLE
from mf_longseq.parallel.algorithms import ALGORITHMS, MINDFORMERS_ALGOS
from mf_longseq.train.mf_route_rules import OUR_DATASET, OUR_TRAINER, OUR_WRAPPER, PACKED_COLUMNS, PRETRAIN_COLUMNS

REMOVED = "<removed>"
# MindFormers' (config type, model type) -> the plugin's family (``families.py``); Qwen1.5 is also MindFormers'
# LLaMA with q/k/v bias.
FAMILIES = {f.mindformers_classes: f.name for f in FAMILY_TABLE.values() if f.mindformers_classes}
# model.model_config keys that change nothing in training with the plugin's model, and why.
DROPPED_MODEL_KEYS = {
    **dict.fromkeys(("use_past", "use_past_shard", "is_dynamic", "block_size", "num_blocks", "batch_size",
                     "repetition_penalty", "max_decode_length", "top_k", "top_p", "do_sample", "compute_in_2d"),
                    "inference / generation only"),
    **dict.fromkeys(("layernorm_compute_type", "softmax_compute_type", "rotary_dtype"),
                    "the plugin's model computes norms, softmax and RoPE in float32"),
    "embedding_init_type": "the plugin's embedding has param_init_type",
    "fine_grain_interleave": "MindFormers' graph-mode overlap; the plugin runs PyNative",
    "offset": "MindFormers' pipeline layer offset; the plugin splits layers evenly",
    "qkv_concat": "a weight layout of MindFormers' checkpoints, not of the model's math",
    "max_position_embedding": "RoPE tables are built for seq_length",
    "checkpoint_name_or_path": "MindFormers' model-zoo weights for its own class; load weights with load_checkpoint",
    "ignore_token_id": "labels come from input_ids; padding is masked with pad_token_id",
}
# model.model_config keys dropped at their neutral value and refused otherwise (the plugin does not implement them).
NEUTRAL_MODEL_KEYS = {"scaling_factor": (1, 1.0), "extend_method": ("None", None), "rotary_pct": (1, 1.0),
                      "emb_dropout_prob": (0, 0.0), "hidden_dropout_prob": (0, 0.0),
                      "attention_dropout_prob": (0, 0.0)}
# Optimizers of older MindFormers YAMLs that 1.9 does not register -> the registered class with the same update.
OPTIMIZERS = {"FP32StateAdamWeightDecay": "AdamWeightDecay", "AdamWeightDecayX": "AdamWeightDecay"}


@dataclass
class Change:
    """One rewritten key: ``old`` / ``new`` values (``REMOVED`` when absent) and the one-line reason."""

    key: str
    old: Any
    new: Any
    reason: str

    def line(self) -> str:
        return f"  {self.key}: {self.old!r} -> {self.new!r}    # {self.reason}"


@dataclass
class Adoption:
    """The rewritten tree, its changes and what could not be carried over (``refusals``: empty = runnable)."""

    tree: dict
    route: str
    changes: List[Change] = field(default_factory=list)
    refusals: List[ConfigError] = field(default_factory=list)


class _Editor:
    def __init__(self, tree: dict, route: str):
        self.out = Adoption(tree, route)

    def set(self, path: str, value: Any, reason: str) -> None:
        *parents, last = path.split(".")
        node = self.out.tree
        for part in parents:
            node = node.setdefault(part, {})
        old = node.get(last, REMOVED)
        if old != value:
            node[last] = value
            self.out.changes.append(Change(path, old, value, reason))

    def remove(self, path: str, reason: str) -> None:
        *parents, last = path.split(".")
        node = node_at(self.out.tree, ".".join(parents)) if parents else self.out.tree
        if isinstance(node, dict) and last in node:
            self.out.changes.append(Change(path, node.pop(last), REMOVED, reason))

    def refuse(self, path: str, problem: str, fix: str) -> None:
        self.out.refusals.append(ConfigError(path, node_at(self.out.tree, path), problem, fix))


def adopt(source, *, route: str = "mindformers", cp: Optional[int] = None, algo: Optional[str] = None,
          dp: Optional[int] = None, mp: Optional[int] = None, pretraining_columns: bool = False) -> Adoption:
    """Rewrite a MindFormers YAML (path, dict or MindFormerConfig) for the plugin on ``route``; ``source`` unchanged.

    Args:
        route: ``mindformers`` (MindFormers' Trainer, run_mindformer.py) or ``train`` (``mf-longseq train``).
        cp, algo, dp, mp: parallel_config.context_parallel / context_parallel_algo / data_parallel /
            model_parallel to set (None: keep the YAML's; context_parallel 1 when absent).  ``algo`` is any name of
            ``parallel/algorithms.py`` ALGORITHMS; outside MindFormers' three it is written as long_seq.cp_algo.
        pretraining_columns: read only input_ids from a finetuning dataset (its label columns are dropped).

    Returns:
        An ``Adoption``; its ``refusals`` name every key that could not be carried over.
    """
    from mf_longseq.train.validation import collect_run, load_tree
    edit = _Editor(copy.deepcopy(load_tree(source)), route)
    _model(edit)
    _classes(edit)
    _parallel(edit, cp=cp, algo=algo, dp=dp, mp=mp)
    _data(edit, pretraining_columns)
    _callbacks(edit)
    if edit.out.tree.get("auto_trans_ckpt") and not edit.out.tree.get("load_checkpoint"):
        edit.set("auto_trans_ckpt", False, "no load_checkpoint to transform (MindFormers' Trainer refuses "
                 "auto_trans_ckpt without one)")
    if route == "train":
        _train_route(edit)
    else:
        name = node_at(edit.out.tree, "optimizer.type")
        if name == "AdamW":
            edit.set("optimizer.type", "LongSeqAdamW", "MindFormers' AdamW update on one flat buffer (a dozen ops per "
                     "parameter less in PyNative)")
            edit.set("optimizer.auto_register", "registry.LongSeqAdamW", "found through --register_path")
        elif name in OPTIMIZERS:
            edit.set("optimizer.type", OPTIMIZERS[name], f"MindFormers 1.9 does not register {name}; "
                     f"{OPTIMIZERS[name]} applies the same update (no bias correction, decoupled weight decay)")
    if not edit.out.refusals:
        _, errors = collect_run(edit.out.tree, route=route)
        edit.out.refusals += errors
    return edit.out


def _model(edit: _Editor) -> None:
    tree = edit.out.tree
    section = node_at(tree, "model.model_config") or {}
    kinds = (section.get("type"), node_at(tree, "model.arch.type"))
    if kinds[0] is not None and "LongSeq" in str(kinds[0]):
        return                                                   # already the plugin's
    family = FAMILIES.get(kinds)
    if family is None:
        edit.refuse("model.model_config.type", f"the plugin has LLaMA2, Qwen and Qwen1.5 models; (model_config.type, "
                    f"arch.type) = {kinds} is none of MindFormers' {sorted(FAMILIES)}",
                    "start from a MindFormers LLaMA2 / Qwen / Qwen1.5 YAML")
        return
    if family == "llama2" and section.get("qkv_has_bias"):
        family = "qwen1_5"                                        # MindFormers' Qwen1.5 research YAMLs
    why = "the plugin's class with context-parallel attention (same shape keys)"
    config_class, model_class = FAMILY_TABLE[family].config_class, FAMILY_TABLE[family].model_class
    edit.set("model.model_config.type", config_class, why)
    edit.set("model.model_config.auto_register", f"registry.{config_class}", "found through --register_path")
    edit.set("model.arch.type", model_class, why)
    edit.set("model.arch.auto_register", f"registry.{model_class}", "found through --register_path")
    if family == "qwen" and isinstance(section.get("intermediate_size"), int):
        edit.set("model.model_config.intermediate_size", 2 * section["intermediate_size"], "MindFormers' Qwen counts "
                 "one SwiGLU half, QwenLongSeqConfig both (Hugging Face's convention): the same FFN width")
    _model_keys(edit, section)


def _model_keys(edit: _Editor, section: Mapping) -> None:
    for key in list(section):
        path = f"model.model_config.{key}"
        if key in DROPPED_MODEL_KEYS:
            edit.remove(path, DROPPED_MODEL_KEYS[key])
        elif key in NEUTRAL_MODEL_KEYS:
            if section[key] in NEUTRAL_MODEL_KEYS[key]:
                edit.remove(path, "its neutral value; the plugin's model does not read it")
            else:
                edit.refuse(path, "the plugin's model does not implement it", f"set it to "
                            f"{NEUTRAL_MODEL_KEYS[key][0]!r} or train this model with MindFormers alone")
    base = section.get("rotary_emb_base")
    if base is not None:
        if section.get("theta", base) != base:
            edit.refuse("model.model_config.rotary_emb_base", f"differs from theta = {section['theta']!r}",
                        "keep one RoPE base")
        else:
            edit.remove("model.model_config.rotary_emb_base", "MindFormers' Qwen name of theta")
            edit.set("model.model_config.theta", base, "the RoPE base (was rotary_emb_base)")
    channels = section.get("kv_channels")
    if channels is not None:
        heads, hidden = section.get("num_heads"), section.get("hidden_size")
        if heads and hidden and channels * heads == hidden:
            edit.remove("model.model_config.kv_channels", "equals hidden_size / num_heads, which the plugin derives")
        else:
            edit.refuse("model.model_config.kv_channels", "the plugin's head_dim is hidden_size / num_heads",
                        "remove it, or set hidden_size = kv_channels x num_heads")


def _classes(edit: _Editor) -> None:
    for path, name, why in (("trainer", OUR_TRAINER, "keeps parallel_config's degrees (MindFormers' trainer resets "
                             "them in data_parallel mode) and builds the model on this rank's mesh"),
                            ("runner_wrapper", OUR_WRAPPER, "sums gradients over dp x cp and clips with the whole "
                             "model's norm, on CPU and Ascend"),
                            ("train_dataset_task", OUR_DATASET, "shards samples over data_parallel only: the CP ranks "
                             "of a sequence read the same sample")):
        edit.set(f"{path}.type", name, why)
        edit.set(f"{path}.auto_register", f"registry.{name}", "found through --register_path")
    wrapper = node_at(edit.out.tree, "runner_wrapper") or {}
    scale = wrapper.get("scale_sense")
    if scale is not None and not (isinstance(scale, (int, float)) and float(scale) == 1.0):
        edit.remove("runner_wrapper.scale_sense", "loss scaling is for float16 overflow on Ascend; the plugin's "
                    "wrapper does none (float32 / bfloat16 need none)")
    if wrapper.get("use_skip_data_by_global_norm"):
        edit.remove("runner_wrapper.use_skip_data_by_global_norm", "the plugin's wrapper never skips a step")
    edit.set("context.mode", 1, "PyNative: the plugin's attention runs host-side schedules (graph mode fails to "
             "compile them)")
    edit.set("runner_config.sink_mode", False, "data sinking needs graph mode; in PyNative it repeats every sample")


def _algorithm(edit: _Editor, algo: Optional[str]) -> None:
    """``--algo``: one of MindFormers' names goes to ``parallel_config.context_parallel_algo``, any other registered
    name (``parallel/algorithms.py`` ALGORITHMS) to ``long_seq.cp_algo`` (MindFormers' enum refuses it), and the
    other key, when the YAML has it, names the same algorithm or goes (the two may not disagree)."""
    if algo is None:
        return
    if algo in MINDFORMERS_ALGOS:
        edit.set("parallel_config.context_parallel_algo", algo, "asked on the command line")
        if node_at(edit.out.tree, "long_seq.cp_algo") is not None:
            edit.set("long_seq.cp_algo", algo, "asked on the command line (the two keys may not disagree)")
        return
    edit.set("long_seq.cp_algo", algo, "asked on the command line; outside MindFormers' "
             f"{', '.join(MINDFORMERS_ALGOS)} the plugin's key names the algorithm")
    if node_at(edit.out.tree, "parallel_config.context_parallel_algo") is not None:
        edit.remove("parallel_config.context_parallel_algo", f"MindFormers' enum has no {algo}; long_seq.cp_algo "
                    "names it (the two keys may not disagree)")


def _parallel(edit: _Editor, *, cp, algo, dp, mp) -> None:
    tree = edit.out.tree
    edit.set("parallel.parallel_mode", 0, "the plugin runs its own collectives; MindSpore's semi/auto sharding "
             "would split its explicitly split layers again")
    for key, why in (("full_batch", "every dp rank reads its own batch"),
                     ("enable_parallel_optimizer", "MindSpore's parallel optimizer needs semi/auto parallel (and "
                      "Ascend)"), ("gradients_mean", "the plugin's loss is the global mean already")):
        if node_at(tree, f"parallel.{key}"):
            edit.set(f"parallel.{key}", False, why)
    for key, value in (("data_parallel", dp), ("model_parallel", mp), ("context_parallel", cp)):
        if value is not None:
            edit.set(f"parallel_config.{key}", value, "asked on the command line")
    _algorithm(edit, algo)
    if node_at(tree, "parallel_config.context_parallel") is None:
        edit.set("parallel_config.context_parallel", 1, "no CP degree given (pass --cp N)")
    if node_at(tree, "parallel_config.use_seq_parallel"):
        edit.set("parallel_config.use_seq_parallel", False, "Megatron sequence parallel cannot be combined with CP")
    stages = node_at(tree, "parallel_config.pipeline_stage", 1)
    if edit.out.route == "mindformers" and stages != 1:
        edit.refuse("parallel_config.pipeline_stage", "MindFormers' Trainer route runs dp x cp x mp only",
                    "adopt with --route train (mf-longseq train runs pipeline stages), or set pipeline_stage: 1")
    devices = 1
    for key in ("data_parallel", "model_parallel", "context_parallel", "pipeline_stage"):
        devices *= int(node_at(tree, f"parallel_config.{key}", 1) or 1)
    if node_at(tree, "long_seq.device_num") not in (None, devices):
        edit.set("long_seq.device_num", devices, "the product of the parallel degrees")


def _data(edit: _Editor, pretraining_columns: bool) -> None:
    columns = node_at(edit.out.tree, "train_dataset.input_columns", PRETRAIN_COLUMNS)
    if list(columns) == PRETRAIN_COLUMNS or sorted(columns) == sorted(PACKED_COLUMNS):
        return
    if pretraining_columns:
        edit.set("train_dataset.input_columns", list(PRETRAIN_COLUMNS), "--pretraining-columns: train on input_ids "
                 "(seq_length + 1 tokens); the label columns are not read")
    else:
        edit.refuse("train_dataset.input_columns", "the plugin's models take input_ids (seq_length + 1 tokens) or "
                    "the 5 packed columns, not finetuning labels", "pass --pretraining-columns to train on input_ids "
                    f"only, or use a dataset with {PACKED_COLUMNS}")


def _callbacks(edit: _Editor) -> None:
    """Callbacks MindFormers 1.9 no longer registers (e.g. ObsMonitor, the AICC upload) would fail its build."""
    from mindformers.tools.register import MindFormerModuleType, MindFormerRegister
    for section in ("callbacks", "eval_callbacks"):
        entries = edit.out.tree.get(section)
        if not isinstance(entries, list):
            continue
        kept = [c for c in entries if not isinstance(c, dict) or c.get("auto_register")
                or MindFormerRegister.is_exist(MindFormerModuleType.CALLBACK, c.get("type"))]
        if kept != entries:
            gone = [c.get("type") for c in entries if c not in kept]
            edit.set(section, kept, f"MindFormers 1.9 registers no {', '.join(map(str, gone))}")


def _train_route(edit: _Editor) -> None:
    """The keys ``mf-longseq train`` refuses that have a faithful rewrite (``train/support.py``)."""
    tree = edit.out.tree
    opt = node_at(tree, "optimizer") or {}
    if opt.get("type") not in (None, "AdamW"):
        edit.set("optimizer.type", "AdamW", "mf-longseq train runs AdamW (bias-corrected, decoupled weight decay)")
    if "beta1" in opt or "beta2" in opt:
        betas = [opt.get("beta1", 0.9), opt.get("beta2", 0.999)]
        edit.remove("optimizer.beta1", "AdamW reads betas")
        edit.remove("optimizer.beta2", "AdamW reads betas")
        edit.set("optimizer.betas", betas, "beta1, beta2 as AdamW's betas")
    accumulation = node_at(tree, "runner_config.gradient_accumulation_steps", 1) or 1
    batch = node_at(tree, "runner_config.batch_size", 1) or 1
    if isinstance(accumulation, int) and isinstance(batch, int) and accumulation > 1:
        edit.set("runner_config.batch_size", batch * accumulation, f"{accumulation} accumulated micro-batches as one "
                 "batch: the same gradient (the loss is the mean over every token of the step)")
        edit.set("runner_config.gradient_accumulation_steps", 1, "mf-longseq train applies one update per batch")
    if node_at(tree, "train_dataset.batch_size") not in (None, node_at(tree, "runner_config.batch_size", 1)):
        edit.set("train_dataset.batch_size", node_at(tree, "runner_config.batch_size", 1), "mf-longseq train reads "
                 "runner_config.batch_size")
    if node_at(tree, "runner_config.epochs", 1) != 1:
        edit.set("runner_config.epochs", 1, "mf-longseq train runs --steps updates")
    if (tree.get("run_mode") or "train") != "train":
        edit.set("run_mode", "train", "mf-longseq train only trains")
    for key in ("do_eval", "auto_trans_ckpt", "resume_training", "profile"):
        if tree.get(key):
            edit.set(key, False, "mf-longseq train does not honour it")
    kept = []
    for i, callback in enumerate(tree.get("callbacks") or []):
        kind = callback.get("type") if isinstance(callback, dict) else None
        if kind == "MFLossMonitor":
            kept.append({"type": kind})
        elif kind == "CheckpointMonitor":
            kept.append({"type": kind, "save_checkpoint_steps": callback.get("save_checkpoint_steps", 0)})
        else:
            edit.out.changes.append(Change(f"callbacks[{i}]", callback, REMOVED, "mf-longseq train runs only "
                                           "MFLossMonitor's line and CheckpointMonitor's period"))
    if "callbacks" in tree and kept != tree["callbacks"]:
        edit.set("callbacks", kept, "mf-longseq train reads MFLossMonitor and CheckpointMonitor.save_checkpoint_steps")


def run(args) -> int:
    import contextlib
    import yaml
    with contextlib.redirect_stdout(sys.stderr):              # MindFormers' logs never reach the printed YAML
        result = adopt(args.config, route=args.route, cp=args.cp, algo=args.algo, dp=args.dp, mp=args.mp,
                       pretraining_columns=args.pretraining_columns)
    print(f"{args.config} -> route {result.route}: {len(result.changes)} changes", file=sys.stderr)
    print("\n".join(c.line() for c in result.changes), file=sys.stderr)
    if result.refusals:
        print(f"cannot carry over ({len(result.refusals)}); nothing written:", file=sys.stderr)
        print("\n".join(f"  - {e}" for e in result.refusals), file=sys.stderr)
        return 1
    text = yaml.safe_dump(result.tree, sort_keys=False, allow_unicode=True)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as handle:
            handle.write(f"# adopted from {args.config} by mf-longseq adopt --route {result.route}\n{text}")
        print(f"written: {args.output}", file=sys.stderr)
    else:
        print(text)
    return 0


def register(subparsers) -> None:
    """Add the ``adopt`` verb."""
    parser = subparsers.add_parser("adopt", help="rewrite a MindFormers LLaMA2/Qwen/Qwen1.5 YAML to run with the "
                                   "plugin (prints every change with its reason)", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="a MindFormers YAML")
    parser.add_argument("-o", "--output", help="write the adopted YAML here (default: print it)")
    parser.add_argument("--route", choices=("mindformers", "train"), default="mindformers",
                        help="run_mindformer.py (mindformers, default) or mf-longseq train")
    parser.add_argument("--cp", type=int, help="parallel_config.context_parallel")
    parser.add_argument("--algo", choices=tuple(ALGORITHMS),
                        help="the CP algorithm, any registered name (parallel/algorithms.py): MindFormers' "
                             f"{', '.join(MINDFORMERS_ALGOS)} as parallel_config.context_parallel_algo, any other "
                             "as long_seq.cp_algo")
    parser.add_argument("--dp", type=int, help="parallel_config.data_parallel")
    parser.add_argument("--mp", type=int, help="parallel_config.model_parallel")
    parser.add_argument("--pretraining-columns", action="store_true",
                        help="a finetuning dataset (input_ids, labels, ...): train on input_ids only")
    parser.set_defaults(func=run)


__all__ = ["adopt", "Adoption", "Change", "REMOVED"]
