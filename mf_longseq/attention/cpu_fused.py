"""Fused local attention on CPU: the kernel contract of ``kernel.py`` through two MindSpore AOT custom operators.

Shapes (legend as in ``kernel.py``): q (B, N, S_q, D), k and v (B, K, S_k, D), N = K * G.

    forward(q, k, v, mask, scale)  -> out (B, N, S_q, D) in q's dtype, lse (B, N, S_q) float32
    backward(q, k, v, dout, lse, delta, mask, scale) -> dq, dk, dv float32

and, for the ring's running results (``ring.py``), the same work accumulated in place, no block-sized output:

    forward_into(q, k, v, mask, scale, out, lse)      out, lse float32: the block merged in by log-sum-exp
    backward_into(q, k, v, dout, lse, delta, mask, scale, dq, dk, dv)   dq, dk, dv float32: gradients added

Token-major ``input_layout`` "BSND" (``with_input_layout``): the same contract with the sequence before the heads,
the format of the model's activations: q, out, dout, dq (B, S_q, N, D); k, v, dk, dv (B, S_k, K, D); lse, delta
(B, S_q, N).
The kernel reads and writes it in place (strided rows), so the algorithms need no transposes around it:
MindSpore's CPU transpose copies about 0.3 GB/s on one thread (measured: 100 ms for a (1, 16384, 8, 64) float32
tensor), which at S = 16k cost more than 10 % of a ring rank's step.

The work is ``csrc/fused_attention.cc`` (FlashAttention-2 forward and backward, tile GEMMs through the oneDNN
``dnnl_sgemm`` in MindSpore's wheel, threads over (batch, kv head, query tile)), called as
``ops.Custom(func_type="aot")`` on CPU, so it runs inside MindSpore's PyNative executor like any other op.  The
kernel receives the mask as positions and document ids (int32, length S_q / S_k) and computes each PARTIAL
tile itself; nothing S x S exists.  A ``DenseMask`` (use_attn_mask_compression off: visibility read from an
S x S grid) is delegated to ``BlockwiseKernel``.

Threads: ``runtime_num_threads`` of the MindSpore context, capped at the CPUs this process may use.

Op dispatch: PyNative's asynchronous executor runs ops on a backend thread while the Python thread busy-waits
for them (``AsyncRQueue::Wait``), one core spinning beside this kernel's threads; CPU runs therefore dispatch
synchronously, decided once in ``train.context.configure_op_dispatch`` (measurements there and in
docs/design.md).  MindSpore releases the GIL while the op runs, so other Python threads keep running.
"""
import os
from typing import Tuple

import numpy as np
import mindspore as ms
from mindspore import Tensor, ops
from mindspore.ops import CustomRegOp, DataType

from mf_longseq.attention.cpu_build import library_path
from mf_longseq.attention.kernel import HEAD_MAJOR, TOKEN_MAJOR, AttentionKernel
from mf_longseq.attention.mask import AttentionMask, DenseMask
from mf_longseq.attention.merge import merge_into

_F32, _I32 = DataType.F32_Default, DataType.I32_Default


def _f32(x):
    """x as float32 (no copy when it already is)."""
    return x if x.dtype == ms.float32 else x.astype(ms.float32)


def _custom(lib, func: str, inputs, outputs, out_shape, out_dtype):
    """An AOT CPU custom op of ``lib:func``; ``inputs``/``outputs``: (name, DataType) in parameter order."""
    reg = CustomRegOp()
    for i, (name, _) in enumerate(inputs):
        reg = reg.input(i, name)
    for i, (name, _) in enumerate(outputs):
        reg = reg.output(i, name)
    reg = reg.dtype_format(*[t for _, t in inputs + outputs]).target("CPU").get_op_info()
    return ops.Custom(f"{lib}:{func}", out_shape=out_shape, out_dtype=out_dtype, func_type="aot", reg_info=reg)


def _check_running(**buffers) -> None:
    """The in-place operators write these tensors' memory: each must be float32 and contiguous.

    Raises:
        ValueError: naming the tensor, its dtype and the fix.
    """
    for name, x in buffers.items():
        if x.dtype != ms.float32 or not x.is_contiguous():
            raise ValueError(f"{name}: a running result updated in place must be a contiguous float32 tensor, got "
                             f"{x.dtype}{'' if x.is_contiguous() else ' (strided view)'}. Fix: pass a buffer this "
                             "caller owns (e.g. ops.zeros(shape, mindspore.float32)).")


