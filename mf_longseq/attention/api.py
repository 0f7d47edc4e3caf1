"""The public entry point: ``context_parallel_attention``, called on every CP rank with that rank's shards.

    q_loc = shard_sequence(q, mesh, layout="zigzag", seq_dim=1)                  # (B, S/CP, N, D)
    out_loc = context_parallel_attention(q_loc, k_loc, v_loc, mesh=mesh, algo="colossalai_cp",
                                         causal=True, layout="zigzag")           # (B, S/CP, N, D)

The algorithm is one of MindFormers' ``context_parallel_algo`` values and must agree with the mesh:
``colossalai_cp`` needs mesh.ulysses == 1, ``ulysses_cp`` needs mesh.ring == 1, ``hybrid_cp`` takes both.
"""
from typing import Optional

import numpy as np
from mindspore import Tensor, ops

from mf_longseq.attention.hybrid import hybrid_attention
from mf_longseq.attention.kernel import LocalAttention, default_scale
from mf_longseq.attention.select import select_kernel
from mf_longseq.attention.mask import AttentionMask, DenseMask, same_sample_mask
from mf_longseq.attention.ring import RingAttention
from mf_longseq.attention.ulysses import ulysses_attention
from mf_longseq.parallel.plan import CP_ALGOS, LEGACY_ALGO_SPELLINGS
from mf_longseq.parallel.sharding import ring_part_positions


def _check_algo(algo: str, mesh) -> str:
    algo = LEGACY_ALGO_SPELLINGS.get(algo, algo)
    if algo not in CP_ALGOS:
        raise ValueError(f"algo = {algo!r}: unknown context-parallel algorithm. "
                         f"Fix: use one of {', '.join(CP_ALGOS)}.")
    if algo == "colossalai_cp" and mesh.ulysses != 1:
        raise ValueError(f"algo = 'colossalai_cp' needs a mesh without a Ulysses split, got {mesh}. "
                         "Fix: build the mesh with ulysses=1, or use hybrid_cp.")
    if algo == "ulysses_cp" and mesh.ring != 1:
        raise ValueError(f"algo = 'ulysses_cp' needs ulysses = cp in the mesh, got {mesh}. "
                         "Fix: build the mesh with ulysses=cp, or use hybrid_cp.")
    return algo


