"""The parallel settings and the mesh of a model built without them (MindFormers' builder), and their checks.

``LongSeqForCausalLM`` takes its mesh and ``LongSeqConfig`` explicitly (``build_model``, ``LongSeqTrainer``);
when MindFormers' ``build_network`` builds it from ``model.model_config`` alone they come from the
``parallel_config`` MindFormers set on the model config, checked against the ranks that run.
"""
import mindspore as ms

from mf_longseq.config import LongSeqConfig
from mf_longseq.models.model_config import LongSeqModelConfig, check_model_parallel
from mf_longseq.parallel.mesh import Mesh


def _long_seq_from_model_config(config: LongSeqModelConfig, checked: bool = True) -> LongSeqConfig:
    """The parallel settings MindFormers' builder set on the model config (``config.parallel_config``).

    ``checked``: the mesh is built from them, so their degrees must multiply to the ranks that run.  MindFormers'
    CausalLanguageModelingTrainer resets parallel_config to 1 in stand_alone / data_parallel mode before it
    builds the network; the plugin's ``LongSeqTrainer`` keeps the YAML's degrees and passes the mesh itself.
    """
    values = config.long_seq_values()
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


def running_world_size() -> int:
    """Ranks of this job: the world group's size once communication is initialised, else 1."""
    from mindspore.communication import GlobalComm
    if not GlobalComm.INITED:
        return 1
    from mindspore.communication import get_group_size
    return get_group_size()


def _check_supported(config: LongSeqModelConfig, long_seq: LongSeqConfig) -> None:
    for key, ours, theirs in (("num_heads", config.num_heads, long_seq.num_heads),
                              ("n_kv_heads", config.n_kv_heads, long_seq.num_kv_heads),
                              ("seq_length", config.seq_length, long_seq.seq_length)):
        if ours != theirs:
            raise ValueError(f"model.model_config.{key} = {ours!r} but the parallel settings were built with "
                             f"{theirs!r}. Fix: build LongSeqConfig from the same YAML as the model config.")
    check_model_parallel(config, long_seq.model_parallel)


def _check_mesh(mesh: Mesh, long_seq: LongSeqConfig) -> None:
    if (mesh.cp, mesh.ulysses, mesh.mp, mesh.pp) != (long_seq.context_parallel, long_seq.ulysses_degree,
                                                     long_seq.model_parallel, long_seq.pipeline_stage):
        raise ValueError(f"mesh {mesh} does not match parallel_config.context_parallel = "
                         f"{long_seq.context_parallel} with Ulysses degree {long_seq.ulysses_degree}, model_parallel "
                         f"= {long_seq.model_parallel}, pipeline_stage = {long_seq.pipeline_stage}. "
                         "Fix: build the mesh with Mesh.from_config(long_seq_config).")


def default_mesh(long_seq: LongSeqConfig) -> Mesh:
    """``Mesh.from_config``; communication groups created when it spans more than one rank."""
    mesh = Mesh.from_config(long_seq)
    return mesh.create_groups() if mesh.world_size > 1 else mesh


__all__ = ["default_mesh", "running_world_size"]
