"""msrun worker (2 CPU ranks) under ASYNCHRONOUS PyNative dispatch (no launch_blocking, no pynative_synchronize):
the same attention step (weights -> q, k, v -> ring or Ulysses CP=2 -> loss), per-sample cases of
``per_sample_case``, repeated REPEATS times.  Each rank writes OUT_DIR/<algo>_<case>/rank<r>.npz: positions,
the first repetition's out / dx / weight gradients, and how many later repetitions differed from it (bitwise).

Usage (under msrun): python async_worker.py OUT_DIR
"""
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # tests/: oracle, per_sample_case
from per_sample_case import CASES, full_inputs, run_attention  # noqa: E402

WORLD = 2
REPEATS = 6
ALGOS = ("colossalai_cp", "ulysses_cp")


def main():
    import mindspore as ms
    from mindspore.communication import get_group_size, get_rank, init
    from mf_longseq.parallel import Mesh, global_positions
    ms.set_device("CPU")
    ms.set_context(mode=ms.PYNATIVE_MODE, pynative_synchronize=False, runtime_num_threads=1)
    init()
    assert get_group_size() == WORLD, f"launch with --worker_num {WORLD}"
    rank, out_dir = get_rank(), sys.argv[1]
    full = full_inputs()
    for algo in ALGOS:
        mesh = Mesh(cp=WORLD, ulysses=WORLD if algo == "ulysses_cp" else 1, rank=rank).create_groups()
        for name in CASES:
            first, differed = None, 0
            for _ in range(REPEATS):
                got = run_attention(name, full, mesh, algo=algo)
                if first is None:
                    first = got
                elif any(not np.array_equal(got[key], first[key]) for key in first):
                    differed += 1
            folder = os.path.join(out_dir, f"{algo}_{name}")
            os.makedirs(folder, exist_ok=True)
            np.savez(os.path.join(folder, f"rank{rank}.npz"), positions=global_positions(full["x"].shape[1], mesh),
                     differed=differed, sync=bool(ms.get_context("pynative_synchronize")), **first)
            print(f"rank {rank}: {algo} {name} done, {differed} of {REPEATS - 1} repetitions differed", flush=True)


if __name__ == "__main__":
    main()
