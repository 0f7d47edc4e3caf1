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
from mf_longseq.attention.kernel import BlockwiseKernel, LocalAttention, default_scale
from mf_longseq.attention.mask import AttentionMask, DenseMask
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

    ``segment_ids`` (S,): document id per token.  ``dense_mask`` (S, S) or (B, 1, S, S) uint8, 1 = masked
    (use_attn_mask_compression off): tiles are then read from it (``DenseMask``) instead of computed.
    """
    parts = [ring_part_positions(seq_len, mesh.ring, j, layout) for j in range(mesh.ring)]
    mine = parts[mesh.coords()["ring_id"]]
    docs = (lambda pos: None) if segment_ids is None else (lambda pos: np.asarray(segment_ids)[pos])
    if dense_mask is not None:
        return [DenseMask(mine, part, causal, docs(mine), docs(part), grid=dense_mask) for part in parts]
    return [AttentionMask(mine, part, causal, docs(mine), docs(part)) for part in parts]


def _by_sample_groups(q, k, v, segment_ids, dense_mask, run):
    """Run ``run(q, k, v, ids (S,), dense)`` once per group of samples sharing their (S,) segment ids.

    (B, S) ids: samples with equal rows run together; the outputs go back in batch order (differentiable).
    A (B, 1, S, S) dense mask gives each group the mask of its first sample.
    """
    ids = None if segment_ids is None else np.asarray(segment_ids)
    if ids is None or ids.ndim == 1:
        return run(q, k, v, ids, dense_mask)
    if ids.ndim != 2 or ids.shape[0] != q.shape[0]:
        raise ValueError(f"segment_ids shape {ids.shape}: expected (S,) or (B, S) with B = {q.shape[0]}. Fix: "
                         "pass one row of document ids per sample (train.packing.segment_ids_from_actual_seq_len).")
    rows, inverse = np.unique(ids, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)

    def dense_of(sample: int):
        return dense_mask[sample:sample + 1] if dense_mask is not None and dense_mask.ndim == 4 else dense_mask
    if len(rows) == 1:
        return run(q, k, v, rows[0], dense_of(0))
    outs, order = [], []
    for group, row in enumerate(rows):
        members = np.flatnonzero(inverse == group)
        take = Tensor(members.astype(np.int64))
        outs.append(run(ops.gather(q, take, 0), ops.gather(k, take, 0), ops.gather(v, take, 0), row,
                        dense_of(int(members[0]))))
        order.append(members)
    return ops.gather(ops.cat(outs, axis=0), Tensor(np.argsort(np.concatenate(order))), 0)   # batch order


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
        kernel: local kernel (default ``BlockwiseKernel()``; ``select_kernel`` picks FlashAttention on Ascend).
        use_alltoall: Ulysses exchange: AlltoAll (True) or the AllGather-based one (False).
        segment_ids: global document id of every token (packed sequences): (S,) shared by the batch, or
            (B, S) per sample (samples with equal rows run together); None for one document.
        dense_mask: uint8 (S, S) or (B, 1, S, S), 1 = masked: the uncompressed MindFormers mask; visibility is
            then read from it.  None (default, use_attn_mask_compression) builds nothing S x S.

    Returns:
        (B, S/CP, N, D) in q's dtype: this rank's part of the output, in ``layout``.

    Raises:
        ValueError: unknown algorithm, algorithm not matching the mesh, heads not divisible by the Ulysses degree.
    """
    algo = _check_algo(algo, mesh)
    kernel = kernel or BlockwiseKernel()
    scale = default_scale(q.shape[-1]) if scale is None else scale

    def run(q, k, v, ids, dense):
        return _attention(q, k, v, mesh, kernel, scale, use_alltoall,
                          ring_masks(q.shape[1] * mesh.cp, mesh, layout, causal, ids, dense))
    return _by_sample_groups(q, k, v, segment_ids, dense_mask, run)


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
