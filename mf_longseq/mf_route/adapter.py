"""MindFormers' builder route: the parallel settings and mesh of a model built from ``model.model_config`` alone.

``LongSeqForCausalLM`` takes its mesh and ``LongSeqConfig`` explicitly (``build_model``, ``LongSeqTrainer``) and
reads no global context.  When MindFormers' ``build_network`` builds a registered class (``mf_route/models.py``)
from the model config alone, this adapter is the one place that reads what MindFormers set up instead: the ``parallel_config`` its trainer put on the model config, the
``parallel.enable_alltoall`` and ``context.device_target`` it applied to MindSpore's context, and the ranks that
run; it creates the communication groups of that mesh.
"""
from typing import Optional, Tuple

import mindspore as ms

from mf_longseq.config import ConfigError, LongSeqConfig
from mf_longseq.models.build import default_mesh
from mf_longseq.models.model_config import LongSeqModelConfig
from mf_longseq.parallel.mesh import Mesh


def builder_parallel_config(config: LongSeqModelConfig, checked: bool = True) -> LongSeqConfig:
    """The parallel settings MindFormers' builder set on the model config (``config.parallel_config``).

    ``checked``: the mesh is built from them, so their degrees must multiply to the ranks that run.  MindFormers'
    CausalLanguageModelingTrainer resets parallel_config to 1 in stand_alone / data_parallel mode before it
    builds the network; the plugin's ``LongSeqTrainer`` keeps the YAML's degrees and passes the mesh itself.

    Raises:
        ValueError: the degrees do not multiply to the ranks that run (names the MindFormers reset and the fix).
        ConfigError: a parallel rule, or the model does not fit the degrees (``LongSeqConfig.check_model``).
    """
    values = config.parallel_values()
    target = ms.get_context("device_target")
    values.setdefault("device_target", target if target in ("CPU", "Ascend", "GPU") else "CPU")
    # MindFormers applies the YAML's parallel: section (enable_alltoall) to MindSpore before building the network
    values.setdefault("enable_alltoall", bool(ms.get_auto_parallel_context("enable_alltoall")))
    long_seq = LongSeqConfig(**values)
    world = running_world_size()
    if checked and world != long_seq.world_size:
        raise ValueError(f"parallel_config as given to the network (data_parallel {long_seq.data_parallel} x "
                         f"model_parallel {long_seq.model_parallel} x context_parallel {long_seq.context_parallel} x "
                         f"pipeline_stage {long_seq.pipeline_stage}) spans {long_seq.world_size} ranks, but {world} "
                         "run: MindFormers' trainer resets parallel_config to 1 in stand_alone / data_parallel "
                         "mode. Fix: set trainer.type: LongSeqTrainer (registered by mf_longseq), which keeps the "
                         "YAML's degrees, or check msrun --worker_num.")
    return long_seq


def check_pynative() -> None:
    """Refuse to build the model in graph mode, where compiling its host-side attention schedules fails later with
    an opaque ``RuntimeError: Unsupported statement 'Delete'`` (MindFormers' trainer with ``context.mode: 0``).

    Raises:
        ConfigError: on ``context.mode``, with the fix (PyNative and the plugin's trainer).
    """
    if ms.get_context("mode") == ms.GRAPH_MODE:
        raise ConfigError("context.mode", 0, "the plugin's models run host-side attention schedules in PyNative "
                          "mode; graph mode cannot compile them", "set context.mode: 1 (PYNATIVE_MODE) and "
                          "trainer.type: LongSeqTrainer (mf-longseq adopt YOUR.yaml rewrites both; mf-longseq "
                          "validate --route mindformers lists the rest)")


def builder_settings(config: LongSeqModelConfig, mesh: Optional[Mesh] = None,
                     long_seq: Optional[LongSeqConfig] = None) -> Tuple[LongSeqConfig, Mesh]:
    """(parallel settings, mesh) of a model: the ones given, the missing ones from MindFormers' builder route.

    The settings missing: ``builder_parallel_config`` (checked against the running ranks when the mesh is missing
    too); the mesh missing: ``default_mesh`` of the settings (its groups created).

    Raises:
        ConfigError: graph mode (``check_pynative``), or the settings' rules.
    """
    check_pynative()
    if long_seq is None:
        long_seq = builder_parallel_config(config, checked=mesh is None)
    return long_seq, (mesh if mesh is not None else default_mesh(long_seq))


def running_world_size() -> int:
    """Ranks of this job: the world group's size once communication is initialised, else 1."""
    from mindspore.communication import GlobalComm
    if not GlobalComm.INITED:
        return 1
    from mindspore.communication import get_group_size
    return get_group_size()


__all__ = ["check_pynative", "builder_parallel_config", "builder_settings", "running_world_size"]
