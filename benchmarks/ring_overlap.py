"""Ring attention overlap on CPU: one ring step (forward + backward, CP = 2, msrun) against its compute alone and
its transfers alone, and the bytes in flight.

    python benchmarks/ring_overlap.py                         # S = 2048 and 4096, 2 ranks, 1 thread per rank
    python benchmarks/ring_overlap.py --seq 8192 --threads 1 --steps 7 --warmup 2 --dispatch async
    python benchmarks/ring_overlap.py --link-gbps 1           # transfers paced to a 1 Gbit/s link

The ring's K/V (and dK/dV) transfers run on the host transport's threads (``parallel/host_p2p.py``, TCP between
the ranks) while the kernel of the current block runs.  Per rank, dispatch mode and S, after ``--warmup`` untimed
rounds, the median of ``--steps`` timed rounds; a round runs each of the four below once, in turn (so a change of
host load hits all four), each starting after a world all-reduce and ending when its results are on the host:

* ring: ``context_parallel_attention`` forward + backward (the ring starts the next K/V, and in backward the
  dK/dV, transfer before computing the current block, then waits),
* ring_serial: the same, but every transfer is waited for right after it is started, before the block's compute
  is issued: no overlap,
* compute: the same kernel calls on this rank's blocks, no transfer,
* transfer: the same ring shifts (R-1 K/V forward, R-1 K/V + R dK/dV backward), no compute.

Definitions: saved = 1 - ring / ring_serial (the share of the step the overlap saves); overlap =
(ring_serial - ring) / min(compute, transfer): the fraction of the shorter part hidden (0: none, 1: all; noise
makes it a rough figure when min(compute, transfer) is a few percent of the step).  The ring's schedule can hide
at most (3R - 3) / (3R - 2) of its shifts (3/4 at R = 2): R - 1 K/V shifts forward and R - 1 K/V + R dK/dV
shifts backward, all of one size, and the last dK/dV shift (home) has no block left to hide behind.  ``peak_in_flight`` is the
largest number of logical bytes started and not yet waited for (``CommStats``); ``step_bytes`` all logical bytes
one rank sends in a step.

``--dispatch``: ``async`` is PyNative's default (ops run on MindSpore's executor thread); ``blocking``
(``ms.runtime.launch_blocking()``) runs them on the Python thread; one msrun launch per mode.
``--link-gbps`` > 0 paces every message to that link rate (a sleep before it is sent: no CPU, no GIL), to show
what overlap hides when the network is slower than this host's loopback.  ``--kernel`` is the local kernel
(default: the CPU kernel of ``select_kernel``, the fused C++ one).  Prints a table (the slowest rank per row)
and writes benchmarks/results/ring_overlap.csv.  Thread counts are set explicitly (MindSpore's
runtime_num_threads and OMP_NUM_THREADS); timings on a shared host are noisy: compare columns of one run only.
"""
import argparse
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
CP = 2


# --------------------------------------------------------------------------------------------------- worker side
def _medians(fns: dict, warmup: int, steps: int, barrier) -> dict:
    """Median seconds of each function, run in turn per round (rounds after ``warmup``)."""
    times = {name: [] for name in fns}
    for i in range(warmup + steps):
        for name, fn in fns.items():
            barrier()
            start = time.perf_counter()
            fn()
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: float(np.median(t)) for name, t in times.items()}


def _serial_shifts():
    """A ring_shift_start whose transfer is finished on the host before it returns (no overlap)."""
    from mf_longseq.parallel import comm

    def start(x, group, offset: int = 1):
        received = comm.ring_shift_start(x, group, offset).wait()
        received.asnumpy()
        return comm.Pending(lambda: received)
    return start


def _kernel(args):
    from mf_longseq.attention import BlockwiseKernel
    from mf_longseq.attention.select import select_kernel
    return BlockwiseKernel(args.block) if args.kernel == "blockwise" else select_kernel("CPU", args.block)


def measure(seq_len: int, args, mesh) -> dict:
    import mindspore as ms
    from mindspore import Tensor, ops
    from mf_longseq.attention import context_parallel_attention, ring_masks
    from mf_longseq.attention.kernel import default_scale
    from mf_longseq.attention import ring as ring_module
    from mf_longseq.parallel.comm import all_reduce_world, ring_shift
    group, local = mesh.group("ring"), seq_len // CP
    rng = np.random.default_rng(mesh.rank)
    shape_q, shape_kv = (1, local, args.heads, args.head_dim), (1, local, args.kv_heads, args.head_dim)
    q, dout = (Tensor(rng.standard_normal(shape_q).astype(np.float32)) for _ in range(2))
    k, v = (Tensor(rng.standard_normal(shape_kv).astype(np.float32)) for _ in range(2))
    kernel, scale = _kernel(args), default_scale(args.head_dim)
    masks = ring_masks(seq_len, mesh, "zigzag", True)
    barrier = lambda: all_reduce_world(Tensor(np.zeros(1, np.float32))).asnumpy()     # noqa: E731

    def loss(q_, k_, v_):
        return (context_parallel_attention(q_, k_, v_, mesh=mesh, kernel=kernel) * dout).sum()
    grad = ms.grad(loss, grad_position=(0, 1, 2))

    def ring():
        [g.asnumpy() for g in grad(q, k, v)]

    bnsd = [x.transpose(0, 2, 1, 3) for x in (q, k, v, dout)]
    qb, kb, vb, db = bnsd
    lse_like = ops.zeros((1, args.heads, local), ms.float32)

    def compute():
        outs = []
        for j in range(CP):
            if any(row for _, _, row in masks[j].plan(args.block)):
                out, lse = kernel.forward(qb, kb, vb, masks[j], scale)
                outs += [out, *kernel.backward(qb, kb, vb, db, lse, lse_like, masks[j], scale)]
        [o.asnumpy() for o in outs]

    kv = ops.stack([kb, vb])
    dkv = ops.zeros(kv.shape, ms.float32)

    def transfer():
        moved = [ring_shift(kv, group) for _ in range(2 * (CP - 1))] + [ring_shift(dkv, group) for _ in range(CP)]
        [m.asnumpy() for m in moved]

    overlapped, serial = ring_module.ring_shift_start, _serial_shifts()

    def ring_serial():
        ring_module.ring_shift_start = serial
        try:
            ring()
        finally:
            ring_module.ring_shift_start = overlapped

    fns = {"compute": compute, "transfer": transfer, "ring": ring, "ring_serial": ring_serial}
    row = {"seq_len": seq_len, "rank": mesh.rank, "threads": args.threads, "dispatch": args.dispatch,
           "kernel": kernel.name, "link_gbps": args.link_gbps}
    row.update({f"{name}_s": seconds for name, seconds in _medians(fns, args.warmup, args.steps, barrier).items()})
    mesh.stats.reset()
    ring()
    row["peak_in_flight"] = mesh.stats.peak_in_flight_bytes
    row["step_bytes"] = mesh.stats.total("logical")
    return row


