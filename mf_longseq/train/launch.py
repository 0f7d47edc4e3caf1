"""``--workers N``: start msrun with N CPU workers running ``mf-longseq <verb> ...`` and watch them.

The workers run a small entry script written into the run's output directory (a script inside the package would
put the package's own directory first on ``sys.path``).  The virtual environment's ``bin`` goes first on PATH
(msrun starts workers with the ``python`` it finds there).  Every worker writes ``status/rank_<r>.json`` when it
ends (``ok`` or the error); msrun's output is passed through without MindSpore's log lines.

The launch fails - non-zero exit, naming the first failed rank and printing the tail of its log - when a worker
reports an error, when msrun exits non-zero, or when a worker ends without reporting.  A worker that reported an
error while the others hang in a collective ends the whole launch after ``grace`` seconds (msrun, the scheduler
and every worker are signalled by process id).  msrun's scheduler runs the same entry script; there it only
serves the cluster (``mindspore.communication.init()``) and never reads the config.
"""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import List, Optional

_LOG_LINE = re.compile(r"^\[(WARNING|INFO|DEBUG)\]")
STATUS_DIR = "status"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_entry(run_dir: str) -> str:
    """The worker entry script: ``python entry.py ARGS`` runs ``mf-longseq ARGS`` and reports the outcome."""
    path = os.path.join(run_dir, "launch", "worker_entry.py")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("import sys\nfrom mf_longseq.train.launch import worker_main\n"
                     "sys.exit(worker_main(sys.argv[1:]))\n")
    return path


def worker_main(argv: List[str]) -> int:
    """Inside a worker: run the verb; write status/rank_<r>.json (ok, or the error) into the run directory."""
    import traceback
    if os.environ.get("MS_ROLE") == "MS_SCHED":       # msrun's scheduler runs this script too: serve, nothing else
        import mindspore as ms
        from mindspore.communication import init
        ms.set_device("CPU")
        init()
        return 0
    from mf_longseq.cli import build_parser
    run_dir = os.environ["MF_LONGSEQ_RUN_DIR"]
    rank = int(os.environ.get("RANK_ID", os.environ.get("MS_NODE_ID", "0")))
    status = {"rank": rank, "ok": False, "error": None}
    try:
        args = build_parser().parse_args(argv)
        code = int(args.func(args) or 0)
        status["ok"] = code == 0
        status["error"] = f"exit code {code}" if code else None
        return code
    except ValueError as err:                 # configuration errors: the message is the report
        status["error"] = f"{err}"
        print(f"mf-longseq: rank {rank}: error: {err}", file=sys.stderr, flush=True)
        return 1
    except BaseException as err:  # reported to the launcher, then re-raised for the worker log
        status["error"] = f"{type(err).__name__}: {err}"
        traceback.print_exc()
        raise
    finally:
        os.makedirs(os.path.join(run_dir, STATUS_DIR), exist_ok=True)
        with open(os.path.join(run_dir, STATUS_DIR, f"rank_{rank}.json"), "w", encoding="utf-8") as handle:
            json.dump(status, handle)


def msrun_command(entry: str, args: List[str], *, workers: int, port: int, log_dir: str,
                  timeout: int = 600) -> List[str]:
    return ["msrun", "--worker_num", str(workers), "--local_worker_num", str(workers), "--master_port", str(port),
            "--log_dir", log_dir, "--join", "True", "--cluster_time_out", str(timeout), entry, *args]


def _statuses(run_dir: str) -> dict:
    found = {}
    folder = os.path.join(run_dir, STATUS_DIR)
    if os.path.isdir(folder):
        for name in os.listdir(folder):
            try:
                with open(os.path.join(folder, name), encoding="utf-8") as handle:
                    item = json.load(handle)
                found[int(item["rank"])] = item
            except (OSError, ValueError, KeyError):
                continue
    return found


