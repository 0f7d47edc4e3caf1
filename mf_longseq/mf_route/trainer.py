"""``LongSeqTrainer``: MindFormers' causal-LM trainer, keeping the YAML's parallel degrees for the plugin.

MindFormers' ``Trainer(config).train()`` (what ``run_mindformer.py`` runs) calls ``set_config``, which in
stand_alone / data_parallel mode resets ``parallel_config`` (data/model/context parallel, pipeline stages) to 1
before the dataset and the network are built.  The plugin runs its own collectives in exactly those modes, so
this trainer reads the degrees from the config *before* that reset (``set_config``), checks them against the
ranks that run, and hands them on explicitly:

* the network: ``create_network`` builds the YAML's ``model`` with ``mf_longseq.models.build_model`` on this
  rank's ``Mesh`` (no layer reads global state);
* the dataset: ``create_train_dataset`` gives the registered ``LongSeqCausalLanguageModelDataset`` the dp shard
  of this rank (``dp_shard = (dp_id, dp)``), so the CP / MP ranks of one dp group read the same samples, and
  and checks the rows it will read against the model's vocab_size / pad_token_id (``scan_dataset``);
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

from mf_longseq.config import ConfigError, LongSeqConfig, check_world_size
from mf_longseq.train.mf_route_rules import OUR_DATASET, OUR_TRAINER, OUR_WRAPPER, route_refusals
from mf_longseq.train.context import bind_rank_cores, configure_op_dispatch, runtime_context_kwargs


def plain_tree(config) -> dict:
    """A MindFormers config (MindFormerConfig with parallel_config / recompute_config objects) as plain dicts."""
    from mf_longseq.train.job import load_tree
    return load_tree(config)


def layout_header(settings, mesh) -> str:
    """The run's layout line (``settings``: its ``RunSettings``): mesh, CP algorithm and layout, sequence, and the
    global batch per step (MindFormers' own ``global_batch_size`` line counts the data_parallel its trainer reset
    to 1)."""
    long_seq, batch, seq = settings.long_seq, settings.data.batch_size, settings.model.seq_length
    algo = long_seq.algo if long_seq.context_parallel > 1 else "off"
    return (f"mf_longseq: {mesh}, context_parallel_algo {algo}, layout {long_seq.layout}, seq_length {seq}; global "
            f"batch = batch_size {batch} x data_parallel {long_seq.data_parallel} = {batch * long_seq.data_parallel} "
            f"samples per step (the {long_seq.context_parallel * long_seq.model_parallel} cp x mp ranks of a sample "
            "share it)")


def apply_cpu_runtime(settings) -> None:
    """The CPU runtime of ``mf-longseq train`` (``train/context.py``) on this route: ``context.runtime_num_threads``
    applied to MindSpore, synchronous op dispatch, the msrun rank bound to its own CPUs.

    MindFormers 1.9's ``build_context`` does not apply ``runtime_num_threads`` (it logs "did not take effect via
    set_context"), so the route ran MindSpore's default (one kernel thread per CPU): with 2 ranks on 2 CPUs that is
    more threads than CPUs, ``bind_rank_cores`` then binds nothing and each rank's thread pool spins on the CPU the
    other rank computes on - at CP = 2, S = 4096 the route used 1.8x our loop's CPU time per step
    (``benchmarks/mf_route_speed.py``, its per-thread profile: ``ActorThread_0`` / ``KernelThread_0`` unbound).
    Called before the dataset and the network exist (no kernel thread yet).

    Raises:
        ValueError: ``context.runtime_num_threads`` is not a positive integer.
    """
    import mindspore as ms
    device_target = settings.long_seq.device_target
    runtime = runtime_context_kwargs(settings.runtime.context)
    if runtime:
        ms.set_context(**runtime)
    configure_op_dispatch(device_target)
    bind_rank_cores(device_target)


class LongSeqTrainer(CausalLanguageModelingTrainer):
    """``trainer.type: LongSeqTrainer``: MindFormers' causal-LM trainer that keeps the plugin's parallel layout.

    Attributes (set by ``set_config``): ``long_seq`` (``LongSeqConfig`` of the YAML as written), ``mesh`` (this
    rank's ``Mesh``, communication groups created), ``settings`` (the ``RunSettings`` of ``check_run`` on the
    config before the reset).

    Raises:
        ConfigError: from ``set_config``, before any dataset, network or device work (module docstring).
    """

    long_seq: Optional[LongSeqConfig] = None
    mesh = None
    settings = None
    registered_class = None                       # model.arch.type's registered class (mf_route/models.py)
    start_checkpoint: Optional[str] = None       # load_checkpoint, loaded by create_network (mf_route/start.py)

    def set_config(self, config=None, is_full_config: bool = False):
        if config is not None and self.long_seq is None:
            self._take_layout(config)
        return super().set_config(config, is_full_config)

    def _take_layout(self, config) -> None:
        from mf_longseq.mf_route.adapter import running_world_size
        from mf_longseq.models.build import default_mesh, model_class_from
        from mf_longseq.train.validation import check_run
        tree = plain_tree(config)
        settings = check_run(tree, route="mindformers", built_by_mindformers=True)   # route_refusals included
        long_seq = settings.long_seq
        self.registered_class = model_class_from(tree, settings.model, registered=True)
        check_world_size(long_seq, running_world_size())
        from mf_longseq.mf_route.start import take_start_checkpoint
        self.start_checkpoint = take_start_checkpoint(config, world_size=running_world_size())
        self.settings, self.long_seq = settings, long_seq
        self.mesh = default_mesh(long_seq)
        apply_cpu_runtime(settings)
        logger.info(layout_header(settings, self.mesh))

    def create_network(self, default_args: Optional[dict] = None):
        """The YAML's ``model`` on this rank's mesh (``mf_longseq.models.build_model``), filled from
        ``load_checkpoint`` when the YAML names one (``mf_route/start.py``)."""
        from mf_longseq.train.job import build_default_model, planned_memory_mib
        from mf_longseq.train.monitor import rss_mib
        if (default_args or {}).get("calculate_per_token_loss"):
            raise ConfigError("calculate_per_token_loss", True, "the plugin's models return the global mean loss",
                              "set calculate_per_token_loss: False")
        before, planned = rss_mib(), planned_memory_mib(self.settings)
        network = build_default_model(self.settings, self.mesh, model_class=self.registered_class)
        network.memory_before_mib, network.memory_planned_mib = before, planned   # read by the runner wrapper
        if self.start_checkpoint:
            from mf_longseq.models.start_weights import load_start_weights
            load_start_weights(network, self.start_checkpoint, mesh=self.mesh)
        self.real_model = network
        return network

    def create_train_dataset(self, default_args: Optional[dict] = None):
        """The train dataset, sharded over dp only (``LongSeqCausalLanguageModelDataset``'s ``dp_shard``)."""
        if self.mesh is None or self.config.train_dataset_task.type != OUR_DATASET:
            return super().create_train_dataset(default_args)
        from mf_longseq.train.mf_dataset import data_check_of, scan_dataset
        args = dict(default_args or {})
        args["dp_shard"] = (self.mesh.coords()["dp_id"], self.mesh.dp)
        dataset = super().create_train_dataset(args)
        batch_size = self.settings.data.batch_size
        scan_dataset(dataset, **data_check_of(self.settings, batch_size=batch_size, dp=self.mesh.dp))  # before step 1
        return dataset


__all__ = ["LongSeqTrainer", "route_refusals", "layout_header", "plain_tree", "OUR_TRAINER", "OUR_DATASET",
           "OUR_WRAPPER"]
