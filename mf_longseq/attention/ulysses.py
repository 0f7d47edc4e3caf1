"""ulysses_cp: DeepSpeed-Ulysses for any head counts.  An all-to-all turns sequence shards into head shards,
attention runs over the whole sequence for this rank's heads, and a second all-to-all turns the result back.

    q (B, S/U, N, D) --all-to-all--> (B, S, n_u, D) --attention--> (B, S, n_u, D) --all-to-all--> (B, S/U, N, D)

Heads (``head_split.HeadSplit``): rank u gets n_u = ceil(N/U) or floor(N/U) contiguous query heads, and exactly
the kv heads they read (query head h reads kv head h // (N/K)); a kv head whose query heads straddle two ranks
goes to both, and the exchange's backward sums its two gradients.  No kv head is repeated to N.  When U divides
N and K this is the classic even split; with K < U each kv head reaches U/K ranks, as a repeat would.

The exchange is ``parallel.comm.AllToAllV`` (native AlltoAllV, the CPU pairwise emulation, or, with
``use_alltoall=False``, the AllGather-based exchange); nothing here depends on which.  Local heads whose kv
groups are cut at the rank's edges form up to three uniform GQA calls of ``inner`` (``HeadSplit.segments``).
"""
from mindspore import ops

from mf_longseq.attention.head_split import HeadSplit
from mf_longseq.parallel.comm import AllToAllV


def check_ulysses_heads(num_heads: int, num_kv_heads: int, degree: int) -> HeadSplit:
    """The head split of ``degree`` Ulysses ranks; ValueError when it cannot exist.

    Raises:
        ValueError: the kv heads do not divide the query heads (GQA), or more Ulysses ranks than query heads.
    """
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_kv_heads} kv heads do not divide the {num_heads} query heads on this rank (GQA "
                         f"needs K | N). Fix: use n_kv_heads in "
                         f"{[d for d in range(1, num_heads + 1) if num_heads % d == 0]}.")
    if degree > num_heads:
        raise ValueError(f"Ulysses degree {degree} exceeds the {num_heads} query heads on this rank: some ranks "
                         f"would hold no head. Fix: use a Ulysses degree of at most {num_heads}, or hybrid_cp / "
                         f"colossalai_cp for the rest of the context parallelism.")
    return HeadSplit(num_heads, num_kv_heads, degree)


def to_heads_plan(split: HeadSplit, s_loc: int) -> dict:
    """``AllToAllV`` arguments of sequence -> heads for the packed [q | k | v] head axis (N + 2K heads).

    Rank j is sent the packed indices of its query heads and of its kv heads in k and in v
    (``HeadSplit.packed_index``); every rank contributes ``s_loc`` rows, concatenated in group order.
    """
    u = split.degree
    send = [split.packed_index(j) for j in range(u)]
    return {"send_index": send, "counts": [[len(idx) for idx in send] for _ in range(u)], "gather_sizes": [s_loc] * u}


def to_seq_plan(split: HeadSplit, s_loc: int) -> dict:
    """``AllToAllV`` arguments of heads -> sequence: rank j gets rows [j s_loc, (j+1) s_loc) of every rank's
    heads, concatenated in group order (rank i's n_i heads), i.e. heads 0..N-1 in order."""
    u = split.degree
    return {"send_index": [range(j * s_loc, (j + 1) * s_loc) for j in range(u)], "counts": [[s_loc] * u] * u,
            "gather_sizes": [split.q_count(i) for i in range(u)]}


def _heads(x, start: int, stop: int, axis: int):
    """Heads [start, stop) of x along ``axis`` (the whole tensor when that is all of them)."""
    if start == 0 and stop == x.shape[axis]:
        return x
    return x[:, start:stop] if axis == 1 else x[:, :, start:stop]


def _qkv_to_heads(q, k, v, group, split: HeadSplit, use_alltoall: bool, token_major: bool = False):
    """One all-to-all for q, k and v together: (B, S_loc, N, D), (B, S_loc, K, D) x 2 -> head shards, BNSD
    (B, n_u, S, D), or with ``token_major`` BSND (B, S, n_u, D).

    One collective instead of three: fewer latencies, and no two independent collectives whose order ranks
    could disagree on.
    """
    packed = ops.cat([q, k, v], axis=2)                                       # (B, S_loc, N + 2K, D)
    to_heads = AllToAllV(group, scatter_dim=2, gather_dim=1, use_alltoall=use_alltoall,
                         **to_heads_plan(split, q.shape[1]))
    heads = to_heads(packed)                                                  # (B, S, n_u + 2 k_u, D)
    if not token_major:
        heads = heads.transpose(0, 2, 1, 3)                                   # (B, n_u + 2 k_u, S, D)
    axis = 2 if token_major else 1
    nq, nk = split.q_count(group.index), split.kv_count(group.index)
    return (_heads(heads, 0, nq, axis), _heads(heads, nq, nq + nk, axis),
            _heads(heads, nq + nk, nq + 2 * nk, axis))


def ulysses_attention(q, k, v, group, inner, use_alltoall: bool = True, token_major: bool = False):
    """Ulysses around ``inner(q, k, v) -> (out, lse)`` (full sequence of the group).

    Args:
        q: (B, S_loc, N, D); k, v: (B, S_loc, K, D), this rank's sequence shard; K divides N, U <= N.
        group: the Ulysses ``Group``; its shards concatenated in group order form the sequence ``inner`` sees.
        inner: attention over the gathered sequence (a LocalAttention or a RingAttention Cell), on BNSD
            tensors, or on BSND tensors when ``token_major`` (its kernel reads that layout: no transposes).
        use_alltoall: False selects the AllGather-based exchange.

    Returns:
        (B, S_loc, N, D), this rank's shard of the output.

    Raises:
        ValueError: see ``check_ulysses_heads``.
    """
    split = check_ulysses_heads(q.shape[2], k.shape[2], group.size)
    q_h, k_h, v_h = _qkv_to_heads(q, k, v, group, split, use_alltoall, token_major)
    axis = 2 if token_major else 1
    outs = [inner(_heads(q_h, q0, q1, axis), _heads(k_h, k0, k1, axis), _heads(v_h, k0, k1, axis))[0]
            for (q0, q1), (k0, k1) in split.segments(group.index)]
    out = outs[0] if len(outs) == 1 else ops.cat(outs, axis=axis)              # (B, n_u, S, D) or (B, S, n_u, D)
    to_seq = AllToAllV(group, scatter_dim=1, gather_dim=2, use_alltoall=use_alltoall,
                       **to_seq_plan(split, q.shape[1]))
    return to_seq(out if token_major else out.transpose(0, 2, 1, 3))          # (B, S_loc, N, D)
