"""Training under context parallelism equals training on one device.

One msrun launch of 4 CPU workers trains tiny LLaMA2 and tiny Qwen1.5 for 10 steps at CP=2 ring zigzag (dp=2),
CP=2 Ulysses (dp=2) and CP=4 hybrid 2x2 (dp=1), and LLaMA2 at CP=4 kvallgather_cp (dp=1, named by the plugin
key long_seq.cp_algo) through the real runner; the CP=1 reference trains the same
global batch in this process.  Losses must agree within 1e-5 relative, every rank must end with bit-identical
weights, and those must equal the reference's.  The LLaMA2 ring case also saves at step 5 and resumes: steps
6-10 and the final weights must equal the uninterrupted run exactly.

The ``mf-longseq train --workers 2`` launcher is checked end to end: a run that works, and one whose degrees do
not match the number of workers (it must exit non-zero naming the failed rank and its error).
"""
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from train_worker import CASES, STEPS, WORLD, reference_tree, weights

pytestmark = pytest.mark.dist
HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
LOSS_RTOL = 1e-5
LR = 0.01                      # lr_schedule.learning_rate of train_worker.case_tree
HEAD_DIM = 8                   # hidden_size / num_heads of train_worker.case_tree
# AdamW moves every weight by about lr per step whatever the gradient's size, so a weight whose gradient is tiny
# turns rounding noise into lr-sized differences.  The weights must agree within 1% of one step (lr / 100),
# except the k_proj bias entries of the lowest RoPE frequency: q . R_j b_k barely depends on the key position j
# there (softmax ignores a per-query constant), so their gradient is ~1000x smaller than the rest (measured:
# ~1e-6 vs ~1e-3 at step 1 with theta = 1e6) and they get 10% of one step.
WEIGHT_ATOL = 1e-2 * LR
LOW_FREQ_K_BIAS_ATOL = 1e-1 * LR


@pytest.fixture(scope="module")
def launched(msrun, tmp_path_factory):
    out = tmp_path_factory.mktemp("train_parity")
    msrun(HERE / "train_worker.py", [out], workers=WORLD, timeout=900)
    return out


@pytest.fixture(scope="module")
def reference():
    """family -> (initial weights, losses, final weights) of the CP=1 run of the same global batch."""
    from mf_longseq.train.job import JobOptions, build_default_model, run_job
    cache = {}

    def get(case):
        if case.family not in cache:
            built = []

            def factory(settings, mesh):
                built.append(build_default_model(settings, mesh))
                built.append(weights(built[0]))
                return built[0]

            records = run_job(JobOptions(config=reference_tree(case), steps=STEPS), model_factory=factory,
                              stream=io.StringIO())
            cache[case.family] = (built[1], [r.loss for r in records], weights(built[0]))
        return cache[case.family]
    return get


def load(folder: Path, stem: str):
    with open(folder / f"{stem}.json", encoding="utf-8") as handle:
        log = json.load(handle)
    return log, dict(np.load(folder / f"{stem}.npz"))


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_cp_training_equals_one_device(launched, reference, case):
    folder = launched / case.name
    ref_init, ref_losses, ref_final = reference(case)
    init = dict(np.load(folder / "init.npz"))
    assert init.keys() == ref_init.keys()
    for name in init:                                              # same starting point as the reference
        assert np.array_equal(init[name], ref_init[name]), name
    log0, final0 = load(folder, "rank0")
    assert log0["steps"] == list(range(1, STEPS + 1))
    np.testing.assert_allclose(log0["losses"], ref_losses, rtol=LOSS_RTOL, atol=0)
    for rank in range(1, WORLD):                                   # every rank logs and holds the same thing
        log, final = load(folder, f"rank{rank}")
        assert log["losses"] == log0["losses"]
        for name in final0:
            assert np.array_equal(final[name], final0[name]), (rank, name)
    for name in ref_final:
        assert not np.array_equal(ref_final[name], ref_init[name]), f"{name} did not train"
        assert_same_weights(name, final0[name], ref_final[name])


