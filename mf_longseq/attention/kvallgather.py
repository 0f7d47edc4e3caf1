"""kvallgather_cp: every CP rank all-gathers the sequence's K and V and computes its own queries against them.

The algorithm of Megatron-LM's ``cp_comm_type: all_gather``, MindSpeed's ``kvallgather_cp_algo`` and torchtitan's
all-gather rotation; the cheap one when the kv heads are few (LLaMA2-70B: 8 kv heads for 64 query heads, so K
and V are a quarter of q's bytes and one gather replaces the ring's CP-1 steps).

    k, v (B, S/CP, K, D) --all-gather over the CP group--> (B, S, K, D) in part order (part j = CP rank j's)
    q (B, S/CP, N, D) x part j, mask j, for every part j with a visible key --merge by lse--> (B, S/CP, N, D)

Causal balance: the zigzag cut the ring uses (rank i holds chunks i and 2CP-1-i), so every rank's queries see
the same number of keys.  Visibility: the ring's per-step masks (``attention_plan.ring_masks``, one per part of
the keys; packed documents and dense masks included), so the two algorithms attend to exactly the same keys.

Backward (nothing kept but q, k, v, out, lse, as the ring): K and V are gathered again, every part's block
gradients computed, dQ summed in float32, and the float32 dK/dV of the whole sequence reduce-scattered over the
CP group back to their owners (``parallel.comm``: native ReduceScatter, on CPU an AllReduce and this rank's chunk).

Working set per rank (``buffers``): the gathered K and V (2 b S K D e), in backward also the whole sequence's
float32 dK/dV (2 b S K D 4), the kernel's block gradients and dQ; bytes sent (``bytes_sent``): the all-gather of K
and V forward and again backward, (CP-1) x this rank's K/V each, and the reduce-scatter of dK/dV, (CP-1)/CP of
the float32 whole.
"""
from typing import Dict, Sequence

import mindspore as ms
from mindspore import nn, ops

from mf_longseq.attention.mask import AttentionMask
from mf_longseq.attention.merge import merge_into
from mf_longseq.attention.runners import sequence_major
from mf_longseq.parallel.comm import all_gather, reduce_scatter


def _f32(x):
    return x if x.dtype == ms.float32 else x.astype(ms.float32)


class KvAllGatherAttention(nn.Cell):
    """All-gather-KV attention over ``group``; ``masks[j]``: this rank's queries against rank j's part of the keys.

    ``construct(q, k, v) -> (out, lse)``: q (B, N, S_loc, D), k and v (B, K, S_loc, D) (``seq_axis`` 2), or the
    token-major (B, S_loc, N, D) / (B, S_loc, K, D) of a kernel that reads it (``seq_axis`` 1); out in q's
    dtype, lse float32 (B, N, S_loc) or (B, S_loc, N).
    """

    def __init__(self, group, kernel, masks: Sequence[AttentionMask], scale: float, seq_axis: int):
        super().__init__()
        self.group, self.kernel, self.masks, self.scale, self.axis = group, kernel, list(masks), scale, seq_axis
        self.work = [any(row for _, _, row in m.plan(kernel.block_size)) for m in self.masks]   # parts with work

    def _part(self, x, j: int):
        size = x.shape[self.axis] // self.group.size
        return ops.narrow(x, self.axis, j * size, size)

    def construct(self, q, k, v):
        k_all, v_all = all_gather(k, self.group, self.axis), all_gather(v, self.group, self.axis)
        out = lse = None
        for j in range(self.group.size):
            if not self.work[j]:
                continue
            block = list(self.kernel.forward(q, self._part(k_all, j), self._part(v_all, j), self.masks[j],
                                             self.scale))
            block[0] = _f32(block[0])
            out, lse = block if out is None else merge_into(out, lse, block)
        if out is None:                                                          # no visible key at all
            out, lse = ops.zeros(q.shape, ms.float32), ops.full(q.shape[:-1], float("-inf"), dtype=ms.float32)
        return out.astype(q.dtype), lse

    def bprop(self, q, k, v, out, dout):
        d_out, d_lse = dout
        delta = (_f32(d_out) * _f32(out[0])).sum(-1) - d_lse
        k_all, v_all = all_gather(k, self.group, self.axis), all_gather(v, self.group, self.axis)
        dq, dks, dvs = None, [], []
        for j in range(self.group.size):
            k_j, v_j = self._part(k_all, j), self._part(v_all, j)
            if not self.work[j]:
                dks.append(ops.zeros(k_j.shape, ms.float32))
                dvs.append(ops.zeros(v_j.shape, ms.float32))
                continue
            dq_j, dk_j, dv_j = self.kernel.backward(q, k_j, v_j, d_out, out[1], delta, self.masks[j], self.scale)
            dq = _f32(dq_j) if dq is None else dq + _f32(dq_j)
            dks.append(_f32(dk_j))
            dvs.append(_f32(dv_j))
        dk = reduce_scatter(ops.cat(dks, axis=self.axis), self.group, self.axis)   # back to the owners, summed
        dv = reduce_scatter(ops.cat(dvs, axis=self.axis), self.group, self.axis)
        dq = ops.zeros(q.shape, ms.float32) if dq is None else dq
        return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


