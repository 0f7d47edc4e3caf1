"""Real multi-process CP attention: one msrun launch of 4 CPU workers runs every case of cases.CASES; each case's
gathered output and gradients (dq, dk, dv) must match the float64 oracle within 1e-5."""
from pathlib import Path

import pytest

from cases import CASES, WORLD
from check import case_errors

WORKER = Path(__file__).with_name("attention_worker.py")
TOL = 1e-5

pytestmark = pytest.mark.dist


@pytest.fixture(scope="module")
def results(msrun, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("attention_dist")
    msrun(WORKER, [out_dir], workers=WORLD, timeout=900)
    return out_dir


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_case_matches_oracle(case, results):
    errors = case_errors(case, results)
    worst = max(errors, key=errors.get)
    assert errors[worst] <= TOL, f"{case.name}: {worst} max abs error {errors[worst]:.2e} > {TOL}"


def test_ring_moves_only_local_blocks(results):
    """The ring's bytes per rank are (CP-1) K/V blocks forward plus the backward's K/V and dK/dV blocks: no
    full-sequence gather (which would be (CP-1) x the whole K/V of the sequence per tensor)."""
    import numpy as np
    case = next(c for c in CASES if c.name == "ring_cp4_zigzag")
    shard = np.load(results / case.name / "rank0.npz")
    b, s, kv, d, cp = case.batch, case.seq_len, case.kv_heads, case.head_dim, case.cp
    block = 2 * b * kv * (s // cp) * d * 4                                  # stacked K and V of one rank, fp32
    expected = (cp - 1) * block + (cp - 1) * block + cp * block              # fwd kv, bwd kv, bwd dkv
    assert int(shard["logical_bytes"]) == expected


@pytest.mark.parametrize("name", ["ulysses_cp2_alltoall", "ulysses_cp4_alltoall_gqa_kv_lt_degree"])
def test_cpu_alltoall_moves_only_its_parts(name, results):
    """On CPU ranks the all-to-all runs over the host transport: every rank hands the wire exactly the parts it
    sends (the AllReduce-pair emulation handed twice that, the AllGather form group-size times)."""
    import numpy as np
    case = next(c for c in CASES if c.name == name)
    for rank in range(WORLD):
        shard = np.load(results / case.name / f"rank{rank}.npz")
        assert int(shard["wire_bytes"]) == int(shard["logical_bytes"]) > 0, (name, rank)
