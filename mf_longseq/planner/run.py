"""The planner's prediction for one configured run: what ``mf-longseq train`` (and the MindFormers Trainer route)
log per rank as ``memory_planned_mib`` beside the measured ``memory_measured_mib``.

    memory, recompute = planned_memory(tree)       # tree: the MindFormers config as nested dicts
    planned_mib(tree)                               # memory.total(recompute) / 2**20

The settings are read where the run reads them: ``model.model_config`` (seq_length, compute_dtype,
param_init_type, use_attn_mask_compression), ``runner_config.batch_size`` (sequences per micro-batch),
``parallel_config`` (degrees, micro_batch_num, use_seq_parallel), ``parallel.enable_alltoall``,
``recompute_config.recompute``, ``context.device_target`` (backend "cpu" unless Ascend) and ``long_seq``
(block_size, loss_tile, mlp_tile, offload_layer_inputs).  Nothing is sharded over dp x cp (``zero`` 0): the
plugin's runner and its runner wrapper keep the whole optimizer, gradients and weights on every rank.
"""
from typing import Mapping, Tuple

from mf_longseq.config import LongSeqConfig, node_at, resolve_loss_tile
from mf_longseq.planner.layout import Settings
from mf_longseq.planner.memory import Memory, memory_per_device


def run_settings(tree: Mapping, config: LongSeqConfig, model) -> Settings:
    """The planner's ``Settings`` of a configured run (see the module docstring); ``model`` its
    ``LongSeqModelConfig`` (defaults resolved)."""
    return Settings(seq_len=model.seq_length, micro_batch=int(node_at(tree, "runner_config.batch_size", 1) or 1),
                    micro_batch_num=config.micro_batch_num, param_dtype=model.param_init_type,
                    grad_dtype=model.param_init_type, compute_dtype=model.compute_dtype, zero=0,
                    recompute=bool(node_at(tree, "recompute_config.recompute", False)),
                    mask_compression=bool(model.use_attn_mask_compression),
                    use_alltoall=config.enable_alltoall,
                    backend="ascend" if config.device_target == "Ascend" else "cpu", block_size=config.block_size,
                    loss_tile=resolve_loss_tile(config.loss_tile, model.vocab_size // config.model_parallel),
                    mlp_tile=config.mlp_tile, seq_parallel=config.use_seq_parallel,
                    offload_layer_inputs=config.offload_layer_inputs)


def planned_memory(tree: Mapping) -> Tuple[Memory, bool]:
    """The planner's per-device memory of the run ``tree`` describes (worst pipeline stage) and whether it
    recomputes.

    Raises:
        ConfigError: as ``LongSeqConfig.from_mindformers`` / ``models.model_config_from``.
    """
    from mf_longseq.models import model_config_from
    from mf_longseq.planner.shapes import shape_of
    config = LongSeqConfig.from_mindformers(tree)
    model = model_config_from(tree)
    settings = run_settings(tree, config, model)
    return memory_per_device(shape_of(model, model.family), config.plan, settings), settings.recompute


def planned_mib(tree: Mapping) -> float:
    """The planner's predicted peak per device, MiB: ``planned_memory(tree)`` total."""
    memory, recompute = planned_memory(tree)
    return memory.total(recompute) / 2 ** 20
