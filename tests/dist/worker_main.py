"""Start-up shared by the msrun worker scripts of tests/dist: one place that joins the launch and runs cases.

    rank, out_dir, only = join_launch(WORLD)           # CPU device, communication up, world size checked
    run_cases(CASES, lambda case: run_case(case, rank, out_dir), only, rank)

Ops launch synchronously (``ms.runtime.launch_blocking``): on CPU the engine's exchanges are blocking
AllReduces in several overlapping groups, deadlock-free in the order every rank issues them; PyNative's
asynchronous launch may reorder them (seen: a hang after a few pipeline steps).  The training runner does the
same (``train/context.py``).
"""
import sys
import time
from typing import Callable, Iterable, Optional, Set, Tuple


def join_launch(world: int) -> Tuple[int, str, Optional[Set[str]]]:
    """This rank, the output directory (argv[1]) and the case names to run (argv[2], comma separated; None: all)."""
    import mindspore as ms
    from mindspore.communication import get_group_size, get_rank, init
    ms.set_device("CPU")
    init()
    ms.runtime.launch_blocking()
    size = get_group_size()
    assert size == world, f"started with {size} workers: launch with --worker_num {world}"
    only = set(sys.argv[2].split(",")) if len(sys.argv) > 2 else None
    return get_rank(), sys.argv[1], only


def run_cases(cases: Iterable, run: Callable, only: Optional[Set[str]], rank: int,
              name_of: Callable = lambda case: case.name) -> None:
    """Run every case (or those named in ``only``) in order; every rank runs the same sequence."""
    for case in cases:
        name = name_of(case)
        if only is not None and name not in only:
            continue
        start = time.time()
        run(case)
        print(f"rank {rank}: {name} done in {time.time() - start:.1f} s", flush=True)
