"""The ``--workers`` launcher with a fake msrun (no MindSpore): the real rank guard and supervisor watch fake
workers; a failed rank is named with its error line and log tail, hung workers (in sessions of their own, as
msrun starts them) are ended, a killed worker fails the launch, and msrun's log lines are not passed on."""
import io
import sys
import textwrap
import time

import psutil
import pytest

from mf_longseq.tools import supervise
from mf_longseq.tools import workers as launch

FAKE_MSRUN = textwrap.dedent("""\
    import os, subprocess, sys, time
    args = sys.argv[1:]
    workers, log_dir = int(args[args.index("--worker_num") + 1]), args[args.index("--log_dir") + 1]
    task = args[args.index("--cluster_time_out") + 2:]
    print("[WARNING] ME(1):hidden msrun log line", flush=True)
    print("worker output line", flush=True)
    procs = []
    for rank in range(workers):
        log = open(os.path.join(log_dir, "worker_%d.log" % rank), "w")
        env = dict(os.environ, RANK_ID=str(rank), MS_ROLE="MS_WORKER")
        procs.append(subprocess.Popen([sys.executable] + task, env=env, stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True))
    sys.exit(max(p.wait() for p in procs))
    """)

FAKE_ENTRY = textwrap.dedent("""\
    import os, signal, sys, time
    rank, mode = int(os.environ["RANK_ID"]), os.environ["FAKE_MODE"]
    print("[WARNING] noise", flush=True)
    if mode == "error" and rank == 1:
        print("mf-longseq: rank 1: error: bad thing on rank 1", file=sys.stderr, flush=True)
        sys.exit(1)
    if mode == "error":
        time.sleep(600)                                 # rank 0 waits in a collective that never completes
    if mode == "killed" and rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    print("rank %d done" % rank, flush=True)
    """)


@pytest.fixture
def fake(tmp_path, monkeypatch):
    (tmp_path / "fake_msrun.py").write_text(FAKE_MSRUN)
    real_command = launch.msrun_command
    monkeypatch.setattr(launch, "msrun_command", lambda *a, **kw: [sys.executable, str(tmp_path / "fake_msrun.py"),
                                                                   *real_command(*a, **kw)[1:]])

    def write_entry(run_dir):
        path = tmp_path / "entry.py"
        path.write_text(FAKE_ENTRY)
        return str(path)
    monkeypatch.setattr(launch, "write_entry", write_entry)

    def run(mode, grace=1.0):
        monkeypatch.setenv("FAKE_MODE", mode)
        out = io.StringIO()
        start = time.time()
        code = launch.launch(["train"], workers=2, run_dir=str(tmp_path / "run"), grace=grace, out=out)
        return code, out.getvalue(), time.time() - start
    return run


def test_all_ranks_ok(fake):
    code, out, _ = fake("ok")
    assert code == 0, out
    assert "worker output line" in out and "hidden msrun log line" not in out


def test_failed_rank_is_named_with_its_error_and_hung_ranks_are_ended(fake, tmp_path):
    code, out, seconds = fake("error")
    assert code == 1 and seconds < 300, out                # rank 0 would sleep 600 s
    assert "mf_longseq launcher: failed rank: 1" in out
    assert "mf-longseq: rank 1: error: bad thing on rank 1" in out            # the worker's one-line error
    assert "[WARNING] noise" not in out
    guards = [p for p in psutil.process_iter(["cmdline"]) if str(tmp_path / "entry.py") in (p.info["cmdline"] or [])]
    assert all(p.status() == psutil.STATUS_ZOMBIE for p in guards if p.is_running())


def test_killed_rank_fails_the_launch(fake):
    code, out, _ = fake("killed")
    assert code == 1
    assert "FAILED: rank 1 was killed by SIGKILL" in out


def test_msrun_command_runs_every_rank_under_the_guard(tmp_path):
    cmd = launch.workers_command("entry.py", ["train", "--steps", "2"], workers=4, port=8123, log_dir="L")
    assert cmd == ["msrun", "--worker_num", "4", "--local_worker_num", "4", "--master_port", "8123", "--log_dir", "L",
                   "--join", "True", "--cluster_time_out", "600", supervise.GUARD, "--status-dir",
                   supervise.status_dir("L"), "entry.py", "train", "--steps", "2"]
    entry = launch.write_entry(str(tmp_path))
    assert "worker_main(sys.argv[1:])" in open(entry).read()


def test_fixture_form_of_the_one_builder():
    """tests/conftest.py and the self-check: no rank guard; no --cluster_time_out unless given."""
    from mf_longseq.tools.msrun import msrun_command
    assert msrun_command(["w.py", 1], worker_num=2, master_port=9, log_dir="L", guard=False) == [
        "msrun", "--worker_num", "2", "--local_worker_num", "2", "--master_port", "9", "--log_dir", "L",
        "--join", "True", "w.py", "1"]


def test_no_other_msrun_command_builder():
    """Every msrun command comes from tools/msrun.py: no other file of the package, the tests or the benchmarks
    writes a list that starts with "msrun"."""
    import ast
    from pathlib import Path
    root = Path(__file__).resolve().parents[2]
    home = root / "mf_longseq" / "tools" / "msrun.py"
    found = []
    for folder in ("mf_longseq", "tests", "benchmarks"):
        for path in (root / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.List) and node.elts and isinstance(node.elts[0], ast.Constant) \
                        and node.elts[0].value == "msrun" and path != home and path != Path(__file__).resolve():
                    found.append(f"{path.relative_to(root)}:{node.lineno}")
    assert not found, f"msrun commands built outside mf_longseq/tools/msrun.py: {found}"
