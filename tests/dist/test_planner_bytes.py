"""The planner's byte model equals the engine's own counters exactly: one msrun launch of 4 CPU workers runs
ring, Ulysses (AlltoAll and AllGather-based, GQA with kv heads fewer than the degree) and hybrid, forward alone
and forward + backward, fp32 and fp16, and every rank's ``mesh.stats.logical_bytes`` is compared per kind."""
import json
from pathlib import Path

import pytest

from mf_longseq.planner.comm import AttentionCall, attention_bytes
from planner_worker import CASES, HEAD_DIM, WORLD

WORKER = Path(__file__).resolve().parent / "planner_worker.py"


@pytest.mark.dist
def test_byte_model_equals_engine_counters(msrun, tmp_path):
    msrun(WORKER, [tmp_path], workers=WORLD, timeout=400)
    checked = 0
    for name, algo, cp, ulysses, use_alltoall, heads, kv_heads, seq_len, batch, dtype in CASES:
        call = AttentionCall(batch=batch, seq_len=seq_len, heads=heads, kv_heads=kv_heads, head_dim=HEAD_DIM,
                             itemsize=4 if dtype == "float32" else 2, cp=cp, ulysses=ulysses,
                             use_alltoall=use_alltoall)
        for rank in range(WORLD):
            measured = json.loads((tmp_path / name / f"rank{rank}.json").read_text())
            for direction in ("forward", "both"):
                got = {kind: row["logical_bytes"] for kind, row in measured[direction].items()}
                assert got == attention_bytes(call, direction), (name, rank, direction)
                checked += 1
    assert checked == len(CASES) * WORLD * 2
