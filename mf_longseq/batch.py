"""ShardedBatch: everything one training step feeds the model, built once per step before the model runs.

As torchtitan's ``cp_shard`` does, the step's inputs, positions and masks are cut together, once: the model's
layers and the backward only read the batch.  Shapes (legend): B samples, S global tokens (all CP ranks),
S/CP tokens of this rank, D head dim, L document ends per sample.

    spec  = BatchSpec(mesh=mesh, layout="zigzag", head_dim=D, theta=1e4, compute_dtype=ms.float32, ...)
    batch = ShardedBatch.from_shards(spec, ids_loc, labels_loc, mask_loc, actual_seq_len)    # (B, S/CP) shards
    batch = ShardedBatch.from_whole(spec, ids, labels, mask, actual_seq_len)                 # (B, S), cut here

A batch holds: this rank's input_ids, labels, loss_mask; the global length S; the global positions of this
rank's tokens (``parallel/sharding.py``); the per-sample document ids (B, S) of packed samples (from
MindFormers' ``actual_seq_len``, ``documents.py``); the RoPE tables (per-document positions when
``use_eod_reset``); and the ``AttentionPlan`` (sample groups, ring masks, and with use_attn_mask_compression
False the (B, 1, S, S) dense mask), whose masks memoize their tile and kernel plans.
"""
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
from mindspore import Tensor

from mf_longseq.attention.attention_plan import AttentionPlan
from mf_longseq.documents import position_ids_from_actual_seq_len, segment_ids_from_actual_seq_len
from mf_longseq.rope import rope_tables
from mf_longseq.parallel.sharding import global_positions, shard_sequence


@dataclass(frozen=True, eq=False)
class BatchSpec:
    """What a model needs to know to build its batches; fixed when the model is built.

    Attributes:
        mesh: this rank's ``Mesh``.
        layout: the sequence layout of the shards (``zigzag`` or ``contiguous``).
        head_dim: D of the RoPE tables; theta: RoPE base (model.model_config.theta).
        compute_dtype: MindSpore dtype of the RoPE tables.
        use_eod_reset: RoPE positions restart in every packed document (model.model_config.use_eod_reset).
        use_attn_mask_compression: False builds the (B, 1, S, S) dense mask (model.model_config key).
        causal: causal attention.
    """

    mesh: Any
    layout: str
    head_dim: int
    theta: float
    compute_dtype: Any
    use_eod_reset: bool = False
    use_attn_mask_compression: bool = True
    causal: bool = True

    def rope(self, positions: np.ndarray):
        """cos, sin Tensors (rows, S/CP, 1, D) in compute_dtype of (S/CP,) or (rows, S/CP) global positions."""
        cos, sin = rope_tables(np.asarray(positions).reshape(-1, np.shape(positions)[-1]), self.head_dim,
                               self.theta)                                              # (rows, S/CP, D)
        return Tensor(cos[:, :, None, :], self.compute_dtype), Tensor(sin[:, :, None, :], self.compute_dtype)


def _host(x) -> np.ndarray:
    return x.asnumpy() if isinstance(x, Tensor) else np.asarray(x)


def _documents(spec: BatchSpec, actual_seq_len, batch: int, seq_len: int, positions: np.ndarray):
    """(segment_ids (B, S) or None, RoPE positions (S/CP,) or (rows, S/CP)) of one step.

    Raises:
        ValueError: actual_seq_len with a number of rows other than 1 or B, or ends that are not valid.
    """
    if actual_seq_len is None:
        return None, positions
    ends = _host(actual_seq_len)
    segment_ids = segment_ids_from_actual_seq_len(ends, seq_len)                          # (rows, S)
    if segment_ids.shape[0] not in (1, batch):
        raise ValueError(f"actual_seq_len has {segment_ids.shape[0]} rows for a batch of {batch} "
                         "samples. Fix: give one row of document ends per sample (train.packing).")
    if spec.use_eod_reset:
        doc_positions = position_ids_from_actual_seq_len(ends, seq_len, use_eod_reset=True)   # (rows, S)
        positions = shard_sequence(doc_positions, spec.mesh, spec.layout, seq_dim=1)          # (rows, S/CP)
    return np.broadcast_to(segment_ids, (batch, seq_len)), positions


