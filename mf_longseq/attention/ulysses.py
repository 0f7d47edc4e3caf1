"""ulysses_cp: DeepSpeed-Ulysses for any head counts.  An all-to-all turns sequence shards into head shards,
attention runs over the whole sequence for this rank's heads, and a second all-to-all turns the result back.

    q (B, S/U, N, D) --all-to-all--> (B, S, n_u, D) --attention--> (B, S, n_u, D) --all-to-all--> (B, S/U, N, D)

Heads (``head_split.HeadSplit``): rank u gets n_u = ceil(N/U) or floor(N/U) contiguous query heads, and exactly
the kv heads they read (query head h reads kv head h // (N/K)); a kv head whose query heads straddle two ranks
goes to both, and the exchange's backward sums its two gradients.  No kv head is repeated to N.  When U divides
N and K this is the classic even split; with K < U each kv head reaches U/K ranks, as a repeat would.

The exchange is ``parallel.comm.all_to_all_v`` (native AlltoAllV, on CPU the host transport's pairwise
transfers, or, with ``use_alltoall=False``, the AllGather-based exchange); nothing here depends on which.  Local
heads whose kv groups are cut at the rank's edges form up to three uniform GQA calls of ``inner``
(``HeadSplit.segments``).  The whole of it is one differentiable Cell (``UlyssesAttention``): see there for what
its backward keeps.
"""
from types import SimpleNamespace

import mindspore as ms
from mindspore import nn, ops

from mf_longseq.attention.head_split import HeadSplit
from mf_longseq.parallel.comm import all_to_all_v


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


def _heads(x, start: int, stop: int, axis: int = 2):
    """Heads [start, stop) of x along ``axis`` (the whole tensor when that is all of them)."""
    if start == 0 and stop == x.shape[axis]:
        return x
    return x[:, start:stop] if axis == 1 else x[:, :, start:stop]


def _cat(xs, axis: int):
    return xs[0] if len(xs) == 1 else ops.cat(xs, axis=axis)


def _part_shapes(counts, b: int, s_loc: int, d: int):
    """(B, S_loc, heads, D) shapes of a token-major exchange from a plan's ``counts`` (heads index i sends to j)."""
    return [[(b, s_loc, c, d) for c in row] for row in counts]


