"""FlashKernel: the engine's local kernel on Ascend, built on FlashAttentionScore and FlashAttentionScoreGrad.

Legend: B batch, N query heads, K kv heads, S_q / S_k query / key tokens of the kernel call, T tokens of one
FlashAttentionScore call (its rows or cols), D head dim, 8 the trailing dim of FlashAttentionScore statistics.

Kernel contract (``kernel.py``)::

    forward(q (B, N, S_q, D), k, v (B, K, S_k, D), mask, scale) -> out (B, N, S_q, D) in q's dtype, lse (B, N, S_q) fp32
    backward(q, k, v, dout, lse, delta, mask, scale) -> dq, dk, dv float32

Which FlashAttentionScore calls a mask needs, and with which arguments, is decided on the host by
``flash_args.plan_flash_calls`` and ``flash_args.flash_arguments`` (pure, CPU-tested).  This file only moves
tensors: take the call's rows and cols, change layout (BNSD or TND), call the primitive, put rows back and
merge the calls by log-sum-exp.  The primitives come from a ``primitives`` object (default
``AscendPrimitives``), so the kernel also runs on CPU in tests with a NumPy stand-in of the documented op.
"""
from typing import List

import numpy as np
import mindspore as ms
from mindspore import Tensor, ops

from mf_longseq.attention.flash_args import (MAX_TND_SEGMENTS, FlashArgs, FlashCall, documented_keep,
                                             flash_arguments, plan_flash_calls)
from mf_longseq.attention.kernel import HEAD_MAJOR, AttentionKernel
from mf_longseq.attention.merge import merge
from mf_longseq.attention.mask import AttentionMask, compressed_causal_mask

HALF_TYPES = (ms.float16, ms.bfloat16)


class AscendPrimitives:
    """MindSpore 2.9's FlashAttentionScore / FlashAttentionScoreGrad, one instance per set of __init__ arguments.

    Call order (documented signatures)::

        FlashAttentionScore(**init)(query, key, value, real_shift, drop_mask, padding_mask, attn_mask, prefix,
                                    actual_seq_qlen, actual_seq_kvlen)
            -> (softmax_max, softmax_sum, softmax_out, attention_out)
        FlashAttentionScoreGrad(**init)(query, key, value, dy, pse_shift, drop_mask, padding_mask, atten_mask,
                                        softmax_max, softmax_sum, softmax_in, attention_in, prefix,
                                        actual_seq_qlen, actual_seq_kvlen) -> (dq, dk, dv, dpse)
    """

    def __init__(self):
        self._cache = {}

    def _get(self, cls, init):
        key = (cls.__name__,) + tuple(sorted(init.items()))
        if key not in self._cache:
            self._cache[key] = cls(**init)
        return self._cache[key]

    def forward(self, init):
        from mindspore.ops.operations.nn_ops import FlashAttentionScore
        return self._get(FlashAttentionScore, init)

    def grad(self, init):
        from mindspore.ops.operations._grad_ops import FlashAttentionScoreGrad
        return self._get(FlashAttentionScoreGrad, init)


def _take(x, index: np.ndarray, axis: int = 2):
    """The entries ``index`` of ``x`` along ``axis`` (a slice when they are consecutive)."""
    total = x.shape[axis]
    start = int(index[0])
    if index[-1] - start + 1 == len(index) and np.all(np.diff(index) == 1):
        if start == 0 and len(index) == total:
            return x
        sl = [slice(None)] * len(x.shape)
        sl[axis] = slice(start, start + len(index))
        return x[tuple(sl)]
    return ops.gather(x, Tensor(index), axis)


def _put_rows(x, index: np.ndarray, total: int, fill: float):
    """Inverse of ``_take`` on axis 2: (B, H, T, ...) -> (B, H, total, ...), ``fill`` in rows not in ``index``."""
    if len(index) == total and np.array_equal(index, np.arange(total)):
        return x
    inverse = np.full(total, len(index), dtype=np.int64)
    inverse[index] = np.arange(len(index))
    pad = ops.full(x.shape[:2] + (1,) + x.shape[3:], fill, dtype=x.dtype)
    return ops.gather(ops.cat([x, pad], axis=2), Tensor(inverse), 2)


