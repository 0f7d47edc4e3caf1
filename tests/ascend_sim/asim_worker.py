"""One batch of Ascend-simulation cases in this (fresh) process: ``python asim_worker.py BATCH``.

The parent (``conftest.py``) starts it with the fake CANN's environment (``env.sh``: library path, hccl stub,
MS_SIMULATION_LEVEL, RANK_SIZE, RANK_ID).  The worker sets ``ms.set_device("Ascend")`` and PyNative
(synchronous dispatch, as ``train/context.setup`` does), runs the batch's cases one after the other and prints
one line ``ASIM_RESULT {json}`` per case: ``ok``, ``error`` ("Type: message" of the first failure) and ``info``
(what the case saw: planned FlashAttentionScore calls, collectives, shapes).  A case never depends on another
one of its batch: each builds its own inputs, kernel and mesh; a failing case does not stop the batch.

Numbers computed under the simulation are meaningless: cases check shapes, dtypes, which ops ran with which
arguments, and MindSpore's own errors - never values.
"""
import gc
import json
import os
import resource
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1]))          # the repository (mf_longseq) when not installed

PREFIX = "ASIM_RESULT "
CASES = {}                                        # batch -> {case name: function}
ENVS = {}                                         # batch -> (RANK_SIZE, RANK_ID, MS_SIMULATION_LEVEL)


def batch(name: str, rank_size: int = 1, rank_id: int = 0, level: int = 1) -> str:
    """Declare batch ``name``: its process runs with RANK_SIZE / RANK_ID / MS_SIMULATION_LEVEL as given."""
    ENVS[name] = (rank_size, rank_id, level)
    return name


def case(batch_name: str, name: str):
    """Register ``fn() -> info dict`` as case ``name`` of ``batch_name`` (declared with ``batch``; raise to fail)."""
    assert batch_name in ENVS, f"declare batch {batch_name!r} first"

    def register(fn):
        CASES.setdefault(batch_name, {})[name] = fn
        return fn
    return register


def host_count_as_if_every_rank_equal() -> None:
    """The step's token count (``step_math.global_token_count``, both routes) still runs its AllReduce through
    the Ascend front end, but the dummy collective returns zero, which the step refuses ("every label of the batch
    is masked").  The host value returned is the sum when every rank holds the same count: local count x group
    size."""
    from mf_longseq.train import step_math
    original = getattr(step_math.global_token_count, "__wrapped__", step_math.global_token_count)

    def counted(local_mask_sum, group, where=""):
        try:
            original(local_mask_sum, group, where)
        except ValueError as exc:                                # the dummy AllReduce's zero, nothing else
            assert "every label of the batch is masked" in str(exc), exc
        return float(local_mask_sum) * group.size
    counted.__wrapped__ = original
    step_math.global_token_count = counted


def _load_cases() -> None:
    import cases_flash   # noqa: F401  (registers)
    import cases_comm    # noqa: F401
    import cases_model   # noqa: F401
    import cases_mf_route  # noqa: F401
    import cases_sp_offload  # noqa: F401
    import cases_planner  # noqa: F401


def all_cases(module=None):
    """[(batch, case name)] of every case (of case module ``module`` only, e.g. "cases_comm"), in run order."""
    _load_cases()
    return [(b, name) for b, cases in CASES.items() for name, fn in cases.items()
            if module is None or fn.__module__ == module]


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
        gc.collect()                              # free the case's cells and tensors before the next case
        record["seconds"] = round(time.time() - start, 2)
        record["max_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
        print(PREFIX + json.dumps(record, default=str), flush=True)
    cpu = os.times()
    print(f"ASIM_CPU {cpu.user + cpu.system:.1f}", flush=True)
    return 0


if __name__ == "__main__":
    import asim_worker                            # the cases register into the importable module, not __main__
    sys.exit(asim_worker.run_batch(sys.argv[1], set(sys.argv[2:])))