def ring_masks(seq_len: int, mesh, layout: str, causal: bool, segment_ids: Optional[np.ndarray] = None,
               dense_mask: Optional[np.ndarray] = None):
    """Visibility of this ring rank's part to every ring rank's part (index j: keys of ring rank j).

    One mask for every sample of the call: ``segment_ids`` (S,) document id per token; ``dense_mask`` (S, S) or
    (1, 1, S, S) uint8, 1 = masked (use_attn_mask_compression off): tiles are then read from it (``DenseMask``)
    instead of computed.  Per-sample inputs are split by ``context_parallel_attention`` first.
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
    if ids is not None and not (ids.ndim == 1 or (ids.ndim == 2 and ids.shape[0] in (1, batch))):
        raise ValueError(f"segment_ids shape {ids.shape}: expected (S,) or (B, S) with B = {batch}. Fix: "
                         "pass one row of document ids per sample (train.packing.segment_ids_from_actual_seq_len).")
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


def _by_sample_groups(q, k, v, seq_len: int, segment_ids, dense_mask, run):
    """Run ``run(q, k, v, ids (S,) or None, dense (S, S)-like or None)`` once per group of samples that share
    their document ids and dense mask; outputs go back in batch order (differentiable).  Exact per sample.
    """
    samples = _per_sample(q.shape[0], seq_len, segment_ids, dense_mask)
    groups = _sample_groups(samples)
    if len(groups) == 1:
        return run(q, k, v, *groups[0][1])
    outs, order = [], []
    for members, (ids, dense) in groups:
        take = Tensor(np.asarray(members, np.int64))
        outs.append(run(ops.gather(q, take, 0), ops.gather(k, take, 0), ops.gather(v, take, 0), ids, dense))
        order.extend(members)
    return ops.gather(ops.cat(outs, axis=0), Tensor(np.argsort(np.asarray(order))), 0)   # batch order


def context_parallel_attention(q, k, v, *, mesh, algo: str = "colossalai_cp", causal: bool = True,
                               layout: str = "zigzag", scale: Optional[float] = None, kernel=None,
                               use_alltoall: bool = False, segment_ids: Optional[np.ndarray] = None,
                               dense_mask: Optional[np.ndarray] = None):
    """Attention over a sequence split across the CP ranks of ``mesh``; call it on every CP rank.

    Args:
        q: (B, S/CP, N, D) this rank's queries, as ``shard_sequence(.., layout=layout)`` cut them.
        k, v: (B, S/CP, K, D), K kv heads dividing N (GQA).
        mesh: the ``Mesh`` (with ``create_groups()`` done when CP > 1).
        algo: ``colossalai_cp`` (ring), ``ulysses_cp`` or ``hybrid_cp``.
        causal: causal mask from global positions.
        layout: ``zigzag`` or ``contiguous``; the same layout comes out.
        scale: softmax scale, default 1/sqrt(D).
        kernel: local kernel (default ``select_kernel(mesh.device_target)``: FlashAttention on Ascend, the fused
            C++ kernel on CPU).
        use_alltoall: Ulysses exchange: AlltoAll (True) or the AllGather-based one (False).
        segment_ids: global document id of every token (packed sequences): (S,) shared by the batch, or
            (B, S) per sample; None for one document.
        dense_mask: uint8 (S, S) or (1, 1, S, S) shared by the batch, or (B, 1, S, S) per sample, 1 = masked:
            the uncompressed MindFormers mask; a key is visible where it is 0 AND ``causal`` and
            ``segment_ids`` allow it.  None (default,
            use_attn_mask_compression) builds nothing S x S.

    Per-sample inputs stay per sample: samples with equal ids and equal dense masks run together, every other
    sample runs with its own.

    Returns:
        (B, S/CP, N, D) in q's dtype: this rank's part of the output, in ``layout``.

    Raises:
        ValueError: unknown algorithm, algorithm not matching the mesh, heads not divisible by the Ulysses degree,
            segment_ids or dense_mask of a shape other than the above.
    """
    algo = _check_algo(algo, mesh)
    kernel = kernel or select_kernel(mesh.device_target)
    scale = default_scale(q.shape[-1]) if scale is None else scale

    def run(q, k, v, ids, dense):
        return _attention(q, k, v, mesh, kernel, scale, use_alltoall,
                          ring_masks(q.shape[1] * mesh.cp, mesh, layout, causal, ids, dense))
    return _by_sample_groups(q, k, v, q.shape[1] * mesh.cp, segment_ids, dense_mask, run)


def _attention(q, k, v, mesh, kernel, scale, use_alltoall, masks):
    """The algorithm the mesh calls for (ring, Ulysses or hybrid), with this rank's ring masks."""
    if mesh.ulysses > 1 and mesh.ring > 1:
        return hybrid_attention(q, k, v, ulysses_group=mesh.group("ulysses"), ring_group=mesh.group("ring"),
                                kernel=kernel, masks=masks, scale=scale, use_alltoall=use_alltoall)
    if mesh.ulysses > 1:
        return ulysses_attention(q, k, v, mesh.group("ulysses"), LocalAttention(kernel, masks[0], scale),
                                 use_alltoall)
    # Ring (or CP = 1): attention in BNSD on this rank's own part.
    inner = (RingAttention(mesh.group("ring"), kernel, masks, scale) if mesh.ring > 1
             else LocalAttention(kernel, masks[0], scale))
    out, _ = inner(q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3))
    return out.transpose(0, 2, 1, 3)                                            # (B, S/CP, N, D)


__all__ = ["context_parallel_attention", "ring_masks", "ulysses_attention"]
