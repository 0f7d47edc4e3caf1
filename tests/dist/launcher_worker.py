"""Tiny msrun worker for the launcher tests.

    python launcher_worker.py ok            every rank joins one AllReduce and exits 0
    python launcher_worker.py die RANK      rank RANK kills itself (SIGKILL) after init; the others block in an
                                            AllReduce that can never complete, so only the launcher can end them
    python launcher_worker.py hang RANK     after the AllReduce rank RANK hangs (sleeps, printing nothing); the
                                            others end with 0
    python launcher_worker.py until PATH    every rank prints a line every second until PATH exists (at most 600 s),
                                            then exits 0
"""
import os
import signal
import sys

import numpy as np


def main():
    import time
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
    if sys.argv[1] == "hang" and rank == int(sys.argv[2]):
        print(f"launcher_worker: rank {rank} hangs now", flush=True)
        time.sleep(3600)
    if sys.argv[1] == "until":
        for second in range(600):
            if os.path.exists(sys.argv[2]):
                break
            print(f"launcher_worker: rank {rank} running, second {second}", flush=True)
            time.sleep(1)
    print(f"launcher_worker: rank {rank} ends", flush=True)


if __name__ == "__main__":
    main()
