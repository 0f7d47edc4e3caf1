"""AttentionPlan: what every attention call of one step needs, built once per step on the host.

A step's batch (B samples of S global tokens) splits into sample groups: samples with equal document ids and
equal dense masks share one kernel call, every other sample runs with its own (per-sample inputs stay exact per
sample; nothing is reduced to sample 0).  For each group the plan holds this rank's ring masks: the visibility
of this ring rank's part to every ring rank's part (``AttentionMask``, or ``DenseMask`` when the dense mask of
use_attn_mask_compression = False is given).  Masks memoize their tile and kernel plans (``AttentionMask.cached``),
so every layer and the backward of the step reuse them.

    plan = AttentionPlan.build(batch=B, seq_len=S, mesh=mesh, layout="zigzag", causal=True, segment_ids=ids)
    for group in plan.groups:   group.members (sample indices), group.masks[j] (keys of ring rank j)
"""
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np

from mf_longseq.attention.mask import AttentionMask, DenseMask, dense_attention_mask, same_sample_mask
from mf_longseq.parallel.algorithms import ALGORITHMS, resolve
from mf_longseq.parallel.sharding import ring_part_positions


def ring_masks(seq_len: int, mesh, layout: str, causal: bool, segment_ids: Optional[np.ndarray] = None,
               dense_mask: Optional[np.ndarray] = None):
    """Visibility of this ring rank's part to every ring rank's part (index j: keys of ring rank j).

    One mask for every sample of the call: ``segment_ids`` (S,) document id per token; ``dense_mask`` (S, S) or
    (1, 1, S, S) uint8, 1 = masked (use_attn_mask_compression off): tiles are then read from it (``DenseMask``)
    instead of computed.  Per-sample inputs are split into groups by ``AttentionPlan.build`` first.
    """
    parts = [ring_part_positions(seq_len, mesh.ring, j, layout) for j in range(mesh.ring)]
    mine = parts[mesh.coords()["ring_id"]]
    docs = (lambda pos: None) if segment_ids is None else (lambda pos: np.asarray(segment_ids)[pos])
    if dense_mask is not None:
        return [DenseMask(mine, part, causal, docs(mine), docs(part), grid=dense_mask) for part in parts]
    return [AttentionMask(mine, part, causal, docs(mine), docs(part)) for part in parts]


def _per_sample(batch: int, seq_len: int, segment_ids, dense_mask):
    """The (ids, dense) of every sample: ids (S,) or None, dense (1, 1, S, S) / (S, S) or None.

    Raises:
        ValueError: a batch dimension that is neither 1 nor ``batch``, or a dense mask not (S, S).
    """
    ids = None if segment_ids is None else np.asarray(segment_ids)
    if ids is not None and not ((ids.ndim == 1 or (ids.ndim == 2 and ids.shape[0] in (1, batch)))
                                and ids.shape[-1] == seq_len):
        raise ValueError(f"segment_ids shape {ids.shape}: expected (S,) or (B, S) with B = {batch}, "
                         f"S = {seq_len}. Fix: "
                         "pass one row of document ids per sample (documents.segment_ids_from_actual_seq_len).")
    dense = None if dense_mask is None else np.asarray(dense_mask)
    if dense is not None and not ((dense.ndim == 2 or (dense.ndim == 4 and dense.shape[:2] in ((1, 1), (batch, 1))))
                                  and dense.shape[-2:] == (seq_len, seq_len)):
        raise ValueError(f"dense_mask shape {dense.shape}: expected (S, S) or (B, 1, S, S) with B = {batch}, "
                         f"S = {seq_len}. Fix: pass the uint8 mask of the whole sequence (1 = masked), one per "
                         "sample or one shared by the batch.")
    id_of = (lambda b: None) if ids is None else ((lambda b: ids) if ids.ndim == 1 else
                                                  (lambda b: ids[b if ids.shape[0] > 1 else 0]))
    dense_of = (lambda b: dense) if dense is None or dense.ndim == 2 or dense.shape[0] == 1 else \
        (lambda b: dense[b:b + 1])
    return [(id_of(b), dense_of(b)) for b in range(batch)]


def _sample_groups(samples):
    """Group indices of samples with equal (ids, dense): [(members, (ids, dense))] in first-member order."""
    groups = []
    for b, (ids, dense) in enumerate(samples):
        for members, (g_ids, g_dense) in groups:
            same_ids = (ids is None and g_ids is None) or (ids is not None and g_ids is not None and
                                                           np.array_equal(ids, g_ids))
            if same_ids and (dense is g_dense or same_sample_mask(dense, g_dense)):
                members.append(b)
                break
        else:
            groups.append(([b], (ids, dense)))
    return groups


