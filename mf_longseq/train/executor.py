"""Step executors: how the trainer gets this rank's loss and gradients for one step.

``Trainer.step`` (``train/runner.py``) owns everything a step has in common: the local batch, the global token
count, the objective scale 1 / count, the gradient sum over dp x cp (and clipping), the optimizer update, the
logged loss.  An executor does only the part that differs, with one contract::

    loss_sum, grads = executor(inputs, inv_count)
        inputs     this rank's (B, S/CP) input_ids, labels, loss_mask (and packed: actual_seq_len (B, L)), from which
                   the executor builds the step's ``ShardedBatch`` (``model.make_batch``, ``batch.py``) once, before
                   the model runs: every layer and the backward read it
        inv_count  1 / global token count (a float32 scalar Tensor)
        loss_sum   sum of CE * mask over this rank's tokens (host float, summed over the pp stages)
        grads      d(loss_sum * inv_count) / d(executor.params), one Tensor per parameter, in that order

* ``PlainStep``: ``value_and_grad`` of the objective over the whole local batch (the whole model on the rank).
* ``PipelinedStep``: this rank's stage of the model (``models/stage.py`` ``DecoderStage``), the batch cut into
  ``micro_batch_num`` micro-batches along B (one ``ShardedBatch`` each, on every stage: document ids and RoPE
  tables of packed samples reach every stage's layers), run by ``parallel/pipeline.py``'s ``PipelineRunner``
  with a schedule (1F1B by default); the gradients are summed over the micro-batches.

``executor.cell`` is what the rank holds (whose parameters its checkpoint file holds); ``executor.params`` the
parameters the optimizer updates, in gradient order.
"""
from typing import Optional, Sequence

import numpy as np
import mindspore as ms
from mindspore import Tensor

from mf_longseq.models.stage import DecoderStage
from mf_longseq.parallel.comm import all_reduce
from mf_longseq.parallel.pipeline import PipelineRunner, build_schedule
from mf_longseq.parallel.plan import check_micro_batches
from mf_longseq.train.context import configure_op_dispatch


class PlainStep:
    """The whole model on this rank: ``value_and_grad`` of ``model.forward_batch(batch)[0] * inv_count``.

    Args:
        model: a ``LongSeqForCausalLM`` (``make_batch`` / ``forward_batch``), or any Cell with
            ``model(input_ids, labels, loss_mask[, actual_seq_len]) -> (loss_sum, token_count)`` (it then takes the
            shards as they are).
        params: the parameters to differentiate (default: ``model.trainable_params()``), in optimizer order.
    """

    def __init__(self, model, params: Optional[Sequence] = None):
        self.cell = model
        self.params = list(model.trainable_params() if params is None else params)
        self.batched = hasattr(model, "make_batch")
        self.grad_fn = ms.value_and_grad(self._objective, None, self.params, has_aux=True)

    def _objective(self, inv_count, batch):
        loss_sum, token_count = self.cell.forward_batch(batch) if self.batched else self.cell(*batch)
        return loss_sum * inv_count, loss_sum, token_count

    def check_batch_size(self, batch_size: int) -> None:
        """Any batch size works."""

    def __call__(self, inputs, inv_count):
        batch = self.cell.make_batch(*inputs) if self.batched else tuple(inputs)     # once, before the model
        (_, loss_sum, _), grads = self.grad_fn(inv_count, batch)
        return float(loss_sum.asnumpy()), list(grads)


class PipelinedStep:
    """This rank's pipeline stage: micro-batches through ``PipelineRunner`` with ``schedule``.

    Args:
        model: a ``LongSeqForCausalLM`` built on ``mesh`` (all layers are built; the stage runs its own).
        mesh: this rank's ``Mesh`` with pp > 1, groups created.
        micro_batch_num: micro-batches per step (``parallel_config.micro_batch_num``, >= pp).
        schedule: ``1f1b`` (default) or ``gpipe``.

    Raises:
        ValueError: an unknown schedule, micro_batch_num < pp, or tied embeddings (``DecoderStage``).
    """

    def __init__(self, model, *, mesh, micro_batch_num: int, schedule: str = "1f1b"):
        build_schedule(schedule, 0, mesh.pp, micro_batch_num)              # validates the schedule settings
        self.model = model
        self.cell = DecoderStage(model, mesh.coords()["stage"], mesh.pp)
        self.params = list(self.cell.trainable_params())                   # PipelineRunner's gradient order
        self.micro_batch_num, self.schedule = micro_batch_num, schedule
        self.hidden_size, self.act_dtype = model.config.hidden_size, model.compute_dtype
        self.pp_group = mesh.group("pp")
        if self.pp_group.size > 1:
            # The emulated stage transfers (CPU) need synchronous dispatch (the reason: configure_op_dispatch).
            configure_op_dispatch(self.pp_group.device_target)

    def check_batch_size(self, batch_size: int) -> None:
        """Raises ValueError unless ``batch_size`` (sequences per dp rank) splits into the micro-batches."""
        check_micro_batches(batch_size, self.micro_batch_num)

    def __call__(self, inputs, inv_count):
        b, s_loc = inputs[0].shape                                         # (B, S/CP); packed: + (B, L) ends
        mb = b // self.micro_batch_num
        micro = []
        for i in range(self.micro_batch_num):
            cut = slice(i * mb, (i + 1) * mb)                              # (B, ...) -> (B/M, ...)
            batch = self.model.make_batch(*(x[cut] for x in inputs))       # every stage: its layers need it
            micro.append((batch, inv_count) if self.cell.last else (batch,))
        tokens = s_loc // self.model.model.sp.degree                       # sequence parallel: S/CP/MP
        runner = PipelineRunner(self.cell, group=self.pp_group, act_shape=(mb, tokens, self.hidden_size),
                                act_dtype=self.act_dtype)
        outputs, grads = runner.run(micro, self.schedule)
        loss_sum = float(sum(out[1].asnumpy() for out in outputs)) if self.cell.last else 0.0
        loss_sum = all_reduce(Tensor(np.array([loss_sum], np.float32)), self.pp_group)   # the last stage's
        return float(loss_sum.asnumpy()[0]), grads


__all__ = ["PlainStep", "PipelinedStep"]
