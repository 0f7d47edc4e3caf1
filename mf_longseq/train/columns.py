"""MindFormers' dataset columns -> whole-sequence (ids, labels, loss_mask) arrays of one dp rank, values checked.

Read by both routes: the dataset scan before the first step (``train/mf_dataset.py scan_dataset``, for
MindFormers' Trainer and for ``mf-longseq train``'s ``dataset_dir``) and the model's column forms on the Trainer
route (``mf_route/inputs.py``).  Two formats (shapes: B samples, S = ``seq_length`` tokens):

* pretraining (``CausalLanguageModelDataset``, ``input_columns: [input_ids]``): ``input_ids`` (B, S + 1), shifted
  here (``step_math.shift_labels``: the loss mask is 0 where the label is ``pad_token_id``).
* packed (MindFormers' GPT dataset with ``create_compressed_eod_mask``): ``input_ids, labels, loss_mask,
  position_ids, actual_seq_len``: (B, S) x 4 and (B, L), already shifted.  A label of -100 (Hugging Face's
  ignore index, ``IGNORE_INDEX``) is no target: its loss_mask becomes 0.

Values are checked on the host before the step's device work (``whole_batch``): ids and labels in [0,
vocab_size), loss_mask finite and >= 0; each error names the column, the (row, position), the value and the fix.
"""
from typing import Optional

import numpy as np
from mindspore import Tensor

from mf_longseq.train.step_math import loss_mask_from_labels, shift_labels


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
        return shift_labels(tokens, pad_token_id)
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


__all__ = ["check_pretraining_rows", "check_token_ids", "check_loss_mask", "whole_batch", "padding_rows",
           "IGNORE_INDEX"]
