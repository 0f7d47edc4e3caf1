"""Per-sample inputs stay per sample (CP = 1, one process): a (B, 1, S, S) dense mask whose samples differ and
(B, S) document ids give every sample its own attention (float64 oracle per sample, out and gradients of the
weights and inputs); what cannot be exact is refused with an error naming the shape and the fix."""
import numpy as np
import pytest

from mf_longseq.attention.mask import DenseMask, dense_attention_mask
from mf_longseq.parallel import Mesh
from per_sample_case import B, CASES, S, allowed_of, full_inputs, oracle, run_attention

TOL = 1e-5


@pytest.mark.parametrize("name", CASES)
def test_every_sample_matches_its_own_oracle(name):
    full = full_inputs()
    got, ref = run_attention(name, full, Mesh(rank=0)), oracle(name, full)
    for b in range(B):
        for key, tol in (("out", TOL), ("x", 1e-4)):          # dx: three float32 weight products summed
            err = np.abs(got[key][b] - ref[key][b]).max()
            assert err <= tol, f"{name}: sample {b} {key} error {err:.2e}"
    for key in ("wq", "wk", "wv"):
        err = np.abs(got[key] - ref[key]).max()
        assert err <= 1e-4, f"{name}: d{key} error {err:.2e}"


@pytest.mark.parametrize("name", CASES)
def test_the_samples_of_each_case_really_differ(name):
    """Guard: computing sample b with sample 0's mask would be wrong (so the test above can fail)."""
    assert all(not np.array_equal(allowed_of(name, 0), allowed_of(name, b)) for b in range(1, B))


def test_dense_mask_refuses_samples_with_different_masks():
    pad = np.ones((2, S), np.int64)
    pad[1, -4:] = 0
    pos = np.arange(S)
    with pytest.raises(ValueError, match=r"DenseMask grid \(2, 1, 32, 32\): its samples have different masks"):
        DenseMask(pos, pos, True, grid=dense_attention_mask(2, S, pad_mask=pad))
    same = DenseMask(pos, pos, True, grid=dense_attention_mask(2, S))            # equal samples: exact
    assert np.array_equal(same.dense(), pos[None, :] <= pos[:, None])


def test_per_sample_inputs_of_the_wrong_batch_are_refused():
    from mindspore import Tensor
    from mf_longseq.attention import context_parallel_attention
    q = Tensor(np.zeros((B, S, 4, 8), np.float32))
    k = Tensor(np.zeros((B, S, 2, 8), np.float32))
    with pytest.raises(ValueError, match=r"dense_mask shape \(2, 1, 32, 32\): expected \(S, S\) or \(B, 1, S, S\) "
                                         r"with B = 3"):
        context_parallel_attention(q, k, k, mesh=Mesh(rank=0), dense_mask=dense_attention_mask(2, S))
    with pytest.raises(ValueError, match=r"segment_ids shape \(2, 32\): expected \(S,\) or \(B, S\) with B = 3"):
        context_parallel_attention(q, k, k, mesh=Mesh(rank=0), segment_ids=np.zeros((2, S), np.int64))


def test_dense_mask_is_combined_with_causal_and_documents():
    """A dense mask never overrides ``causal`` or the document ids: a key is visible only where all allow it."""
    from per_sample_case import documents
    pos, ids = np.arange(S), documents(S, 2)[1]
    zeros = np.zeros((S, S), np.uint8)
    truth = (pos[None, :] <= pos[:, None]) & (ids[None, :] == ids[:, None])
    assert np.array_equal(DenseMask(pos, pos, True, ids, ids, grid=zeros).dense(), truth)
    assert DenseMask(pos, pos, False, grid=zeros).dense().all()


def test_dense_mask_with_causal_and_segment_ids_equals_them_alone():
    """Through the public API: an all-visible dense mask plus causal + segment ids gives the output of causal +
    segment ids (the path the float64 oracle tests above check)."""
    from mindspore import Tensor
    from mf_longseq.attention import context_parallel_attention
    from per_sample_case import documents
    rng = np.random.default_rng(3)
    q = Tensor(rng.standard_normal((1, S, 4, 8)).astype(np.float32))
    k = Tensor(rng.standard_normal((1, S, 2, 8)).astype(np.float32))
    ids, mesh = documents(S, 2)[1], Mesh(rank=0)
    plain = context_parallel_attention(q, k, k, mesh=mesh, causal=True, segment_ids=ids).asnumpy()
    dense = context_parallel_attention(q, k, k, mesh=mesh, causal=True, segment_ids=ids,
                                       dense_mask=np.zeros((S, S), np.uint8)).asnumpy()
    assert np.abs(plain - dense).max() <= TOL          # two kernels (fused; blockwise for dense): float32 rounding
