"""``LongSeqTrainOneStepCell``: the runner wrapper of MindFormers' Trainer for the plugin's models (CPU and Ascend).

One step, the same as ``mf-longseq train``'s (``train/runner.py``)::

    batch, count = model.mindformers_batch(*columns)     this rank's shards, RoPE tables, attention plan and the
                                                         global token count: host work, outside the gradient
    loss_sum, grads = value_and_grad(forward_batch(batch) / count)    grads: this rank's share
    grads       = all_reduce(grads, dp x cp)             one flat collective; the sum is the global gradient
    grads, norm = clip_grads(grads, max_grad_norm)       MindFormers' ClipGradNorm formula with the whole
                                                         model's norm (train/clip.py), when use_clip_grad
                                                         (token count, sum and clip: train/step_math.py)
    optimizer(grads)                                     MindFormers' optimizer and LR schedule
    loss        = all_reduce(loss_sum, dp x cp) / count  the global mean, the same on every rank

It returns ``(loss, overflow False, scale 1, learning rate, global norm)``, the tuple MindFormers'
``MFLossMonitor`` reads: the loss line shows the learning rate and, with ``use_clip_grad``, the gradient norm
(None without clipping).

Why not MindSpore's / MindFormers' wrappers: ``nn.TrainOneStepCell`` rejects the keyword arguments MindFormers
passes (``calculate_per_token_loss`` ...); ``MFTrainOneStepCell`` checks overflow with ``NPUGetFloatStatusV2``,
which has no CPU kernel, and its gradient reducer sums over the *world*, which is the dp x cp sum only when
model_parallel = 1 and ``parallel.parallel_mode`` is data_parallel with ``gradients_mean: False``.  Use
``MFTrainOneStepCell`` on Ascend for dynamic loss scaling (float16) in that case; this wrapper everywhere else.

The mesh is the network's own (``network.mesh``, set when the model was built): the gradient group is
``mesh.group("dp_cp")``; model-parallel shards are not summed.

Memory: when ``LongSeqTrainer`` built the network it left the planner's peak and the resident memory before the
build on the model (``memory_planned_mib``, ``memory_before_mib``); after each step every rank logs
``memory_planned_mib`` and ``memory_measured_mib`` (peak RSS minus that resident memory; ``train/monitor.py``).
"""
import logging

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn, ops
from mindformers.tools.logger import logger          # the Trainer route's log (MindFormers' own)

from mf_longseq.config import ConfigError
from mf_longseq.families import FAMILIES
from mf_longseq.parallel.comm import all_reduce
from mf_longseq.parallel.mesh import Mesh
from mf_longseq.parallel.tensor_parallel import shard_specs
from mf_longseq.train.clip import clip_grads
from mf_longseq.train.monitor import peak_rss_mib
from mf_longseq.train.step_math import sum_gradients, sync_flat_gradients


_NAMES = [f.model_class for f in FAMILIES.values()]
_OUR_MODELS = ", ".join(_NAMES[:-1]) + " or " + _NAMES[-1]          # "A, B or C"


def plugin_model(network):
    """The plugin model inside ``network`` (MindFormers may wrap it in tool cells): the cell with a ``Mesh``."""
    for _, cell in network.cells_and_names():
        if isinstance(getattr(cell, "mesh", None), Mesh):
            return cell
    raise ConfigError("model.arch.type", type(network).__name__, "LongSeqTrainOneStepCell trains mf_longseq's models "
                      "(it needs their mesh)", f"use {_OUR_MODELS}")


def _refuse_unsupported(scale_sense, calculate_per_token_loss, use_skip_data_by_global_norm) -> None:
    if scale_sense is not None and not (isinstance(scale_sense, (int, float)) and float(scale_sense) == 1.0):
        raise ConfigError("runner_wrapper.scale_sense", scale_sense, "loss scaling needs overflow detection, which "
                          "LongSeqTrainOneStepCell does not do (bfloat16 and float32 need no loss scale)",
                          "remove scale_sense, or on Ascend with model_parallel 1 use MFTrainOneStepCell")
    if calculate_per_token_loss:
        raise ConfigError("calculate_per_token_loss", True, "the plugin's models return the global mean loss",
                          "set calculate_per_token_loss: False")
    if use_skip_data_by_global_norm:
        raise ConfigError("use_skip_data_by_global_norm", True, "LongSeqTrainOneStepCell never skips a step",
                          "set use_skip_data_by_global_norm: False")


