"""Launches own their processes (issue 20, items 4-6 and free_port of 9), without MindSpore: the scheduler's rank
guard writes no rank record, status files live in a per-launch folder, a log directory in use by a live launch
is refused before anything starts, a signal to the launcher ends every process of its launch (found by the
launch id in their environment, whatever their session), and ``free_port`` leaves no window for a bind(0)."""
import errno
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from mf_longseq.tools import msrun, rank_guard, supervise

GUARD = rank_guard.__file__


def _guard(tmp_path, **env):
    full = {k: v for k, v in os.environ.items() if k not in ("MS_ROLE", "RANK_ID", supervise.LAUNCH_ID_ENV)}
    full.update(env)
    return subprocess.run([sys.executable, GUARD, "--status-dir", str(tmp_path / "status"), "python", "-c",
                           "pass"], env=full, capture_output=True, text=True, timeout=60)


def test_the_schedulers_guard_writes_no_rank_record(tmp_path):
    """msrun gives its scheduler RANK_ID=0: its guard must not write (and later overwrite) rank 0's record."""
    assert _guard(tmp_path, MS_ROLE="MS_SCHED", RANK_ID="0").returncode == 0
    assert not list(tmp_path.rglob("rank_*.json")), "the scheduler wrote a rank record"
    assert _guard(tmp_path, MS_ROLE="MS_WORKER", RANK_ID="0", MF_LONGSEQ_LAUNCH_ID="L1").returncode == 0
    record = json.loads((tmp_path / "status" / "L1" / "rank_0.json").read_text())
    assert record["rank"] == "0" and record["rc"] == 0


def test_a_hung_rank_is_named_alone_when_the_launch_runs_too_long(tmp_path):
    """Rank 0 ended with 0, rank 1 still runs at --timeout: the failure names rank 1 only."""
    status = tmp_path / supervise.STATUS_DIR_NAME / "L"
    status.mkdir(parents=True)
    (status / "rank_0.json").write_text(json.dumps({"rank": "0", "pid": 1, "rc": 0, "ended": time.time()}))
    (status / "rank_1.json").write_text(json.dumps({"rank": "1", "pid": os.getpid(), "rc": None}))
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        watch = supervise._Watch(proc, str(tmp_path), ["0", "1"], grace=0.0, timeout=0.01, stall_timeout=0,
                                 out=sys.stderr, launch_id="L")
        time.sleep(0.05)
        assert watch.step() == 1
        assert watch.failed == ["1"] and "ran past --timeout" in watch.reason
    finally:
        proc.kill(), proc.wait()


def test_a_log_dir_in_use_by_a_live_launch_is_refused_naming_it(tmp_path):
    held = supervise.lock_log_dir(str(tmp_path), ["0", "1"], "first-launch")
    try:
        with pytest.raises(supervise.LaunchConflict, match=rf"log directory {tmp_path} is in use by a live launch "
                                                           r"\(launch id first-launch, launcher pid \d+\) for ranks "
                                                           r"0-1: .*Fix: give this launch its own log directory"):
            supervise.lock_log_dir(str(tmp_path), ["0", "1"], "second")
        supervise.lock_log_dir(str(tmp_path), ["2", "3"], "other-node").close()     # another node's ranks
        marker = tmp_path / "started"
        outcome = supervise.supervise([sys.executable, "-c", f"open({str(marker)!r}, 'w')"], log_dir=str(tmp_path),
                                      ranks=["0", "1"], poll=0.05, out=open(os.devnull, "w"))
        assert outcome.code == 1 and "in use by a live launch" in outcome.reason
        assert not marker.exists(), "the refused launch started its command"
    finally:
        held.close()
    supervise.lock_log_dir(str(tmp_path), ["0", "1"], "after").close()              # released with the launch


FAKE_MSRUN = textwrap.dedent("""\
    import os, subprocess, sys, time
    log_dir = sys.argv[1]
    for rank in range(2):                      # ranks in sessions of their own, as msrun starts them
        env = dict(os.environ, RANK_ID=str(rank), MS_ROLE="MS_WORKER")
        subprocess.Popen([sys.executable, sys.argv[2], "--status-dir", os.path.join(log_dir, "mf_longseq_status"),
                          "python", "-c", "import time; time.sleep(600)"], env=env, start_new_session=True)
    subprocess.Popen(["sleep", "600"])         # like msrun's tail -f
    time.sleep(600)
    """)

