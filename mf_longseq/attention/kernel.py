"""Local attention: one device, one (queries, keys) pair of blocks, returning ``(out, lse)``.

Shapes (legend): B batch, N query heads, K kv heads (GQA, N = K*G), G query heads per kv head, S_q / S_k query /
key tokens of this call, D head dim, R = G * tile rows (a tile's queries of all G heads stacked).

    q (B, N, S_q, D), k and v (B, K, S_k, D)  ->  out (B, N, S_q, D) in q's dtype, lse (B, N, S_q) float32

``lse`` is the natural-log sum of exp(scores) over the visible keys (-inf where a query sees none) so partial
results merge exactly (``merge``).  The contract is declared by ``AttentionKernel`` below (every kernel class
subclasses it and sets its attributes); three kernels implement it:

* ``BlockwiseKernel`` (the reference; GPU, and CPU without a C++ compiler): tiles of ``block_size``; online
  softmax in float32 (FlashAttention-2); tiles that ``AttentionMask`` marks SKIP cost nothing, FULL tiles use no
  mask; GQA by stacking a kv head's G query heads as rows of one matmul, never repeating K/V.  Backward recomputes each tile from (q, k, v, lse).
* ``FusedCpuKernel`` (CPU, ``cpu_fused.py``): the same algorithm in C++ as a MindSpore AOT custom operator,
  tile GEMMs through oneDNN, PARTIAL masks computed in the kernel from positions; the CPU default.
* ``FlashKernel`` (Ascend): FlashAttentionScore / FlashAttentionScoreGrad, arguments from ``flash.py``.

No S x S tensor exists in either direction: the largest temporary is (B, K, R, tile_k).
"""
import copy
import math
from typing import Optional, Tuple

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn, ops

from mf_longseq.attention.mask import FULL, AttentionMask

NEG_INF = float("-inf")
HEAD_MAJOR, TOKEN_MAJOR = "BNSD", "BSND"     # FlashAttentionScore's input_layout names of the two tensor formats


class AttentionKernel:
    """The declared contract of a local attention kernel (shapes: the module docstring).

    Methods:
        forward(q, k, v, mask, scale) -> (out, lse): out in q's dtype, lse float32 natural-log sums.
        backward(q, k, v, dout, lse, delta, mask, scale) -> (dq, dk, dv) float32, given the *final* lse and
            delta = rowsum(dout * out) - dlse.
        ``mask`` is an ``AttentionMask`` (``mask.py``); ``scale`` the softmax scale (1/sqrt(D) by default).

    Attributes every kernel class sets explicitly (``tests/unit/test_kernel_protocol.py`` checks them):
        name: short name (benchmarks, logs).
        block_size: tokens per tile of the kernel's work, the tile the ring's and kvallgather's skip test
            classifies (``AttentionMask.plan``); None when the kernel takes each run of consecutive positions
            whole (one tile per run, e.g. FlashAttentionScore).
        input_layouts: the tensor formats (FlashAttentionScore's ``input_layout`` names) the kernel can take:
            "BNSD" (head-major, the shapes above, always) and "BSND" (token-major: q, out, dout, dq
            (B, S_q, N, D); k, v, dk, dv (B, S_k, K, D); lse, delta (B, S_q, N)).
        input_layout: the format this instance takes ("BNSD" unless made by ``with_input_layout``).

    Optional accumulating forms (``forward_into`` / ``backward_into``, ``cpu_fused.py``) are read by ``ring.py``
    when present.
    """

    name: str = ""
    block_size: Optional[int] = None
    input_layouts: Tuple[str, ...] = (HEAD_MAJOR,)
    input_layout: str = HEAD_MAJOR

    def with_input_layout(self, input_layout: str) -> "AttentionKernel":
        """This kernel (same operators) taking and returning tensors in ``input_layout`` (one of
        ``input_layouts``).

        Raises:
            ValueError: a format the kernel does not take.
        """
        if input_layout not in self.input_layouts:
            raise ValueError(f"input_layout = {input_layout!r}: the {self.name} kernel takes "
                             f"{' or '.join(self.input_layouts)}.")
        if input_layout == self.input_layout:
            return self
        twin = copy.copy(self)
        twin.input_layout = input_layout
        return twin

    def forward(self, q, k, v, mask: AttentionMask, scale: float) -> Tuple[Tensor, Tensor]:
        raise NotImplementedError

    def backward(self, q, k, v, dout, lse, delta, mask: AttentionMask, scale: float):
        raise NotImplementedError

    def delta(self, dout, out, dlse):
        """The backward's delta = rowsum(dout * out) - dlse, float32, lse's shape (either layout)."""
        return (_f32(dout) * _f32(out)).sum(-1) - dlse


def _rows(x_BKGSD, qs: int, qe: int):
    """(B, K, G, S, D) -> the tile's rows (B, K, G*(qe-qs), D)."""
    b, k, g, _, d = x_BKGSD.shape
    return x_BKGSD[:, :, :, qs:qe, :].reshape(b, k, g * (qe - qs), d)


