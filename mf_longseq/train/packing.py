"""Packed documents (EOD): MindFormers' ``actual_seq_len`` from EOD tokens, and what the engine needs from it.

MindFormers' format (dataset key ``create_compressed_eod_mask: True``): per sample, the cumulative end offsets
of its documents, padded with the sequence length to a fixed ``eod_pad_length``.  A document ends after its
EOD token; an EOD on the last token ends the last document (it adds no entry).  Example, S = 10, EOD = 2::

    tokens          5 7 2 9 9 2 4 4 4 4
    actual_seq_len  3 6 10 10 10 ...          (eod_pad_length entries)
    segment ids     0 0 0 1 1 1 2 2 2 2       -> context_parallel_attention(..., segment_ids=...)
    positions       0 1 2 0 1 2 0 1 2 3       (use_eod_reset: RoPE positions restart per document)

Every CP rank takes its tokens' ids and positions with ``shard_sequence(x, mesh, layout, seq_dim=1)``: both
are global per token, so documents crossing shard or zigzag-chunk boundaries need nothing special.

Training with packed samples (``Trainer(packing=check_run(yaml).data.packing)``) reads MindFormers'
dataset keys: ``train_dataset.data_loader.config.create_compressed_eod_mask: True`` turns packing on,
``eod_pad_length`` (default 128, as MindFormers) bounds the documents per sample, ``eod`` is the EOD token id
(``model.model_config.eos_token_id`` when unset), ``eod_mask_loss`` (default False) drops the loss of every
position whose input token is the EOD (the EOD predicting the next document's first token).  MindFormers keeps
that label by default, and so do we.  ``actual_seq_len`` is computed on the whole sample, before CP sharding.

Padding: a compressed mask cannot hide pad tokens.  Put the padding in its own trailing document (it then sees
only itself) and zero its loss mask.  Compared with MindFormers' ``_get_eod_attention_mask`` we always keep a
final entry equal to S (TND needs it), so a sample may hold at most eod_pad_length documents, not one more.
"""
from dataclasses import dataclass
from typing import Optional

import numpy as np

from mf_longseq.config import node_at
from mf_longseq.documents import as_rows

LOADER_KEY = "train_dataset.data_loader.config"
PACKING_KEY = f"{LOADER_KEY}.create_compressed_eod_mask"
EOD_PAD_KEY = f"{LOADER_KEY}.eod_pad_length"
EOD_TOKEN_KEY = f"{LOADER_KEY}.eod"
EOS_TOKEN_KEY = "model.model_config.eos_token_id"
EOD_MASK_LOSS_KEY = f"{LOADER_KEY}.eod_mask_loss"
DEFAULT_EOD_PAD_LENGTH = 128                       # MindFormers' default (BlendedMegatronDatasetDataLoader)


def actual_seq_len_from_tokens(tokens, eod_token_id: int, eod_pad_length: int) -> np.ndarray:
    """Cumulative document ends per sample, padded with S: (S,) or (B, S) tokens -> (B, eod_pad_length) int64.

    Raises:
        ValueError: a sample holds more documents than eod_pad_length (the error names the key and the
            length that would fit), or eod_pad_length < 1.
    """
    if not isinstance(eod_pad_length, (int, np.integer)) or eod_pad_length < 1:
        raise ValueError(f"{EOD_PAD_KEY} = {eod_pad_length!r}: must be a positive integer. "
                         f"Fix: set it to the largest number of documents a packed sample may hold.")
    tokens = as_rows(tokens)
    batch, seq_len = tokens.shape
    out = np.full((batch, eod_pad_length), seq_len, dtype=np.int64)
    for b in range(batch):
        ends = np.flatnonzero(tokens[b] == eod_token_id) + 1                     # a document ends after its EOD
        ends = ends[ends < seq_len]                                              # the final EOD adds no entry
        docs = len(ends) + 1
        if docs > eod_pad_length:
            raise ValueError(f"{EOD_PAD_KEY} = {eod_pad_length}: sample {b} holds {docs} documents "
                             f"({len(ends)} EOD tokens before its end). Fix: set {EOD_PAD_KEY} to at least "
                             f"{docs}, or pack fewer documents per sample.")
        out[b, :len(ends)] = ends
    return out



@dataclass(frozen=True)
class PackingSettings:
    """How the trainer packs: EOD token, documents per sample, whether EOD positions count in the loss."""

    eod_token_id: int
    eod_pad_length: int = DEFAULT_EOD_PAD_LENGTH
    eod_mask_loss: bool = False

    def __post_init__(self):
        if isinstance(self.eod_token_id, bool) or not isinstance(self.eod_token_id, (int, np.integer)) \
                or self.eod_token_id < 0:
            raise ValueError(f"{EOD_TOKEN_KEY} = {self.eod_token_id!r} (or {EOS_TOKEN_KEY}): packing needs the "
                             f"EOD token id, a non-negative integer. Fix: set {EOD_TOKEN_KEY} or {EOS_TOKEN_KEY}.")
        if isinstance(self.eod_pad_length, bool) or not isinstance(self.eod_pad_length, (int, np.integer)) \
                or self.eod_pad_length < 1:
            raise ValueError(f"{EOD_PAD_KEY} = {self.eod_pad_length!r}: must be a positive integer. "
                             f"Fix: set it to the largest number of documents a packed sample may hold.")
        if not isinstance(self.eod_mask_loss, bool):
            raise ValueError(f"{EOD_MASK_LOSS_KEY} = {self.eod_mask_loss!r}: must be True or False.")

    @classmethod
    def from_mindformers(cls, tree: dict) -> Optional["PackingSettings"]:
        """The settings of a MindFormers YAML (as a plain dict); None when packing is off.  Called by
        ``check_run`` (``train/validation.py``) only: the run reads ``RunSettings.data.packing``."""
        loader = node_at(tree, LOADER_KEY) or {}
        if not isinstance(loader, dict):
            loader = {}
        on = loader.get("create_compressed_eod_mask", False)
        if not isinstance(on, bool):
            raise ValueError(f"{PACKING_KEY} = {on!r}: must be True or False.")
        if not on:
            return None
        eod = loader.get("eod")
        if eod is None or (isinstance(eod, int) and not isinstance(eod, bool) and eod < 0):   # MindFormers: -1 unset
            eod = node_at(tree, EOS_TOKEN_KEY)
        pad_length = loader.get("eod_pad_length", loader.get("compressed_eod_mask_length", DEFAULT_EOD_PAD_LENGTH))
        return cls(eod_token_id=eod, eod_pad_length=pad_length, eod_mask_loss=loader.get("eod_mask_loss", False))

    def pack(self, input_ids: np.ndarray, loss_mask: np.ndarray):
        """Whole-sequence (B, S) input ids and loss mask -> (actual_seq_len (B, eod_pad_length) int32, loss mask).

        The loss mask is copied and, with ``eod_mask_loss``, zeroed where the input token is the EOD.
        """
        ends = actual_seq_len_from_tokens(input_ids, self.eod_token_id, int(self.eod_pad_length))
        mask = np.array(loss_mask, np.float32)
        if self.eod_mask_loss:
            mask[np.asarray(input_ids) == self.eod_token_id] = 0.0
        return ends.astype(np.int32), mask


__all__ = ["PackingSettings", "actual_seq_len_from_tokens", "EOD_PAD_KEY", "EOD_TOKEN_KEY",
           "EOS_TOKEN_KEY", "EOD_MASK_LOSS_KEY", "PACKING_KEY"]
