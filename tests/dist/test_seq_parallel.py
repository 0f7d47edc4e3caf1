"""Sequence parallelism with context parallelism on 4 CPU ranks: SP on trains exactly like SP off.

One msrun launch (``sp_worker.py``) trains compose_worker's tiny LLaMA2 (GQA) for 5 steps with
``parallel_config.use_seq_parallel`` on and off under mp2 x cp2 (ring and Ulysses), mp4 (kv heads replicated
over the mp ranks) and pp2 x mp2 (1F1B), and SP on with recompute and ``long_seq.offload_layer_inputs`` under
mp2 x cp2 ring.  Every rank's losses and trained weights must equal its SP-off twin's within 1e-5 relative (the
SP-off layouts themselves equal one rank: tests/dist/test_compose.py).
"""
from pathlib import Path

import numpy as np
import pytest

import sp_worker as sw
from test_compose import RTOL, rel_err

WORKER = Path(__file__).with_name("sp_worker.py")


@pytest.fixture(scope="module")
def launch(msrun, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("seq_parallel")
    msrun(WORKER, [out_dir], workers=sw.WORLD, timeout=1500)
    return out_dir


@pytest.mark.dist
@pytest.mark.parametrize("name", list(sw.TWINS))
def test_seq_parallel_trains_like_seq_parallel_off(name, launch):
    mp = sw.CASES[name][1]
    for rank in range(sw.WORLD):
        on = np.load(launch / name / f"rank{rank}.npz")
        off = np.load(launch / sw.TWINS[name] / f"rank{rank}.npz")
        assert int(on["sp_degree"]) == mp and int(off["sp_degree"]) == 1        # SP really split the tokens
        assert bool(on["offload"]) == sw.CASES[name][8]
        assert max(rel_err(a, b) for a, b in zip(on["losses"], off["losses"])) <= RTOL, \
            f"{name} rank {rank}: losses {on['losses']} vs {off['losses']}"
        weights = [k for k in off.files if k.startswith("state/")]
        assert sorted(weights) == sorted(k for k in on.files if k.startswith("state/"))
        worst = max((rel_err(on[k], off[k]), k) for k in weights)
        assert worst[0] <= RTOL, f"{name} rank {rank}: {worst[1]} differs by {worst[0]:.2e} relative"
        assert rel_err(off["losses"][-1], off["losses"][0]) > 1e-3               # the weights did move