@dataclass(frozen=True, eq=False)
class SampleGroup:
    """Samples that share one kernel call: their indices in the batch and this rank's ring masks."""

    members: Tuple[int, ...]
    masks: Tuple[AttentionMask, ...]


@dataclass(frozen=True, eq=False)
class AttentionPlan:
    """The attention of one step on this rank (see the module docstring).

    Attributes:
        batch: samples B of the step.
        seq_len: global sequence length S (all CP ranks together).
        groups: the sample groups, in first-member order; their members cover 0..B-1 once.
        dense_mask: the (B, 1, S, S) uint8 mask (1 = masked) the plan was built from, or None (compression on).
        ring, ring_id, layout, causal: what the masks were built for (the mesh's ring degree and this rank's ring
            index, the sequence layout, causal visibility); ``check_fits`` compares a call against them.
    """

    batch: int
    seq_len: int
    groups: Tuple[SampleGroup, ...]
    dense_mask: Optional[np.ndarray] = None
    ring: int = 1
    ring_id: int = 0
    layout: str = "zigzag"
    causal: bool = True

    def check_fits(self, *, batch: int, seq_len: int, mesh, layout: str, causal: bool) -> None:
        """Raises ValueError naming the first difference between this plan and a call of ``batch`` samples of
        global length ``seq_len`` on ``mesh`` with ``layout`` and ``causal`` (a plan built for another call would
        apply its masks to the wrong tokens)."""
        call = {"batch": batch, "seq_len": seq_len, "ring degree": mesh.ring,
                "ring index": mesh.coords()["ring_id"], "layout": layout, "causal": causal}
        built = {"batch": self.batch, "seq_len": self.seq_len, "ring degree": self.ring, "ring index": self.ring_id,
                 "layout": self.layout, "causal": self.causal}
        for name, want in built.items():
            if call[name] != want:
                raise ValueError(f"attention_plan built for {name} = {want!r}, the call has {call[name]!r}. Fix: "
                                 "build the plan (ShardedBatch / AttentionPlan.build) from this call's inputs, mesh, "
                                 "layout and causal, or pass no plan.")

    @classmethod
    def build(cls, *, batch: int, seq_len: int, mesh, layout: str, causal: bool,
              segment_ids: Optional[np.ndarray] = None, dense_mask: Optional[np.ndarray] = None) -> "AttentionPlan":
        """Group the samples and build each group's per-step masks once (the ``masks`` of the mesh's algorithm in
        ``ALGORITHMS``; ``ring_masks`` for every algorithm of the table so far).

        Args:
            batch: B; seq_len: global S.
            mesh: the ``Mesh`` (its ring degree and this rank's ring index); layout: ``zigzag`` or ``contiguous``.
            causal: causal visibility from global positions.
            segment_ids: global document ids, (S,) shared by the batch or (B, S) per sample; None: one document.
            dense_mask: uint8 (S, S) or (1, 1, S, S) shared, or (B, 1, S, S) per sample, 1 = masked; None: none.

        Raises:
            ValueError: segment_ids or dense_mask of another shape (the message names the fix).
        """
        groups = _sample_groups(_per_sample(batch, seq_len, segment_ids, dense_mask))
        step_masks = resolve(ALGORITHMS[mesh.plan.algo].masks)
        return cls(batch, seq_len, tuple(SampleGroup(tuple(members), tuple(step_masks(seq_len, mesh, layout, causal,
                                                                                       ids, dense)))
                                         for members, (ids, dense) in groups), dense_mask,
                   ring=mesh.ring, ring_id=mesh.coords()["ring_id"], layout=layout, causal=causal)

    @classmethod
    def for_model(cls, *, batch: int, seq_len: int, mesh, layout: str, causal: bool,
                  segment_ids: Optional[np.ndarray], use_attn_mask_compression: bool) -> "AttentionPlan":
        """``build`` as a decoder runs it: with use_attn_mask_compression False, the (B, 1, S, S) mask MindFormers
        builds (``dense_attention_mask``, B * S^2 bytes) is built here, once per step, and shared by all layers."""
        dense = None if use_attn_mask_compression else dense_attention_mask(batch, seq_len, segment_ids,
                                                                             causal=causal)
        return cls.build(batch=batch, seq_len=seq_len, mesh=mesh, layout=layout, causal=causal,
                         segment_ids=segment_ids, dense_mask=dense)


__all__ = ["AttentionPlan", "SampleGroup", "ring_masks"]
