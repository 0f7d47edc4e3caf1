"""ulysses_cp: DeepSpeed-Ulysses. All-to-all turns sequence shards into head shards, attention runs over the
whole sequence for 1/U of the heads, and a second all-to-all turns the result back.

    q (B, S/U, N, D) --all-to-all--> (B, S, N/U, D) --attention--> (B, S, N/U, D) --all-to-all--> (B, S/U, N, D)

GQA: the U ranks each need whole kv heads.  With K kv heads and K % U == 0 every rank gets K/U of them; with
K < U (U % K == 0) each kv head is repeated U/K times, just enough for one per rank, never up to N.  The repeat
is an ordinary op, so its gradient sums the copies back.  Query head h keeps its kv head h // (N/K).

The exchange is ``parallel.comm.AllToAll`` (native AlltoAll, the CPU pairwise emulation, or, with
``use_alltoall=False``, the AllGather-based exchange); nothing here depends on which.
"""
from mindspore import ops

from mf_longseq.parallel.comm import AllToAll


def check_ulysses_heads(num_heads: int, num_kv_heads: int, degree: int) -> None:
    """Raise ValueError unless ``degree`` ranks can split the heads."""
    if num_heads % degree:
        valid = [d for d in range(1, num_heads + 1) if num_heads % d == 0]
        raise ValueError(f"Ulysses degree {degree} does not divide the {num_heads} query heads on this rank. "
                         f"Fix: use a Ulysses degree in {valid}, or colossalai_cp (ring), which has no head "
                         f"constraint.")
    if num_kv_heads % degree and degree % num_kv_heads:
        raise ValueError(f"Ulysses degree {degree} and the {num_kv_heads} kv heads must divide one another. "
                         f"Fix: use a Ulysses degree that divides {num_kv_heads} or is a multiple of it.")


def kv_repeats(num_kv_heads: int, degree: int) -> int:
    """How often each kv head is repeated so that ``degree`` ranks get whole kv heads."""
    return degree // num_kv_heads if num_kv_heads < degree else 1


def _qkv_to_heads(q, k, v, group, use_alltoall: bool):
    """One all-to-all for q, k and v together: (B, S_loc, N, D), (B, S_loc, K', D) x 2 -> BNSD head shards.

    Rank j must receive query heads [j*N/U, (j+1)*N/U) and kv heads [j*K'/U, (j+1)*K'/U), so the three tensors
    are interleaved per destination, [q_0 k_0 v_0 | q_1 k_1 v_1 | ...] along the head axis, and cut apart after
    the exchange.  One collective instead of three: fewer latencies, and forward and backward each issue a single
    exchange, so no two independent collectives exist whose order ranks could disagree on.
    """
    b, s, n, d = q.shape
    u, kv = group.size, k.shape[2]
    parts = [t.reshape(b, s, u, heads // u, d) for t, heads in ((q, n), (k, kv), (v, kv))]
    packed = ops.cat(parts, axis=3).reshape(b, s, n + 2 * kv, d)                  # (B, S_loc, N + 2K', D)
    to_heads = AllToAll(group, scatter_dim=2, gather_dim=1, use_alltoall=use_alltoall)
    heads = to_heads(packed).transpose(0, 2, 1, 3)                                # (B, (N + 2K')/U, S, D)
    nq, nk = n // u, kv // u
    return heads[:, :nq], heads[:, nq:nq + nk], heads[:, nq + nk:]


def ulysses_attention(q, k, v, group, inner, use_alltoall: bool = True):
    """Ulysses around ``inner(q, k, v) -> (out, lse)`` (BNSD, full sequence of the group).

    Args:
        q: (B, S_loc, N, D); k, v: (B, S_loc, K, D), this rank's sequence shard.
        group: the Ulysses ``Group``; its shards concatenated in group order form the sequence ``inner`` sees.
        inner: attention over the gathered sequence (a LocalAttention or a RingAttention Cell).
        use_alltoall: False selects the AllGather-based exchange.

    Returns:
        (B, S_loc, N, D), this rank's shard of the output.
    """
    degree = group.size
    check_ulysses_heads(q.shape[2], k.shape[2], degree)
    reps = kv_repeats(k.shape[2], degree)
    if reps > 1:
        k, v = ops.repeat_interleave(k, reps, axis=2), ops.repeat_interleave(v, reps, axis=2)
    q_h, k_h, v_h = _qkv_to_heads(q, k, v, group, use_alltoall)               # (B, N/U, S, D), (B, K'/U, S, D)
    out, _ = inner(q_h, k_h, v_h)                                               # (B, N/U, S, D)
    to_seq = AllToAll(group, scatter_dim=1, gather_dim=2, use_alltoall=use_alltoall)
    return to_seq(out.transpose(0, 2, 1, 3))                                    # (B, S_loc, N, D)
