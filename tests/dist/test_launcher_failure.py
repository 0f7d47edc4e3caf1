"""A real msrun launch on 2 CPU workers where rank 1 is killed (SIGKILL) while rank 0 waits in an AllReduce
that can never complete: the launcher must end every rank and exit non-zero within bounded time, naming rank 1
and showing the tail of its log."""
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).resolve().parent / "launcher_worker.py"
PORTS = range(8600, 8700)                       # this test's master-port range
GRACE = 5


def _port() -> int:
    for port in PORTS:
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    pytest.skip("no free port in 8600-8699")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.dist
def test_killed_rank_ends_the_launch(tmp_path):
    log_dir = tmp_path / "logs"
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
               GLOG_v="2")
    cmd = ["bash", str(ROOT / "scripts" / "msrun_launcher.sh"), "--device", "CPU", "--worker-num", "2",
           "--master-port", str(_port()), "--log-dir", str(log_dir), "--grace", str(GRACE), "--timeout", "300",
           "--", str(WORKER), "die", "1"]
    start = time.time()
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    finished = time.time()
    report = proc.stderr
    assert proc.returncode == 1, proc.stdout[-3000:] + report[-3000:]
    assert "rank 1 was killed by SIGKILL" in report
    assert "failed rank: 1" in report
    assert "launcher_worker: rank 1 kills itself now" in report              # the tail of rank 1's log
    statuses = {}
    for path in (log_dir / "mf_longseq_status").glob("*/rank_*.json"):            # <launch id>/rank_R.json
        record = json.loads(path.read_text())
        statuses[record["rank"]] = record
    assert statuses["1"]["rc"] == -9
    # Bounded: from rank 1's death to the launcher's exit, at most the grace period plus the kill sequence.
    assert finished - statuses["1"]["ended"] < GRACE + 10, finished - statuses["1"]["ended"]
    assert finished - start < 300
    time.sleep(0.5)
    leftover = [pid for s in statuses.values() for pid in (s["pid"], s["child_pid"]) if _alive(pid)]
    assert leftover == [], f"processes still running after the launch ended: {leftover}"
