"""AttentionMask tile plans agree with the dense visibility matrix, for every layout the engine produces."""
import numpy as np
import pytest

from mf_longseq.attention.mask import FULL, PARTIAL, AttentionMask, tile_bounds
from mf_longseq.parallel import positions_for


def test_tile_bounds_split_at_position_breaks():
    pos = np.array([0, 1, 2, 3, 4, 10, 11, 12])
    assert tile_bounds(pos, 3) == [(0, 3), (3, 5), (5, 8)]


def covered(mask: AttentionMask, block: int) -> np.ndarray:
    """Rebuild the dense matrix from the plan: FULL tiles all True, PARTIAL tiles their allowed(), rest False."""
    got = np.zeros((len(mask.q_pos), len(mask.k_pos)), dtype=bool)
    for qs, qe, row in mask.plan(block):
        for ks, ke, kind in row:
            assert kind in (FULL, PARTIAL)
            got[qs:qe, ks:ke] = True if kind == FULL else mask.allowed(qs, qe, ks, ke)
            if kind == FULL:
                assert mask.allowed(qs, qe, ks, ke).all()
    return got


@pytest.mark.parametrize("block", [4, 7, 16])
@pytest.mark.parametrize("ring", [2, 4])
def test_ring_steps_zigzag_and_contiguous(block, ring):
    s = 64
    for layout in ("zigzag", "contiguous"):
        parts = [positions_for(s, ring_size=ring, ring_index=i, layout=layout) for i in range(ring)]
        for qp in parts:
            for kp in parts:
                mask = AttentionMask(qp, kp, causal=True)
                assert (covered(mask, block) == mask.dense()).all()


def test_documents_and_noncausal():
    rng = np.random.default_rng(0)
    s = 80
    docs = np.cumsum(rng.random(s) < 0.1)
    perm = positions_for(s, ring_size=4, ring_index=1)
    for causal in (True, False):
        mask = AttentionMask(perm, np.arange(s), causal, docs[perm], docs)
        assert (covered(mask, 8) == mask.dense()).all()


def test_future_step_is_skipped_entirely():
    mask = AttentionMask(np.arange(0, 16), np.arange(16, 32), causal=True)
    assert all(not row for _, _, row in mask.plan(4))
    assert mask.visible_pairs() == 0


def test_visible_pairs_counts_causal_triangle():
    s = 100
    assert AttentionMask(np.arange(s), np.arange(s)).visible_pairs() == s * (s + 1) // 2
