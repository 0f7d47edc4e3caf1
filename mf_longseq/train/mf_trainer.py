"""``LongSeqTrainer``: MindFormers' causal-LM trainer, keeping the YAML's parallel degrees for the plugin.

MindFormers' ``Trainer(config).train()`` (what ``run_mindformer.py`` runs) calls ``set_config``, which in
stand_alone / data_parallel mode resets ``parallel_config`` (data/model/context parallel, pipeline stages) to 1
before the dataset and the network are built.  The plugin runs its own collectives in exactly those modes, so
this trainer reads the degrees from the config *before* that reset (``set_config``), checks them against the
ranks that run, and hands them on explicitly:

* the network: ``create_network`` builds the YAML's ``model`` with ``mf_longseq.models.build_model`` on this
  rank's ``Mesh`` (no layer reads global state);
* the dataset: ``create_train_dataset`` gives the registered ``LongSeqCausalLanguageModelDataset`` the dp shard
  of this rank (``dp_shard = (dp_id, dp)``), so the CP / MP ranks of one dp group read the same samples;
* the runner wrapper (``LongSeqTrainOneStepCell``) finds the mesh on the network and sums gradients over dp x cp.

Refused before any device work (the message names key, value and fix): ``parallel_config.pipeline_stage`` > 1
(``mf-longseq train`` runs pipeline stages); ``context.mode`` 0 (graph mode: the plugin's attention is PyNative);
``parallel.parallel_mode`` semi_auto / auto (MindSpore's own sharding would split our explicitly-split layers
again); a foreign ``train_dataset_task.type`` when CP or MP > 1 (it would shard over every rank); a wrapper other
than ``LongSeqTrainOneStepCell`` with model_parallel > 1, or with more than one rank unless
``parallel.parallel_mode`` is data_parallel with ``gradients_mean: False`` (then MindSpore's world gradient sum
is the dp x cp sum: ``MFTrainOneStepCell`` on Ascend, with loss scaling).
"""
from typing import Optional

from mindformers.tools.logger import logger
from mindformers.trainer.causal_language_modeling.causal_language_modeling import CausalLanguageModelingTrainer

from mf_longseq.config import ConfigError, LongSeqConfig, check_world_size, node_at, raise_all
from mf_longseq.train.context import bind_rank_cores, configure_op_dispatch

OUR_TRAINER = "LongSeqTrainer"
OUR_DATASET = "LongSeqCausalLanguageModelDataset"
OUR_WRAPPER = "LongSeqTrainOneStepCell"
# The columns the plugin's models take from MindFormers' datasets (models/mf_inputs.py).
PRETRAIN_COLUMNS = ["input_ids"]
PACKED_COLUMNS = ["input_ids", "labels", "loss_mask", "position_ids", "actual_seq_len"]


def plain_tree(config) -> dict:
    """A MindFormers config (MindFormerConfig with parallel_config / recompute_config objects) as plain dicts."""
    from mf_longseq.train.job import load_tree
    return load_tree(config)


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


def layout_header(tree: dict, long_seq: LongSeqConfig, mesh) -> str:
    """The run's layout line: mesh, CP algorithm and layout, sequence, and the global batch per step (MindFormers'
    own ``global_batch_size`` line counts the data_parallel its trainer reset to 1)."""
    batch = int(node_at(tree, "runner_config.batch_size", 1) or 1)
    seq = node_at(tree, "model.model_config.seq_length")
    algo = long_seq.context_parallel_algo if long_seq.context_parallel > 1 else "off"
    return (f"mf_longseq: {mesh}, context_parallel_algo {algo}, layout {long_seq.layout}, seq_length {seq}; global "
            f"batch = batch_size {batch} x data_parallel {long_seq.data_parallel} = {batch * long_seq.data_parallel} "
            f"samples per step (the {long_seq.context_parallel * long_seq.model_parallel} cp x mp ranks of a sample "
            "share it)")


class LongSeqTrainer(CausalLanguageModelingTrainer):
    """``trainer.type: LongSeqTrainer``: MindFormers' causal-LM trainer that keeps the plugin's parallel layout.

    Attributes (set by ``set_config``): ``long_seq`` (``LongSeqConfig`` of the YAML as written), ``mesh`` (this
    rank's ``Mesh``, communication groups created), ``tree`` (the config as plain dicts, before the reset).

    Raises:
        ConfigError: from ``set_config``, before any dataset, network or device work (module docstring).
    """

    long_seq: Optional[LongSeqConfig] = None
    mesh = None
    tree: Optional[dict] = None

    def set_config(self, config=None, is_full_config: bool = False):
        if config is not None and self.long_seq is None:
            self._take_layout(config)
        return super().set_config(config, is_full_config)

    def _take_layout(self, config) -> None:
        from mf_longseq.models.mf_adapter import default_mesh, running_world_size
        tree = plain_tree(config)
        long_seq = LongSeqConfig.from_mindformers(tree)
        raise_all(route_refusals(tree, long_seq))
        check_world_size(long_seq, running_world_size())
        self.tree, self.long_seq = tree, long_seq
        self.mesh = default_mesh(long_seq)
        configure_op_dispatch(long_seq.device_target)       # the CPU runtime of mf-longseq train (train/context.py)
        bind_rank_cores(long_seq.device_target)
        logger.info(layout_header(tree, long_seq, self.mesh))

    def create_network(self, default_args: Optional[dict] = None):
        """The YAML's ``model`` on this rank's mesh (``mf_longseq.models.build_model``)."""
        from mf_longseq.models import build_model
        if (default_args or {}).get("calculate_per_token_loss"):
            raise ConfigError("calculate_per_token_loss", True, "the plugin's models return the global mean loss",
                              "set calculate_per_token_loss: False")
        network = build_model(self.tree, mesh=self.mesh, long_seq_config=self.long_seq)
        self.real_model = network
        return network

    def create_train_dataset(self, default_args: Optional[dict] = None):
        """The train dataset, sharded over dp only (``LongSeqCausalLanguageModelDataset``'s ``dp_shard``)."""
        if self.mesh is None or self.config.train_dataset_task.type != OUR_DATASET:
            return super().create_train_dataset(default_args)
        args = dict(default_args or {})
        args["dp_shard"] = (self.mesh.coords()["dp_id"], self.mesh.dp)
        return super().create_train_dataset(args)


__all__ = ["LongSeqTrainer", "route_refusals", "layout_header", "plain_tree", "OUR_TRAINER", "OUR_DATASET", "OUR_WRAPPER"]
