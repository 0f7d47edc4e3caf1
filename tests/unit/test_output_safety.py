"""Nothing lost, nothing wrong in a run's output directory (issue 20, items 1 and 8), on one process.

* a save that dies after a rank's file never becomes "the latest" checkpoint, and the latest is never a step of
  an abandoned history (the torn checkpoint of issue 20 item 1, the single-rank form of it);
* replicas that loaded different state are refused, naming the step directory;
* a torn last line of metrics.jsonl is named and skipped; links inside the output directory are never
  followed; a full disk (ENOSPC, simulated at the write) leaves no temporary file and names its cause.
"""
import errno
import json
import os

import numpy as np
import pytest

from mf_longseq.train import checkpoint as ckpt
from mf_longseq.train import runner
from mf_longseq.train.job import JobOptions, run_job
from mf_longseq.train.monitor import Monitor, read_metrics

from test_train_runner import bigram_factory, job_tree


def rank0(directory):
    import mindspore as ms
    return {k: v.asnumpy().copy() for k, v in ms.load_checkpoint(ckpt.rank_file(directory, 0)).items()}


def test_a_save_that_dies_after_a_rank_file_is_never_resumed(tmp_path, monkeypatch):
    """Run A saves steps 5 and 10; run B resumes from step 5 into the same directory and dies in its step-10
    save right after writing its rank file.  Today's main then resumes step_10 with B's rank file under A's
    meta.json (a torn checkpoint); now the latest is a step of B's history with the files it was published with."""
    out = str(tmp_path / "run")
    run_job(JobOptions(config=job_tree(), steps=10, save_every=5, output_dir=out), model_factory=bigram_factory)
    published = {step: rank0(ckpt.step_dir(out, step)) for step in (5, 10)}

    def dies():
        raise RuntimeError("rank 1 died")                         # the barrier after this rank's file
    monkeypatch.setattr(runner, "barrier", lambda world_size: dies)
    with pytest.raises(RuntimeError, match="rank 1 died"):
        run_job(JobOptions(config=job_tree(seed=6), steps=10, save_every=5, output_dir=out,
                           resume=ckpt.step_dir(out, 5)), model_factory=bigram_factory)
    latest = ckpt.find_resume_dir(out)
    step = ckpt.read_meta(latest)["step"]
    assert step <= 5, f"{latest}: a step of the abandoned run A (B resumed from step 5)"
    got = rank0(latest)
    for name, value in published[step].items():
        assert np.array_equal(got[name], value), f"{latest}/rank_0.ckpt changed after it was published"
    partial = [n for n in os.listdir(os.path.join(out, "checkpoints")) if n.startswith(".step_")]
    assert [p.split(".partial-")[0] for p in partial] == [".step_000010"]      # the dead save: never resumed
    moved = os.listdir(os.path.join(out, "checkpoints", ckpt.ABANDONED))
    assert len(moved) == 1 and os.listdir(os.path.join(out, "checkpoints", ckpt.ABANDONED, moved[0])) == \
        ["step_000010"]


def test_a_fresh_run_moves_an_older_runs_checkpoints_aside(tmp_path):
    out = str(tmp_path)
    run_job(JobOptions(config=job_tree(), steps=4, save_every=2, output_dir=out), model_factory=bigram_factory)
    run_job(JobOptions(config=job_tree(seed=7), steps=2, save_every=2, output_dir=out), model_factory=bigram_factory)
    assert sorted(n for n in os.listdir(os.path.join(out, "checkpoints")) if n.startswith("step_")) == \
        ["step_000002"]
    assert ckpt.find_resume_dir(out) == ckpt.step_dir(out, 2)
    assert ckpt.read_meta(ckpt.step_dir(out, 2))["data"]["seed"] == 7