def _unrows(x_BKRD, g: int):
    """(B, K, G*T, D) -> (B, K, G, T, D)."""
    b, k, r, d = x_BKRD.shape
    return x_BKRD.reshape(b, k, g, r // g, d)


# MindSpore CPU kernels broadcast slowly (a (R, 1) row offset applied to an (R, T) tile costs ~10x a same-shape
# op), so no tile op below broadcasts: row offsets (-max, -lse, -delta) ride along in the matmul as an extra
# column ([q, -m] @ [k, 1]^T = q k^T - m), masks are added at full tile shape, and transposed products use
# BatchMatMul's transpose flags instead of swapaxes copies.
_MM_NT = ops.BatchMatMul(transpose_b=True)                                       # a @ b^T
_MM_TN = ops.BatchMatMul(transpose_a=True)                                       # a^T @ b


def _drain(x) -> None:
    """Wait until ``x`` is computed. PyNative dispatches ops asynchronously; on a busy host the Python side can
    run many tiles ahead of execution, and every queued tile holds its (R, T_k) temporaries (seen: 5.5 GiB at
    S = 32768 when waiting once per query tile).  Waiting once per tile bounds the memory in flight to one tile's
    temporaries; the wait costs microseconds against a tile's milliseconds."""
    x.asnumpy()


def _append(x, column):
    """(.., D) and a (.., 1) column -> (.., D + 1)."""
    return ops.cat([x, column], axis=-1)


class BlockwiseKernel(AttentionKernel):
    """Tiled attention with online softmax, composed of MindSpore ops (runs on CPU, GPU and Ascend).

    Args:
        block_size: tokens per tile (queries and keys).
    """

    name = "blockwise"
    input_layouts = (HEAD_MAJOR,)

    def __init__(self, block_size: int = 2048):
        self.block_size: int = block_size

    def _bias(self, mask: AttentionMask, qs, qe, ks, ke, shape):
        """Additive bias of a PARTIAL tile at the tile's full (B, K, G*T_q, T_k) shape: 0 visible, -inf masked."""
        g = shape[2] // (qe - qs)
        allowed = np.tile(mask.allowed(qs, qe, ks, ke), (g, 1))
        return Tensor(np.broadcast_to(np.where(allowed, 0.0, NEG_INF).astype(np.float32), shape).copy())

    @staticmethod
    def _with_ones(x):
        """(B, K, S, D) float32 -> (B, K, S, D + 1) with a column of ones (the partner of a row-offset column)."""
        return _append(x, ops.ones(x.shape[:-1] + (1,), ms.float32))

    def forward(self, q, k, v, mask: AttentionMask, scale: float) -> Tuple[Tensor, Tensor]:
        b, n, s_q, d = q.shape
        kv_heads = k.shape[1]
        g = n // kv_heads
        q5 = (q.astype(ms.float32) * scale).reshape(b, kv_heads, g, s_q, d)      # (B, K, G, S_q, D)
        k32 = k.astype(ms.float32)
        k1, v1 = self._with_ones(k32), self._with_ones(v.astype(ms.float32))      # (B, K, S_k, D + 1)
        outs, lses = [], []
        for qs, qe, row in mask.plan(self.block_size):
            rows = g * (qe - qs)
            q_t = _rows(q5, qs, qe)                                               # (B, K, R, D)
            m = ops.full((b, kv_heads, rows, 1), NEG_INF, dtype=ms.float32)
            acc = ops.zeros((b, kv_heads, rows, d + 1), ms.float32)              # [sum p v | sum p]
            for ks, ke, kind in row:
                bias = self._bias(mask, qs, qe, ks, ke, (b, kv_heads, rows, ke - ks)) if kind != FULL else None
                s = _MM_NT(q_t, k32[:, :, ks:ke])                                 # (B, K, R, T_k)
                if bias is not None:
                    s = s + bias
                m_new = ops.maximum(m, s.max(axis=-1, keepdims=True))
                m_safe = ops.where(ops.isinf(m_new), ops.zeros_like(m_new), m_new)
                s = _MM_NT(_append(q_t, -m_safe), k1[:, :, ks:ke])               # scores - row max
                if bias is not None:
                    s = s + bias
                p = ops.exp(s)
                acc = acc * ops.exp(m - m_safe) + ops.matmul(p, v1[:, :, ks:ke])  # (B, K, R, D + 1)
                m = m_new
                _drain(acc)
            l = acc[..., d:]
            seen = l > 0
            l_safe = ops.where(seen, l, ops.ones_like(l))
            outs.append(acc[..., :d] / l_safe)
            m_safe = ops.where(ops.isinf(m), ops.zeros_like(m), m)
            lses.append(ops.where(seen, ops.log(l_safe) + m_safe, ops.full_like(l, NEG_INF)).squeeze(-1))
        out = ops.cat([_unrows(o, g) for o in outs], axis=3).reshape(b, n, s_q, d)
        lse = ops.cat([l_.reshape(b, kv_heads, g, -1) for l_ in lses], axis=3).reshape(b, n, s_q)
        return out.astype(q.dtype), lse

    def backward(self, q, k, v, dout, lse, delta, mask: AttentionMask, scale: float):
        """Gradients of this call's (q, k, v), given the *final* lse and delta = rowsum(dout * out) - dlse.

        Returns float32 (dq (B, N, S_q, D), dk (B, K, S_k, D), dv (B, K, S_k, D)).
        """
        b, n, s_q, d = q.shape
        kv_heads, s_k = k.shape[1], k.shape[2]
        g = n // kv_heads
        q5 = (q.astype(ms.float32) * scale).reshape(b, kv_heads, g, s_q, d)
        do5 = dout.astype(ms.float32).reshape(b, kv_heads, g, s_q, d)
        # A query that sees no key has lse = -inf: a huge finite offset makes its p = exp(s - lse) exactly 0.
        neg_lse = -ops.where(ops.isinf(lse), ops.full_like(lse, 1e30), lse).reshape(b, kv_heads, g, s_q, 1)
        neg_delta = -delta.reshape(b, kv_heads, g, s_q, 1)
        k32 = k.astype(ms.float32)
        k1, v1 = self._with_ones(k32), self._with_ones(v.astype(ms.float32))
        dk_parts, dv_parts, dq_tiles = {}, {}, []
        for qs, qe, row in mask.plan(self.block_size):
            q_t, do_t = _rows(q5, qs, qe), _rows(do5, qs, qe)                    # (B, K, R, D)
            q_lse = _append(q_t, _rows(neg_lse, qs, qe))                          # [q | -lse]
            do_delta = _append(do_t, _rows(neg_delta, qs, qe))                    # [dout | -delta]
            dq_t = ops.zeros(q_t.shape, ms.float32)
            for ks, ke, kind in row:
                s = _MM_NT(q_lse, k1[:, :, ks:ke])                                # scores - lse, (B, K, R, T_k)
                if kind != FULL:
                    s = s + self._bias(mask, qs, qe, ks, ke, s.shape)
                p = ops.exp(s)
                ds = p * _MM_NT(do_delta, v1[:, :, ks:ke])                        # p * (dp - delta)
                dq_t = dq_t + ops.matmul(ds, k32[:, :, ks:ke])
                key = (ks, ke)
                dv_blk = _MM_TN(p, do_t)                                          # (B, K, T_k, D), summed over G
                dk_blk = _MM_TN(ds, q_t)
                dv_parts[key] = dv_parts[key] + dv_blk if key in dv_parts else dv_blk
                dk_parts[key] = dk_parts[key] + dk_blk if key in dk_parts else dk_blk
                _drain(dk_parts[key])
            dq_tiles.append(_unrows(dq_t * scale, g))
        dq = ops.cat(dq_tiles, axis=3).reshape(b, n, s_q, d)
        dk, dv = self._assemble(dk_parts, (b, kv_heads, s_k, d)), self._assemble(dv_parts, (b, kv_heads, s_k, d))
        return dq, dk, dv

    @staticmethod
    def _assemble(parts, shape):
        """Key-tile gradients -> one (B, K, S_k, D) tensor (zeros for tiles no query saw)."""
        b, kv_heads, s_k, d = shape
        pieces, cursor = [], 0
        for ks, ke in sorted(parts):
            if ks > cursor:
                pieces.append(ops.zeros((b, kv_heads, ks - cursor, d), ms.float32))
            pieces.append(parts[(ks, ke)])
            cursor = ke
        if cursor < s_k:
            pieces.append(ops.zeros((b, kv_heads, s_k - cursor, d), ms.float32))
        return ops.cat(pieces, axis=2) if len(pieces) > 1 else pieces[0]


def _cast(x, dtype):
    """x in ``dtype``; no copy when it already is (a float32 gradient is returned as it is)."""
    return x if x.dtype == dtype else x.astype(dtype)


def _f32(x):
    return _cast(x, ms.float32)


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)


class LocalAttention(nn.Cell):
    """Differentiable single-call attention: ``construct(q, k, v) -> (out, lse)``.

    Backward recomputes tiles (``kernel.backward``); the gradient of ``lse``, if any, enters through delta.
    """

    def __init__(self, kernel, mask: AttentionMask, scale: float):
        super().__init__()
        self.kernel, self.mask, self.scale = kernel, mask, scale

    def construct(self, q, k, v):
        return self.kernel.forward(q, k, v, self.mask, self.scale)

    def bprop(self, q, k, v, out, dout):
        d_out, d_lse = dout
        delta = self.kernel.delta(d_out, out[0], d_lse)
        dq, dk, dv = self.kernel.backward(q, k, v, d_out, out[1], delta, self.mask, self.scale)
        return _cast(dq, q.dtype), _cast(dk, k.dtype), _cast(dv, v.dtype)
