"""``--workers N``: start msrun with N CPU workers running ``mf-longseq <verb> ...`` and watch them.

The workers run a small entry script written into the run's output directory (a script inside the package would
put the package's own directory first on ``sys.path``).  The virtual environment's ``bin`` goes first on PATH
(msrun starts workers with the ``python`` it finds there).  Watching is ``tools/supervise.py``'s, the same as
for ``scripts/msrun_launcher.sh``: every worker runs under ``tools/rank_guard.py``, which records how it ended,
and the launch fails - non-zero exit, naming the first failed rank with the tail of its log - when a worker
ends non-zero or vanishes; the other workers (hung in a collective, typically) are ended after ``grace``
seconds.  A configuration error is printed by the worker as one line (``mf-longseq: rank R: error: ...``), so
it is in that tail.  msrun's output is passed on without MindSpore's log lines.  msrun's scheduler runs the
same entry script; there it only serves the cluster (``mindspore.communication.init()``).
"""
import os
import re
import sys
from typing import List, Optional

from mf_longseq.tools import supervise
from mf_longseq.tools.msrun import free_port, msrun_command, msrun_env
from mf_longseq.train.files import safe_path, write_atomic

_LOG_LINE = re.compile(r"^\[(WARNING|INFO|DEBUG)\]")


def entry_path(run_dir: str) -> str:
    """Where ``write_entry`` puts the worker entry script of a run."""
    return os.path.join(run_dir, "launch", "worker_entry.py")


def write_entry(run_dir: str) -> str:
    """The worker entry script: ``python entry.py ARGS`` runs ``mf-longseq ARGS``."""
    parts = os.path.relpath(entry_path(run_dir), run_dir).split(os.sep)      # launch/worker_entry.py
    os.makedirs(safe_path(run_dir, *parts[:-1]), exist_ok=True)               # links below run_dir refused
    return write_atomic(safe_path(run_dir, *parts), "import sys\nfrom mf_longseq.tools.workers import worker_main\n"
                        "sys.exit(worker_main(sys.argv[1:]))\n")


def worker_main(argv: List[str]) -> int:
    """Inside a worker: run the verb; a configuration error becomes one line on stderr and exit code 1."""
    if os.environ.get("MS_ROLE") == "MS_SCHED":       # msrun's scheduler runs this script too: serve, nothing else
        import mindspore as ms
        from mindspore.communication import init
        ms.set_device("CPU")
        init()
        return 0
    from mf_longseq.cli import build_parser
    rank = os.environ.get("RANK_ID", os.environ.get("MS_NODE_ID", "0"))
    try:
        args = build_parser().parse_args(argv)
        return int(args.func(args) or 0)
    except ValueError as err:                          # configuration errors: the message is the report
        print(f"mf-longseq: rank {rank}: error: {err}", file=sys.stderr, flush=True)
        return 1


CLUSTER_TIME_OUT = 600          # msrun --cluster_time_out of a --workers launch (seconds)


def workers_command(entry: str, args: List[str], *, workers: int, port: int, log_dir: str) -> List[str]:
    """msrun (``tools/msrun.py``) running ``python entry ARGS`` on ``workers`` local CPU ranks, each under the
    rank guard."""
    return msrun_command([entry, *args], worker_num=workers, master_port=port, log_dir=log_dir,
                         cluster_time_out=CLUSTER_TIME_OUT)


def launch(args: List[str], *, workers: int, run_dir: str, port: Optional[int] = None, grace: float = 30.0,
           timeout: Optional[float] = None, out=None) -> int:
    """Run ``mf-longseq ARGS`` on ``workers`` CPU ranks under msrun; returns 0 or 1 (after naming the failure)."""
    out = out or sys.stdout
    run_dir = os.path.abspath(run_dir)
    log_dir = os.path.join(run_dir, "logs")
    os.makedirs(log_dir, exist_ok=True)
    cmd = workers_command(write_entry(run_dir), args, workers=workers, port=port or free_port(), log_dir=log_dir)
    env = msrun_env()
    print("launching: " + " ".join(cmd), file=out, flush=True)
    outcome = supervise.supervise(cmd, log_dir=log_dir, ranks=[str(r) for r in range(workers)], env=env,
                                  grace=grace, timeout=timeout or 0.0, out=out, cwd=run_dir,
                                  hide=lambda line: bool(_LOG_LINE.match(line)))
    return outcome.code