def test_replicas_that_loaded_different_state_are_refused():
    same = ckpt.state_digest({"w": np.arange(4, dtype=np.float32)})
    other = ckpt.state_digest({"w": np.arange(4, dtype=np.float32) + 1e-7})
    assert same != other and all(0 <= x < 2 ** 24 for x in same)
    ckpt.check_replicas("/ck/step_000010", [same, same], [0, 1])
    with pytest.raises(ValueError, match=r"--resume /ck/step_000010: the dp x cp replicas loaded different "
                                         r"weights \(ranks 3 differ from rank 1\).*Fix: resume from another"):
        ckpt.check_replicas("/ck/step_000010", [same, other], [1, 3])


def test_a_torn_metrics_line_is_named_and_skipped(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n" + json.dumps({"step": 2, "loss": 1.5}) + "\n"
                    + '{"step": 3, "lo')
    assert [r["step"] for r in read_metrics(str(tmp_path))] == [1, 2]
    assert f"{path} line 3: skipped" in caplog.text
    Monitor(0, 5, str(tmp_path), start_step=2)                       # a resume after step 2 keeps 1, 2
    assert path.read_text().splitlines() == [json.dumps({"step": 1, "loss": 2.0}),
                                            json.dumps({"step": 2, "loss": 1.5})]


def test_links_inside_the_output_directory_are_refused(tmp_path):
    from mf_longseq.tools.workers import write_entry
    from mf_longseq.train import files
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "out"
    (out / "launch").mkdir(parents=True)
    refused = r"{}: it is a symbolic link \(to .*victim.txt\) inside the output directory .*Fix: remove the link"
    os.symlink(victim, out / "launch" / "worker_entry.py")
    with pytest.raises(files.OutputError, match=refused.format("worker_entry.py")):
        write_entry(str(out))
    for name, save_every in (("config.yaml", 0), ("metrics.jsonl", 0), ("checkpoints", 1)):
        target = tmp_path if name == "checkpoints" else victim
        os.symlink(target, out / name)
        with pytest.raises(files.OutputError, match=refused.format(name).replace("victim.txt", "")):
            run_job(JobOptions(config=job_tree(), steps=1, save_every=save_every, output_dir=str(out)),
                    model_factory=bigram_factory)
        os.remove(out / name)
    assert victim.read_text() == "precious" and sorted(os.listdir(tmp_path)) == ["out", "victim.txt"]


def _full_disk(monkeypatch, what):
    """Writes fail with ENOSPC: MindSpore's checkpoint writer (after leaving its temporary file, as it does) or
    every other output file (after its first 16 bytes)."""
    import mindspore as ms
    from mf_longseq.train import files
    real = ms.save_checkpoint

    def enospc(fd, data):
        os.write(fd, bytes(data[:16]))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def save_checkpoint(obj, name, *args, **kwargs):
        real(obj, name, *args, **kwargs)
        os.replace(name, os.path.splitext(name)[0] + ".tmp")        # MindSpore's half-written temporary file
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    if what == "checkpoint":
        monkeypatch.setattr(ms, "save_checkpoint", save_checkpoint)
    else:
        monkeypatch.setattr(files, "_write_bytes", enospc)


@pytest.mark.parametrize("what", ["checkpoint", "config"])
def test_a_full_disk_leaves_no_temporary_file_and_names_enospc(tmp_path, monkeypatch, what):
    from mf_longseq.train import files
    out = tmp_path / "out"
    run_job(JobOptions(config=job_tree(), steps=2, save_every=2, output_dir=str(out)), model_factory=bigram_factory)
    before = rank0(ckpt.step_dir(str(out), 2))
    _full_disk(monkeypatch, what)
    with pytest.raises(files.OutputError, match=r"cannot write .*: No space left on device \(ENOSPC\)\. Fix: free "
                                                r"space"):
        run_job(JobOptions(config=job_tree(), output_dir=str(out), resume=str(out), steps=4, save_every=2),
                model_factory=bigram_factory)
    left = [os.path.join(root, n) for root, dirs, names in os.walk(out) for n in names + dirs
            if ".tmp" in n or n.startswith(".step_")]
    assert left == []
    assert ckpt.find_resume_dir(str(out)) == ckpt.step_dir(str(out), 2)
    assert all(np.array_equal(rank0(ckpt.step_dir(str(out), 2))[k], v) for k, v in before.items())