def _to_layout(x_BHTD, layout: str):
    """(B, H, T, D) -> BNSD as is, or TND: (B*T, H, D)."""
    if layout != "TND":
        return x_BHTD
    b, h, t, d = x_BHTD.shape
    return x_BHTD.transpose(0, 2, 1, 3).reshape(b * t, h, d)


def _from_layout(x, layout: str, batch: int):
    """Inverse of ``_to_layout``: TND (B*T, H, D) -> (B, H, T, D)."""
    if layout != "TND":
        return x
    bt, h, d = x.shape
    return x.reshape(batch, bt // batch, h, d).transpose(0, 2, 1, 3)


def _stat_from(stat, layout: str, batch: int):
    """softmax_max / softmax_sum -> (B, N, T): BNSD (B, N, T, 8), TND (B*T, N, 8); the 8 copies are equal."""
    x = stat[..., 0]
    if layout != "TND":
        return x
    bt, n = x.shape
    return x.reshape(batch, bt // batch, n).transpose(0, 2, 1)


def _stat_to(x_BNT, layout: str):
    """(B, N, T) -> the statistics' shape: BNSD (B, N, T, 8), TND (B*T, N, 8)."""
    if layout == "TND":
        b, n, t = x_BNT.shape
        x_BNT = x_BNT.transpose(0, 2, 1).reshape(b * t, n)
    return ops.broadcast_to(x_BNT.expand_dims(-1), x_BNT.shape + (8,))


def _attention_in(dout32, delta):
    """A stand-in for the forward output with rowsum(dout * attention_in) == delta, row by row.

    FlashAttentionScoreGrad computes D = rowsum(dy * attention_in) and ds = p * (dp - D).  The engine hands the
    kernel delta = rowsum(dout * out) - dlse instead of out, so we pass attention_in = dout * delta / |dout|^2.
    Exact whenever the row of dout is non-zero or dlse is zero: in the engine dlse is always zero (lse never
    leaves the ring), and then a zero dout row has delta = 0 too.
    """
    norm = (dout32 * dout32).sum(-1, keepdims=True)                              # (B, N, T, 1)
    safe = ops.where(norm > 0, norm, ops.ones_like(norm))
    return dout32 * (delta.expand_dims(-1) / safe)


class FlashKernel(AttentionKernel):
    """Local attention through FlashAttentionScore (Ascend); the same contract as ``BlockwiseKernel``.

    Args:
        primitives: provider of the two primitives (``AscendPrimitives()`` by default).
        compute_dtype: dtype fed to the primitives; default: q's dtype when float16/bfloat16, else bfloat16
            (FlashAttentionScore takes float16 and bfloat16).
        max_tnd_segments: segments per TND call (the op allows 1024 per call, batch folded in).
    """

    name = "flash"
    block_size = None             # each run of consecutive positions is one call (TND segments), not tiled
    input_layouts = (HEAD_MAJOR,)

    def __init__(self, primitives=None, compute_dtype=None, max_tnd_segments: int = MAX_TND_SEGMENTS):
        self.primitives = primitives or AscendPrimitives()
        self.compute_dtype = compute_dtype
        self.max_tnd_segments = max_tnd_segments
        self._compressed = None

    def plan(self, mask: AttentionMask, batch: int = 1) -> List[FlashCall]:
        """The calls of ``mask``, computed once per mask (``AttentionMask.cached``): every layer and the backward
        of a step share the step's masks."""
        segments = max(1, self.max_tnd_segments // batch)
        return mask.cached(("flash_calls", segments), lambda: plan_flash_calls(mask, segments))

    def _dtype(self, q):
        if self.compute_dtype is not None:
            return self.compute_dtype
        return q.dtype if q.dtype in HALF_TYPES else ms.bfloat16

    def _mask_tensor(self, args: FlashArgs):
        if args.attn_mask is None:
            return None
        if args.attn_mask.shape == (2048, 2048) and args.init["sparse_mode"] in (2, 3):
            if self._compressed is None:
                self._compressed = Tensor(compressed_causal_mask(), ms.uint8)
            return self._compressed
        return Tensor(args.attn_mask, ms.uint8)

    def _inputs(self, call: FlashCall, dtype, *pairs):
        """Take the call's rows (q-like) or cols (k-like) of each tensor, cast, and lay out."""
        return [_to_layout(_take(x, idx).astype(dtype), call.input_layout) for x, idx in pairs]

    def forward(self, q, k, v, mask: AttentionMask, scale: float):
        b, n, s_q, d = q.shape
        dtype = self._dtype(q)
        out = ops.zeros((b, n, s_q, d), ms.float32)
        lse = ops.full((b, n, s_q), float("-inf"), dtype=ms.float32)
        for call in self.plan(mask, b):
            args = flash_arguments(call, batch=b, head_num=n, scale=scale)
            q_c, k_c, v_c = self._inputs(call, dtype, (q, call.q_index), (k, call.k_index), (v, call.k_index))
            sm_max, sm_sum, _, out_c = self.primitives.forward(args.init)(
                q_c, k_c, v_c, None, None, None, self._mask_tensor(args), None,
                args.actual_seq_qlen, args.actual_seq_kvlen)
            lse_c = _stat_from(sm_max, call.input_layout, b) + ops.log(_stat_from(sm_sum, call.input_layout, b))   # (B, N, T)
            out_c = _from_layout(out_c, call.input_layout, b).astype(ms.float32)                              # (B, N, T, D)
            out, lse = merge(out, lse, _put_rows(out_c, call.q_index, s_q, 0.0),
                             _put_rows(lse_c, call.q_index, s_q, float("-inf")))
        return out.astype(q.dtype), lse

    def backward(self, q, k, v, dout, lse, delta, mask: AttentionMask, scale: float):
        """Gradients of this call's (q, k, v) given the final lse and delta = rowsum(dout * out) - dlse."""
        b, n, s_q, d = q.shape
        kv_heads, s_k = k.shape[1], k.shape[2]
        dtype = self._dtype(q)
        dq = ops.zeros((b, n, s_q, d), ms.float32)
        dk = ops.zeros((b, kv_heads, s_k, d), ms.float32)
        dv = ops.zeros((b, kv_heads, s_k, d), ms.float32)
        for call in self.plan(mask, b):
            args = flash_arguments(call, batch=b, head_num=n, scale=scale)
            q_c, k_c, v_c, do_c = self._inputs(call, dtype, (q, call.q_index), (k, call.k_index),
                                               (v, call.k_index), (dout, call.q_index))
            lse_c, delta_c = _take(lse, call.q_index), _take(delta, call.q_index)           # (B, N, T)
            attn_in = _attention_in(_take(dout, call.q_index).astype(ms.float32), delta_c)  # (B, N, T, D)
            sm_max = _stat_to(lse_c, call.input_layout)
            grads = self.primitives.grad(args.init)(
                q_c, k_c, v_c, do_c, None, None, None, self._mask_tensor(args), sm_max, ops.ones_like(sm_max),
                None, _to_layout(attn_in.astype(dtype), call.input_layout), None,
                args.actual_seq_qlen, args.actual_seq_kvlen)
            dq_c, dk_c, dv_c = (_from_layout(g, call.input_layout, b).astype(ms.float32) for g in grads[:3])
            dq = dq + _put_rows(dq_c, call.q_index, s_q, 0.0)
            dk = dk + _put_rows(dk_c, call.k_index, s_k, 0.0)
            dv = dv + _put_rows(dv_c, call.k_index, s_k, 0.0)
        return dq, dk, dv


__all__ = ["FlashKernel", "AscendPrimitives", "FlashCall", "FlashArgs", "plan_flash_calls", "flash_arguments",
           "documented_keep"]
