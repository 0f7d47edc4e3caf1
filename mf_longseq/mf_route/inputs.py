"""MindFormers' dataset columns -> this rank's ``ShardedBatch`` and token count, and the global mean loss
MindFormers' Trainer logs.

MindFormers' ``Model.train`` calls ``network(*columns)`` with whole (unsharded) sequences of this dp rank, in
the dataset's column order, and expects one scalar loss.  The two formats (pretraining ``input_ids`` (B, S + 1);
packed ``input_ids, labels, loss_mask, position_ids, actual_seq_len``) and their value checks are
``train/columns.py``'s (``whole_batch``); ``position_ids`` is not used: the model derives the same per-document
positions from ``actual_seq_len`` (``use_eod_reset``) or runs global positions (``use_eod_reset: False``).

Each rank then keeps its ``shard_sequence`` cut (B, S/CP) of ids, labels and mask.  The loss returned is
``sum over dp x cp of (CE * mask)`` / ``sum over dp x cp of mask`` (``train/step_math.py global_token_count``),
the same number on every rank (what MFLossMonitor prints; it equals the one-rank loss of the dp x B samples), and
its gradient on each rank is this rank's share ``d(local CE sum) / global count``: summing the gradients over
dp x cp (the plugin's runner wrapper does, ``mf_route/wrapper.py``) gives exactly the gradient of the global mean.
"""
from mindspore import nn, ops

from mf_longseq.batch import ShardedBatch
from mf_longseq.parallel.comm import all_reduce
from mf_longseq.train import step_math
from mf_longseq.train.columns import whole_batch


def columns_batch(model, group, input_ids, labels=None, loss_mask=None, actual_seq_len=None):
    """(this rank's ``ShardedBatch``, global token count over ``group`` (dp x cp) as a host float) of MindFormers'
    whole-sequence columns for ``model`` (a ``LongSeqForCausalLM``: its config and ``batch_spec``).

    Raises:
        ValueError: bad column shapes or values (``whole_batch``); every label of the batch masked.
    """
    config = model.config
    whole = whole_batch(config.seq_length, getattr(config, "pad_token_id", None), input_ids, labels, loss_mask,
                        vocab_size=config.vocab_size)
    batch = ShardedBatch.from_whole(model.batch_spec, *whole, actual_seq_len)          # (B, S/CP) shards
    local = float(batch.loss_mask.asnumpy().sum(dtype="float64"))
    return batch, step_math.global_token_count(local, group)


class GlobalMeanLoss(nn.Cell):
    """(local CE sum, global token count) -> global mean loss, the same on every rank of ``group``.

    Forward: all_reduce(loss_sum, group) / count.  Backward: dout / count to the local sum only (the other
    ranks' terms are theirs to differentiate; the wrapper sums the gradients over the group).
    """

    def __init__(self, group):
        super().__init__()
        self.group = group

    def construct(self, loss_sum, count):
        return all_reduce(loss_sum, self.group) / count

    def bprop(self, loss_sum, count, out, dout):
        return dout / count, ops.zeros_like(count)


__all__ = ["columns_batch", "GlobalMeanLoss"]
