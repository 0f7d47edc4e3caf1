"""Started exchanges (comm.Pending): bytes in flight between start and wait, one wait only."""
import numpy as np
import pytest
from mindspore import Tensor

from mf_longseq.parallel import Mesh
from mf_longseq.parallel.comm import CommStats, Pending, ring_shift_start


def test_pending_counts_bytes_in_flight_until_waited():
    stats = CommStats()
    first, second = Pending(lambda: "a", stats, 100), Pending(lambda: "b", stats, 50)
    assert (stats.in_flight_bytes, stats.peak_in_flight_bytes) == (150, 150)
    assert first.wait() == "a" and stats.in_flight_bytes == 50
    with pytest.raises(RuntimeError, match=r"Pending.wait\(\) called twice"):
        first.wait()
    assert second.wait() == "b" and (stats.in_flight_bytes, stats.peak_in_flight_bytes) == (0, 150)
    stats.reset()
    assert stats.peak_in_flight_bytes == 0


def test_a_one_rank_ring_shift_hands_back_its_input_and_moves_nothing():
    group = Mesh(rank=0).group("ring")
    x = Tensor(np.arange(6, dtype=np.float32))
    assert ring_shift_start(x, group).wait() is x
    assert group.stats.total() == 0 and group.stats.peak_in_flight_bytes == 0
