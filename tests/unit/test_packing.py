"""Packed documents: actual_seq_len from EOD tokens (against MindFormers' own dataset code), segment ids,
per-document positions, and per-sample (B, S) segment ids through the attention API (against the oracle)."""
import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor

from oracle import causal_allowed, reference_attention
from mf_longseq.attention import BlockwiseKernel, context_parallel_attention
from mf_longseq.parallel import Mesh
from mf_longseq.documents import (check_actual_seq_len, position_ids_from_actual_seq_len,
                                  segment_ids_from_actual_seq_len)
from mf_longseq.train.packing import EOD_PAD_KEY, actual_seq_len_from_tokens
from packed_docs import pack_documents

EOD = 2


def random_tokens(rng, seq_len, eod_rate=0.1):
    tokens = rng.integers(3, 50, seq_len)
    tokens[rng.random(seq_len) < eod_rate] = EOD
    return tokens


def test_docstring_example():
    tokens = np.array([5, 7, 2, 9, 9, 2, 4, 4, 4, 4])
    packed = pack_documents(tokens, EOD, eod_pad_length=5)
    assert packed["actual_seq_len"].tolist() == [[3, 6, 10, 10, 10]]
    assert packed["segment_ids"].tolist() == [[0, 0, 0, 1, 1, 1, 2, 2, 2, 2]]
    assert packed["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 0, 1, 2, 3]]
    # a final EOD ends the last document and adds no entry
    assert actual_seq_len_from_tokens([5, 2, 7, 2], EOD, 3).tolist() == [[2, 4, 4]]


def test_matches_mindformers_dataset_code():
    from mindformers.dataset.blended_datasets.gpt_dataset import (_get_eod_attention_mask,
                                                                  _get_ltor_masks_and_position_ids)
    rng = np.random.default_rng(0)
    for _ in range(20):
        tokens = random_tokens(rng, 64)
        ends = actual_seq_len_from_tokens(tokens, EOD, 32)[0]
        assert np.array_equal(ends, _get_eod_attention_mask(tokens, EOD, 32))
        _, _, mf_pos = _get_ltor_masks_and_position_ids(tokens, EOD, True, False, False, False)
        assert np.array_equal(position_ids_from_actual_seq_len(ends, 64)[0], mf_pos.astype(np.int64))


def test_segment_ids_change_exactly_after_each_eod():
    rng = np.random.default_rng(1)
    tokens = np.stack([random_tokens(rng, 80) for _ in range(3)])
    packed = pack_documents(tokens, EOD, eod_pad_length=40)
    for b in range(3):
        ids = packed["segment_ids"][b]
        steps = np.flatnonzero(np.diff(ids)) + 1                            # first token of each new document
        eods = np.flatnonzero(tokens[b][:-1] == EOD) + 1
        assert np.array_equal(steps, eods) and ids[0] == 0
        assert np.all(np.diff(ids) <= 1)
    assert np.array_equal(position_ids_from_actual_seq_len(packed["actual_seq_len"], 80, use_eod_reset=False),
                          np.tile(np.arange(80), (3, 1)))


def test_too_many_documents_names_the_key():
    tokens = np.array([1, 2, 1, 2, 1, 2, 1])                                 # 4 documents
    assert actual_seq_len_from_tokens(tokens, EOD, 4).tolist() == [[2, 4, 6, 7]]
    with pytest.raises(ValueError, match=rf"{EOD_PAD_KEY} = 3: sample 0 holds 4 documents.*at least 4"):
        actual_seq_len_from_tokens(tokens, EOD, 3)
    with pytest.raises(ValueError, match=EOD_PAD_KEY):
        actual_seq_len_from_tokens(tokens, EOD, 0)


def test_bad_actual_seq_len_is_rejected():
    for bad in ([3, 2, 10], [3, 6, 9], [0, 10], [3, 11]):
        with pytest.raises(ValueError, match="actual_seq_len of sample 0"):
            check_actual_seq_len(bad, 10)
    with pytest.raises(ValueError, match="use_eod_reset"):
        position_ids_from_actual_seq_len([10], 10, use_eod_reset=1)
    assert segment_ids_from_actual_seq_len([[4, 10], [10, 10]], 10)[1].tolist() == [0] * 10


@pytest.mark.parametrize("shared_rows", [False, True])
def test_per_sample_segment_ids_through_the_api(shared_rows):
    """(B, S) ids at CP = 1: samples with different documents, forward and backward against the oracle."""
    b, s, n, kv, d = 3, 40, 4, 2, 8
    ends = [[7, 19, 40], [7, 19, 40], [25, 40, 40]] if shared_rows else [[7, 19, 40], [12, 13, 40], [40, 40, 40]]
    ids = segment_ids_from_actual_seq_len(ends, s)
    rng = np.random.default_rng(2)
    q, dout = (rng.standard_normal((b, s, n, d)).astype(np.float32) for _ in range(2))
    k, v = (rng.standard_normal((b, s, kv, d)).astype(np.float32) for _ in range(2))
    mesh = Mesh(rank=0)

    def loss(q_, k_, v_):
        out = context_parallel_attention(q_, k_, v_, mesh=mesh, kernel=BlockwiseKernel(16), segment_ids=ids)
        return (out * Tensor(dout)).sum(), out

    (_, out), grads = ms.value_and_grad(loss, grad_position=(0, 1, 2), has_aux=True)(Tensor(q), Tensor(k), Tensor(v))
    pos = np.arange(s)
    for i in range(b):
        allowed = causal_allowed(pos, pos, ids[i], ids[i])
        ref_out, _, ref_grads = reference_attention(q[i:i + 1], k[i:i + 1], v[i:i + 1], allowed, d ** -0.5,
                                                    dout[i:i + 1])
        assert np.abs(out.asnumpy()[i:i + 1] - ref_out).max() <= 1e-5
        for got, ref in zip(grads, ref_grads):
            assert np.abs(got.asnumpy()[i:i + 1] - ref).max() <= 1e-5


def test_per_sample_ids_must_match_the_batch():
    mesh = Mesh(rank=0)
    q = Tensor(np.zeros((2, 8, 1, 4), np.float32))
    with pytest.raises(ValueError, match=r"segment_ids shape \(3, 8\)"):
        context_parallel_attention(q, q, q, mesh=mesh, segment_ids=np.zeros((3, 8), np.int64))


@pytest.mark.parametrize("bad", [np.zeros((2, 0), np.int64), np.full((1, 2, 2), 10), np.int64(10),
                                 np.array([[7.9, 10.0]])], ids=["empty", "3-d", "scalar", "fractional"])
def test_malformed_actual_seq_len_arrays_are_refused_by_shape_and_dtype(bad):
    """Shapes and dtypes that are not document ends are named, not left to NumPy (empty rows, 3-D, a scalar), and
    fractional ends are refused instead of truncated."""
    with pytest.raises(ValueError, match=r"actual_seq_len of shape .* expected \(L,\) or \(B, L\) integer document "
                                         r"ends, L >= 1. Fix"):
        check_actual_seq_len(bad, 10)
    assert check_actual_seq_len(np.array([[4.0, 10.0]]), 10).tolist() == [[4, 10]]     # whole floats are ends