@dataclass(frozen=True, eq=False)
class ShardedBatch:
    """One step's inputs on this rank (see the module docstring).

    Attributes:
        input_ids: (B, S/CP) int Tensor; labels: (B, S/CP) int Tensor or None (logits only); loss_mask: (B, S/CP)
            float Tensor or None.  Labels are shifted globally before sharding (``models/decoder.py``).
        seq_len: global sequence length S.
        positions: (S/CP,) int64 global positions of this rank's tokens.
        segment_ids: (B, S) int64 global document ids of packed samples, or None (one document per sample).
        cos, sin: RoPE tables (1, S/CP, 1, D), or (B or 1, S/CP, 1, D) per-document positions (use_eod_reset).
        attention: the step's ``AttentionPlan`` (every layer and the backward use it).
    """

    input_ids: Any
    labels: Any
    loss_mask: Any
    seq_len: int
    positions: np.ndarray
    segment_ids: Optional[np.ndarray]
    cos: Tensor
    sin: Tensor
    attention: AttentionPlan

    @property
    def dense_mask(self) -> Optional[np.ndarray]:
        """The (B, 1, S, S) uint8 mask (1 = masked) when use_attn_mask_compression is False, else None."""
        return self.attention.dense_mask

    @classmethod
    def from_shards(cls, spec: BatchSpec, input_ids, labels=None, loss_mask=None,
                    actual_seq_len=None) -> "ShardedBatch":
        """The batch of this rank's (B, S/CP) shards (cut in ``spec.layout``).

        Args:
            spec: the model's ``BatchSpec``.
            input_ids, labels, loss_mask: (B, S/CP) this rank's shards (labels, loss_mask may be None).
            actual_seq_len: (B, L) or (1, L) / (L,) int global cumulative document ends (Tensor or ndarray), the
                same on every CP rank; None: one document per sample.

        Raises:
            ValueError: actual_seq_len of another number of rows, or not valid ends (``documents.py``).
        """
        batch, local_len = input_ids.shape[0], input_ids.shape[1]
        seq_len = local_len * spec.mesh.cp                        # the one place the global length is derived
        positions = global_positions(seq_len, spec.mesh, spec.layout)                    # (S/CP,)
        segment_ids, rope_positions = _documents(spec, actual_seq_len, batch, seq_len, positions)
        cos, sin = spec.rope(rope_positions)
        plan = AttentionPlan.for_model(batch=batch, seq_len=seq_len, mesh=spec.mesh, layout=spec.layout,
                                       causal=spec.causal, segment_ids=segment_ids,
                                       use_attn_mask_compression=spec.use_attn_mask_compression)
        return cls(input_ids, labels, loss_mask, seq_len, positions, segment_ids, cos, sin, plan)

    @classmethod
    def from_whole(cls, spec: BatchSpec, input_ids, labels, loss_mask, actual_seq_len=None) -> "ShardedBatch":
        """The batch of whole (B, S) sequences (ndarray or Tensor): this rank's cut is taken here (ids and labels
        int32, loss_mask float32), then as ``from_shards``."""
        shards = [Tensor(np.ascontiguousarray(shard_sequence(_host(x), spec.mesh, spec.layout, seq_dim=1))
                         .astype(dtype)) for x, dtype in ((input_ids, np.int32), (labels, np.int32),
                                                          (loss_mask, np.float32))]
        return cls.from_shards(spec, *shards, actual_seq_len=actual_seq_len)


__all__ = ["BatchSpec", "ShardedBatch"]
