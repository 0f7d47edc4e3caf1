"""Shared test set-up: keep MindFormers' logs out of the repo, CPU device, an msrun launcher for dist tests."""
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))                  # oracle.py
sys.path.insert(0, str(TESTS / "dist"))         # cases.py, check.py

# MindFormers writes logs to $LOCAL_DEFAULT_PATH (default ./output) on import: send them to a temp dir.
_RUN_DIR = tempfile.mkdtemp(prefix="mf_longseq_tests_")
os.environ.setdefault("LOCAL_DEFAULT_PATH", os.path.join(_RUN_DIR, "mindformers_output"))
os.environ.setdefault("GLOG_v", "2")
# The templates' auto_register entries resolve against REGISTER_PATH, as run_mindformer.py --register_path sets it.
os.environ.setdefault("REGISTER_PATH", str(ROOT / "mf_longseq"))
os.environ.setdefault("OM_MODULES_CACHE", os.path.join(_RUN_DIR, "om_modules"))   # auto_register's module copies


@pytest.fixture(scope="session", autouse=True)
def cpu_device():
    import mindspore as ms
    ms.set_device("CPU")


def run_msrun(script, args, workers: int, timeout: float, log_dir=None) -> Path:
    """Launch ``script args`` on ``workers`` CPU ranks with msrun; fail the test with the workers' log tails.

    Returns the log directory.  The command and its environment (the venv's bin first on PATH: msrun starts
    workers with ``python``) are ``mf_longseq/tools/msrun.py``'s, as for every launch.
    """
    from mf_longseq.tools.msrun import free_port, msrun_command, msrun_env
    log_dir = Path(log_dir or tempfile.mkdtemp(prefix="msrun_", dir=_RUN_DIR))
    env = msrun_env(root=ROOT)
    cmd = msrun_command([script, *args], worker_num=workers, master_port=free_port(), log_dir=str(log_dir),
                        cluster_time_out=int(timeout), guard=False)
    try:
        proc = subprocess.run(cmd, cwd=_RUN_DIR, env=env, capture_output=True, text=True, timeout=timeout)
        failed = proc.returncode != 0
        reason = f"msrun exited with {proc.returncode}"
    except subprocess.TimeoutExpired:
        subprocess.run(["pkill", "-f", str(script)], check=False)
        failed, reason = True, f"msrun timed out after {timeout} s"
    if failed:
        tails = []
        for log in sorted(log_dir.glob("worker_*.log")):
            lines = [ln for ln in log.read_text(errors="replace").splitlines() if "[WARNING]" not in ln]
            tails.append(f"--- {log.name} ---\n" + "\n".join(lines[-40:]))
        pytest.fail(f"{reason}: {' '.join(cmd)}\n" + "\n".join(tails))
    return log_dir


@pytest.fixture(scope="session")
def msrun():
    return run_msrun
