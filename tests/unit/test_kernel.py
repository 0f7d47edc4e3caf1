"""Both CPU kernels (blockwise reference, fused C++) against the float64 oracle: out, lse, dq, dk, dv; merge of
partial results."""
import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor

from mf_longseq.attention.cpu_fused import FusedCpuKernel
from mf_longseq.attention.kernel import BlockwiseKernel, LocalAttention, default_scale
from mf_longseq.attention.merge import merge
from mf_longseq.attention.mask import AttentionMask
from mf_longseq.parallel import positions_for
from oracle import causal_allowed, reference_attention

TOL = 1e-5
KERNELS = {"blockwise": BlockwiseKernel, "fused_cpu": FusedCpuKernel}      # kernel class(block_size)


def bnsd(x):
    return Tensor(np.ascontiguousarray(x.transpose(0, 2, 1, 3)))


def bsnd(t):
    return t.asnumpy().transpose(0, 2, 1, 3)


def run_kernel(q, k, v, dout, mask, block, kernel="blockwise"):
    scale = default_scale(q.shape[-1])
    cell = LocalAttention(KERNELS[kernel](block), mask, scale)
    dout_t = bnsd(dout)

    def loss(q_, k_, v_):
        out, lse = cell(q_, k_, v_)
        return (out * dout_t).sum(), (out, lse)

    (_, (out, lse)), grads = ms.value_and_grad(loss, grad_position=(0, 1, 2), has_aux=True)(bnsd(q), bnsd(k), bnsd(v))
    return bsnd(out), lse.asnumpy(), [bsnd(g) for g in grads]


def check_against_oracle(q, k, v, dout, mask, allowed, block, kernel):
    """out, lse, dq, dk, dv of ``kernel`` within TOL of the float64 oracle with visibility ``allowed``."""
    out, lse, (dq, dk, dv) = run_kernel(q, k, v, dout, mask, block, kernel)
    ref_out, ref_lse, (rdq, rdk, rdv) = reference_attention(q, k, v, allowed, default_scale(q.shape[-1]), dout)
    for name, got, ref in (("out", out, ref_out), ("lse", lse, ref_lse), ("dq", dq, rdq), ("dk", dk, rdk),
                           ("dv", dv, rdv)):
        assert np.abs(got - ref).max() <= TOL, name


def inputs(b, sq, sk, n, kv, d, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((b, sq, n, d)).astype(np.float32), rng.standard_normal((b, sk, kv, d)).astype(np.float32),
            rng.standard_normal((b, sk, kv, d)).astype(np.float32), rng.standard_normal((b, sq, n, d)).astype(np.float32))


@pytest.mark.parametrize("kernel", sorted(KERNELS))
@pytest.mark.parametrize("s, causal, n, kv, block", [
    (4096, True, 8, 2, 1024),
    (4096, False, 4, 4, 2048),
    (1000, True, 8, 2, 128),        # not a power of two, tiles of unequal size
    (257, True, 4, 1, 64),           # MQA
])
def test_kernel_matches_oracle(s, causal, n, kv, block, kernel):
    q, k, v, dout = inputs(1, s, s, n, kv, 32)
    pos = np.arange(s)
    mask = AttentionMask(pos, pos, causal)
    check_against_oracle(q, k, v, dout, mask, causal_allowed(pos, pos, causal=causal), block, kernel)


@pytest.mark.parametrize("kernel", sorted(KERNELS))
def test_ring_step_masks_from_global_positions(kernel):
    """Queries of zigzag rank 1 against keys of zigzag rank 3 (of 4): partly visible, some queries see nothing."""
    s = 256
    qp, kp = positions_for(s, ring_size=4, ring_index=1), positions_for(s, ring_size=4, ring_index=3)
    q, k, v, dout = inputs(2, len(qp), len(kp), 4, 2, 16, seed=3)
    out, lse, (dq, dk, dv) = run_kernel(q, k, v, dout, AttentionMask(qp, kp, True), 16, kernel)
    allowed = causal_allowed(qp, kp)
    assert not allowed.all(axis=1).all() and allowed.any()
    ref_out, ref_lse, (rdq, rdk, rdv) = reference_attention(q, k, v, allowed, default_scale(16), dout)
    blind = ~allowed.any(axis=1)
    assert np.isneginf(lse[:, :, blind]).all() and (out[:, blind] == 0).all()
    for got, ref in ((out, ref_out), (dq, rdq), (dk, rdk), (dv, rdv)):
        assert np.abs(got - ref).max() <= TOL
    assert np.allclose(lse[:, :, ~blind], ref_lse[:, :, ~blind], atol=TOL)


@pytest.mark.parametrize("kernel_name", sorted(KERNELS))
def test_merge_of_two_key_halves_is_full_attention(kernel_name):
    s = 128
    q, k, v, _ = inputs(1, s, s, 4, 2, 16, seed=5)
    kernel, scale, pos = KERNELS[kernel_name](32), default_scale(16), np.arange(s)
    halves = [kernel.forward(bnsd(q), bnsd(k[:, sl]), bnsd(v[:, sl]), AttentionMask(pos, pos[sl], True), scale)
              for sl in (slice(0, 64), slice(64, 128))]
    out, lse = merge(halves[0][0], halves[0][1], halves[1][0], halves[1][1])
    ref_out, ref_lse = reference_attention(q, k, v, causal_allowed(pos, pos), scale)
    assert np.abs(bsnd(out) - ref_out).max() <= TOL
    assert np.abs(lse.asnumpy() - ref_lse).max() <= TOL


