"""MindFormers' dataset columns -> this rank's model inputs, and the global mean loss MindFormers' Trainer logs.

MindFormers' ``Model.train`` calls ``network(*columns)`` with whole (unsharded) sequences of this dp rank, in
the dataset's column order, and expects one scalar loss.  Two formats are accepted (shapes: B samples, S =
``seq_length`` tokens, L = ``eod_pad_length`` document ends):

* pretraining (``CausalLanguageModelDataset``, ``input_columns: [input_ids]``): ``input_ids`` (B, S + 1).  The
  model shifts: ids = tokens[:, :-1], labels = tokens[:, 1:]; the loss mask is 0 where the label is
  ``pad_token_id`` (the rule of ``mf-longseq train``, ``train/data.py``: a padded position is never a target.
  MindFormers' own LlamaForCausalLM masks where the *input* token is the pad; both agree on unpadded data).
* packed (MindFormers' GPT dataset with ``create_compressed_eod_mask``): ``input_ids, labels, loss_mask,
  position_ids, actual_seq_len``: (B, S) x 4 and (B, L), already shifted.  ``position_ids`` is not used: the
  model derives the same per-document positions from ``actual_seq_len`` (``use_eod_reset``) or runs global
  positions (``use_eod_reset: False``).  A label of -100 (Hugging Face's ignore index, ``IGNORE_INDEX``) is no
  target: its loss_mask becomes 0.

Values are checked on the host before the step's device work (``whole_batch``): ids and labels in [0,
vocab_size), loss_mask finite and >= 0; each error names the column, the (row, position), the value and the fix.

Each rank then keeps its ``shard_sequence`` cut (B, S/CP) of ids, labels and mask.  The loss returned is
``sum over dp x cp of (CE * mask)`` / ``sum over dp x cp of mask``, the same number on every rank (what
MFLossMonitor prints; it equals the one-rank loss of the dp x B samples), and its gradient on each rank is this
rank's share ``d(local CE sum) / global count``: summing the gradients over dp x cp (the plugin's runner
wrapper does, ``mf_route/wrapper.py``) gives exactly the gradient of the global mean.
"""
from typing import Optional

import numpy as np
from mindspore import Tensor, nn, ops

from mf_longseq.parallel.comm import all_reduce


def loss_mask_from_labels(labels: np.ndarray, pad_token_id: Optional[int]) -> np.ndarray:
    """(B, S) float32: 1 where the label counts, 0 where it is ``pad_token_id`` (None: every label counts)."""
    mask = np.ones(np.shape(labels), np.float32)
    if pad_token_id is not None:
        mask[np.asarray(labels) == pad_token_id] = 0.0
    return mask


def _host(x) -> np.ndarray:
    return x.asnumpy() if isinstance(x, Tensor) else np.asarray(x)


def check_pretraining_rows(shape, seq_length: int, where: str = "input_ids") -> None:
    """Refuse a pretraining ``input_ids`` batch whose shape is not (batch, seq_length + 1).

    ``where`` names the data in the message (e.g. ``"train_dataset.data_loader.dataset_dir X: input_ids"``).

    Raises:
        ValueError: naming ``where``, the shape, the length needed and the fix.
    """
    shape = tuple(shape)
    if len(shape) != 2 or shape[1] != seq_length + 1:
        raise ValueError(f"{where} of shape {shape}: MindFormers' pretraining column must be (batch, "
                         f"model.model_config.seq_length + 1 = {seq_length + 1}). Fix: write samples of "
                         f"{seq_length + 1} tokens, or set seq_length to the sample length - 1.")


IGNORE_INDEX = -100     # Hugging Face's ignore index: a label of -100 is no target (its loss_mask becomes 0)


