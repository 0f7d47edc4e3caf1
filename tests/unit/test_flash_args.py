"""FlashAttentionScore argument building, checked against the op's documented semantics, for every engine case.

For every mask the engine produces (ring / Ulysses / hybrid steps of every rank, zigzag and contiguous, causal
or not, packed documents, the dense mask of compression-off), the planned calls, evaluated with
``documented_keep`` (the documented meaning of sparse_mode, attn_mask, pre/next tokens, TND lengths), must
select exactly the pairs of ``AttentionMask.dense()``, each once, with no call row that keeps no key.
Then ``FlashKernel`` itself runs on CPU with a NumPy stand-in of the two primitives and is compared with the
float64 oracle, forward and backward, over whole simulated rings.
"""
import itertools

import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor

from flash_emulator import NumpyFlashPrimitives
from oracle import causal_allowed, reference_attention
from mf_longseq.attention.attention_plan import ring_masks
from mf_longseq.attention.flash import FlashKernel
from mf_longseq.attention.flash_args import documented_keep, flash_arguments, plan_flash_calls
from mf_longseq.attention.merge import merge
from mf_longseq.attention.mask import (MAX_TOKENS, AttentionMask, DenseMask, compressed_causal_mask,
                                       dense_attention_mask)
from mf_longseq.parallel import Mesh


def docs_from_ends(ends, seq_len):
    """Segment ids of documents ending (exclusive) at ``ends``."""
    return np.searchsorted(np.asarray(ends), np.arange(seq_len), side="right").astype(np.int64)


def coverage(mask, batch=1):
    """Sum over the planned calls of their documented kept pairs, mapped back to the kernel call's indices."""
    hits = np.zeros((len(mask.q_pos), len(mask.k_pos)), dtype=np.int64)
    for call in plan_flash_calls(mask):
        args = flash_arguments(call, batch=batch, head_num=4, scale=0.125)
        m, n = len(call.q_index), len(call.k_index)
        folded = batch if call.input_layout == "TND" else 1             # TND folds the batch into T
        keep = documented_keep(args.init, args.attn_mask, args.actual_seq_qlen, args.actual_seq_kvlen,
                               folded * m, folded * n)
        assert keep.any(axis=1).all(), f"call {call} has a row with no key"
        for b in range(folded):                                    # samples must not see each other
            rows = keep[b * m:(b + 1) * m]
            assert not rows[:, :b * n].any() and not rows[:, (b + 1) * n:].any()
            assert np.array_equal(rows[:, b * n:(b + 1) * n], keep[:m, :n])
        np.add.at(hits, (call.q_index[:, None], call.k_index[None, :]), keep[:m, :n].astype(np.int64))
    return hits


def engine_masks(seq_len, cp, ulysses, layout, causal, segment_ids):
    for rank in range(cp):
        mesh = Mesh(cp=cp, ulysses=ulysses, rank=rank)
        if layout == "zigzag" and seq_len % (2 * mesh.ring):
            continue
        for j, mask in enumerate(ring_masks(seq_len, mesh, layout, causal, segment_ids)):
            yield rank, j, mask


