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

Shapes: q (B, N, S_loc, D), k and v (B, K, S_loc, D); k and v travel as two transfers of their own (no stacked
copy).

Working set (per rank, besides the inputs and what PyNative keeps for the backward: q, k, v, out, lse): forward
the K/V block computed and the one arriving, the block's output and one scaled copy during the merge
(``merge_into``); backward the same two K/V blocks, the block gradients, dQ, and the dK/dV buffers leaving and
arriving, every accumulation in place (``ops.assign_add``).  A kernel with accumulating forms
(``forward_into`` / ``backward_into``: the fused CPU kernel) merges each block into (out, lse) and adds its
gradients into dQ and the arriving dK/dV buffer itself, so no block output and no block gradient exists: forward
holds out + the two K/V blocks, backward out, dQ, the two K/V blocks and the dK/dV buffers (the one arriving is
waited for before the block's kernel, which adds into it).  Other kernels (FlashKernel on Ascend) take the
block-gradient path above, unchanged.  With a
token-major kernel (``FusedCpuKernel.with_input_layout("BSND")``) the same code runs on q (B, S_loc, N, D), k and v
(B, S_loc, K, D) and lse (B, S_loc, N): nothing here depends on the order of the sequence and head axes.
"""
from typing import Sequence

import mindspore as ms
from mindspore import nn, ops

from mf_longseq.attention.merge import merge_into
from mf_longseq.attention.mask import AttentionMask, DenseMask
from mf_longseq.parallel.comm import ring_shift_start


def _has_work(mask: AttentionMask, block_size: int) -> bool:
    return any(row for _, _, row in mask.plan(block_size))


def _as(x, dtype):
    """x in ``dtype`` (no copy when it already is)."""
    return x if x.dtype == dtype else x.astype(dtype)


def _accumulate(total, part, owned: bool = True):
    """total += part, or part when there is no total yet.  In place only when ``total`` is a buffer this algorithm
    owns (``owned``: received, or made by an earlier add): a kernel's own output may be a view (the reference
    kernel's grouped heads are a reshape), which MindSpore refuses to write in place."""
    if total is None:
        return part
    if not owned or not total.is_contiguous():    # a kernel's tensor or a strided view: a new buffer, once
        return total + part
    ops.assign_add(total, part)
    return total


class _Pair:
    """The started ring shifts of a K and a V block (or of their float32 gradients): two transfers, no stacked copy
    of the two; ``wait()`` returns the received (k, v)."""

    def __init__(self, k, v, group):
        self.k, self.v = ring_shift_start(k, group), ring_shift_start(v, group)

    def wait(self):
        return self.k.wait(), self.v.wait()


class RingAttention(nn.Cell):
    """Ring attention over ``group``; ``masks[j]`` is the visibility of this rank's queries to ring rank j's keys.

    ``construct(q, k, v) -> (out, lse)`` with out in q's dtype and lse float32 (B, N, S_loc).
    """

    def __init__(self, group, kernel, masks: Sequence[AttentionMask], scale: float):
        super().__init__()
        self.group, self.kernel, self.scale = group, kernel, scale
        self.masks = list(masks)
        self.work = [_has_work(m, kernel.block_size) for m in self.masks]         # AttentionKernel.block_size

    def _source(self, step: int) -> int:
        return (self.group.index - step) % self.group.size

    def _start_next(self, k, v, step: int):
        """Start the transfers of the K and V blocks the next step needs (None at the last step)."""
        return _Pair(k, v, self.group) if step + 1 < self.group.size else None

    def construct(self, q, k, v):
        out = lse = None
        for step in range(self.group.size):
            src = self._source(step)
            incoming = self._start_next(k, v, step)                              # transfer of step + 1 ...
            if self.work[src]:                                                   # ... overlaps this block
                self_merging = (out is not None and out.is_contiguous() and lse.is_contiguous()
                                and not isinstance(self.masks[src], DenseMask)       # the reference's views
                                and hasattr(self.kernel, "forward_into"))
                if self_merging:
                    self.kernel.forward_into(q, k, v, self.masks[src], self.scale, out, lse)
                else:
                    block = list(self.kernel.forward(q, k, v, self.masks[src], self.scale))
                    block[0] = _as(block[0], ms.float32)
                    out, lse = block if out is None else merge_into(out, lse, block)
                    del block
            k, v = incoming.wait() if incoming is not None else (None, None)
        if out is None:                                                          # no visible key at all
            out, lse = ops.zeros(q.shape, ms.float32), ops.full(q.shape[:-1], float("-inf"), dtype=ms.float32)
        return _as(out, q.dtype), lse

    def bprop(self, q, k, v, out, dout):
        d_out, d_lse = dout
        o, lse = out
        delta = (_as(d_out, ms.float32) * _as(o, ms.float32)).sum(-1) - d_lse      # (B, N, S_loc)
        if hasattr(self.kernel, "backward_into"):
            return self._backward_into(q, k, v, d_out, lse, delta)
        dq = dk = dv = None                                                      # dk, dv travel with k, v
        dq_owned = False                                                         # dq is still a kernel's output
        kv_shape, k_dtype, v_dtype = k.shape, k.dtype, v.dtype
        moving = None                                                            # dK/dV in flight from step - 1
        for step in range(self.group.size):
            src = self._source(step)
            incoming = self._start_next(k, v, step)
            grads = None
            if self.work[src]:                                                   # overlaps both transfers
                grads = list(self.kernel.backward(q, k, v, d_out, lse, delta, self.masks[src], self.scale))
            if moving is not None:
                dk, dv = moving.wait()                                           # block src's buffers arrive
            if grads is not None:
                dq_owned, dq = dq is not None, _accumulate(dq, grads.pop(0), owned=dq_owned)
                dk = _accumulate(dk, grads.pop(0))
                dv = _accumulate(dv, grads.pop(0))
            if dk is None:                                                       # nothing for block src yet
                dk, dv = ops.zeros(kv_shape, ms.float32), ops.zeros(kv_shape, ms.float32)
            moving = _Pair(dk, dv, self.group)                                   # after R shifts: back home
            dk = dv = None
            k, v = incoming.wait() if incoming is not None else (None, None)
        dk, dv = moving.wait()
        dq = ops.zeros(q.shape, ms.float32) if dq is None else dq
        return _as(dq, q.dtype), _as(dk, k_dtype), _as(dv, v_dtype)

    def _backward_into(self, q, k, v, d_out, lse, delta):
        """The backward with a kernel that adds into dQ and the arriving dK/dV buffer (``backward_into``): the
        buffer of block src is waited for before its kernel; K/V blocks are dropped as soon as computed."""
        kv_shape, k_dtype, v_dtype = k.shape, k.dtype, v.dtype
        dq = ops.zeros(q.shape, ms.float32)
        moving = None                                                            # dK/dV in flight from step - 1
        for step in range(self.group.size):
            src = self._source(step)
            incoming = self._start_next(k, v, step)
            dk, dv = moving.wait() if moving is not None else \
                (ops.zeros(kv_shape, ms.float32), ops.zeros(kv_shape, ms.float32))   # block src's buffers
            if self.work[src]:                                                   # overlaps the K/V transfer
                self.kernel.backward_into(q, k, v, d_out, lse, delta, self.masks[src], self.scale, dq, dk, dv)
            k, v = incoming.wait() if incoming is not None else (None, None)
            moving = _Pair(dk, dv, self.group)                                   # after R shifts: back home
            dk = dv = None
        dk, dv = moving.wait()
        return _as(dq, q.dtype), _as(dk, k_dtype), _as(dv, v_dtype)
