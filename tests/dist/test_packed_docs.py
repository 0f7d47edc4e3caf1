"""Packed documents under ring, Ulysses and hybrid CP (2 and 4 ranks, zigzag and contiguous), forward and
backward, on real msrun CPU workers: every gathered output and gradient matches the float64 oracle of
block-diagonal causal attention within 1e-5.  Then the whole model: a tiny LLaMA2 with use_eod_reset on packed
samples under ring (zigzag), Ulysses and hybrid 2 x 2 has the loss and the gradient of the one-process model
within 1e-5 relative.  One launch of 4 workers runs every case of packed_worker.CASES and MODEL_CASES."""
from pathlib import Path

import numpy as np
import pytest

from oracle import causal_allowed, reference_attention
from packed_worker import (CASES, MODEL_CASES, SEQ_LEN, WORLD, build_packed_model, inputs, model_batch,
                           model_loss_and_grads, segment_ids)

WORKER = Path(__file__).with_name("packed_worker.py")
TOL = 1e-5
MODEL_RTOL = 1e-5

pytestmark = pytest.mark.dist


@pytest.fixture(scope="module")
def results(msrun, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("packed_docs")
    msrun(WORKER, [out_dir], workers=WORLD, timeout=900)
    return out_dir


def case_errors(case, out_dir: Path):
    """Max abs error of out, dq, dk, dv over every dp group and sample."""
    shards = [dict(np.load(out_dir / case.name / f"rank{r}.npz")) for r in range(WORLD)]
    ids = np.broadcast_to(segment_ids(case), (case.batch, SEQ_LEN))
    pos = np.arange(SEQ_LEN)
    errors = {}
    for dp_id in range(case.dp):
        mine = [sh for sh in shards if int(sh["dp_id"]) == dp_id]
        positions = np.concatenate([sh["positions"] for sh in mine])
        assert sorted(positions.tolist()) == list(range(SEQ_LEN)), "shards do not cover the sequence once"
        full = inputs(case, dp_id)
        for b in range(case.batch):
            one = {name: x[b:b + 1] for name, x in full.items()}
            out, _, (dq, dk, dv) = reference_attention(one["q"], one["k"], one["v"],
                                                       causal_allowed(pos, pos, ids[b], ids[b]),
                                                       case.head_dim ** -0.5, one["dout"])
            for name, ref in (("out", out), ("dq", dq), ("dk", dk), ("dv", dv)):
                got = np.concatenate([sh[name][b:b + 1] for sh in mine], axis=1)
                errors[(dp_id, b, name)] = float(np.abs(got - ref[:, positions]).max())
    return errors


def test_documents_cross_shard_and_chunk_boundaries():
    """The data really exercises what the cases claim (ids from EOD tokens via train.packing)."""
    ids = segment_ids(CASES[0])
    for chunk in (12, 24, 48):                                   # zigzag chunks of CP 4 and 2, CP 2 shards
        crossing = [c for c in range(chunk, SEQ_LEN, chunk) if ids[0, c - 1] == ids[0, c]]
        assert crossing, chunk
    assert ids[0, 5] == ids[0, 89] != ids[0, 90]                  # [5, 90): both chunks of zigzag rank 0
    assert (ids[1] == ids[1, 60]).sum() == 1                      # a one-token document


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_packed_case_matches_oracle(case, results):
    errors = case_errors(case, results)
    worst = max(errors, key=errors.get)
    assert errors[worst] <= TOL, f"{case.name}: {worst} max abs error {errors[worst]:.2e} > {TOL}"


@pytest.fixture(scope="module")
def single_process():
    """Loss sum, token count and gradients of the tiny model on one process (CP = 1), whole sequences."""
    return model_loss_and_grads(build_packed_model(None), *model_batch())


@pytest.mark.parametrize("case", MODEL_CASES, ids=[c.name for c in MODEL_CASES])
def test_packed_model_loss_and_grads_match_one_process(case, results, single_process):
    want_loss, want_count, want_grads = single_process
    shards = [dict(np.load(results / case.name / f"rank{r}.npz")) for r in range(WORLD)]
    for dp_id in range(case.dp):
        mine = [sh for sh in shards if int(sh["dp_id"]) == dp_id]
        assert len(mine) == case.cp
        assert sum(float(sh["count"]) for sh in mine) == want_count
        loss = sum(float(sh["loss_sum"]) for sh in mine)
        assert abs(loss - want_loss) <= MODEL_RTOL * abs(want_loss), (case.name, dp_id, loss, want_loss)
        for name, want in want_grads.items():
            got = sum(sh["grad:" + name] for sh in mine)
            error = float(np.abs(got - want).max()) / float(np.abs(want).max())
            assert error <= MODEL_RTOL, f"{case.name} dp {dp_id} {name}: relative error {error:.2e}"