@pytest.mark.parametrize("kernel", sorted(KERNELS))
@pytest.mark.parametrize("causal", [True, False])
def test_packed_documents_match_oracle(kernel, causal):
    """Three documents (boundaries inside tiles), zigzag-style positions with a break: PARTIAL tiles from ids."""
    s = 200
    doc = np.repeat([0, 1, 2], [70, 45, 85])
    pos = np.concatenate([np.arange(100), np.arange(150, 250)])          # a break in positions at 100
    q, k, v, dout = inputs(2, s, s, 8, 2, 16, seed=7)
    mask = AttentionMask(pos, pos, causal, doc, doc)
    check_against_oracle(q, k, v, dout, mask, causal_allowed(pos, pos, doc, doc, causal=causal), 32, kernel)


@pytest.mark.parametrize("kernel", sorted(KERNELS))
def test_rows_that_see_no_key(kernel):
    """Queries of one document against keys of others only: lse = -inf, out = 0 and zero gradients there."""
    s = 96
    q_doc, k_doc = np.repeat([0, 1], [40, 56]), np.repeat([1, 2], [30, 66])
    pos = np.arange(s)
    q, k, v, dout = inputs(1, s, s, 4, 4, 16, seed=11)
    out, lse, (dq, dk, dv) = run_kernel(q, k, v, dout, AttentionMask(pos, pos, False, q_doc, k_doc), 32, kernel)
    allowed = causal_allowed(pos, pos, q_doc, k_doc, causal=False)
    blind = ~allowed.any(axis=1)
    assert blind.sum() == 40 and np.isneginf(lse[:, :, blind]).all()
    assert (out[:, blind] == 0).all() and (dq[:, blind] == 0).all()
    assert (dk[:, ~allowed.any(axis=0)] == 0).all() and (dv[:, ~allowed.any(axis=0)] == 0).all()
    ref_out, _, (rdq, rdk, rdv) = reference_attention(q, k, v, allowed, default_scale(16), dout)
    for got, ref in ((out, ref_out), (dq, rdq), (dk, rdk), (dv, rdv)):
        assert np.abs(got - ref).max() <= TOL


def run_token_major(q, k, v, dout, mask, block):
    """The fused kernel on (B, S, N, D) tensors as they are (``with_input_layout("BSND")``): out, lse, grads."""
    cell = LocalAttention(FusedCpuKernel(block).with_input_layout("BSND"), mask, default_scale(q.shape[-1]))
    dout_t = Tensor(dout)

    def loss(q_, k_, v_):
        out, lse = cell(q_, k_, v_)
        return (out * dout_t).sum(), (out, lse)

    (_, (out, lse)), grads = ms.value_and_grad(loss, grad_position=(0, 1, 2), has_aux=True)(
        Tensor(q), Tensor(k), Tensor(v))
    return out.asnumpy(), lse.asnumpy().transpose(0, 2, 1), [g.asnumpy() for g in grads]


@pytest.mark.parametrize("s, causal, n, kv, block, docs", [
    (1000, True, 8, 2, 128, False),
    (257, False, 4, 1, 64, False),
    (200, True, 8, 2, 32, True),
])
def test_token_major_layout_matches_oracle(s, causal, n, kv, block, docs):
    """The fused kernel reading and writing (B, S, N, D) in place: the same oracle as the (B, N, S, D) contract,
    with a break in positions (zigzag) and packed documents."""
    q, k, v, dout = inputs(2, s, s, n, kv, 16, seed=13)
    pos = np.concatenate([np.arange(s // 2), np.arange(s // 2, s) + 40])
    doc = np.repeat([0, 1, 2], [s // 3, s // 3, s - 2 * (s // 3)]) if docs else None
    mask = AttentionMask(pos, pos, causal, doc, doc)
    out, lse, (dq, dk, dv) = run_token_major(q, k, v, dout, mask, block)
    allowed = causal_allowed(pos, pos, doc, doc, causal=causal)
    ref_out, ref_lse, (rdq, rdk, rdv) = reference_attention(q, k, v, allowed, default_scale(16), dout)
    for name, got, ref in (("out", out, ref_out), ("lse", lse, ref_lse), ("dq", dq, rdq), ("dk", dk, rdk),
                           ("dv", dv, rdv)):
        assert np.abs(got - ref).max() <= TOL, name


def test_token_major_dense_mask_goes_through_the_reference():
    """A DenseMask in the token-major layout: the blockwise reference with axes swapped, same oracle."""
    from mf_longseq.attention.mask import DenseMask
    s = 96
    pos = np.arange(s)
    grid = np.zeros((s, s), np.uint8)
    grid[:, 10:20] = 1
    mask = DenseMask(pos, pos, True, None, None, grid=grid)
    q, k, v, dout = inputs(1, s, s, 4, 2, 16, seed=17)
    out, lse, (dq, dk, dv) = run_token_major(q, k, v, dout, mask, 32)
    ref_out, ref_lse, (rdq, rdk, rdv) = reference_attention(q, k, v, mask.dense(), default_scale(16), dout)
    for name, got, ref in (("out", out, ref_out), ("lse", lse, ref_lse), ("dq", dq, rdq), ("dk", dk, rdk),
                           ("dv", dv, rdv)):
        assert np.abs(got - ref).max() <= TOL, name


def test_with_input_layout_refuses_other_layouts():
    with pytest.raises(ValueError, match="BNSD or BSND"):
        FusedCpuKernel(64).with_input_layout("TND")