DOCS = {
    "none": lambda s: None,
    "crossing": lambda s: docs_from_ends([5, s // 4 + 3, s // 2 - 1, s // 2 + 7, 3 * s // 4 + 1, s], s),
    "many_small": lambda s: docs_from_ends(list(range(3, s, 7)) + [s], s),
    "one_doc": lambda s: np.zeros(s, np.int64),
}


@pytest.mark.parametrize("cp,ulysses", [(1, 1), (2, 1), (4, 1), (8, 1), (2, 2), (4, 2), (4, 4)])
@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("docs", sorted(DOCS))
def test_every_engine_mask_is_selected_exactly(cp, ulysses, layout, docs):
    seq_len = 96
    segment_ids = DOCS[docs](seq_len)
    for causal in (True, False):
        for rank, j, mask in engine_masks(seq_len, cp, ulysses, layout, causal, segment_ids):
            for batch in (1, 3):
                hits = coverage(mask, batch)
                assert np.array_equal(hits, mask.dense().astype(np.int64)), (rank, j, causal, batch)


def test_longer_than_compressed_mask_and_short_sequences():
    for seq_len, docs in itertools.product((8, 100, 4096 + 64), ("none", "crossing")):
        segment_ids = DOCS[docs](seq_len)
        for rank, j, mask in engine_masks(seq_len, 2, 1, "zigzag", True, segment_ids):
            assert np.array_equal(coverage(mask), mask.dense().astype(np.int64)), (seq_len, docs, rank, j)


def test_dense_mask_path_uses_the_dense_slice():
    seq_len = 64
    segment_ids = DOCS["crossing"](seq_len)
    grid = dense_attention_mask(2, seq_len, segment_ids)
    for rank in range(4):
        mesh = Mesh(cp=4, rank=rank)
        for j, mask in enumerate(ring_masks(seq_len, mesh, "zigzag", True, segment_ids)):
            dense = DenseMask(mask.q_pos, mask.k_pos, True, grid=grid)
            calls = plan_flash_calls(dense)
            assert all(c.mask == "dense" and c.sparse_mode == 0 for c in calls)
            assert np.array_equal(coverage(dense), mask.dense().astype(np.int64))


def _mask(q, k, causal=True, q_doc=None, k_doc=None):
    return AttentionMask(np.asarray(q, np.int64), np.asarray(k, np.int64), causal,
                         None if q_doc is None else np.asarray(q_doc), None if k_doc is None else np.asarray(k_doc))


def test_named_cases_get_the_expected_arguments():
    r = np.arange
    diag = plan_flash_calls(_mask(r(16, 32), r(16, 32)))
    assert [(c.input_layout, c.sparse_mode, c.mask) for c in diag] == [("BNSD", 2, "compressed")]
    args = flash_arguments(diag[0], batch=2, head_num=8, scale=0.125)
    assert args.init == dict(head_num=8, keep_prob=1.0, scale_value=0.125, pre_tokens=MAX_TOKENS, next_tokens=0,
                             inner_precise=0, input_layout="BNSD", sparse_mode=2)
    assert args.attn_mask.shape == (2048, 2048) and args.attn_mask.dtype == np.uint8
    assert np.array_equal(args.attn_mask, compressed_causal_mask()) and args.attn_mask[0, 1] == 1
    earlier = plan_flash_calls(_mask(r(16, 32), r(0, 16)))
    assert [(c.sparse_mode, c.mask) for c in earlier] == [(0, "none")]
    assert flash_arguments(earlier[0], batch=1, head_num=2, scale=1.0).init["next_tokens"] == MAX_TOKENS
    assert plan_flash_calls(_mask(r(0, 16), r(16, 32))) == []                     # later step: skipped
    zz_i, zz_j = np.r_[8:16, 48:56], np.r_[0:8, 56:64]                            # zigzag, R = 4, ranks 1 and 0
    step = plan_flash_calls(_mask(zz_i, zz_j))                                    # keys of an earlier rank
    assert len(step) == 1 and step[0].sparse_mode == 0 and np.array_equal(step[0].k_index, r(8))
    step = plan_flash_calls(_mask(zz_j, zz_i))                                    # keys of a later rank
    assert len(step) == 1 and np.array_equal(step[0].q_index, r(8, 16)) and len(step[0].k_index) == 16
    zz_diag = plan_flash_calls(_mask(zz_i, zz_i))
    assert [(c.sparse_mode, len(c.q_index)) for c in zz_diag] == [(2, 16)]
    suffix = plan_flash_calls(_mask(r(24, 32), r(16, 32)))                         # queries a suffix of keys
    assert [(c.sparse_mode, len(c.q_index), len(c.k_index)) for c in suffix] == [(3, 8, 16)]


def test_eod_uses_tnd_with_cumulative_lengths():
    pos = np.arange(32)
    doc = docs_from_ends([5, 20, 32], 32)
    calls = plan_flash_calls(_mask(pos, pos, True, doc, doc))
    assert [(c.input_layout, c.sparse_mode) for c in calls] == [("TND", 3)]
    assert calls[0].seq_qlen == (5, 15, 12) == calls[0].seq_kvlen
    args = flash_arguments(calls[0], batch=2, head_num=4, scale=0.5)
    assert args.actual_seq_qlen == (5, 20, 32, 37, 52, 64) == args.actual_seq_kvlen
    assert args.init["input_layout"] == "TND" and args.init["next_tokens"] == 0
    assert args.init["pre_tokens"] >= max(calls[0].seq_qlen)
    # zigzag diagonal with a document crossing the gap between the two chunks: TND + one full rectangle
    zz = np.r_[0:8, 24:32]
    doc = docs_from_ends([3, 30, 32], 32)[zz]
    calls = plan_flash_calls(_mask(zz, zz, True, doc, doc))
    kinds = sorted((c.input_layout, c.sparse_mode) for c in calls)
    assert kinds == [("BNSD", 0), ("TND", 3)]


def test_argument_errors_name_the_fix():
    call = plan_flash_calls(_mask(np.arange(8), np.arange(8)))[0]
    with pytest.raises(ValueError, match="attention_dropout"):
        flash_arguments(call, batch=1, head_num=1, scale=1.0, keep_prob=0.0)
    pos = np.arange(64)
    doc = np.arange(64) // 2                                                       # 32 two-token documents
    tnd = [c for c in plan_flash_calls(_mask(pos, pos, True, doc, doc)) if c.input_layout == "TND"][0]
    with pytest.raises(ValueError, match="max_tnd_segments"):
        flash_arguments(tnd, batch=33, head_num=1, scale=1.0)
    assert all(len(c.seq_qlen) <= 10 for c in plan_flash_calls(_mask(pos, pos, True, doc, doc), 10))


def test_documented_semantics_rejects_what_the_docs_forbid():
    init = dict(head_num=1, keep_prob=1.0, scale_value=1.0, pre_tokens=MAX_TOKENS, next_tokens=0,
                inner_precise=0, input_layout="BNSD", sparse_mode=2)
    with pytest.raises(ValueError, match="compressed"):
        documented_keep(init, np.zeros((2048, 2048), np.uint8), None, None, 4, 4)
    assert documented_keep(init, None, None, None, 3, 3).all()                    # no mask: full attention
    tnd = dict(init, input_layout="TND", sparse_mode=3)
    with pytest.raises(ValueError, match="S1 <= S2"):
        documented_keep(tnd, compressed_causal_mask(), (4,), (2,), 4, 2)
    with pytest.raises(ValueError, match="T1"):
        documented_keep(tnd, compressed_causal_mask(), (2, 3), (2, 4), 4, 4)


# ------------------------------------------------------------------------------------------------ kernel
def simulate_ring(seq_len, cp, layout, segment_ids, kernel, heads=4, kv_heads=2, dim=8, batch=2, seed=0):
    """Run ``kernel`` over every (rank, step) of a simulated ring; return full-sequence out, dq, dk, dv."""
    rng = np.random.default_rng(seed)
    q, dout = (rng.standard_normal((batch, heads, seq_len, dim)).astype(np.float32) for _ in range(2))
    k, v = (rng.standard_normal((batch, kv_heads, seq_len, dim)).astype(np.float32) for _ in range(2))
    scale = dim ** -0.5
    parts = [ring_masks(seq_len, Mesh(cp=cp, rank=r), layout, True, segment_ids) for r in range(cp)]
    pos = [masks[0].q_pos for masks in parts]
    t = lambda x, p: Tensor(x[:, :, p])
    got = {name: np.zeros_like(x) for name, x in (("out", q), ("dq", q), ("dk", k), ("dv", v))}
    for i in range(cp):
        out = ms.ops.zeros((batch, heads, len(pos[i]), dim), ms.float32)
        lse = ms.ops.full((batch, heads, len(pos[i])), float("-inf"), dtype=ms.float32)
        for j in range(cp):
            o, l_ = kernel.forward(t(q, pos[i]), t(k, pos[j]), t(v, pos[j]), parts[i][j], scale)
            out, lse = merge(out, lse, o.astype(ms.float32), l_)
        got["out"][:, :, pos[i]] = out.asnumpy()
        delta = (Tensor(dout[:, :, pos[i]]) * out).sum(-1)
        for j in range(cp):
            dq, dk, dv = kernel.backward(t(q, pos[i]), t(k, pos[j]), t(v, pos[j]), t(dout, pos[i]), lse, delta,
                                         parts[i][j], scale)
            got["dq"][:, :, pos[i]] += dq.asnumpy()
            got["dk"][:, :, pos[j]] += dk.asnumpy()
            got["dv"][:, :, pos[j]] += dv.asnumpy()
    p = np.arange(seq_len)
    docs = None if segment_ids is None else segment_ids
    allowed = causal_allowed(p, p, docs, docs)
    bsnd = lambda x: x.transpose(0, 2, 1, 3)
    out, _, (dq, dk, dv) = reference_attention(bsnd(q), bsnd(k), bsnd(v), allowed, scale, bsnd(dout))
    ref = {"out": out, "dq": dq, "dk": dk, "dv": dv}
    return {name: float(np.abs(bsnd(got[name]) - ref[name]).max()) for name in ref}


@pytest.mark.parametrize("cp,layout,docs", [(1, "contiguous", "none"), (2, "zigzag", "none"),
                                            (4, "contiguous", "none"), (2, "zigzag", "crossing"),
                                            (4, "zigzag", "crossing"), (4, "contiguous", "many_small")])
def test_flash_kernel_matches_oracle_with_numpy_primitives(cp, layout, docs):
    prims = NumpyFlashPrimitives()
    kernel = FlashKernel(primitives=prims, compute_dtype=ms.float32)
    errors = simulate_ring(64, cp, layout, DOCS[docs](64), kernel)
    assert max(errors.values()) <= 1e-5, errors
    modes = {(c["input_layout"], c["sparse_mode"]) for c in prims.calls}
    if docs != "none":
        assert ("TND", 3) in modes


def test_flash_kernel_half_precision_statistics():
    kernel = FlashKernel(primitives=NumpyFlashPrimitives())                       # float32 in -> bfloat16 calls
    errors = simulate_ring(32, 2, "zigzag", DOCS["crossing"](32), kernel, batch=1)
    assert max(errors.values()) <= 5e-2, errors


def test_mindspore_primitives_accept_the_built_arguments():
    """MindSpore 2.9's FlashAttentionScore / FlashAttentionScoreGrad constructors take every argument set
    (building a primitive needs no device) and keep the values; select_kernel picks FlashKernel on Ascend."""
    from mf_longseq.attention.flash import AscendPrimitives
    from mf_longseq.attention.select import select_kernel
    prims = AscendPrimitives()
    pos, zz = np.arange(32), np.r_[0:8, 24:32]
    doc = docs_from_ends([3, 30, 32], 32)
    masks = [_mask(pos, pos), _mask(pos[16:], pos[:16]), _mask(pos[24:], pos[8:]), _mask(pos, pos, True, doc, doc),
             _mask(zz, zz, True, doc[zz], doc[zz]), DenseMask(pos, pos, True, grid=dense_attention_mask(1, 32))]
    for mask in masks:
        for call in plan_flash_calls(mask):
            args = flash_arguments(call, batch=2, head_num=4, scale=0.25)
            for prim in (prims.forward(args.init), prims.grad(args.init)):
                got = {key: getattr(prim, key) for key in args.init if key != "input_layout"}
                assert got == {key: val for key, val in args.init.items() if key != "input_layout"}
    assert prims.forward(dict(args.init)) is prims.forward(args.init)            # one instance per argument set
    assert isinstance(select_kernel("Ascend", 2048, True), FlashKernel)
    assert select_kernel("Ascend", 2048, False).name == "blockwise"
