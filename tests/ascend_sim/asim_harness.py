"""Harness of the ascend_sim tier (see ``conftest.py``): find and build the tool, run batches, read results."""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))

import asim_worker as worker  # noqa: E402  (the case registry; importing it does no device work)

BATCH_TIMEOUT = 1800         # seconds per batch process (a hang; a loaded 2-core CI box took 480 s for "flash")
PARALLEL_BATCHES = 2


def find_tool():
    """The ascend-sim folder, or None."""
    candidates = [os.environ.get("MF_LONGSEQ_ASCEND_SIM")] + [
        str(base / "shared" / "tools" / "ascend-sim") for base in (ROOT.parent, ROOT.parent.parent)]
    for candidate in candidates:
        if candidate and (Path(candidate) / "build.sh").is_file() and (Path(candidate) / "env.sh").is_file():
            return Path(candidate)
    return None


def skip_reason():
    """Why the tier cannot run here, or None.  With ``$MF_LONGSEQ_ASCEND_SIM`` set (CI sets it when ../shared
    has the tool) a tool that is missing or cannot be built fails the tier instead of skipping it."""
    tool, reason = find_tool(), None
    if tool is None:
        reason = ("ascend-sim tool not found (looked in $MF_LONGSEQ_ASCEND_SIM and shared/tools/ascend-sim beside "
                  "the clone): the Ascend simulation tier needs that test-only fake CANN runtime")
    elif not sys.platform.startswith("linux"):
        reason = "ascend-sim builds on Linux x86-64 only"
    else:
        missing = [exe for exe in ("gcc", "g++", "nm", "bash") if shutil.which(exe) is None]
        reason = f"ascend-sim needs {', '.join(missing)} to build" if missing else None
    if reason and os.environ.get("MF_LONGSEQ_ASCEND_SIM"):
        pytest.fail(f"MF_LONGSEQ_ASCEND_SIM={os.environ['MF_LONGSEQ_ASCEND_SIM']}: {reason}")
    return reason


class Simulation:
    """Builds the tool, runs batches in the background (two at a time), hands out per-case results."""

    def __init__(self, tool: Path, work: Path):
        self.tool, self.work = tool, work
        self.prefix = work / "cann"
        self._futures, self._lock = {}, threading.Lock()
        self._pool = ThreadPoolExecutor(PARALLEL_BATCHES)

    def build(self):
        proc = subprocess.run(["bash", str(self.tool / "build.sh"), str(self.prefix)], capture_output=True, text=True,
                              timeout=300)
        if proc.returncode != 0:
            pytest.fail(f"ascend-sim build.sh failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")

    def env(self, rank_size: int, rank_id: int, level: int) -> dict:
        """The process environment ``env.sh PREFIX LEVEL RANK_SIZE RANK_ID`` exports (plus the repository)."""
        script = f'eval "$(bash "$1" "$2" "$3" "$4" "$5")" && env -0'
        proc = subprocess.run(["bash", "-c", script, "env", str(self.tool / "env.sh"), str(self.prefix), str(level),
                               str(rank_size), str(rank_id)], capture_output=True, check=True, env=os.environ)
        env = dict(item.split("=", 1) for item in proc.stdout.decode().split("\0") if "=" in item)
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
        env.setdefault("GLOG_v", "3")
        return env

    def start(self, batches):
        with self._lock:
            for name in batches:
                if name not in self._futures:
                    self._futures[name] = self._pool.submit(self._run, name)

    def _run(self, name: str) -> dict:
        rank_size, rank_id, level = worker.ENVS[name]
        cwd = Path(tempfile.mkdtemp(prefix=f"{name}_", dir=self.work))
        start = time.time()
        cmd = [sys.executable, str(HERE / "asim_worker.py"), name]
        try:
            proc = subprocess.run(cmd, cwd=cwd, env=self.env(rank_size, rank_id, level), capture_output=True,
                                  text=True, timeout=BATCH_TIMEOUT)
            out, err, status = proc.stdout, proc.stderr, f"exit code {proc.returncode}"
        except subprocess.TimeoutExpired as exc:
            out, err, status = exc.stdout or "", exc.stderr or "", f"timeout after {BATCH_TIMEOUT} s"
            out, err = (x.decode(errors="replace") if isinstance(x, bytes) else x for x in (out, err))
        results, cpu = {}, None
        for line in out.splitlines():
            if line.startswith("ASIM_CPU "):
                cpu = float(line.split()[1])
            if line.startswith(worker.PREFIX):
                record = json.loads(line[len(worker.PREFIX):])
                results[record["case"]] = record
        tail = "\n".join(ln for ln in err.splitlines() if "[WARNING]" not in ln)[-3000:]
        results["__process__"] = {"status": status, "stderr_tail": tail, "seconds": round(time.time() - start, 1),
                                  "cpu": cpu}
        return results

    def result(self, batch_name: str, case_name: str) -> dict:
        self.start([batch_name])
        results = self._futures[batch_name].result()
        if case_name not in results:
            proc = results["__process__"]
            pytest.fail(f"batch {batch_name}: the worker ended ({proc['status']}) before case {case_name}; "
                        f"stderr:\n{proc['stderr_tail']}")
        return results[case_name]

    def timings(self):
        """{batch: (wall seconds, CPU seconds of the worker)} of the batches that finished."""
        return {name: (f.result()["__process__"]["seconds"], f.result()["__process__"]["cpu"])
                for name, f in self._futures.items() if f.done() and not f.cancelled() and f.exception() is None}

    def close(self):
        self._pool.shutdown(wait=True, cancel_futures=True)


def check_case(sim, sim_case, xfail=None):
    """Pass when the case passed; ``xfail``: the exact MindSpore message the case is known to stop at."""
    record = sim.result(*sim_case)
    if xfail is not None:
        if record["ok"]:
            pytest.fail(f"{sim_case}: expected to stop at {xfail!r} (a known simulation limit), but it passed: "
                        "remove the xfail")
        assert xfail in record["error"], f"{sim_case}: failed with another error:\n{record.get('traceback')}"
        pytest.xfail(xfail)
    assert record["ok"], f"{sim_case}: {record['error']}\n{record.get('traceback', '')}"
    return record


def cases_of(module, keep=lambda batch, name: True):
    """pytest params ``(batch, case)`` of the cases defined in case module ``module``, with readable ids."""
    return [pytest.param((b, name), id=f"{b}:{name}") for b, name in worker.all_cases(module) if keep(b, name)]
