"""What a run reports every step: loss, tokens/s, per-rank peak memory; a progress bar on a terminal.

Peak memory is the process's peak resident set size (``VmHWM`` of ``/proc/self/status``): on CPU MindSpore's
``max_memory_allocated`` returns 0, and RSS is what the machine actually gave the rank.  Not ``ru_maxrss``:
Linux carries a parent's peak into a child started by fork + exec (msrun's, or pytest's), so a worker's
ru_maxrss can report its parent's memory.
Rank 0 prints one line per step and appends one JSON object per step to ``<output_dir>/metrics.jsonl``.

The planner against the run, per rank (``memory_planned_mib``, ``memory_measured_mib``): planned is
``mf_longseq.planner.run.planned_mib`` of the run's config (the planner's tensors: weights, gradients, optimizer
states, activations, buffers, logits; worst pipeline stage); measured is this rank's peak resident memory so far
minus its resident memory just before the model was built, so MindSpore's own runtime (libraries, kernels,
communication) loaded before then is not counted as the model's.
"""
import json
import logging
import os
import resource
import sys
import time
from dataclasses import asdict, dataclass
from typing import List, Optional, TextIO

from mf_longseq.train.files import append_text, safe_path, write_atomic

logger = logging.getLogger(__name__)


def _status_kib(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def peak_rss_mib() -> float:
    """Peak resident set size of this process's own memory image, MiB (VmHWM; ru_maxrss where /proc is absent)."""
    kib = _status_kib("VmHWM")
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss if kib is None else kib) / 1024.0


def rss_mib() -> float:
    """Current resident set size, MiB (0 where /proc is absent)."""
    return (_status_kib("VmRSS") or 0) / 1024.0


@dataclass(frozen=True)
class StepRecord:
    """The global numbers of one training step (identical on every rank, printed by rank 0)."""

    step: int                    # 1-based number of the update just applied
    loss: float                  # global mean loss: sum of CE * mask over all ranks / global token count
    tokens: int                  # tokens processed in the step, all dp ranks
    seconds: float               # wall time of the step
    lr: float
    peak_rss_mib: List[float]    # per rank, in rank order
    memory_planned_mib: Optional[List[float]] = None    # per rank: the planner's peak (module docstring)
    memory_measured_mib: Optional[List[float]] = None   # per rank: peak RSS - RSS before the model was built

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def line(self, total_steps: int) -> str:
        mem = " ".join(f"{m:.0f}" for m in self.peak_rss_mib)
        planned = ""
        if self.memory_planned_mib and self.memory_measured_mib:
            planned = " | model memory measured/planned (MiB): " + " ".join(
                f"{m:.0f}/{p:.0f}" for m, p in zip(self.memory_measured_mib, self.memory_planned_mib))
        return (f"step {self.step:>{len(str(total_steps))}}/{total_steps} | loss {self.loss:.6f} | "
                f"{self.tokens_per_second:,.0f} tok/s | {self.seconds:.2f} s | lr {self.lr:.3g} | "
                f"peak RSS per rank (MiB): {mem}{planned}")

    def as_json(self) -> str:
        return json.dumps({**asdict(self), "tokens_per_second": self.tokens_per_second})


class ProgressBar:
    """A one-line bar redrawn with carriage returns; it draws nothing unless ``stream`` is a terminal."""

    def __init__(self, total: int, stream: Optional[TextIO] = None, width: int = 30):
        self.total, self.stream, self.width = total, stream or sys.stdout, width
        self.enabled = bool(getattr(stream, "isatty", lambda: False)())
        self.start = time.time()
        self.shown = False

    def draw(self, done: int, start_step: int = 0) -> None:
        if not self.enabled:
            return
        frac = done / self.total if self.total else 1.0
        filled = int(round(frac * self.width))
        elapsed = time.time() - self.start
        rate = (done - start_step) / elapsed if elapsed > 0 and done > start_step else 0.0
        eta = f"{(self.total - done) / rate:.0f}s" if rate > 0 else "?"
        self.stream.write(f"\r[{'#' * filled}{'.' * (self.width - filled)}] {done}/{self.total} eta {eta}")
        self.stream.flush()
        self.shown = True

    def clear(self) -> None:
        if self.enabled and self.shown:
            self.stream.write("\r" + " " * (self.width + 40) + "\r")
            self.stream.flush()
            self.shown = False


class Monitor:
    """Prints step lines (rank 0), keeps the loss history, appends ``metrics.jsonl``.

    Args:
        rank: this process's rank (only rank 0 prints and writes).
        total_steps: the step number the run ends at (for the bar and the line format).
        output_dir: where ``metrics.jsonl`` goes (None: no file).
        stream: where lines go (default stdout).
    """

    def __init__(self, rank: int, total_steps: int, output_dir: Optional[str] = None, stream: TextIO = None,
                 start_step: int = 0):
        self.rank, self.total_steps, self.start_step = rank, total_steps, start_step
        self.stream = stream or sys.stdout
        self.path = safe_path(output_dir, "metrics.jsonl") if output_dir and rank == 0 else None
        self.bar = ProgressBar(total_steps, self.stream) if rank == 0 else None
        self.records: List[StepRecord] = []
        if self.path and os.path.exists(self.path):
            _keep_until(self.path, start_step)

    def say(self, text: str) -> None:
        if self.rank != 0:
            return
        self.bar.clear()
        print(text, file=self.stream, flush=True)

    def record(self, rec: StepRecord) -> None:
        self.records.append(rec)
        if self.rank != 0:
            return
        self.say(rec.line(self.total_steps))
        self.bar.draw(rec.step, self.start_step)
        if self.path:
            append_text(self.path, rec.as_json() + "\n")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.clear()


def _keep_until(path: str, step: int) -> None:
    """Drop the records after ``step`` (a fresh run keeps none; a resumed one keeps the steps it resumes after)."""
    kept = [rec for rec in _records(path) if rec["step"] <= step]
    write_atomic(path, "".join(json.dumps(rec) + "\n" for rec in kept))


def _records(path: str) -> List[dict]:
    """The JSON records of ``path``, one a line; a line that is not one (a write cut short by a full disk) is
    named (file, line) in a warning and skipped."""
    out = []
    with open(path, encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if not isinstance(record, dict) or "step" not in record:
                    raise ValueError("not a step record")
            except ValueError as err:
                logger.warning("%s line %d: skipped, not a step record (%s; a write cut short?): %.60r", path, number,
                               err, line)
                continue
            out.append(record)
    return out


def read_metrics(output_dir: str) -> List[dict]:
    """The step records of a run's ``metrics.jsonl`` (a resumed run appends to it); torn lines are skipped."""
    return _records(os.path.join(output_dir, "metrics.jsonl"))