def run_kvallgather(q, k, v, *, mesh, kernel, masks, scale, use_alltoall, token_major):
    """The ``run`` of kvallgather_cp (``parallel/algorithms.py``): q (B, S/CP, N, D), k/v (B, S/CP, K, D) ->
    (B, S/CP, N, D) over ``mesh.group("cp")`` (``use_alltoall`` plays no part: there is no Ulysses exchange)."""
    inner = KvAllGatherAttention(mesh.group("cp"), kernel, masks, scale, seq_axis=1 if token_major else 2)
    return sequence_major(inner, q, k, v, token_major)


# ------------------------------------------------------------------------------------------ planner formulas
def bytes_sent(call, ulysses_index: int = 0) -> Dict[str, Dict[str, int]]:
    """Logical bytes one rank sends per attention layer (``planner.comm.AttentionCall``; b sequences of S tokens,
    Kt kv heads, head dim D, e bytes, CP ranks), counted as ``parallel.comm`` counts them: an all-gather of x
    sends nbytes(x)(CP-1), a reduce-scatter of x (CP-1)/CP nbytes(x).

    kv_all_gather: K and V of this rank, 2 b Kt (S/CP) D e, sent (CP-1) times forward and again backward;
    dkv_reduce_scatter: the float32 dK/dV of the sequence, 2 b Kt S D 4, (CP-1)/CP of it, backward.
    """
    cp, b, d, kt = call.cp, call.batch, call.head_dim, call.kv_heads
    if cp == 1:
        return {}
    kv = 2 * b * kt * (call.seq_len // cp) * d * call.itemsize
    dkv = 2 * b * kt * (call.seq_len // cp) * d * 4 * (cp - 1)
    return {"kv_all_gather": {"forward": (cp - 1) * kv, "backward": (cp - 1) * kv},
            "dkv_reduce_scatter": {"forward": 0, "backward": dkv}}


def buffers(shape, layout, settings) -> int:
    """Transient bytes of one layer's attention backward (``planner.memory``'s ``attention`` item; s = b S/CP
    tokens, Nt = N/mp and Kt = max(K/mp, 1) heads): the kernel's float32 block gradients and dQ
    (2 s Nt D 4 + 2 s Kt D 4), the gathered K and V (2 CP s Kt D e) and the whole sequence's float32 dK/dV
    (2 CP s Kt D 4); the blockwise CPU kernel adds its float32 tiles (T = min(block_size, S/CP), 8 b Nt T^2 4)
    and float32 copies of q, k, v when the compute dtype is half (the terms of ``planner.memory``)."""
    e, cp, d = settings.bytes_of("compute"), layout.cp, shape.head_dim
    s = settings.micro_batch * settings.seq_len // cp
    nt, kt = max(shape.heads // layout.mp, 1), max(shape.kv_heads // layout.mp, 1)
    out = 2 * s * nt * d * 4 + 2 * s * kt * d * 4 + 2 * cp * s * kt * d * e + 2 * cp * s * kt * d * 4
    if settings.backend == "cpu":
        tile = min(settings.block_size, settings.seq_len // cp)
        out += 8 * settings.micro_batch * nt * tile * tile * 4 + s * (nt + 2 * kt) * d * 4 * (1 if e < 4 else 0)
    return out


__all__ = ["KvAllGatherAttention", "run_kvallgather", "bytes_sent", "buffers"]
