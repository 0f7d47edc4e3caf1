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


@pytest.mark.parametrize("name", ["kvallgather_cp2_zigzag", "kvallgather_cp4_zigzag_gqa_kv1"])
def test_kvallgather_moves_what_the_planner_counts(name, results):
    """kvallgather_cp: the all-gather of K and V (forward, and again in backward) and the reduce-scatter of the
    float32 dK/dV are exactly ``planner.comm``'s counts (on CPU the reduce-scatter is an AllReduce of the whole,
    twice the native bytes); no ring shift, no all-to-all."""
    import numpy as np
    from mf_longseq.planner.comm import AttentionCall, attention_bytes
    case = next(c for c in CASES if c.name == name)
    call = AttentionCall(case.batch, case.seq_len, case.heads, case.kv_heads, case.head_dim, 4, cp=case.cp,
                         algo=case.algo)
    want = attention_bytes(call)
    for rank in range(WORLD):
        shard = np.load(results / case.name / f"rank{rank}.npz")
        kinds = {key[len("logical_"):] for key in shard.files if key.startswith("logical_")} - {"bytes"}
        assert kinds == {"all_gather", "all_reduce"}, (name, rank, kinds)
        assert int(shard["logical_all_gather"]) == want["kv_all_gather"] > 0
        assert int(shard["logical_all_reduce"]) == 2 * want["dkv_reduce_scatter"] > 0
