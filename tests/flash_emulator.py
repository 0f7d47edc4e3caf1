"""A NumPy stand-in for FlashAttentionScore / FlashAttentionScoreGrad that follows their documented semantics.

It lets ``FlashKernel`` run on CPU: same call signatures and output tuples as MindSpore 2.9's primitives, kept
pairs from ``flash_args.documented_keep``, float64 arithmetic.  A row that keeps no key is an error here
(the real op's result for it is not documented), so planner bugs that create such rows fail loudly.
"""
import numpy as np
import mindspore as ms
from mindspore import Tensor

from mf_longseq.attention.flash_args import documented_keep


def _np(x):
    if x is None:
        return None
    return np.asarray(x.astype(ms.float32).asnumpy() if hasattr(x, "asnumpy") else x, dtype=np.float64)


def _to_bnsd(x, layout):
    """(T, H, D) -> (1, H, T, D) for TND; BNSD unchanged."""
    return x.transpose(1, 0, 2)[None] if layout == "TND" else x


def _from_bnsd(x, layout):
    return x[0].transpose(1, 0, 2) if layout == "TND" else x


def _stat(x_BNT, layout):
    """(B, N, T) -> (B, N, T, 8) or TND (T, N, 8)."""
    x = np.repeat(x_BNT[..., None], 8, axis=-1)
    return x[0].transpose(1, 0, 2) if layout == "TND" else x


def _unstat(x, layout):
    return x[..., 0].transpose(1, 0)[None] if layout == "TND" else x[..., 0]


class NumpyFlashPrimitives:
    """Drop-in for ``AscendPrimitives``; records every call's __init__ arguments in ``self.calls``."""

    def __init__(self):
        self.calls = []

    def _setup(self, init, q, k, attn_mask, qlen, kvlen):
        layout = init["input_layout"]
        q64, k64 = _to_bnsd(_np(q), layout), _to_bnsd(_np(k), layout)
        mask = None if attn_mask is None else attn_mask.asnumpy()
        keep = documented_keep(init, mask, qlen, kvlen, q64.shape[2], k64.shape[2])
        assert keep.any(axis=1).all(), "a FlashAttentionScore call has a row that keeps no key"
        group = q64.shape[1] // k64.shape[1]
        return layout, q64, keep, group

    def forward(self, init):
        self.calls.append(dict(init))

        def run(query, key, value, real_shift, drop_mask, padding_mask, attn_mask, prefix, qlen, kvlen):
            layout, q, keep, g = self._setup(init, query, key, attn_mask, qlen, kvlen)
            k = np.repeat(_to_bnsd(_np(key), layout), g, axis=1)
            v = np.repeat(_to_bnsd(_np(value), layout), g, axis=1)
            s = np.where(keep, init["scale_value"] * q @ k.swapaxes(-1, -2), -np.inf)
            mx = s.max(-1)
            e = np.exp(s - mx[..., None])
            sm = e.sum(-1)
            out = (e / sm[..., None]) @ v
            f32 = lambda x: Tensor(x.astype(np.float32))
            return (f32(_stat(mx, layout)), f32(_stat(sm, layout)), Tensor(np.zeros(0, np.float32)),
                    Tensor(_from_bnsd(out, layout).astype(np.float32)).astype(query.dtype))
        return run

    def grad(self, init):
        self.calls.append(dict(init, grad=True))

        def run(query, key, value, dy, pse_shift, drop_mask, padding_mask, atten_mask, softmax_max, softmax_sum,
                softmax_in, attention_in, prefix, qlen, kvlen):
            layout, q, keep, g = self._setup(init, query, key, atten_mask, qlen, kvlen)
            k = np.repeat(_to_bnsd(_np(key), layout), g, axis=1)
            v = np.repeat(_to_bnsd(_np(value), layout), g, axis=1)
            do, o = _to_bnsd(_np(dy), layout), _to_bnsd(_np(attention_in), layout)
            mx, sm = _unstat(_np(softmax_max), layout), _unstat(_np(softmax_sum), layout)
            scale = init["scale_value"]
            s = np.where(keep, scale * q @ k.swapaxes(-1, -2), -np.inf)
            p = np.exp(s - mx[..., None]) / sm[..., None]
            ds = p * (do @ v.swapaxes(-1, -2) - (do * o).sum(-1, keepdims=True))
            dq = scale * ds @ k
            b, n, t_k, d = k.shape
            dk = (scale * ds.swapaxes(-1, -2) @ q).reshape(b, n // g, g, t_k, d).sum(2)
            dv = (p.swapaxes(-1, -2) @ do).reshape(b, n // g, g, t_k, d).sum(2)
            back = lambda x: Tensor(_from_bnsd(x, layout).astype(np.float32)).astype(query.dtype)
            return back(dq), back(dk), back(dv), Tensor(np.zeros(0, np.float32))
        return run


__all__ = ["NumpyFlashPrimitives"]
