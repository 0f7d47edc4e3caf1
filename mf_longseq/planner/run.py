"""The planner's prediction for one configured run: what ``mf-longseq train`` (and the MindFormers Trainer route)
log per rank as ``memory_planned_mib`` beside the measured ``memory_measured_mib``.

    settings = check_run(tree)                      # train/validation.py: the run's RunSettings, parsed once
    memory, recompute = planned_memory(settings)
    planned_mib(settings)                           # memory.total(recompute) / 2**20

The values are the run's own (``RunSettings``, ``train/settings.py``): ``settings.model`` (seq_length,
compute_dtype, param_init_type, use_attn_mask_compression, vocab_size), ``settings.data.batch_size``
(``runner_config.batch_size``, sequences per micro-batch), ``settings.long_seq`` (degrees, micro_batch_num,
use_seq_parallel, enable_alltoall, device_target: backend "cpu" unless Ascend, block_size, loss_tile, mlp_tile,
offload_layer_inputs) and ``settings.loop.recompute``.  Nothing is sharded over dp x cp (``zero`` 0): the plugin's
runner and its runner wrapper keep the whole optimizer, gradients and weights on every rank.
"""
from typing import Tuple

from mf_longseq.config import resolve_loss_tile
from mf_longseq.planner.run_settings import Settings
from mf_longseq.planner.memory import Memory, memory_per_device


def run_settings(settings) -> Settings:
    """The planner's ``Settings`` of a configured run: ``settings`` is its ``RunSettings`` (module docstring)."""
    config, model = settings.long_seq, settings.model
    return Settings(seq_len=model.seq_length, micro_batch=settings.data.batch_size,
                    micro_batch_num=config.micro_batch_num, param_dtype=model.param_init_type,
                    grad_dtype=model.param_init_type, compute_dtype=model.compute_dtype, zero=0,
                    recompute=settings.loop.recompute,
                    mask_compression=bool(model.use_attn_mask_compression),
                    use_alltoall=config.enable_alltoall,
                    backend="ascend" if config.device_target == "Ascend" else "cpu", block_size=config.block_size,
                    loss_tile=resolve_loss_tile(config.loss_tile, model.vocab_size // config.model_parallel),
                    mlp_tile=config.mlp_tile, seq_parallel=config.use_seq_parallel,
                    offload_layer_inputs=config.offload_layer_inputs)


def planned_memory(settings) -> Tuple[Memory, bool]:
    """The planner's per-device memory of the run ``settings`` (its ``RunSettings``) describes (worst pipeline
    stage) and whether it recomputes.

    Raises:
        ValueError / KeyError: a model family the planner has no shapes for.
    """
    from mf_longseq.planner.shapes import shape_of
    planned = run_settings(settings)
    model = settings.model
    return memory_per_device(shape_of(model, model.family), settings.long_seq.plan, planned), planned.recompute


def planned_mib(settings) -> float:
    """The planner's predicted peak per device, MiB: ``planned_memory(settings)`` total."""
    memory, recompute = planned_memory(settings)
    return memory.total(recompute) / 2 ** 20
