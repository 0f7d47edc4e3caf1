"""Run an msrun command and watch its ranks: a failed rank ends the whole launch, non-zero, within bounded time.

msrun alone is not enough: with ``--join False`` it returns 0 at once whatever the ranks do, a failure is reported
by process id (not rank) without the log, and after a failure it waits for the scheduler, which can take up to
``--cluster_time_out``.  So every rank runs under ``rank_guard.py``, which writes ``rank_<R>.json`` (pid, and the
exit code when the rank ends) into a status directory, and ``supervise`` polls those files:

* all local ranks ended with 0                  -> success (msrun given ``grace`` s to exit, then stopped)
* a rank ended non-zero, or its guard vanished  -> failure: msrun gets ``grace`` s to stop the others, then every
  process of the launch is killed (TERM, then KILL); the first failed rank is named with the tail of its log
* no rank log grew for ``stall_timeout`` s, or the launch ran past ``timeout`` s -> failure, all ranks named
* msrun ended non-zero before the ranks started -> failure, with the scheduler log's tail

Bound: a failure is acted on within ``poll + grace + 5`` seconds.

A launch owns its processes: SIGINT or SIGTERM to the launcher stops msrun and every rank (TERM, then KILL
after 3 s) and the launcher returns 128 + the signal number.  Every process of a launch carries its launch id
in the environment (``MF_LONGSEQ_LAUNCH_ID``), so ranks that msrun put into sessions of their own, or that
outlived msrun (``--join False``), are found and ended too, and nothing of another launch is touched.  The
status files live in ``<log_dir>/mf_longseq_status/<launch id>/``; a log directory already used by a live
launch for the same local ranks is refused (``LaunchConflict``, a lock held for the life of the launch), since
msrun would overwrite that launch's ``worker_<rank>.log``.
"""
import errno
import fcntl
import glob
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

from mf_longseq.tools.rank_guard import LAUNCH_ID_ENV   # set for msrun, inherited by every process it starts

STATUS_DIR_NAME = "mf_longseq_status"
GUARD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "rank_guard.py")   # msrun runs it per rank


@dataclass
class Outcome:
    """How a supervised launch ended: ``code`` is the launcher's exit status (0 success)."""

    code: int
    failed_ranks: List[str] = field(default_factory=list)
    reason: str = ""


def status_dir(log_dir: str, launch_id: Optional[str] = None) -> str:
    """Where the rank guards write (``--status-dir``); a launch's own files are in its ``launch_id`` folder."""
    root = os.path.join(log_dir, STATUS_DIR_NAME)
    return os.path.join(root, launch_id) if launch_id else root


