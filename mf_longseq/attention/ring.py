"""colossalai_cp: ring attention. K/V blocks travel round the ring; partial outputs merge by log-sum-exp.

Each of the R ring ranks holds 1/R of Q, K and V (for the zigzag layout: chunks i and 2R-1-i).  At step t rank
i holds the K/V block of rank (i - t) mod R, computes attention of its queries against it, and merges the
result into its running (out, lse) in float32.  Which keys a query may see is decided from global positions
(``AttentionMask``), so steps whose keys all lie in the future are skipped outright and the zigzag layout gives
every rank the same causal work.

Backward (FlashAttention-2 style, nothing stored but q, k, v, out, lse): the K/V blocks travel the ring again,
and with them a float32 buffer of their dK/dV, to which every rank adds its contribution; after R shifts the
buffer is back at its owner.  Per-rank memory stays O(S/R): q, one K/V block in flight, its dK/dV buffer.

Overlap (as ring-flash-attention and TransformerEngine do): each step starts the transfer of the next K/V block
(``ring_shift_start``), computes the current block, then waits.  In backward the dK/dV buffer of step t travels
while the kernel computes the block gradients of step t+1; the buffer is waited for only to add them.

The first block computed starts the running (out, lse) and the first block gradients start dQ and dK/dV: no
zero buffers and no merge with them (merging with lse = -inf gives the block exactly).

Shapes: q (B, N, S_loc, D), k and v (B, K, S_loc, D); kv travel stacked as (2, B, K, S_loc, D).  With a
token-major kernel (``FusedCpuKernel.with_layout("BSND")``) the same code runs on q (B, S_loc, N, D), k and v
(B, S_loc, K, D) and lse (B, S_loc, N): nothing here depends on the order of the sequence and head axes.
"""
from typing import Sequence

import mindspore as ms
from mindspore import nn, ops

from mf_longseq.attention.merge import merge
from mf_longseq.attention.mask import AttentionMask
from mf_longseq.parallel.comm import ring_shift_start


def _has_work(mask: AttentionMask, block_size: int) -> bool:
    return any(row for _, _, row in mask.plan(block_size))


def _as(x, dtype):
    """x in ``dtype`` (no copy when it already is)."""
    return x if x.dtype == dtype else x.astype(dtype)


def _accumulate(total, part):
    """total + part, or part when there is no total yet."""
    return part if total is None else total + part


class RingAttention(nn.Cell):
    """Ring attention over ``group``; ``masks[j]`` is the visibility of this rank's queries to ring rank j's keys.

    ``construct(q, k, v) -> (out, lse)`` with out in q's dtype and lse float32 (B, N, S_loc).
    """

    def __init__(self, group, kernel, masks: Sequence[AttentionMask], scale: float):
        super().__init__()
        self.group, self.kernel, self.scale = group, kernel, scale
        self.masks = list(masks)
        block = getattr(kernel, "block_size", 1 << 30)
        self.work = [_has_work(m, block) for m in self.masks]

    def _source(self, step: int) -> int:
        return (self.group.index - step) % self.group.size

    def _start_next(self, kv, step: int):
        """Start the transfer of the K/V block the next step needs (None at the last step)."""
        return ring_shift_start(kv, self.group) if step + 1 < self.group.size else None

    def construct(self, q, k, v):
        out = lse = None
        kv = ops.stack([k, v])                                                   # (2, B, K, S_loc, D)
        for step in range(self.group.size):
            src = self._source(step)
            incoming = self._start_next(kv, step)                                # transfer of step + 1 ...
            if self.work[src]:                                                   # ... overlaps this block
                block_out, block_lse = self.kernel.forward(q, kv[0], kv[1], self.masks[src], self.scale)
                block_out = _as(block_out, ms.float32)
                out, lse = (block_out, block_lse) if out is None else merge(out, lse, block_out, block_lse)
            kv = incoming.wait() if incoming is not None else None
        if out is None:                                                          # no visible key at all
            out, lse = ops.zeros(q.shape, ms.float32), ops.full(q.shape[:-1], float("-inf"), dtype=ms.float32)
        return _as(out, q.dtype), lse

    def bprop(self, q, k, v, out, dout):
        d_out, d_lse = dout
        o, lse = out
        delta = (_as(d_out, ms.float32) * _as(o, ms.float32)).sum(-1) - d_lse      # (B, N, S_loc)
        dq = dkv = None                                                          # dkv travels with kv
        kv = ops.stack([k, v])
        dkv_moving = None                                                        # dK/dV in flight from step - 1
        for step in range(self.group.size):
            src = self._source(step)
            incoming = self._start_next(kv, step)
            grads = None
            if self.work[src]:                                                   # overlaps both transfers
                grads = self.kernel.backward(q, kv[0], kv[1], d_out, lse, delta, self.masks[src], self.scale)
            if dkv_moving is not None:
                dkv = dkv_moving.wait()                                          # block src's buffer arrives
            if grads is not None:
                dq = _accumulate(dq, grads[0])
                dkv = _accumulate(dkv, ops.stack([grads[1], grads[2]]))
            if dkv is None:                                                      # nothing for block src yet
                dkv = ops.zeros(kv.shape, ms.float32)
            dkv_moving = ring_shift_start(dkv, self.group)                       # after R shifts: back home
            kv = incoming.wait() if incoming is not None else None
        dkv = dkv_moving.wait()
        dq = ops.zeros(q.shape, ms.float32) if dq is None else dq
        return _as(dq, q.dtype), _as(dkv[0], k.dtype), _as(dkv[1], v.dtype)
