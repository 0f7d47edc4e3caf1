"""Packed documents: MindFormers' ``actual_seq_len`` (cumulative document ends) -> document ids and positions.

Pure NumPy, for whole sequences (before CP sharding): the batch (``batch.py``) and the data side
(``train/packing.py``) both read these.  Example, S = 10::

    actual_seq_len  3 6 10 10 ...
    segment ids     0 0 0 1 1 1 2 2 2 2
    positions       0 1 2 0 1 2 0 1 2 3       (use_eod_reset: RoPE positions restart per document)
"""
import numpy as np

EOD_RESET_KEY = "model.model_config.use_eod_reset"


def as_rows(x) -> np.ndarray:
    """(S,) or (B, S) array-like -> (B, S) ndarray (one row for a 1-D input)."""
    x = np.asarray(x)
    return x[None] if x.ndim == 1 else x


def check_actual_seq_len(actual_seq_len, seq_len: int) -> np.ndarray:
    """Validate (B, L) or (L,) ends: non-decreasing, within [1, S], last entry S. Returns (B, L) int64.

    Raises:
        ValueError: naming the sample, its row and the fix.
    """
    raw = np.asarray(actual_seq_len)
    if raw.ndim not in (1, 2) or raw.shape[-1] == 0 or not (np.issubdtype(raw.dtype, np.integer) or (
            np.issubdtype(raw.dtype, np.floating) and np.all(raw == np.round(raw)))):
        raise ValueError(f"actual_seq_len of shape {raw.shape} and dtype {raw.dtype}: expected (L,) or (B, L) "
                         f"integer document ends, L >= 1. Fix: build it with actual_seq_len_from_tokens "
                         f"(train/packing.py) or pad each row with {seq_len}.")
    ends = as_rows(raw).astype(np.int64)
    for b, row in enumerate(ends):
        if np.any(np.diff(row) < 0) or row.min() < 1 or row.max() != seq_len or row[-1] != seq_len:
            raise ValueError(f"actual_seq_len of sample {b} = {row.tolist()}: must be non-decreasing "
                             f"cumulative document ends in [1, {seq_len}] ending with seq_length {seq_len}. "
                             f"Fix: build it with actual_seq_len_from_tokens or pad with {seq_len}.")
    return ends


def segment_ids_from_actual_seq_len(actual_seq_len, seq_len: int) -> np.ndarray:
    """(B, L) document ends -> (B, S) int64 document id of every token (0, 1, ... per sample)."""
    ends = check_actual_seq_len(actual_seq_len, seq_len)
    tokens = np.arange(seq_len)
    return np.stack([np.searchsorted(row, tokens, side="right") for row in ends]).astype(np.int64)


def position_ids_from_actual_seq_len(actual_seq_len, seq_len: int, use_eod_reset: bool = True) -> np.ndarray:
    """(B, S) int64 RoPE positions: restart at 0 in every document when use_eod_reset, else 0..S-1."""
    if not isinstance(use_eod_reset, bool):
        raise ValueError(f"{EOD_RESET_KEY} = {use_eod_reset!r}: must be True or False.")
    ends = check_actual_seq_len(actual_seq_len, seq_len)
    tokens = np.arange(seq_len, dtype=np.int64)
    if not use_eod_reset:
        return np.tile(tokens, (len(ends), 1))
    starts = np.concatenate([np.zeros((len(ends), 1), np.int64), ends[:, :-1]], axis=1)   # (B, L)
    doc = segment_ids_from_actual_seq_len(ends, seq_len)                                   # (B, S)
    return tokens[None, :] - np.take_along_axis(starts, np.minimum(doc, starts.shape[1] - 1), axis=1)


__all__ = ["EOD_RESET_KEY", "as_rows", "check_actual_seq_len", "segment_ids_from_actual_seq_len",
           "position_ids_from_actual_seq_len"]