def cpu_threads() -> int:
    """Threads for the kernel: MindSpore's ``runtime_num_threads``, at most the CPUs this process may run on."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    configured = ms.get_context("runtime_num_threads") or usable
    return max(1, min(int(configured), usable))


class FusedCpuKernel(AttentionKernel):
    """FlashAttention-2 in C++ on CPU (see module docstring).

    Tiles hold about ``block_q`` query rows (the G query heads of a kv head share a tile: block_q / G rows per
    head) and ``block_k`` keys, sized for the L2 cache; ``block_size`` caps both (small values in tests force
    many tiles) and is the tile of the ``BlockwiseKernel`` used for a ``DenseMask``.

    Raises:
        FusedKernelUnavailable: at construction, when the library cannot be built (no compiler, no oneDNN).
    """

    name = "fused_cpu"
    input_layouts = (HEAD_MAJOR, TOKEN_MAJOR)     # head-major (the kernel contract), token-major (the activations)

    def __init__(self, block_size: int = 2048, block_q: int = 128, block_k: int = 512):
        from mf_longseq.attention.kernel import BlockwiseKernel
        self.input_layout = HEAD_MAJOR
        self.block_size: int = block_size                        # the skip test's tile (AttentionKernel.block_size)
        self.block_q, self.block_k = min(block_q, block_size), min(block_k, block_size)
        self.reference = BlockwiseKernel(block_size)             # DenseMask fallback
        lib = library_path()
        f32, i32 = (lambda n: (n, _F32)), (lambda n: (n, _I32))
        pos = [i32("q_pos"), i32("k_pos"), i32("q_doc"), i32("k_doc"), f32("cfg")]
        self._fwd = _custom(lib, "FusedAttentionForward", [f32("q"), f32("k"), f32("v")] + pos,
                            [f32("out"), f32("lse")],
                            lambda q, *_: (q, q[:-1]), lambda q, *_: (ms.float32, ms.float32))
        self._bwd = _custom(lib, "FusedAttentionBackward",
                            [f32("q"), f32("k"), f32("v"), f32("dout"), f32("lse"), f32("delta")] + pos,
                            [f32("dq"), f32("dk"), f32("dv")],
                            lambda q, k, v, *_: (q, k, v), lambda *_: (ms.float32,) * 3)
        done = [f32("done")]                                     # the *Into operators write their inputs in place
        self._fwd_into = _custom(lib, "FusedAttentionForwardInto",
                                 [f32("q"), f32("k"), f32("v"), f32("out"), f32("lse")] + pos, done,
                                 lambda *_: (1,), lambda *_: ms.float32)
        self._bwd_into = _custom(lib, "FusedAttentionBackwardInto",
                                 [f32("q"), f32("k"), f32("v"), f32("dout"), f32("lse"), f32("delta"),
                                  f32("dq"), f32("dk"), f32("dv")] + pos, done,
                                 lambda *_: (1,), lambda *_: ms.float32)
        self._delta = _custom(lib, "FusedAttentionDelta", [f32("dout"), f32("out"), f32("dlse")], [f32("delta")],
                              lambda dout, out, dlse: dlse, lambda *_: ms.float32)

    def _mask_args(self, mask: AttentionMask, scale: float, rows_per_head: int):
        """(q_pos, k_pos, q_doc, k_doc, cfg) tensors; cfg = [scale, causal, docs, threads, block_q, block_k,
        token_major]."""
        def ids(x, n):
            return Tensor(np.ascontiguousarray(x if x is not None else np.zeros(n), dtype=np.int32))
        cfg = np.array([scale, mask.causal, mask.has_docs, cpu_threads(), rows_per_head, self.block_k,
                        self.input_layout == TOKEN_MAJOR], np.float32)
        return (ids(mask.q_pos, 1), ids(mask.k_pos, 1), ids(mask.q_doc, 1), ids(mask.k_doc, 1), Tensor(cfg))

    def _rows_per_head(self, q, k) -> int:
        """Query rows per head of a tile: block_q / G (at least min(16, block_q)), about block_q rows a tile."""
        heads = 2 if self.input_layout == TOKEN_MAJOR else 1
        return max(min(16, self.block_q), self.block_q // (q.shape[heads] // k.shape[heads]))

    def forward(self, q, k, v, mask: AttentionMask, scale: float) -> Tuple[Tensor, Tensor]:
        if isinstance(mask, DenseMask):
            return self._reference_forward(q, k, v, mask, scale)
        args = self._mask_args(mask, scale, self._rows_per_head(q, k))
        out, lse = self._fwd(_f32(q), _f32(k), _f32(v), *args)
        return (out if q.dtype == ms.float32 else out.astype(q.dtype)), lse

    def backward(self, q, k, v, dout, lse, delta, mask: AttentionMask, scale: float):
        """Gradients given the *final* lse and delta = rowsum(dout * out) - dlse; float32 (dq, dk, dv)."""
        if isinstance(mask, DenseMask):
            return self._reference_backward(q, k, v, dout, lse, delta, mask, scale)
        args = self._mask_args(mask, scale, self._rows_per_head(q, k))
        return self._bwd(_f32(q), _f32(k), _f32(v), _f32(dout), _f32(lse), _f32(delta), *args)

    def delta(self, dout, out, dlse):
        """rowsum(dout * out) - dlse (float32, lse's shape) in one C++ pass: no (.., D) product is allocated
        (strided views, e.g. the ``DenseMask`` path's swapped outputs, take the generic form)."""
        xs = (_f32(dout), _f32(out), _f32(dlse))
        if not all(x.is_contiguous() for x in xs):
            return super().delta(dout, out, dlse)
        return self._delta(*xs)

    def forward_into(self, q, k, v, mask: AttentionMask, scale: float, out, lse) -> None:
        """Merge this block's attention into the running ``out`` (q's shape) and ``lse`` (q's shape without D), both
        float32, contiguous and owned (not views: a ``DenseMask`` merges through ``ops.assign``), in place
        (log-sum-exp, as ``merge.merge``).

        Raises:
            ValueError: ``out`` or ``lse`` not a contiguous float32 tensor (the operator writes their memory).
        """
        _check_running(out=out, lse=lse)
        if isinstance(mask, DenseMask):
            block = list(self.forward(q, k, v, mask, scale))
            block[0] = _f32(block[0])
            new_out, new_lse = merge_into(out, lse, block)
            ops.assign(out, new_out)
            ops.assign(lse, new_lse)
            return
        args = self._mask_args(mask, scale, self._rows_per_head(q, k))
        self._fwd_into(_f32(q), _f32(k), _f32(v), out, lse, *args)

    def backward_into(self, q, k, v, dout, lse, delta, mask: AttentionMask, scale: float, dq, dk, dv) -> None:
        """Add this block's gradients into ``dq`` (q's shape), ``dk`` and ``dv`` (k's shape), float32 and
        contiguous, in place; lse and delta as in ``backward``.

        Raises:
            ValueError: ``dq``, ``dk`` or ``dv`` not a contiguous float32 tensor.
        """
        _check_running(dq=dq, dk=dk, dv=dv)
        if isinstance(mask, DenseMask):
            for total, part in zip((dq, dk, dv), self.backward(q, k, v, dout, lse, delta, mask, scale)):
                ops.assign_add(total, part)
            return
        args = self._mask_args(mask, scale, self._rows_per_head(q, k))
        self._bwd_into(_f32(q), _f32(k), _f32(v), _f32(dout), _f32(lse), _f32(delta), dq, dk, dv, *args)

    # DenseMask: the blockwise reference, in BNSD; token-major tensors are swapped (B, S, H, ..) <-> (B, H, S, ..).
    def _swap(self, *xs):
        return [x.swapaxes(1, 2) if self.input_layout == TOKEN_MAJOR else x for x in xs]

    def _reference_forward(self, q, k, v, mask, scale):
        return tuple(self._swap(*self.reference.forward(*self._swap(q, k, v), mask, scale)))

    def _reference_backward(self, q, k, v, dout, lse, delta, mask, scale):
        return tuple(self._swap(*self.reference.backward(*self._swap(q, k, v, dout, lse, delta), mask, scale)))