def assert_same_weights(name, got, ref):
    atol = np.full(ref.shape, WEIGHT_ATOL)
    if name.endswith("k_proj.bias"):                                # (K * D,): entry j of each kv head
        lowest = np.arange(ref.size) % (HEAD_DIM // 2) == HEAD_DIM // 2 - 1
        atol[lowest] = LOW_FREQ_K_BIAS_ATOL
    diff = np.abs(got - ref)
    worst = np.unravel_index(np.argmax(diff - atol), diff.shape)
    assert (diff <= atol).all(), f"{name}: |CP - CP=1| = {diff[worst]:.3g} at {worst} > {atol[worst]:.3g}"


def test_resume_at_step_5_repeats_steps_6_to_10_exactly(launched):
    case = next(c for c in CASES if c.resume)
    folder = launched / case.name
    for rank in range(WORLD):
        full, full_w = load(folder, f"rank{rank}")
        resumed, resumed_w = load(folder, f"resumed_rank{rank}")
        assert resumed["steps"] == [6, 7, 8, 9, 10]
        assert resumed["losses"] == full["losses"][5:]
        for name in full_w:
            assert np.array_equal(resumed_w[name], full_w[name]), (rank, name)
    meta = json.loads((folder / "run" / "checkpoints" / "step_000005" / "meta.json").read_text())
    assert meta["run_plan"] == {"dp": 2, "cp": 2, "mp": 1, "pp": 1, "ulysses": 1, "ring": 2, "seq_layout": "zigzag",
                                "context_parallel_algo": "colossalai_cp", "world_size": 4}
    assert sorted(os.listdir(folder / "run" / "checkpoints" / "step_000005")) == \
        ["config.yaml", "meta.json", "rank_0.ckpt", "rank_1.ckpt", "rank_2.ckpt", "rank_3.ckpt"]


def _cli(args, tmp_path, timeout=600):
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    return subprocess.run([sys.executable, "-m", "mf_longseq.cli", *map(str, args)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _write_yaml(tree, path):
    import yaml
    path.write_text(yaml.safe_dump(tree))
    return path


def test_train_workers_launches_msrun_and_reports(tmp_path):
    from train_worker import case_tree
    config = _write_yaml(case_tree("llama2", cp=2, dp=1), tmp_path / "cp2.yaml")
    proc = _cli(["train", "--config", config, "--workers", "2", "--steps", "2", "--output-dir", tmp_path / "ok"],
                tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "launching: msrun --worker_num 2" in proc.stdout
    assert "step 2/2 | loss" in proc.stdout and "summary: loss" in proc.stdout
    metrics = [json.loads(line) for line in (tmp_path / "ok" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2] and len(metrics[0]["peak_rss_mib"]) == 2
    assert all(m > 100 for m in metrics[0]["peak_rss_mib"])


def test_train_workers_names_the_failed_rank(tmp_path):
    """A config that passes the launch-time check but whose ranks fail (token ids the data check refuses inside
    each rank): the launcher ends the launch, exits 1 and names the failed rank with the tail of its log."""
    import numpy as np
    from train_worker import case_tree
    config = _write_yaml(case_tree("llama2", cp=2, dp=1), tmp_path / "cp2.yaml")
    data = tmp_path / "negative.npy"
    np.save(data, np.full(4 * 65, -1, np.int32))
    proc = _cli(["train", "--config", config, "--workers", "2", "--steps", "1", "--data", data,
                 "--output-dir", tmp_path / "bad"], tmp_path, timeout=300)
    assert proc.returncode == 1
    assert "mf_longseq launcher: failed rank: " in proc.stdout
    assert "error: " in proc.stdout and "negative token id -1" in proc.stdout


def test_train_workers_refuses_degrees_before_msrun(tmp_path):
    """Degrees that do not multiply to --workers are refused before msrun starts (no rank runs, no rank log)."""
    from train_worker import case_tree
    config = _write_yaml(case_tree("llama2", cp=4, dp=1), tmp_path / "cp4.yaml")
    proc = _cli(["train", "--config", config, "--workers", "2", "--steps", "1", "--output-dir", tmp_path / "bad"],
                tmp_path, timeout=300)
    assert proc.returncode != 0
    assert "failed rank" not in proc.stdout
    assert ("device_num = 2: device_num must equal data_parallel x model_parallel x context_parallel x "
            "pipeline_stage = 1 x 1 x 4 x 1 = 4. Fix: " in proc.stderr)
    assert not (tmp_path / "bad").exists()                                  # msrun never started
