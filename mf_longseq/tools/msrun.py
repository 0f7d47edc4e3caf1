"""The one builder of msrun commands, and the environment msrun's workers need.

Every msrun launch goes through here: the launch scripts (``scripts/msrun_launcher.sh`` and the
``scripts/launch_*.sh`` built on it, ``tools/launch.py``), ``mf-longseq train|demo --workers N``
(``tools/workers.py``), the Ascend self-check (``tools/ascend_selfcheck.py``) and the test fixtures
(``tests/conftest.py``).  msrun's option order is always::

    msrun --worker_num N --local_worker_num L [--master_addr A] --master_port P [--node_rank R] --log_dir D
          --join True|False [--cluster_time_out S] [rank_guard.py --status-dir D/<status>] TASK ARGS...

``--master_addr`` and ``--node_rank`` only for a launch over several nodes.  With ``guard`` every rank runs under
``tools/rank_guard.py``, which records how it ended for ``tools/supervise.py``.  ``joined`` spells the options
``--worker_num=N``, as MindFormers' ``scripts/msrun_launcher.sh`` prints them (msrun reads both spellings).
"""
import os
import socket
import sys
from typing import Dict, List, Mapping, Optional, Sequence

from mf_longseq.tools import supervise

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # holds mf_longseq/


def free_port() -> int:
    """A TCP port for ``--master_port``, held back from everyone but msrun's scheduler until it binds it.

    msrun takes a port number, not a socket, so the port cannot stay bound until msrun binds it.  Instead it is
    left in TIME_WAIT: bound and listening here, one connection to it accepted and closed from this side first.
    For the next 60 s (Linux's TIME_WAIT) the kernel hands the port to no ``bind(0)`` (no other launch's
    ``free_port``, no ephemeral port) and refuses a plain ``bind`` of it, while a server that sets SO_REUSEADDR -
    msrun's scheduler does - binds it.  What remains: a process that explicitly binds this number with
    SO_REUSEADDR within those 60 s.
    """
    with socket.socket() as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)) as client:
            accepted, _ = server.accept()
            accepted.close()                  # the side that closes first keeps (127.0.0.1, port) in TIME_WAIT
    return port


def msrun_command(task: Sequence[str], *, worker_num: int, master_port: int, log_dir: str,
                  local_worker_num: Optional[int] = None, master_addr: Optional[str] = None,
                  node_rank: Optional[int] = None, join: bool = True, cluster_time_out: Optional[int] = None,
                  guard: bool = True, joined: bool = False) -> List[str]:
    """The msrun command running ``task`` (script and arguments) on ``worker_num`` ranks.

    Args:
        task: what every rank runs (``python`` is implied for a ``.py`` file, as msrun does).
        worker_num, local_worker_num: ranks in all, and on this node (default: all of them).
        master_port, master_addr, node_rank: msrun's rendezvous; the address and node rank only when given.
        log_dir: msrun's ``worker_<rank>.log`` directory (also the rank guard's status files).
        join, cluster_time_out: msrun's options of the same names (no ``--cluster_time_out`` when None).
        guard: run each rank under ``tools/rank_guard.py`` (needed by ``tools/supervise.py``).
        joined: ``--option=value`` (MindFormers' launcher) instead of ``--option value``.

    Returns:
        The command as a list of strings.
    """
    options = [("worker_num", worker_num), ("local_worker_num", worker_num if local_worker_num is None
                                            else local_worker_num)]
    options += [("master_addr", master_addr)] if master_addr is not None else []
    options += [("master_port", master_port)]
    options += [("node_rank", node_rank)] if node_rank is not None else []
    options += [("log_dir", log_dir), ("join", bool(join))]
    options += [("cluster_time_out", cluster_time_out)] if cluster_time_out is not None else []
    cmd = ["msrun"]
    for name, value in options:
        cmd += [f"--{name}={value}"] if joined else [f"--{name}", str(value)]
    if guard:
        cmd += [supervise.GUARD, "--status-dir", supervise.status_dir(log_dir)]
    return cmd + [str(arg) for arg in task]


def msrun_env(environ: Optional[Mapping[str, str]] = None, *, root: str = REPO_ROOT) -> Dict[str, str]:
    """``environ`` (default ``os.environ``) with this interpreter's ``bin`` first on PATH (msrun starts every
    worker with the ``python`` it finds there) and ``root`` (default: the directory holding ``mf_longseq``)
    first on PYTHONPATH."""
    env = dict(os.environ if environ is None else environ)
    def first(entry: str, current: str) -> str:        # no empty entry: it would put the cwd on the path
        return entry + (os.pathsep + current if current else "")
    env["PATH"] = first(os.path.dirname(sys.executable), env.get("PATH", ""))
    env["PYTHONPATH"] = first(str(root), env.get("PYTHONPATH", ""))
    return env


__all__ = ["REPO_ROOT", "free_port", "msrun_command", "msrun_env"]