def check_token_ids(values: np.ndarray, column: str, vocab_size: Optional[int], where: str = "",
                    ignore_index: bool = False) -> None:
    """Refuse token ids outside [0, vocab_size) (``ignore_index``: a label may also be ``IGNORE_INDEX``).

    Raises:
        ValueError: naming ``where``, the column, the first bad (row, position), its value and the fix.
    """
    values = np.asarray(values)
    if not values.size or (values.min() >= 0 and (vocab_size is None or values.max() < vocab_size)):
        return                                                  # the common case: two reductions, no masks
    bad = values < 0 if vocab_size is None else (values < 0) | (values >= vocab_size)
    if ignore_index:
        bad &= values != IGNORE_INDEX
    if not bad.any():
        return
    at = np.unravel_index(int(np.argmax(bad)), values.shape)
    allowed = f"[0, model.model_config.vocab_size = {vocab_size})" if vocab_size is not None else "ids >= 0"
    also = f" or {IGNORE_INDEX} (ignored)" if ignore_index else ""
    raise ValueError(f"{where}{column}{list(at)} = {int(values[at])}: a token id must be in {allowed}{also} "
                     "(MindSpore's CPU gather wraps a bad id round silently). Fix: use data tokenized for this model "
                     "(its vocab_size), or mark ignored labels with -100.")


def check_loss_mask(mask: np.ndarray, where: str = "") -> None:
    """Refuse a loss mask with NaN, inf or negative values (they give a NaN or meaningless loss).

    Raises:
        ValueError: naming ``where``, the first bad (row, position) and its value.
    """
    mask = np.asarray(mask)
    bad = ~np.isfinite(mask) | (mask < 0)
    if bad.any():
        at = np.unravel_index(int(np.argmax(bad)), mask.shape)
        raise ValueError(f"{where}loss_mask{list(at)} = {mask[at]}: loss_mask must be finite and >= 0 (1 where the "
                         "label counts, 0 where it does not). Fix: write 0 / 1 (or non-negative weights) in the "
                         "loss_mask column.")


def whole_batch(seq_length: int, pad_token_id: Optional[int], input_ids, labels=None, loss_mask=None,
                vocab_size: Optional[int] = None, where: str = ""):
    """MindFormers' columns -> whole-sequence (ids, labels, mask) NumPy arrays, each (B, S), values checked.

    Packed labels equal to ``IGNORE_INDEX`` (-100) get loss_mask 0 and label 0.  ``where`` prefixes messages.

    Raises:
        ValueError: a pretraining column that is not (B, seq_length + 1), or packed columns not (B, seq_length);
            ids or labels outside [0, vocab_size) (``check_token_ids``); a loss_mask not finite or negative.
    """
    tokens = _host(input_ids)
    if labels is None:
        check_pretraining_rows(tokens.shape, seq_length, where=f"{where}input_ids")
        check_token_ids(tokens, "input_ids", vocab_size, where)
        ids, labels = tokens[:, :-1], tokens[:, 1:]
        return ids, labels, loss_mask_from_labels(labels, pad_token_id)
    labels, mask = _host(labels), _host(loss_mask).astype(np.float32)
    if tokens.shape[-1] != seq_length or labels.shape != tokens.shape or mask.shape != tokens.shape:
        raise ValueError(f"{where}packed columns input_ids {tokens.shape}, labels {labels.shape}, loss_mask "
                         f"{mask.shape}: each must be (batch, model.model_config.seq_length = {seq_length}). Fix: "
                         "build the dataset with this seq_length.")
    check_token_ids(tokens, "input_ids", vocab_size, where)
    check_token_ids(labels, "labels", vocab_size, where, ignore_index=True)
    check_loss_mask(mask, where)
    ignored = labels == IGNORE_INDEX
    labels = np.where(ignored, 0, labels).astype(labels.dtype)
    return tokens, labels, mask * loss_mask_from_labels(labels, pad_token_id) * ~ignored


def padding_rows(mask: np.ndarray) -> np.ndarray:
    """Indices of the rows of a (B, S) loss mask with no label that counts (all-padding samples)."""
    return np.flatnonzero(~(np.asarray(mask) > 0).any(axis=1))


def global_count(mask_local: Tensor, group) -> float:
    """Sum of the loss mask over the group (dp x cp), a host float; ValueError when every label is masked."""
    count = float(all_reduce(Tensor(np.array([mask_local.asnumpy().sum(dtype=np.float64)], np.float32)),
                             group).asnumpy()[0])
    if count <= 0:
        raise ValueError("every label of the batch is masked (loss_mask, or labels equal to "
                         "model.model_config.pad_token_id). Fix: check the data and pad_token_id.")
    return count


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


__all__ = ["loss_mask_from_labels", "check_pretraining_rows", "check_token_ids", "check_loss_mask", "whole_batch",
           "padding_rows", "global_count", "GlobalMeanLoss", "IGNORE_INDEX"]
