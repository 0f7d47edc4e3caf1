"""Run one rank's task and record how it ended, so the launcher can name a failed rank.

msrun starts this file once per rank (``python rank_guard.py --status-dir DIR TASK [ARGS...]``); it runs
``python TASK ARGS`` (or TASK itself when TASK is ``python``/``python3``/``pytest``, as msrun does) with the
same environment, and writes ``DIR/<launch id>/rank_<RANK_ID>.json`` (the launch id from ``MF_LONGSEQ_LAUNCH_ID``,
set by ``tools/supervise.py``; ``DIR/rank_<RANK_ID>.json`` without one):

    at start: {"rank", "pid", "pgid", "child_pid", "host", "started", "rc": null}
    at exit:  the same plus "rc" (negative: killed by that signal), "signal" (its name or null), "ended"

The exit code of the task is passed on to msrun (128 + signal number when the task was killed), so msrun's own
failure handling sees it too.  SIGTERM/SIGINT sent to this process are forwarded to the task.  msrun runs the
task of its scheduler through this file too, with ``MS_ROLE=MS_SCHED`` and ``RANK_ID=0``: that process is no
rank, so it writes no record (it would take rank 0's).  Standard library
only: this file runs before anything else is imported, by path.
"""
import os
import sys

# Run by path, this file's directory is sys.path[0]: drop it so that no module of the package can shadow the
# standard library modules imported below.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import json  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

_RUNNERS = ("python", "python3", "pytest")
LAUNCH_ID_ENV = "MF_LONGSEQ_LAUNCH_ID"          # supervise.LAUNCH_ID_ENV (this file imports no package module)


def _write(path: str, payload: dict) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(payload, handle)
    os.replace(tmp, path)                                   # readers never see half a file


def task_command(task, args):
    """The command msrun would have run for ``task args``."""
    return [task, *args] if task in _RUNNERS else [sys.executable, task, *args]


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) < 3 or argv[0] != "--status-dir":
        print("usage: rank_guard.py --status-dir DIR TASK [ARGS...]", file=sys.stderr)
        return 2
    status_dir, task, args = argv[1], argv[2], argv[3:]
    status_dir = os.path.join(status_dir, os.environ.get(LAUNCH_ID_ENV, ""))
    record = os.environ.get("MS_ROLE") != "MS_SCHED"                # msrun's scheduler: no rank, no record
    rank = os.environ.get("RANK_ID", os.environ.get("MS_NODE_ID", f"pid{os.getpid()}"))
    path = os.path.join(status_dir, f"rank_{rank}.json")
    status = {"rank": rank, "pid": os.getpid(), "pgid": os.getpgid(0), "child_pid": None,
              "host": socket.gethostname(), "started": time.time(), "rc": None}
    child = subprocess.Popen(task_command(task, args))
    status["child_pid"] = child.pid
    if record:
        os.makedirs(status_dir, exist_ok=True)
        _write(path, status)

    def forward(signum, _frame):
        if child.poll() is None:
            child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    rc = child.wait()
    status.update(rc=rc, ended=time.time(), signal=signal.Signals(-rc).name if rc < 0 else None)
    if record:
        try:
            _write(path, status)
        except OSError as err:                              # e.g. a full disk: say it where the launcher looks
            try:
                os.remove(f"{path}.{os.getpid()}.tmp")
            except OSError:
                pass
            print(f"mf_longseq rank guard: rank {rank} ended with rc {rc}, but its status file {path} could not "
                  f"be written ({err})", file=sys.stderr, flush=True)
    return 128 - rc if rc < 0 else rc


if __name__ == "__main__":
    sys.exit(main())
