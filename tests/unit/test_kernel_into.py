"""The fused CPU kernel's accumulating forms (``forward_into`` / ``backward_into``, what the ring calls): a running
(out, lse) and running dq, dk, dv updated in place block by block equal the float64 oracle of the whole."""
import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor, ops

from mf_longseq.attention.cpu_fused import FusedCpuKernel
from mf_longseq.attention.kernel import default_scale
from mf_longseq.attention.mask import AttentionMask, DenseMask
from oracle import causal_allowed, reference_attention

TOL = 1e-5


def _inputs(s, n, kv, d, seed):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape).astype(np.float32) for shape in ((1, s, n, d), (1, s, kv, d), (1, s, kv, d),
                                                                         (1, s, n, d))]


def _split_run(input_layout, dense, q, k, v, dout, q_pos, k_pos, halves):
    """Forward and backward of the queries against the key ``halves`` one at a time, accumulated in place."""
    kernel = FusedCpuKernel(32).with_input_layout(input_layout)
    scale = default_scale(q.shape[-1])
    lay = (lambda x: Tensor(np.ascontiguousarray(x))) if input_layout == "BSND" else \
        (lambda x: Tensor(np.ascontiguousarray(x.transpose(0, 2, 1, 3))))
    back = (lambda t: t.asnumpy()) if input_layout == "BSND" else (lambda t: t.asnumpy().transpose(0, 2, 1, 3))
    grid = np.triu(np.ones((len(k_pos),) * 2, np.uint8), 1)                 # 1 = masked: the causal grid
    masks = [DenseMask(q_pos, k_pos[sl], True, grid=grid) if dense else AttentionMask(q_pos, k_pos[sl], True)
             for sl in halves]
    qt, dt = lay(q), lay(dout)
    out, lse = kernel.forward(qt, lay(k[:, halves[0]]), lay(v[:, halves[0]]), masks[0], scale)
    out, lse = (x.copy() for x in (out, lse))        # owned buffers (the dense reference returns views)
    for sl, mask in zip(halves[1:], masks[1:]):
        kernel.forward_into(qt, lay(k[:, sl]), lay(v[:, sl]), mask, scale, out, lse)
    delta = (dt * out).sum(-1)
    dq = ops.zeros(qt.shape, ms.float32)
    dk, dv = [], []
    for sl, mask in zip(halves, masks):
        dk_h, dv_h = ops.zeros(lay(k[:, sl]).shape, ms.float32), ops.zeros(lay(v[:, sl]).shape, ms.float32)
        for _ in range(2):                                                   # twice: proves it adds, not writes
            kernel.backward_into(qt, lay(k[:, sl]), lay(v[:, sl]), dt, lse, delta, mask, scale, dq, dk_h, dv_h)
        dk.append(back(dk_h) / 2)
        dv.append(back(dv_h) / 2)
    return back(out), lse.asnumpy(), back(dq) / 2, np.concatenate(dk, 1), np.concatenate(dv, 1)


@pytest.mark.parametrize("input_layout", ["BSND", "BNSD"])
@pytest.mark.parametrize("dense", [False, True])
def test_accumulated_blocks_match_oracle(input_layout, dense):
    """Three key blocks; the queries of the first rows see nothing of the later blocks (-inf lse merged)."""
    s, n, kv, d = 96, 4, 2, 16
    q, k, v, dout = _inputs(s, n, kv, d, seed=13)
    pos = np.arange(s)
    halves = [slice(0, 40), slice(40, 70), slice(70, 96)]
    out, lse, dq, dk, dv = _split_run(input_layout, dense, q, k, v, dout, pos, pos, halves)
    ref_out, ref_lse, (rdq, rdk, rdv) = reference_attention(q, k, v, causal_allowed(pos, pos), default_scale(d), dout)
    lse_bsn = lse if input_layout == "BSND" else lse.transpose(0, 2, 1)
    for name, got, ref in (("out", out, ref_out), ("lse", lse_bsn.transpose(0, 2, 1), ref_lse), ("dq", dq, rdq),
                           ("dk", dk, rdk), ("dv", dv, rdv)):
        assert np.abs(got - ref).max() <= TOL, name


def test_running_buffers_must_be_contiguous_float32():
    kernel = FusedCpuKernel(32).with_input_layout("BSND")
    q, k, v, _ = (Tensor(x) for x in _inputs(16, 2, 1, 8, seed=1))
    pos = np.arange(16)
    out, lse = ops.zeros(q.shape, ms.float16), ops.zeros(q.shape[:-1], ms.float32)
    with pytest.raises(ValueError, match="out: .*contiguous float32"):
        kernel.forward_into(q, k, v, AttentionMask(pos, pos, True), 0.3, out, lse)
    dq, dk = ops.zeros(q.shape, ms.float32), ops.zeros((1, 1, 8, 16), ms.float32).swapaxes(2, 3)
    with pytest.raises(ValueError, match="dk: .*strided view"):
        kernel.backward_into(q, k, v, q, lse, lse, AttentionMask(pos, pos, True), 0.3, dq, dk, ops.zeros_like(k))


@pytest.mark.parametrize("input_layout", ["BSND", "BNSD"])
def test_delta_in_one_pass_matches_rowsum(input_layout):
    """``FusedCpuKernel.delta`` (the C++ pass the backward's delta comes from, no (.., D) product) equals
    rowsum(dout * out) - dlse in float64, in either layout, and a strided view takes the generic form."""
    rng = np.random.default_rng(5)
    shape = (2, 40, 4, 16) if input_layout == "BSND" else (2, 4, 40, 16)
    dout, out = (rng.standard_normal(shape).astype(np.float32) for _ in range(2))
    dlse = rng.standard_normal(shape[:-1]).astype(np.float32)
    kernel = FusedCpuKernel(32).with_input_layout(input_layout)
    want = (dout.astype(np.float64) * out).sum(-1) - dlse
    got = kernel.delta(Tensor(dout), Tensor(out), Tensor(dlse)).asnumpy()
    assert got.shape == dlse.shape and np.allclose(got, want, rtol=1e-5, atol=1e-5)
    view = Tensor(np.ascontiguousarray(out.transpose(0, 2, 1, 3))).swapaxes(1, 2)       # same values, strided
    got_view = kernel.delta(Tensor(dout), view, Tensor(dlse)).asnumpy()
    assert np.allclose(got_view, want, rtol=1e-5, atol=1e-5)