def new_launch_id() -> str:
    """A launch id: time, launcher pid and random hex (unique across launches sharing a log directory)."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{secrets.token_hex(3)}"


class LaunchConflict(RuntimeError):
    """The log directory is in use by a live launch for the same ranks (the message names it and the fix)."""


def lock_log_dir(log_dir: str, ranks: Sequence[str], launch_id: str):
    """Take the lock of ``log_dir`` for these local ranks for the life of this launch (an open file: closing it,
    or the launcher's exit, releases it).  Raises LaunchConflict when a live launch holds it."""
    os.makedirs(status_dir(log_dir), exist_ok=True)
    path = os.path.join(status_dir(log_dir), f"ranks_{ranks[0]}-{ranks[-1]}.lock" if ranks else "ranks.lock")
    handle = open(path, "a+", encoding="utf-8")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        if err.errno not in (errno.EAGAIN, errno.EACCES):
            raise
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise LaunchConflict(
            f"log directory {os.path.abspath(log_dir)} is in use by a live launch ({holder}) for ranks "
            f"{ranks[0]}-{ranks[-1]}: msrun would overwrite its worker_<rank>.log files. Fix: give this launch "
            f"its own log directory (--log-dir, or --output-dir for mf-longseq), or wait until that launch ends"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"launch id {launch_id}, launcher pid {os.getpid()}\n")
    handle.flush()
    return handle


def clear_status(log_dir: str, launch_id: Optional[str] = None) -> None:
    """Remove the status files of this launch's folder (a new launch id: there are none unless reused)."""
    for path in glob.glob(os.path.join(status_dir(log_dir, launch_id), "rank_*.json")):
        os.remove(path)


def read_status(log_dir: str, launch_id: Optional[str] = None) -> Dict[str, dict]:
    out = {}
    for path in glob.glob(os.path.join(status_dir(log_dir, launch_id), "rank_*.json")):
        try:
            with open(path, encoding="utf-8") as handle:
                record = json.load(handle)
        except (OSError, ValueError):
            continue                                             # being replaced right now: next poll
        out[str(record["rank"])] = record
    return out


def _alive(pid: Optional[int]) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:                                                         # a zombie is not alive
        with open(f"/proc/{pid}/stat", encoding="utf-8") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def log_tail(path: str, lines: int = 40) -> str:
    """Last ``lines`` lines of a log file, MindSpore [WARNING] lines left out."""
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            kept = [ln.rstrip("\n") for ln in handle if "[WARNING]" not in ln]
    except OSError:
        return f"(no log at {path})"
    return f"--- {path} (last {min(lines, len(kept))} lines, [WARNING] lines omitted) ---\n" + "\n".join(kept[-lines:])


def worker_log(log_dir: str, rank: str) -> str:
    """msrun's log file of a rank (``--worker_log_name`` left at its default)."""
    return os.path.join(log_dir, f"worker_{rank}.log")


FULL_DISK_BYTES = 1 << 20              # less free space than this where the status files live: "the disk is full"


def _describe(record: dict, status_path: Optional[str] = None) -> str:
    """How a rank ended, from its status record; a record without an end on a full disk says so (its guard
    could not write the end, ``rank_guard.py``) instead of blaming the rank."""
    rc = record.get("rc")
    if rc is None:
        free = _free_bytes(status_path)
        if free is not None and free < FULL_DISK_BYTES:
            return (f"left no exit status: the disk holding {status_path} is full ({free} bytes free), so its "
                    f"guard could not record how it ended. Fix: free space there (or use another --log_dir) and "
                    f"run again")
        return "vanished without an exit status (killed together with its guard)"
    if rc < 0:
        return f"was killed by {record.get('signal') or -rc}"
    return f"exited with code {rc}"


def _free_bytes(path: Optional[str]) -> Optional[int]:
    """Free bytes on the file system of ``path`` (None when it cannot be asked)."""
    try:
        return shutil.disk_usage(path).free if path else None
    except OSError:
        return None


def _first_failure(statuses: Dict[str, dict], dead: Sequence[str]) -> List[str]:
    """Failed ranks, the one that ended first first (ranks without an end time after those with one)."""
    failed = [r for r, s in statuses.items() if s.get("rc") not in (None, 0)] + list(dead)
    return sorted(set(failed), key=lambda r: (statuses[r].get("ended") is None, statuses[r].get("ended") or 0,
                                              _rank_key(r)))


def _rank_key(rank: str):
    return (0, int(rank)) if str(rank).isdigit() else (1, str(rank))


def _descendants(pid: int) -> List[int]:
    try:
        import psutil                                           # a MindSpore dependency: present wherever msrun is
        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except Exception:                                           # already gone
        return []


def launch_processes(launch_id: Optional[str]) -> List[int]:
    """Pids of this user's processes whose environment carries ``MF_LONGSEQ_LAUNCH_ID=launch_id``."""
    if not launch_id:
        return []
    import psutil
    found = []
    for process in psutil.process_iter(["pid"]):
        try:
            if process.pid != os.getpid() and process.environ().get(LAUNCH_ID_ENV) == launch_id:
                found.append(process.pid)
        except (psutil.Error, OSError):
            continue                                             # gone, or another user's
    return found


def kill_launch(proc: subprocess.Popen, statuses: Dict[str, dict], launch_id: Optional[str] = None) -> None:
    """TERM then KILL msrun, every process it started (found by parentage and by the launch id in their
    environment), and every rank guard's process group of this launch."""
    pids = set(_descendants(proc.pid)) | {proc.pid} | set(launch_processes(launch_id))
    groups = {s["pgid"] for s in statuses.values() if s.get("pgid")}
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pgid in groups:
            try:
                os.killpg(pgid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        for pid in pids:
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.time() + 3
        while time.time() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.1)
            proc.poll()
        pids |= set(launch_processes(launch_id))                 # started meanwhile (msrun was spawning)
    proc.wait()


def _log_mtime(log_dir: str) -> float:
    times = [os.path.getmtime(p) for p in glob.glob(os.path.join(log_dir, "worker_*.log"))]
    return max(times) if times else 0.0


class _Watch:
    """State of one supervised launch; ``step()`` looks once and records the first failure it sees."""

    def __init__(self, proc, log_dir: str, ranks: List[str], grace: float, timeout: float, stall_timeout: float,
                 out, launch_id: Optional[str] = None):
        self.proc, self.log_dir, self.ranks, self.grace, self.launch_id = proc, log_dir, ranks, grace, launch_id
        self.timeout, self.stall_timeout, self.out = timeout, stall_timeout, out
        self.start = self.last_growth = time.time()
        self.last_mtime, self.msrun_ended = 0.0, None
        self.failure_at, self.reason, self.failed, self.statuses = None, "", [], {}

    def _fail(self, now: float, reason: str, failed: Sequence[str], wait: bool = False) -> None:
        self.failure_at, self.reason, self.failed = (now if wait else now - self.grace), reason, list(failed)

    def _check_ranks(self, now: float) -> None:
        dead = [r for r, s in self.statuses.items() if s.get("rc") is None and not _alive(s.get("pid"))]
        failed = _first_failure(self.statuses, dead)
        if failed:                                   # msrun gets ``grace`` seconds to stop the others itself
            where = status_dir(self.log_dir, self.launch_id)
            self._fail(now, f"rank {failed[0]} {_describe(self.statuses[failed[0]], where)}", failed, wait=True)
            print(f"mf_longseq launcher: {self.reason}; ending the other ranks", file=self.out, flush=True)
        elif self.timeout and now - self.start > self.timeout:
            self._fail(now, f"the launch ran past --timeout {self.timeout:g} s", self._unfinished())
        elif self.stall_timeout:
            mtime = _log_mtime(self.log_dir)
            if mtime > self.last_mtime:
                self.last_growth, self.last_mtime = now, mtime
            if now - self.last_growth > self.stall_timeout:
                self._fail(now, f"no rank log grew for {self.stall_timeout:g} s (--stall-timeout)",
                           self._unfinished())

    def _unfinished(self) -> List[str]:
        """The ranks that have not ended with 0 (the hung ones, when a launch runs too long)."""
        return [r for r in self.ranks if self.statuses.get(r, {}).get("rc") != 0] or self.ranks

    def _check_msrun(self, now: float, msrun_rc: Optional[int]) -> None:
        missing = [r for r in self.ranks if r not in self.statuses]
        if msrun_rc is None:
            return
        self.msrun_ended = self.msrun_ended or now
        running = any(s.get("rc") is None and _alive(s.get("pid")) for s in self.statuses.values())
        never = f"; ranks {', '.join(missing)} never started" if missing else ""
        if msrun_rc != 0 and not running:
            self._fail(now, f"msrun exited with code {msrun_rc}{never}", missing or self.ranks)
        elif missing and now - self.msrun_ended > max(self.grace, 30):       # --join False, ranks absent
            self._fail(now, f"msrun exited with code {msrun_rc}{never}", missing)

    def step(self) -> Optional[int]:
        """Look once: 0 (success), 1 (failure: stop everything) or None (keep watching)."""
        now, msrun_rc = time.time(), self.proc.poll()
        self.statuses = read_status(self.log_dir, self.launch_id)
        if self.failure_at is None:
            self._check_ranks(now)
        finished = all(self.statuses.get(r, {}).get("rc") == 0 for r in self.ranks)
        if self.failure_at is None and finished:
            ended = max((s.get("ended") or 0 for s in self.statuses.values()), default=0.0)
            return 0 if msrun_rc is not None or now - ended > self.grace else None
        if self.failure_at is None:
            self._check_msrun(now, msrun_rc)
        if self.failure_at is not None and (now - self.failure_at >= self.grace or _all_ended(self.proc,
                                                                                              self.statuses)):
            return 1
        return None


def supervise(cmd: Sequence[str], *, log_dir: str, ranks: Sequence[str], env: Optional[dict] = None,
              grace: float = 10.0, poll: float = 0.5, timeout: float = 0.0, stall_timeout: float = 0.0,
              tail: int = 40, out=None, cwd: Optional[str] = None,
              hide: Optional[Callable[[str], bool]] = None) -> Outcome:
    """Run ``cmd`` (an msrun command whose task is ``rank_guard.py``) and watch the local ``ranks``.

    Args:
        cmd: the msrun command.
        log_dir: msrun's ``--log_dir`` (worker logs and the status directory are there).
        ranks: global rank ids started on this node, as strings.
        env: environment of msrun.
        grace: seconds msrun gets to end the other ranks (or to exit after success) before they are killed.
        poll: seconds between checks.
        timeout: wall-clock limit of the whole launch (0: none).
        stall_timeout: fail when no worker log grew for this long (0: never).
        tail: log lines shown for a failed rank.
        out: stream for the launcher's messages (default stderr).
        cwd: working directory of msrun.
        hide: when given, msrun's output is passed on to ``out`` without the lines for which it returns True
            (e.g. MindSpore's log lines); when None, msrun writes to this process's stdout directly.

    Returns:
        An ``Outcome``; ``code`` is 0 on success, 1 on failure (also when ``log_dir`` is in use by a live
        launch for the same ranks: nothing is started), 128 + N when signal N (SIGINT, SIGTERM, SIGHUP) stopped
        the launch.
    """
    out = out or sys.stderr
    ranks = [str(r) for r in ranks]
    launch_id = new_launch_id()
    try:
        lock = lock_log_dir(log_dir, ranks, launch_id)
    except LaunchConflict as err:
        print(f"mf_longseq launcher: FAILED: {err}.", file=out, flush=True)
        return Outcome(1, reason=str(err))
    env = dict(os.environ if env is None else env, **{LAUNCH_ID_ENV: launch_id})
    with lock, _Signals() as signals:
        piped = dict(stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) if hide else {}
        proc = subprocess.Popen(list(cmd), env=env, cwd=cwd, start_new_session=True, **piped)
        pump = threading.Thread(target=_pass_on, args=(proc.stdout, out, hide), daemon=True) if hide else None
        if pump:
            pump.start()
        watch = _Watch(proc, log_dir, ranks, grace, timeout, stall_timeout, out, launch_id)
        code = None
        while code is None and not signals.received:
            time.sleep(poll)
            code = None if signals.received else watch.step()
        if signals.received:
            name = signal.Signals(signals.received).name
            print(f"mf_longseq launcher: received {name}: stopping msrun and every rank of this launch",
                  file=out, flush=True)
            watch.statuses = read_status(log_dir, launch_id)
            kill_launch(proc, watch.statuses, launch_id)
            print(f"mf_longseq launcher: FAILED: interrupted by {name}; every process of the launch was stopped.",
                  file=out, flush=True)
            return Outcome(128 + signals.received, reason=f"interrupted by {name}")
        if proc.poll() is None or code:
            kill_launch(proc, watch.statuses, launch_id)
        if pump:
            pump.join(timeout=5)
    if code == 0:
        return Outcome(0)
    _report(out, watch.reason, watch.failed, log_dir, tail)
    return Outcome(1, failed_ranks=watch.failed, reason=watch.reason)


class _Signals:
    """SIGINT/SIGTERM/SIGHUP recorded (not raised) while a launch runs; the previous handlers come back after.
    Outside the main thread (where Python cannot install handlers) nothing is changed."""

    NAMES = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self):
        self.received, self._previous = 0, {}

    def _record(self, signum, _frame):
        self.received = self.received or signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._record) for sig in self.NAMES}
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _pass_on(stream, out, hide: Callable[[str], bool]) -> None:
    for line in iter(stream.readline, ""):
        if not hide(line):
            out.write(line)
            out.flush()


def _all_ended(proc, statuses) -> bool:
    return proc.poll() is not None and not any(_alive(s.get("pid")) for s in statuses.values())


def _report(out, reason: str, failed: Sequence[str], log_dir: str, tail: int) -> None:
    print(f"mf_longseq launcher: FAILED: {reason}.", file=out)
    if not failed:
        return
    others = f" (also ended abnormally: {', '.join(failed[1:])})" if len(failed) > 1 else ""
    print(f"mf_longseq launcher: failed rank: {failed[0]}{others}; every rank of this launch was stopped.", file=out)
    shown = failed[:1] if not reason.startswith(("no rank log", "the launch ran past")) else failed
    for rank in shown:
        print(log_tail(worker_log(log_dir, rank), tail), file=out)
    if not os.path.exists(worker_log(log_dir, failed[0])):
        print(log_tail(os.path.join(log_dir, "scheduler.log"), tail), file=out)
    out.flush()
