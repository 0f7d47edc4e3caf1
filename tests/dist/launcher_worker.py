"""Tiny msrun worker for the launcher tests.

    python launcher_worker.py ok            every rank joins one AllReduce and exits 0
    python launcher_worker.py die RANK      rank RANK kills itself (SIGKILL) after init; the others block in an
                                            AllReduce that can never complete, so only the launcher can end them
"""
import os
import signal
import sys

import numpy as np


def main():
    import mindspore as ms
    from mindspore import Tensor, ops
    from mindspore.communication import get_group_size, get_rank, init
    ms.set_device("CPU")
    init()
    rank, size = get_rank(), get_group_size()
    print(f"launcher_worker: rank {rank} of {size} up, pid {os.getpid()}", flush=True)
    if sys.argv[1] == "die" and rank == int(sys.argv[2]):
        print(f"launcher_worker: rank {rank} kills itself now", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    total = ops.AllReduce()(Tensor(np.ones(4, np.float32)))
    print(f"launcher_worker: rank {rank} all-reduce {total.asnumpy().tolist()}", flush=True)
    assert float(total.asnumpy()[0]) == size


if __name__ == "__main__":
    main()
