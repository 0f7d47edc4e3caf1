"""Launchers own their processes (issue 20, items 4-6), with real msrun launches on 2 CPU ranks.

* SIGINT/SIGTERM once training started, to ``mf-longseq train --workers 2``, ``mf-longseq demo``,
  ``scripts/msrun_launcher.sh`` and ``scripts/launch_llama2.sh``: the launcher exits non-zero (128 + signal)
  within 30 s and no process of the launch remains (its ranks, their guards, msrun, the scheduler, ``tail -f``);
* a hung rank 1 (rank 0 ended with 0) is named as rank 1 alone (the scheduler's guard writes no rank record);
* a second launch into the log directory of a live one is refused naming it, and the first completes.
"""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from mf_longseq.tools import supervise

pytestmark = pytest.mark.dist
HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
WORKER = HERE / "launcher_worker.py"


def _env():
    return dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
                PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", GLOG_v="2")


def _port() -> int:
    from mf_longseq.tools.msrun import free_port
    return free_port()


def _config(tmp_path) -> Path:
    import yaml
    from train_worker import case_tree
    path = tmp_path / "cp2.yaml"
    path.write_text(yaml.safe_dump(case_tree("llama2", cp=2, dp=1)))
    return path


def _wait_for(path: Path, text: str, proc, seconds: float = 400) -> None:
    """Until ``path`` holds a match of the regular expression ``text``."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        if path.exists() and re.search(text, path.read_text(errors="replace")):
            return
        if proc.poll() is not None:
            pytest.fail(f"the launch ended before {text!r} appeared in {path}: {proc.communicate()[0][-3000:]}")
        time.sleep(0.5)
    pytest.fail(f"{text!r} never appeared in {path}")


def _records(log_dir: Path):
    return [json.loads(p.read_text()) for p in log_dir.glob(f"{supervise.STATUS_DIR_NAME}/*/rank_*.json")]


def _left(marker: str, records, launch_ids):
    """Live processes of the launch: the marker in argv, the launch id in the environment, a recorded pid/pgid."""
    pids = {r[k] for r in records for k in ("pid", "child_pid") if r.get(k)}
    pgids = {r["pgid"] for r in records if r.get("pgid")}
    left = []
    for process in psutil.process_iter(["pid", "cmdline", "status"]):
        try:
            if process.info["status"] == psutil.STATUS_ZOMBIE or process.pid == os.getpid():
                continue
            ours = (marker in " ".join(process.info["cmdline"] or []) or process.pid in pids
                    or os.getpgid(process.pid) in pgids
                    or process.environ().get(supervise.LAUNCH_ID_ENV) in launch_ids)
            if ours:
                left.append((process.pid, " ".join(process.info["cmdline"] or [])[:200]))
        except (psutil.Error, OSError):
            continue
    return left


def _interrupt(cmd, sig, started: Path, cwd: Path, log_dir: Path, marker: str):
    proc = subprocess.Popen([str(c) for c in cmd], cwd=cwd, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        _wait_for(started, r"step +1/", proc)
        records = _records(log_dir)
        launch_ids = {p.parent.name for p in log_dir.glob(f"{supervise.STATUS_DIR_NAME}/*/rank_*.json")}
        assert len(launch_ids) == 1 and len(records) == 2, (launch_ids, records)
        proc.send_signal(sig)
        sent = time.time()
        out, _ = proc.communicate(timeout=60)
        took = time.time() - sent
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert took < 30, f"the launcher took {took:.0f} s to stop"
    assert proc.returncode == 128 + sig, out[-3000:]
    assert f"received {signal.Signals(sig).name}: stopping msrun and every rank of this launch" in out
    time.sleep(0.5)
    assert _left(marker, records, launch_ids) == []


def test_train_workers_sigint(tmp_path):
    out_dir = tmp_path / "run"
    _interrupt([sys.executable, "-m", "mf_longseq.cli", "train", "--config", _config(tmp_path), "--workers", "2",
                "--steps", "100000", "--output-dir", out_dir, "--port", _port()], signal.SIGINT,
               out_dir / "logs" / "worker_0.log", tmp_path, out_dir / "logs", str(tmp_path))


def test_demo_sigterm(tmp_path):
    out_dir = tmp_path / "demo"
    _interrupt([sys.executable, "-m", "mf_longseq.cli", "demo", "--seq-len", "256", "--steps", "100000",
                "--output-dir", out_dir, "--port", _port()], signal.SIGTERM,
               out_dir / "logs" / "worker_0.log", tmp_path, out_dir / "logs", str(tmp_path))


def test_msrun_launcher_sh_sigterm(tmp_path):
    logs = tmp_path / "logs"
    _interrupt(["bash", ROOT / "scripts" / "msrun_launcher.sh", "--device", "CPU", "--worker-num", "2",
                "--master-port", _port(), "--log-dir", logs, "--", "python", "-m", "mf_longseq.cli", "train",
                "--config", _config(tmp_path), "--steps", "100000", "--output-dir", tmp_path / "run"],
               signal.SIGTERM, logs / "worker_0.log", tmp_path, logs, str(tmp_path))


def test_launch_llama2_sh_sigint(tmp_path):
    logs = tmp_path / "logs"
    _interrupt(["bash", ROOT / "scripts" / "launch_llama2.sh", "--template",
                ROOT / "yaml_templates" / "tiny" / "llama2_tiny_s256_cp2_colossalai_cp.yaml", "--steps", "100000",
                "--device", "CPU", "--master-port", _port(), "--log-dir", logs], signal.SIGINT,
               logs / "worker_0.log", tmp_path, logs, str(tmp_path))


def test_a_hung_rank_is_named_as_itself(tmp_path):
    logs = tmp_path / "logs"
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "msrun_launcher.sh"), "--device", "CPU", "--worker-num",
                           "2", "--master-port", str(_port()), "--log-dir", str(logs), "--timeout", "90", "--grace",
                           "5", "--", str(WORKER), "hang", "1"], cwd=tmp_path, env=_env(), capture_output=True,
                          text=True, timeout=400)
    records = {r["rank"]: r for r in _records(logs)}
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert records["0"]["rc"] == 0 and records["1"]["rc"] is not None and records["1"]["rc"] != 0, records
    assert "FAILED: the launch ran past --timeout 90 s." in proc.stderr
    assert "failed rank: 1; every rank of this launch was stopped." in proc.stderr, proc.stderr[-3000:]
    assert "launcher_worker: rank 1 hangs now" in proc.stderr                 # rank 1's log tail


def test_a_second_launch_into_a_live_launchs_log_dir_is_refused_and_the_first_completes(tmp_path):
    logs, release = tmp_path / "logs", tmp_path / "release"

    def launcher(*task):
        return ["bash", str(ROOT / "scripts" / "msrun_launcher.sh"), "--device", "CPU", "--worker-num", "2",
                "--master-port", str(_port()), "--log-dir", str(logs), "--", str(WORKER), *task]
    first = subprocess.Popen(launcher("until", str(release)), cwd=tmp_path, env=_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for(logs / "worker_0.log", "running, second 1", first)
        second = subprocess.run(launcher("die", "1"), cwd=tmp_path, env=_env(), capture_output=True, text=True,
                                timeout=300)
        assert second.returncode == 1, second.stdout[-2000:] + second.stderr[-2000:]
        assert f"FAILED: log directory {logs} is in use by a live launch (launch id " in second.stderr
        assert "Fix: give this launch its own log directory" in second.stderr
        release.touch()
        out, _ = first.communicate(timeout=400)
    finally:
        release.touch()
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, out[-3000:]
    for rank in (0, 1):
        log = (logs / f"worker_{rank}.log").read_text()
        assert "running, second 1" in log and f"launcher_worker: rank {rank} ends" in log
    assert len({p.parent.name for p in logs.glob(f"{supervise.STATUS_DIR_NAME}/*/rank_*.json")}) == 1
