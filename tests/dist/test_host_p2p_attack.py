"""A stranger attacks a live 2-rank ring run (issue 20, item 2): rank 0's attacker thread connects to both ranks'
host-transport ports over and over while they train (``attack_worker.py``).  The launch must end rc 0, both ranks
must have refused the stranger's connections, and the attacked run's losses must equal the unattacked run's."""
import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.dist
HERE = Path(__file__).resolve().parent


def test_a_stranger_connecting_to_a_live_ring_run_changes_nothing(msrun, tmp_path):
    msrun(HERE / "attack_worker.py", [tmp_path], workers=2, timeout=600)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["attacks"] > 0, "the attacker never found a listening port"
    for rank, got in enumerate(ranks):
        assert got["refused"] > 0, f"rank {rank} refused nothing: {got}"
        assert len(got["attacked"]) == len(got["clean"]) > 0
        assert got["attacked"] == got["clean"], f"rank {rank}: attacked {got['attacked']} != clean {got['clean']}"
    reasons = " | ".join(ranks[0]["reasons"] + ranks[1]["reasons"])
    assert "not an mf_longseq host p2p hello" in reasons, reasons
