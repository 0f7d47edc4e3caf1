"""The public entry point: ``context_parallel_attention``, called on every CP rank with that rank's shards.

    q_loc = shard_sequence(q, mesh, layout="zigzag", seq_dim=1)                  # (B, S/CP, N, D)
    out_loc = context_parallel_attention(q_loc, k_loc, v_loc, mesh=mesh, algo="colossalai_cp",
                                         causal=True, layout="zigzag")           # (B, S/CP, N, D)

The algorithm is a name of the table ``ALGORITHMS`` (``parallel/algorithms.py``; MindFormers' three
``context_parallel_algo`` values and the plugin's own) and must agree with the mesh: ``colossalai_cp`` needs
mesh.ulysses == 1, ``ulysses_cp`` needs mesh.ring == 1, ``hybrid_cp`` takes both.  Dispatch is the row's ``run``.
"""
from typing import Optional

import numpy as np
from mindspore import Tensor, ops

from mf_longseq.attention.attention_plan import AttentionPlan
from mf_longseq.attention.kernel import TOKEN_MAJOR, default_scale
from mf_longseq.attention.select import select_kernel
from mf_longseq.attention.ulysses import ulysses_attention
from mf_longseq.parallel.algorithms import ALGORITHMS, CpAlgorithm, resolve
from mf_longseq.parallel.plan import CP_ALGOS, LEGACY_ALGO_SPELLINGS


def _check_algo(algo: str, mesh) -> CpAlgorithm:
    """The table row of ``algo``, checked against the mesh's Ulysses x ring split."""
    algo = LEGACY_ALGO_SPELLINGS.get(algo, algo)
    if algo not in ALGORITHMS:
        raise ValueError(f"algo = {algo!r}: unknown context-parallel algorithm. "
                         f"Fix: use one of {', '.join(CP_ALGOS)}.")
    row = ALGORITHMS[algo]
    if not row.takes(mesh.cp, mesh.ulysses):
        want = row.ulysses_degree(mesh.cp)
        shape = "without a Ulysses split" if want == 1 else f"with ulysses = cp = {mesh.cp}"
        raise ValueError(f"algo = {algo!r} needs a mesh {shape}, got {mesh}. "
                         f"Fix: build the mesh with ulysses={1 if want == 1 else 'cp'}, or use hybrid_cp.")
    return row


def _by_groups(q, k, v, plan: AttentionPlan, run):
    """Run ``run(q, k, v, masks)`` once per sample group of ``plan`` (samples sharing their document ids and
    dense mask); outputs go back in batch order (differentiable).  Exact per sample.
    """
    if len(plan.groups) == 1:
        return run(q, k, v, plan.groups[0].masks)
    outs, order = [], []
    for group in plan.groups:
        take = Tensor(np.asarray(group.members, np.int64))
        outs.append(run(ops.gather(q, take, 0), ops.gather(k, take, 0), ops.gather(v, take, 0), group.masks))
        order.extend(group.members)
    return ops.gather(ops.cat(outs, axis=0), Tensor(np.argsort(np.asarray(order))), 0)   # batch order


def context_parallel_attention(q, k, v, *, mesh, algo: str = "colossalai_cp", causal: bool = True,
                               layout: str = "zigzag", scale: Optional[float] = None, kernel=None,
                               use_alltoall: bool = False, segment_ids: Optional[np.ndarray] = None,
                               dense_mask: Optional[np.ndarray] = None,
                               attention_plan: Optional[AttentionPlan] = None):
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
        attention_plan: the step's ``AttentionPlan`` (built once per step by ``ShardedBatch``, shared by every
            layer); it replaces ``segment_ids`` and ``dense_mask`` (and must have been built with the same
            mesh, layout and causal).  None: built here from them.

    Per-sample inputs stay per sample: samples with equal ids and equal dense masks run together, every other
    sample runs with its own.

    Returns:
        (B, S/CP, N, D) in q's dtype: this rank's part of the output, in ``layout``.

    Raises:
        ValueError: unknown algorithm, algorithm not matching the mesh, heads not divisible by the Ulysses degree,
            segment_ids or dense_mask of a shape other than the above, an attention_plan built for another batch,
            sequence length, ring rank, layout or causal setting, or given together with segment_ids / dense_mask.
    """
    row = _check_algo(algo, mesh)
    kernel = kernel or select_kernel(mesh.device_target)
    scale = default_scale(q.shape[-1]) if scale is None else scale
    seq_len = q.shape[1] * mesh.cp
    if attention_plan is None:
        attention_plan = AttentionPlan.build(batch=q.shape[0], seq_len=seq_len, mesh=mesh, layout=layout,
                                             causal=causal, segment_ids=segment_ids, dense_mask=dense_mask)
    elif segment_ids is not None or dense_mask is not None:
        raise ValueError("attention_plan given together with segment_ids / dense_mask: the plan already holds the "
                         "step's documents and masks. Fix: pass either the plan or segment_ids / dense_mask.")
    else:
        attention_plan.check_fits(batch=q.shape[0], seq_len=seq_len, mesh=mesh, layout=layout, causal=causal)

    def run(q, k, v, masks):
        return _attention(row, q, k, v, mesh, kernel, scale, use_alltoall, masks)
    return _by_groups(q, k, v, attention_plan, run)


def _token_major(kernel):
    """``kernel`` working on (B, S, N, D) tensors directly (``AttentionKernel.with_input_layout("BSND")``, e.g.
    the fused CPU kernel), or None when it only takes the (B, N, S, D) of the kernel contract."""
    return kernel.with_input_layout(TOKEN_MAJOR) if TOKEN_MAJOR in kernel.input_layouts else None


def _attention(row: CpAlgorithm, q, k, v, mesh, kernel, scale, use_alltoall, masks):
    """The row's ``run`` with this rank's per-step masks.

    A kernel that reads the token-major (B, S, N, D) layout gets the tensors as they are; any other gets them
    transposed to (B, N, S, D) and back (by the ``run``).
    """
    token_major = _token_major(kernel)
    return resolve(row.run)(q, k, v, mesh=mesh, kernel=token_major or kernel, masks=masks, scale=scale,
                            use_alltoall=use_alltoall, token_major=token_major is not None)


__all__ = ["context_parallel_attention", "ulysses_attention"]