class UlyssesAttention(nn.Cell):
    """Ulysses as ONE differentiable Cell: ``construct(q, k, v) -> out``, q, out (B, S_loc, N, D), k, v
    (B, S_loc, K, D).

    Why one Cell: PyNative keeps every input and output of a custom-bprop Cell alive until its backward.  With
    an exchange Cell on each side of the attention (and the slices between them) that kept the packed
    [q | k | v] shard, its head-sharded copy and the head-sharded output beside the tensors the backward really
    needs.  Here the backward keeps exactly what FlashAttention's backward reads: q, k, v of this rank's heads
    over the whole sequence (B, S, n_u / k_u, D), their output and lse; q, k, v and out themselves are kept by
    PyNative (the caller holds them anyway).

    Forward: part for rank j = [q heads of j | k heads of j | v heads of j] of this sequence shard (one exchange);
    attention over ``inner`` per uniform GQA segment; the output back to sequence shards (a second exchange).
    Backward: dout to heads, ``inner.bprop`` per segment, [dq | dk | dv] of each rank's heads back to sequence
    shards; a kv head two ranks hold has its two gradients summed.  The exchange is
    ``parallel.comm.all_to_all_v`` (native AlltoAllV, the CPU host transport, or the AllGather-based form).
    """

    def __init__(self, group, inner, split: HeadSplit, use_alltoall: bool, token_major: bool):
        super().__init__()
        self.group, self.inner, self.split = group, inner, split
        self.use_alltoall, self.token_major = use_alltoall, token_major
        self.saved = SimpleNamespace(segments=None)          # per segment: (q, k, v, out, lse) of the inner call

    def _exchange(self, parts, counts, dims):
        b, s_loc, _, d = dims
        return all_to_all_v(parts, self.group, _part_shapes(counts, b, s_loc, d), self.use_alltoall)

    def _inner_layout(self, x):
        """Token-major (B, S, n, D) -> what ``inner`` takes ((B, n, S, D) unless token-major)."""
        return x if self.token_major else x.transpose(0, 2, 1, 3)

    def _from_inner(self, x):
        return x if self.token_major else x.transpose(0, 2, 1, 3)

    def _qkv_to_heads(self, q, k, v):
        """(B, S_loc, N | K, D) x 3 -> this rank's heads over the group's sequence, (B, S, n_u | k_u, D) x 3."""
        split, u, me = self.split, self.group.size, self.group.index
        parts = [ops.cat([_heads(q, *split.q_range(j)), _heads(k, *split.kv_range(j)), _heads(v, *split.kv_range(j))],
                         axis=2) for j in range(u)]                            # (B, S_loc, n_j + 2 k_j, D)
        received = self._exchange(parts, to_heads_plan(split, q.shape[1])["counts"], q.shape)
        del parts
        nq, nk = split.q_count(me), split.kv_count(me)
        return tuple(_cat([_heads(r, lo, hi) for r in received], 1)
                     for lo, hi in ((0, nq), (nq, nq + nk), (nq + nk, nq + 2 * nk)))

    def construct(self, q, k, v):
        split, me = self.split, self.group.index
        q_h, k_h, v_h = (self._inner_layout(x) for x in self._qkv_to_heads(q, k, v))
        axis = 2 if self.token_major else 1
        segments, outs = [], []
        for (q0, q1), (k0, k1) in split.segments(me):
            qs, ks, vs = _heads(q_h, q0, q1, axis), _heads(k_h, k0, k1, axis), _heads(v_h, k0, k1, axis)
            out, lse = self.inner.construct(qs, ks, vs)
            segments.append((qs, ks, vs, out, lse))
            outs.append(out)
        self.saved.segments = segments
        out_h = self._from_inner(_cat(outs, axis))                            # (B, S, n_u, D)
        s_loc = q.shape[1]
        parts = [out_h[:, j * s_loc:(j + 1) * s_loc] for j in range(self.group.size)]
        counts = [[split.q_count(i)] * self.group.size for i in range(self.group.size)]   # i sends its heads
        received = self._exchange(parts, counts, q.shape)
        return _cat(received, 2)                                              # (B, S_loc, N, D)

    def _dout_to_heads(self, dout):
        split = self.split
        parts = [_heads(dout, *split.q_range(j)) for j in range(self.group.size)]
        counts = [[split.q_count(j) for j in range(self.group.size)]] * self.group.size
        return self._inner_layout(_cat(self._exchange(parts, counts, dout.shape), 1))   # (B, S, n_u, D)

    def bprop(self, q, k, v, out, dout):
        split, u, me = self.split, self.group.size, self.group.index
        segments, self.saved.segments = self.saved.segments, None
        dout_h = self._dout_to_heads(dout)
        axis = 2 if self.token_major else 1
        grads = self._inner_grads(segments, dout_h, axis)
        del segments, dout_h                                                  # the head-layout inputs go here
        dq_h, dk_h, dv_h = (self._from_inner(_cat([g[i] for g in grads], axis)) for i in range(3))
        del grads
        s_loc = q.shape[1]
        rows = lambda x, j: x[:, j * s_loc:(j + 1) * s_loc]                   # noqa: E731
        parts = [ops.cat([rows(dq_h, j), rows(dk_h, j), rows(dv_h, j)], axis=2) for j in range(u)]
        del dq_h, dk_h, dv_h
        counts = [[split.q_count(i) + 2 * split.kv_count(i)] * u for i in range(u)]
        received = self._exchange(parts, counts, q.shape)                    # from i: (B, S_loc, n_i + 2 k_i, D)
        del parts
        dq = _cat([_heads(r, 0, split.q_count(i)) for i, r in enumerate(received)], 2)
        return (dq, *self._kv_grads(received, k.dtype))

    def _inner_grads(self, segments, dout_h, axis: int):
        """``inner.bprop`` of every segment; the list is emptied as it goes, so each segment's saved tensors are
        released as soon as its gradients exist."""
        grads = []
        for (q0, q1), _ in self.split.segments(self.group.index):
            qs, ks, vs, out_s, lse = segments.pop(0)
            d_out = _heads(dout_h, q0, q1, axis)
            grads.append(self.inner.bprop(qs, ks, vs, (out_s, lse), (d_out, ops.zeros_like(lse))))
        return grads

    def _kv_grads(self, received, dtype):
        """dk, dv (B, S_loc, K, D) from every rank's returned [dq | dk | dv]; a kv head several ranks hold (its
        query heads straddle them, or K < U) gets the sum of their gradients, taken in float32."""
        split = self.split
        cut = split.kv_heads_received == split.num_kv_heads                   # each kv head from one rank
        dk, dv, by_head = [], [], {}
        for i, r in enumerate(received):
            nq, nk = split.q_count(i), split.kv_count(i)
            if cut and nk:
                dk.append(_heads(r, nq, nq + nk))
                dv.append(_heads(r, nq + nk, nq + 2 * nk))
            for h in range(nk if not cut else 0):
                by_head.setdefault(split.kv_range(i)[0] + h, []).append((_heads(r, nq + h, nq + h + 1),
                                                                         _heads(r, nq + nk + h, nq + nk + h + 1)))
        if cut:
            return _cat(dk, 2), _cat(dv, 2)

        def total(h, t):
            held = [p[t] for p in by_head[h]]
            return held[0] if len(held) == 1 else sum(x.astype(ms.float32) for x in held).astype(dtype)
        return tuple(_cat([total(h, t) for h in range(split.num_kv_heads)], 2) for t in (0, 1))


def ulysses_attention(q, k, v, group, inner, use_alltoall: bool = True, token_major: bool = False):
    """Ulysses around ``inner`` (full sequence of the group).

    Args:
        q: (B, S_loc, N, D); k, v: (B, S_loc, K, D), this rank's sequence shard; K divides N, U <= N.
        group: the Ulysses ``Group``; its shards concatenated in group order form the sequence ``inner`` sees.
        inner: a Cell with ``construct(q, k, v) -> (out, lse)`` and ``bprop(q, k, v, (out, lse), (dout, dlse))``
            (``LocalAttention`` or ``RingAttention``) on BNSD tensors, or on BSND tensors when ``token_major``
            (its kernel reads that layout: no transposes).
        use_alltoall: False selects the AllGather-based exchange.

    Returns:
        (B, S_loc, N, D), this rank's shard of the output.

    Raises:
        ValueError: see ``check_ulysses_heads``.
    """
    split = check_ulysses_heads(q.shape[2], k.shape[2], group.size)
    return UlyssesAttention(group, inner, split, use_alltoall, token_major)(q, k, v)
