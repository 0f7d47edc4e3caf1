"""Ulysses and hybrid for any head counts on real msrun CPU ranks (issue 14): one launch of 4 workers runs every
case of ``uneven_heads_worker.CASES`` and a tiny LLaMA2 training run with 6 query / 3 kv heads at Ulysses 2.

* out, dq, dk, dv of every case equal the float64 oracle (float32 tolerance, scaled by the tensor's size);
* every rank's logical bytes equal the planner's model for its Ulysses index (forward + backward);
* training (6 / 3 heads at Ulysses 2 x dp 2; 6 / 2 at mp 2 x Ulysses 2, split 2 + 1 per mp rank) equals the
  same global batch trained on one process.

N = K = 40 at U = 16 needs 16 ranks; it runs here at U = 4 (10 heads per rank split 3, 3, 2, 2) and all 16
ranks are simulated in one process by tests/unit/test_uneven_heads.py.
"""
import io
import json
from pathlib import Path

import numpy as np
import pytest

from check import case_errors
from mf_longseq.parallel import Mesh
from mf_longseq.planner.comm import AttentionCall, attention_bytes
from test_train_parity import LOSS_RTOL, assert_same_weights
from uneven_heads_worker import CASES, TRAIN_CASES, TRAIN_STEPS, WORLD, train_tree

WORKER = Path(__file__).with_name("uneven_heads_worker.py")
TOL = 1e-5                      # absolute, for tensors of magnitude <= 1; relative to the largest entry above
pytestmark = pytest.mark.dist


@pytest.fixture(scope="module")
def results(msrun, tmp_path_factory):
    """One launch of the worker; the directory of every rank's saved shards, bytes and training logs."""
    return _launch(msrun, tmp_path_factory.mktemp("uneven_heads"))


def _launch(msrun, out_dir):
    msrun(WORKER, [out_dir], workers=WORLD, timeout=900)
    return out_dir


def _largest(results, case, name):
    return max(float(np.abs(np.load(results / case.name / f"rank{r}.npz")[name]).max()) for r in range(WORLD))


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_shards_match_the_oracle(case, results):
    errors = case_errors(case, results)
    scale = {name: max(1.0, _largest(results, case, name)) for name in ("out", "dq", "dk", "dv")}
    worst = max(errors, key=lambda key: errors[key] / scale[key[1]])
    assert errors[worst] <= TOL * scale[worst[1]], \
        f"{case.name}: {worst} max abs error {errors[worst]:.2e} > {TOL} x {scale[worst[1]]:.2f}"


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bytes_equal_the_planner_model(case, results):
    call = AttentionCall(case.batch, case.seq_len, case.heads, case.kv_heads, case.head_dim, 4, cp=case.cp,
                         ulysses=case.ulysses, use_alltoall=case.use_alltoall)
    for rank in range(WORLD):
        index = Mesh(dp=case.dp, cp=case.cp, ulysses=case.ulysses, rank=rank).coords()["ulysses_id"]
        measured = int(np.load(results / case.name / f"rank{rank}.npz")["logical_bytes"])
        assert measured == sum(attention_bytes(call, "both", index).values()), (case.name, rank, index)


@pytest.mark.parametrize("name", list(TRAIN_CASES))
def test_training_equals_one_process(results, name):
    """Losses equal the one-process run of the same global batch; every rank logs the same.  With mp = 1 the
    final weights (replicated on every rank) also equal the reference's; with mp = 2 each rank holds a shard,
    and the losses of steps 2 and 3 carry the updates."""
    from mf_longseq.train.job import JobOptions, build_default_model, run_job
    from train_worker import weights
    dp, mp, cp, algo, heads, kv_heads = TRAIN_CASES[name]
    built = []

    def factory(settings, mesh):
        built.append(build_default_model(settings, mesh))
        return built[-1]
    records = run_job(JobOptions(config=train_tree(heads=heads, kv_heads=kv_heads), steps=TRAIN_STEPS),
                      model_factory=factory, stream=io.StringIO())
    ref_losses, ref_final = [r.loss for r in records], weights(built[-1])
    assert abs(ref_losses[-1] - ref_losses[0]) > 1e-3                            # training moved the loss
    folder = results / name
    logs = [json.loads((folder / f"rank{r}.json").read_text())["losses"] for r in range(WORLD)]
    np.testing.assert_allclose(logs[0], ref_losses, rtol=LOSS_RTOL, atol=0)
    for rank in range(1, WORLD):
        assert logs[rank] == logs[0]
    if mp > 1:
        return
    finals = [dict(np.load(folder / f"rank{r}.npz")) for r in range(WORLD)]
    for rank in range(1, WORLD):
        for key in finals[0]:
            assert np.array_equal(finals[rank][key], finals[0][key]), (rank, key)
    for key in ref_final:
        assert_same_weights(key, finals[0][key], ref_final[key])