def _clear_statuses(run_dir: str) -> None:
    folder = os.path.join(run_dir, STATUS_DIR)
    if os.path.isdir(folder):
        for name in os.listdir(folder):
            os.remove(os.path.join(folder, name))


def log_tail(log_dir: str, rank: int, lines: int = 30) -> str:
    path = os.path.join(log_dir, f"worker_{rank}.log")
    if not os.path.exists(path):
        return f"(no log at {path})"
    with open(path, errors="replace") as handle:
        kept = [ln.rstrip("\n") for ln in handle if not _LOG_LINE.match(ln)]
    return "\n".join(kept[-lines:])


def _pump(stream, out) -> None:
    for line in iter(stream.readline, ""):
        if not _LOG_LINE.match(line):
            out.write(line)
            out.flush()


def launch(args: List[str], *, workers: int, run_dir: str, port: Optional[int] = None, grace: float = 30.0,
           timeout: Optional[float] = None, out=None) -> int:
    """Run ``mf-longseq ARGS`` on ``workers`` CPU ranks under msrun; returns 0 or 1 (after naming the failure)."""
    out = out or sys.stdout
    run_dir = os.path.abspath(run_dir)
    log_dir = os.path.join(run_dir, "logs")
    os.makedirs(log_dir, exist_ok=True)
    _clear_statuses(run_dir)
    cmd = msrun_command(write_entry(run_dir), args, workers=workers, port=port or free_port(), log_dir=log_dir)
    env = dict(os.environ, MF_LONGSEQ_RUN_DIR=run_dir)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = package_root + os.pathsep + env.get("PYTHONPATH", "")
    print("launching: " + " ".join(cmd), file=out, flush=True)
    proc = subprocess.Popen(cmd, cwd=run_dir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    pump = threading.Thread(target=_pump, args=(proc.stdout, out), daemon=True)
    pump.start()
    code = _watch(proc, run_dir, workers, grace, timeout)
    pump.join(timeout=5)
    return _report(code, run_dir, log_dir, workers, out)


def _watch(proc, run_dir: str, workers: int, grace: float, timeout: Optional[float]) -> Optional[int]:
    """Wait for msrun; end it when a worker failed and the rest did not follow within ``grace`` s."""
    started, failed_at = time.time(), None
    while proc.poll() is None:
        time.sleep(1.0)
        if failed_at is None and any(not s["ok"] for s in _statuses(run_dir).values()):
            failed_at = time.time()
        late = failed_at is not None and time.time() - failed_at > grace
        if late or (timeout and time.time() - started > timeout):
            _stop(proc)
            return None
    return proc.returncode


def _stop(proc) -> None:
    """End msrun and every process under it (msrun starts each worker in a session of its own, so signalling
    msrun's process group does not reach them): SIGTERM, then SIGKILL after 10 s."""
    import psutil
    try:
        family = psutil.Process(proc.pid).children(recursive=True) + [psutil.Process(proc.pid)]
    except psutil.NoSuchProcess:
        family = []
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for member in family:
            try:
                member.send_signal(sig)
            except psutil.NoSuchProcess:
                pass
        _, family = psutil.wait_procs(family, timeout=10)
        if not family:
            break
    proc.wait()


def _report(code: Optional[int], run_dir: str, log_dir: str, workers: int, out) -> int:
    statuses = _statuses(run_dir)
    bad = [r for r in range(workers) if not statuses.get(r, {}).get("ok")]
    if code == 0 and not bad:
        return 0
    errored = [r for r in bad if statuses.get(r, {}).get("error")]
    rank = (errored or bad or [0])[0]
    reason = statuses.get(rank, {}).get("error") or "ended without reporting (killed, or hung in a collective)"
    how = "msrun was stopped" if code is None else f"msrun exited with {code}"
    print(f"\nmf-longseq: rank {rank} failed: {reason} ({how}). Log: {os.path.join(log_dir, f'worker_{rank}.log')}"
          f"\n--- last lines of worker_{rank}.log ---\n{log_tail(log_dir, rank)}", file=out, flush=True)
    return 1
