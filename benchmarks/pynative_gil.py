"""Does a Python thread run while PyNative computes?  (The host p2p transport's threads need the GIL between
their socket system calls.)

    python benchmarks/pynative_gil.py --seq 4096 --threads 1

One process, the fused CPU attention kernel (forward + backward of one (S, S) causal block, ``--heads`` heads)
called on the main thread, in two dispatch modes: ``async`` (PyNative's default: ops run on MindSpore's
executor thread) and ``blocking`` (``ms.runtime.launch_blocking()``: ops run on the calling thread).  Beside it a
Python thread counts in a loop; ``progress`` = its count while the kernel runs / its count alone in the same
time (1: the GIL is free while the kernel runs; near 0: the kernel holds it).  Reference row ``numpy``: NumPy
matrix products on the main thread (they release the GIL), the ceiling ``progress`` reaches on this host
under its current load.  ``kernel_ms``: the kernel
call's wall time with the counting thread running; ``alone_ms``: without it.  Prints a table and writes
benchmarks/results/pynative_gil.csv.
"""
import argparse
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


class Counter:
    """A Python thread that counts until stopped (it needs the GIL for every step)."""

    def __init__(self):
        self.count, self.running = 0, True
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while self.running:
            self.count += 1

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()


def _kernel_call(mode: str, args):
    """The timed call: fused attention forward + backward (results on the host), or NumPy products."""
    import numpy as np
    import mindspore as ms
    from mindspore import Tensor
    from mf_longseq.attention.cpu_fused import FusedCpuKernel
    from mf_longseq.attention.mask import AttentionMask
    rng = np.random.default_rng(0)
    if mode == "numpy":
        a = rng.standard_normal((args.seq // 2, args.seq // 2)).astype(np.float32)
        return lambda: [a @ a for _ in range(args.heads)]
    if mode == "blocking":
        ms.runtime.launch_blocking()
    q, k, v, dout = (Tensor(rng.standard_normal((1, args.heads, args.seq, 64)).astype(np.float32)) for _ in range(4))
    kernel, mask = FusedCpuKernel(), AttentionMask(np.arange(args.seq), np.arange(args.seq), causal=True)

    def call():
        out, lse = kernel.forward(q, k, v, mask, 0.125)
        grads = kernel.backward(q, k, v, dout, lse, lse * 0, mask, 0.125)
        [g.asnumpy() for g in grads]
    return call


def measure(mode: str, args) -> dict:
    call = _kernel_call(mode, args)
    call()                                                            # build, warm up
    start = time.perf_counter()
    call()
    alone = time.perf_counter() - start
    with Counter() as idle:                                           # the thread's rate with nothing else
        time.sleep(alone)
    with Counter() as busy:
        start = time.perf_counter()
        call()
        beside = time.perf_counter() - start
    return {"mode": mode, "seq": args.seq, "threads": args.threads, "alone_ms": round(alone * 1e3, 1),
            "kernel_ms": round(beside * 1e3, 1),
            "progress": round((busy.count / beside) / (idle.count / alone), 3)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="kernel threads (runtime_num_threads)")
    parser.add_argument("--mode", choices=("async", "blocking", "numpy"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:                                                     # one mode per process (blocking is global)
        import json
        import mindspore as ms
        ms.set_device("CPU")
        ms.set_context(mode=ms.PYNATIVE_MODE, runtime_num_threads=args.threads)
        print("RESULT " + json.dumps(measure(args.mode, args)), flush=True)
        return
    import json
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), GLOG_v="3",
               PYTHONPATH=f"{HERE.parent}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    rows = []
    for mode in ("async", "blocking", "numpy"):
        out = subprocess.run([sys.executable, __file__, "--mode", mode, "--seq", str(args.seq), "--heads",
                              str(args.heads), "--threads", str(args.threads)], capture_output=True, text=True,
                             env=env, check=True).stdout
        rows += [json.loads(line.split("RESULT ", 1)[1]) for line in out.splitlines() if "RESULT " in line]
    sys.path.insert(0, str(HERE))
    from bench_table import write_table
    write_table(rows, "pynative_gil.csv")


if __name__ == "__main__":
    main()
