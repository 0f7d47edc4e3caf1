"""The ``--workers`` launcher's watch and report logic, with a fake msrun (no MindSpore): a failed rank is named
with its error and log tail, hung processes (in sessions of their own, as msrun starts workers) are ended by pid,
and a rank that ends without reporting fails the launch."""
import io
import json
import os
import sys
import time

import psutil
import pytest

from mf_longseq.train import launch

FAKE_MSRUN = r'''
import json, os, subprocess, sys, time
run_dir, mode = sys.argv[1], sys.argv[2]
os.makedirs(os.path.join(run_dir, "status"), exist_ok=True)
os.makedirs(os.path.join(run_dir, "logs"), exist_ok=True)
def status(rank, ok, error=None):
    with open(os.path.join(run_dir, "status", f"rank_{rank}.json"), "w") as handle:
        json.dump({"rank": rank, "ok": ok, "error": error}, handle)
print("[WARNING] hidden msrun log line", flush=True)
print("worker output line", flush=True)
status(0, True)
if mode == "hang":
    with open(os.path.join(run_dir, "logs", "worker_1.log"), "w") as handle:
        handle.write("[WARNING] noise\nTraceback (most recent call last):\nValueError: bad thing on rank 1\n")
    status(1, False, "ValueError: bad thing on rank 1")
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
    with open(os.path.join(run_dir, "child.pid"), "w") as handle:
        handle.write(str(child.pid))
    time.sleep(600)
elif mode == "silent":
    sys.exit(0)
else:
    status(1, True)
'''


@pytest.fixture
def fake(tmp_path, monkeypatch):
    script = tmp_path / "fake_msrun.py"
    script.write_text(FAKE_MSRUN)

    def run(mode, grace=1.0):
        monkeypatch.setattr(launch, "msrun_command",
                            lambda entry, args, **kw: [sys.executable, str(script), str(tmp_path / "run"), mode])
        out = io.StringIO()
        start = time.time()
        code = launch.launch(["train"], workers=2, run_dir=str(tmp_path / "run"), grace=grace, out=out)
        return code, out.getvalue(), time.time() - start
    return run


def test_all_ranks_ok(fake):
    code, out, _ = fake("ok")
    assert code == 0
    assert "worker output line" in out and "hidden msrun log line" not in out


def test_failed_rank_is_named_and_hung_processes_are_ended(fake, tmp_path):
    code, out, seconds = fake("hang")
    assert code == 1 and seconds < 60
    assert "mf-longseq: rank 1 failed: ValueError: bad thing on rank 1 (msrun was stopped)" in out
    assert "--- last lines of worker_1.log ---\nTraceback (most recent call last):\nValueError: bad thing" in out
    child = int((tmp_path / "run" / "child.pid").read_text())
    assert not psutil.pid_exists(child) or psutil.Process(child).status() == psutil.STATUS_ZOMBIE


def test_rank_without_status_fails_the_launch(fake):
    code, out, _ = fake("silent")
    assert code == 1
    assert "rank 1 failed: ended without reporting (killed, or hung in a collective) (msrun exited with 0)" in out
    assert "(no log at" in out


def test_stale_statuses_are_cleared(tmp_path):
    folder = tmp_path / "status"
    folder.mkdir()
    (folder / "rank_0.json").write_text(json.dumps({"rank": 0, "ok": False, "error": "old"}))
    launch._clear_statuses(str(tmp_path))
    assert os.listdir(folder) == []


def test_msrun_command_and_entry(tmp_path):
    cmd = launch.msrun_command("entry.py", ["train", "--steps", "2"], workers=4, port=8123, log_dir="L")
    assert cmd == ["msrun", "--worker_num", "4", "--local_worker_num", "4", "--master_port", "8123", "--log_dir", "L",
                   "--join", "True", "--cluster_time_out", "600", "entry.py", "train", "--steps", "2"]
    entry = launch.write_entry(str(tmp_path))
    assert "worker_main(sys.argv[1:])" in open(entry).read()