LAUNCHER = textwrap.dedent("""\
    import sys
    from mf_longseq.tools import supervise
    out = supervise.supervise([sys.executable, sys.argv[1], sys.argv[2], sys.argv[3]], log_dir=sys.argv[2],
                              ranks=["0", "1"], poll=0.1)
    sys.exit(out.code)
    """)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_to_the_launcher_ends_every_process_of_the_launch(tmp_path, sig):
    (tmp_path / "msrun.py").write_text(FAKE_MSRUN)
    (tmp_path / "launcher.py").write_text(LAUNCHER)
    logs = tmp_path / "logs"
    logs.mkdir()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(msrun.REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, str(tmp_path / "launcher.py"), str(tmp_path / "msrun.py"), str(logs),
                             GUARD], env=env, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 60
        while len(list(logs.rglob("rank_*.json"))) < 2 and time.time() < deadline:
            time.sleep(0.1)
        assert len(list(logs.rglob("rank_*.json"))) == 2, "the fake ranks did not start"
        ids = {p.parent.name for p in logs.rglob("rank_*.json")}
        assert len(ids) == 1 and ids != {supervise.STATUS_DIR_NAME}, "status files not in a per-launch folder"
        launch_id = ids.pop()
        assert len(supervise.launch_processes(launch_id)) >= 6          # msrun, sleep, 2 guards, 2 ranks
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 128 + sig, out
        assert f"received {signal.Signals(sig).name}: stopping msrun and every rank" in out
        assert not _alive(supervise.launch_processes(launch_id)), "processes of the launch left running"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def _alive(pids):
    out = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.NoSuchProcess:
            pass
    return out


def test_free_port_leaves_no_window_for_another_bind():
    """The port is held in TIME_WAIT: no bind(0) hands it out and a plain bind is refused, but a server with
    SO_REUSEADDR (msrun's scheduler) binds it."""
    port = msrun.free_port()
    for _ in range(2000):
        with socket.socket() as other:
            other.bind(("127.0.0.1", 0))
            assert other.getsockname()[1] != port, "bind(0) handed out the reserved port"
    with socket.socket() as plain:
        with pytest.raises(OSError) as err:
            plain.bind(("127.0.0.1", port))
        assert err.value.errno == errno.EADDRINUSE
    with socket.socket() as scheduler:
        scheduler.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        scheduler.bind(("127.0.0.1", port))
        scheduler.listen(1)


def test_a_full_disk_is_named_instead_of_a_vanished_rank(tmp_path, monkeypatch, capsys):
    """Issue 20, item 8: on a full disk the guard cannot write the rank's end; it still passes on the task's exit
    code and says why, and the launcher's headline names the full disk, not a rank that vanished."""
    writes = []

    def write(path, payload):
        writes.append(payload.get("rc"))
        if payload.get("rc") is not None:
            raise OSError(errno.ENOSPC, "No space left on device")
        rank_guard_write(path, payload)

    rank_guard_write = rank_guard._write
    monkeypatch.setattr(rank_guard, "_write", write)
    monkeypatch.setenv("RANK_ID", "1")
    monkeypatch.delenv("MS_ROLE", raising=False)
    monkeypatch.delenv(supervise.LAUNCH_ID_ENV, raising=False)
    handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    try:
        rc = rank_guard.main(["--status-dir", str(tmp_path), "python", "-c", "import sys; sys.exit(3)"])
    finally:
        signal.signal(signal.SIGTERM, handlers[0])
        signal.signal(signal.SIGINT, handlers[1])
    assert rc == 3 and writes == [None, 3]
    assert "rank 1 ended with rc 3, but its status file" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.tmp"))
    record = json.loads((tmp_path / "rank_1.json").read_text())              # only the start was recorded
    monkeypatch.setattr(supervise.shutil, "disk_usage", lambda path: type("U", (), {"free": 4096})())
    said = supervise._describe(record, str(tmp_path))
    assert "the disk holding" in said and "is full (4096 bytes free)" in said and "vanished" not in said
    monkeypatch.setattr(supervise.shutil, "disk_usage", lambda path: type("U", (), {"free": 10 << 30})())
    assert supervise._describe(record, str(tmp_path)).startswith("vanished without an exit status")
