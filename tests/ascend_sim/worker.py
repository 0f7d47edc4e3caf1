"""One batch of Ascend-simulation cases in this (fresh) process: ``python worker.py BATCH``.

The parent (``conftest.py``) starts it with the fake CANN's environment (``env.sh``: library path, hccl stub,
MS_SIMULATION_LEVEL, RANK_SIZE, RANK_ID).  The worker sets ``ms.set_device("Ascend")`` and PyNative
(synchronous dispatch, as ``train/context.setup`` does), runs the batch's cases one after the other and prints
one line ``ASIM_RESULT {json}`` per case: ``ok``, ``error`` ("Type: message" of the first failure) and ``info``
(what the case saw: planned FlashAttentionScore calls, collectives, shapes).  A case never depends on another
one of its batch: each builds its own inputs, kernel and mesh; a failing case does not stop the batch.

Numbers computed under the simulation are meaningless: cases check shapes, dtypes, which ops ran with which
arguments, and MindSpore's own errors - never values.
"""
import json
import os
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1]))          # the repository (mf_longseq) when not installed

PREFIX = "ASIM_RESULT "
CASES = {}                                        # batch -> {case name: function}


def case(batch: str, name: str):
    """Register ``fn() -> info dict`` as case ``name`` of ``batch`` (raise to fail)."""
    def register(fn):
        CASES.setdefault(batch, {})[name] = fn
        return fn
    return register


def _load_cases() -> None:
    import cases_flash   # noqa: F401  (registers)
    import cases_comm    # noqa: F401
    import cases_model   # noqa: F401


def batch_names(batch: str):
    _load_cases()
    return list(CASES[batch])


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}"


def run_batch(batch: str, only=None) -> int:
    import mindspore as ms
    ms.set_context(mode=ms.PYNATIVE_MODE, pynative_synchronize=True)
    ms.set_device("Ascend")
    if int(os.environ.get("RANK_SIZE", "1")) > 1:
        from mindspore.communication import init
        init()
    _load_cases()
    for name, fn in CASES[batch].items():
        if only and name not in only:
            continue
        start = time.time()
        record = {"batch": batch, "case": name, "ok": True, "error": "", "info": {}}
        try:
            record["info"] = fn() or {}
        except Exception as exc:                                     # noqa: BLE001  (reported to the parent)
            record["ok"] = False
            record["error"] = _one_line(exc)
            record["traceback"] = traceback.format_exc()[-4000:]
        record["seconds"] = round(time.time() - start, 2)
        print(PREFIX + json.dumps(record, default=str), flush=True)
    return 0


if __name__ == "__main__":
    import worker                                 # the cases register into the importable module, not __main__
    sys.exit(worker.run_batch(sys.argv[1], set(sys.argv[2:])))