def worker_main(args):
    import mindspore as ms
    from mindspore.communication import init
    from mf_longseq.parallel import Mesh
    ms.set_device("CPU")
    ms.set_context(mode=ms.PYNATIVE_MODE, runtime_num_threads=args.threads)
    if args.dispatch == "blocking":
        ms.runtime.launch_blocking()
    init()
    mesh = Mesh(cp=CP).create_groups()
    if args.link_gbps > 0:
        from mf_longseq.parallel import host_p2p
        host_p2p.transport().pace_bytes_per_s = args.link_gbps * 1e9 / 8
    for seq_len in args.seq:
        print("RESULT " + json.dumps(measure(seq_len, args, mesh)), flush=True)


# --------------------------------------------------------------------------------------------------- driver side
def launch(args, dispatch: str, workdir: str):
    from mf_longseq.tools.msrun import free_port, msrun_command, msrun_env
    env = msrun_env(dict(os.environ, LOCAL_DEFAULT_PATH=os.path.join(workdir, "mfout"), GLOG_v="3",
                         OMP_NUM_THREADS=str(args.threads)), root=HERE.parent)
    log_dir = os.path.join(workdir, f"log_{dispatch}")
    cmd = msrun_command([__file__, "--as-worker", "--threads", args.threads, "--steps", args.steps, "--warmup",
                         args.warmup, "--block", args.block, "--heads", args.heads, "--kv-heads", args.kv_heads,
                         "--head-dim", args.head_dim, "--kernel", args.kernel, "--dispatch", dispatch,
                         "--link-gbps", args.link_gbps, "--seq", *args.seq],
                        worker_num=CP, master_port=free_port(), log_dir=log_dir, guard=False)
    subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=workdir, check=True)
    return [json.loads(line.split("RESULT ", 1)[1]) for log in sorted(Path(log_dir).glob("worker_*.log"))
            for line in log.read_text().splitlines() if "RESULT " in line]


def report(rows):
    table = []
    for key in sorted({(r["dispatch"], r["seq_len"]) for r in rows}):
        slowest = max((r for r in rows if (r["dispatch"], r["seq_len"]) == key), key=lambda r: r["ring_s"])
        c, t, ring, serial = (slowest[f"{k}_s"] for k in ("compute", "transfer", "ring", "ring_serial"))
        table.append({"seq_len": key[1], "cp": CP, "dispatch": key[0], "kernel": slowest["kernel"],
                      "threads": slowest["threads"], "link_gbps": slowest["link_gbps"],
                      "compute_ms": round(c * 1e3, 1),
                      "transfer_ms": round(t * 1e3, 1), "ring_ms": round(ring * 1e3, 1),
                      "ring_serial_ms": round(serial * 1e3, 1), "saved": round(1 - ring / serial, 3),
                      "overlap": round((serial - ring) / min(c, t), 3),
                      "peak_in_flight_mib": round(slowest["peak_in_flight"] / 2**20, 3),
                      "step_mib": round(slowest["step_bytes"] / 2**20, 3)})
    return table


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seq", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--threads", type=int, default=1, help="CPU kernel threads per rank")
    parser.add_argument("--steps", type=int, default=5, help="timed runs per measurement (median)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--block", type=int, default=1024)
    parser.add_argument("--kernel", choices=("fused", "blockwise"), default="fused",
                        help="local kernel: select_kernel's CPU kernel (fused C++) or BlockwiseKernel")
    parser.add_argument("--dispatch", nargs="+", choices=("async", "blocking"), default=["async", "blocking"],
                        help="PyNative dispatch modes to measure (one msrun launch each)")
    parser.add_argument("--link-gbps", type=float, default=0.0,
                        help="pace the host transport to this link rate in Gbit/s (0: as fast as loopback)")
    parser.add_argument("--as-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.as_worker:
        args.dispatch = args.dispatch[0]
        return worker_main(args)
    from bench_table import write_table
    workdir = tempfile.mkdtemp(prefix="mfls_overlap_")
    rows = [row for dispatch in args.dispatch for row in launch(args, dispatch, workdir)]
    name = "ring_overlap.csv" if args.link_gbps <= 0 else f"ring_overlap_{args.link_gbps:g}gbps.csv"
    write_table(report(rows), name)
    return None


if __name__ == "__main__":
    main()