class LongSeqTrainOneStepCell(nn.Cell):
    """``runner_wrapper.type: LongSeqTrainOneStepCell``.

    Args:
        network: the plugin's model (columns in, global mean loss out).
        optimizer: a MindSpore / MindFormers optimizer over the network's trainable parameters.
        use_clip_grad: clip the summed gradients to ``max_grad_norm`` (MindFormers' ``ClipGradNorm`` formula,
            the whole model's norm on any layout: ``train/clip.py``).
        max_grad_norm: clipping threshold (L2 norm over all gradients).
        scale_sense: None or 1 only (see ``_refuse_unsupported``).
        **mindformers_args: the other arguments MindFormers' trainer passes (parallel_config, lr_scheduler,
            print_separate_loss ...): not used; ``calculate_per_token_loss`` and ``use_skip_data_by_global_norm``
            must be False.

    Outputs of ``construct``: (loss, overflow False, scale 1.0, learning rate, global norm or None), the form
    MFLossMonitor reads.

    Raises:
        ConfigError: an unsupported key (named), or a network that is not one of the plugin's.
    """

    def __init__(self, network, optimizer, use_clip_grad: bool = False, max_grad_norm: float = 1.0,
                 scale_sense=None, calculate_per_token_loss: bool = False,
                 use_skip_data_by_global_norm: bool = False, **mindformers_args):
        super().__init__(auto_prefix=False)
        _refuse_unsupported(scale_sense, calculate_per_token_loss, use_skip_data_by_global_norm)
        self.network, self.optimizer = network, optimizer
        self.weights = optimizer.parameters
        model = plugin_model(network)
        self.model, self.mesh, self.sharded = model, model.mesh, shard_specs(model)
        self.group = self.mesh.group("dp_cp")
        self.columns = getattr(network, "construct_args_key", None)     # MindFormers' DataOrderWrapperCell
        self.grad_fn = ms.value_and_grad(self._objective, None, self.weights, has_aux=True)
        self.max_grad_norm = float(max_grad_norm) if use_clip_grad else None
        self.names = [p.name for p in self.weights]
        self.sizes = [int(np.prod(p.shape)) for p in self.weights]
        self.memory = (getattr(model, "memory_planned_mib", None), getattr(model, "memory_before_mib", None))
        self.steps = 0

    def sum_gradients(self, grads):
        """Gradients summed over dp x cp in one flat float32 collective, split back in parameter order."""
        if self.group.size == 1:
            return tuple(grads)
        flat = sum_gradients(ops.cat([g.astype(ms.float32).reshape(-1) for g in grads]), self.group)
        out, start = [], 0
        for g, n in zip(grads, self.sizes):
            out.append(flat[start:start + n].reshape(g.shape).astype(g.dtype))
            start += n
        return tuple(out)

    def flat_update(self, grads):
        """The step of ``mf-longseq train`` (``train/runner.py``) for an optimizer with ``step_flat``
        (``LongSeqAdamW``): one flat sum over dp x cp, clipped, handed over whole; returns the norm (or None)."""
        flat = ops.cat([g.astype(ms.float32).reshape(-1) for g in grads])          # (sum of sizes,)
        flat, norm = sync_flat_gradients(flat, self.group, sizes=self.sizes, names=self.names, mesh=self.mesh,
                                         max_grad_norm=self.max_grad_norm, sharded=self.sharded)
        self.optimizer.step_flat(flat)
        return norm

    def _objective(self, inv_count, batch):
        loss_sum, _ = self.model.forward_batch(batch)
        return loss_sum * inv_count, loss_sum

    def _batch(self, inputs):
        if self.columns is not None:                                     # the dataset's columns, by name
            return self.model.mindformers_batch(**dict(zip(self.columns, inputs)))
        return self.model.mindformers_batch(*inputs)

    def learning_rate(self):
        """The optimizer's learning rate of this update (before its step counter moves), or None."""
        get_lr = getattr(self.optimizer, "get_lr", None)
        lr = get_lr() if get_lr is not None else None
        return lr if isinstance(lr, Tensor) else (Tensor(np.float32(lr)) if isinstance(lr, float) else None)

    def log_memory(self):
        """Log this rank's ``memory_planned_mib`` / ``memory_measured_mib`` after the update (planner/run.py)."""
        self.steps += 1
        planned, before = self.memory
        if planned is not None and before is not None:
            logger.info("step %d rank %d: memory_planned_mib %.0f memory_measured_mib %.0f", self.steps,
                        self.mesh.rank, planned, peak_rss_mib() - before)

    def construct(self, *inputs):
        batch, count = self._batch(inputs)
        (_, loss_sum), grads = self.grad_fn(Tensor(np.float32(1.0 / count)), batch)
        lr = self.learning_rate()
        if hasattr(self.optimizer, "step_flat"):
            norm = self.flat_update(grads)
        else:
            grads, norm = self.sum_gradients(grads), None
            if self.max_grad_norm is not None:
                grads, norm = clip_grads(grads, self.names, self.mesh, self.max_grad_norm, self.sharded)
            self.optimizer(grads)
        self.log_memory()
        norm = None if norm is None else Tensor(np.float32(norm))
        loss = (all_reduce(loss_sum.reshape(1), self.group)[0] if self.group.size > 1 else loss_sum) / count
        return loss, Tensor(False), Tensor(np.float32(1.0)), lr, norm


__all__ = ["LongSeqTrainOneStepCell", "plugin_model"]
