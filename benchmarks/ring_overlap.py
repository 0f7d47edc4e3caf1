"""Ring attention overlap on CPU: one ring step (forward + backward, CP = 2, msrun) against its compute alone and
its transfers alone, and the bytes in flight.

    python benchmarks/ring_overlap.py                         # S = 4096 and 8192, 2 ranks, 1 thread per rank
    python benchmarks/ring_overlap.py --seq 8192 --threads 1 --steps 7 --warmup 2

Per rank and S, each after ``--warmup`` untimed runs, the median of ``--steps`` timed runs (every run starts
after a world all-reduce, ends when its results are on the host):

* ring: ``context_parallel_attention`` forward + backward (the ring starts the next K/V, and in backward the
  dK/dV, transfer before computing the current block, then waits),
* compute: the same kernel calls on this rank's blocks, no transfer,
* transfer: the same ring shifts (R-1 K/V forward, R-1 K/V + R dK/dV backward), no compute.

overlap = (compute + transfer - ring) / min(compute, transfer): 0 when the ring costs the sum of its parts, 1
when the shorter part is hidden entirely.  ``peak_in_flight`` is the largest number of logical bytes started and
not yet waited for (``CommStats``); ``step_bytes`` all logical bytes of one step.  Prints a table (the slowest
rank per S) and writes benchmarks/results/ring_overlap.csv.  Thread counts are set explicitly (MindSpore's
runtime_num_threads and OMP_NUM_THREADS); timings on a shared host are noisy: compare columns of one run only.
"""
import argparse
import csv
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
CP = 2


# --------------------------------------------------------------------------------------------------- worker side
def _median_seconds(fn, warmup: int, steps: int, barrier) -> float:
    times = []
    for i in range(warmup + steps):
        barrier()
        start = time.perf_counter()
        fn()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return float(np.median(times))


def measure(seq_len: int, args, mesh) -> dict:
    import mindspore as ms
    from mindspore import Tensor, ops
    from mf_longseq.attention import BlockwiseKernel, context_parallel_attention, ring_masks
    from mf_longseq.attention.kernel import default_scale
    from mf_longseq.parallel.comm import all_reduce_world, ring_shift
    group, local = mesh.group("ring"), seq_len // CP
    rng = np.random.default_rng(mesh.rank)
    shape_q, shape_kv = (1, local, args.heads, args.head_dim), (1, local, args.kv_heads, args.head_dim)
    q, dout = (Tensor(rng.standard_normal(shape_q).astype(np.float32)) for _ in range(2))
    k, v = (Tensor(rng.standard_normal(shape_kv).astype(np.float32)) for _ in range(2))
    kernel, scale = BlockwiseKernel(args.block), default_scale(args.head_dim)
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

    row = {"seq_len": seq_len, "rank": mesh.rank, "threads": args.threads}
    for name, fn in (("compute", compute), ("transfer", transfer), ("ring", ring)):
        row[f"{name}_s"] = _median_seconds(fn, args.warmup, args.steps, barrier)
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
    init()
    mesh = Mesh(cp=CP).create_groups()
    for seq_len in args.seq:
        print("RESULT " + json.dumps(measure(seq_len, args, mesh)), flush=True)


# --------------------------------------------------------------------------------------------------- driver side
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(args, workdir: str):
    env = dict(os.environ, PYTHONPATH=f"{HERE.parent}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               LOCAL_DEFAULT_PATH=os.path.join(workdir, "mfout"), GLOG_v="3", OMP_NUM_THREADS=str(args.threads),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    log_dir = os.path.join(workdir, "log")
    cmd = ["msrun", "--worker_num", str(CP), "--local_worker_num", str(CP), "--master_port", str(_free_port()),
           "--log_dir", log_dir, "--join", "True", __file__, "--as-worker", "--threads", str(args.threads),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--block", str(args.block),
           "--heads", str(args.heads), "--kv-heads", str(args.kv_heads), "--head-dim", str(args.head_dim),
           "--seq", *map(str, args.seq)]
    subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=workdir, check=True)
    return [json.loads(line.split("RESULT ", 1)[1]) for log in sorted(Path(log_dir).glob("worker_*.log"))
            for line in log.read_text().splitlines() if "RESULT " in line]


def report(rows):
    table = []
    for s in sorted({r["seq_len"] for r in rows}):
        slowest = max((r for r in rows if r["seq_len"] == s), key=lambda r: r["ring_s"])
        c, t, ring = slowest["compute_s"], slowest["transfer_s"], slowest["ring_s"]
        table.append({"seq_len": s, "cp": CP, "threads": slowest["threads"], "compute_ms": round(c * 1e3, 1),
                      "transfer_ms": round(t * 1e3, 1), "ring_ms": round(ring * 1e3, 1),
                      "sum_ms": round((c + t) * 1e3, 1), "overlap": round((c + t - ring) / min(c, t), 3),
                      "peak_in_flight_mib": round(slowest["peak_in_flight"] / 2**20, 3),
                      "step_mib": round(slowest["step_bytes"] / 2**20, 3)})
    return table


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seq", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--threads", type=int, default=1, help="CPU kernel threads per rank")
    parser.add_argument("--steps", type=int, default=5, help="timed runs per measurement (median)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--block", type=int, default=1024)
    parser.add_argument("--as-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.as_worker:
        return worker_main(args)
    table = report(launch(args, tempfile.mkdtemp(prefix="mfls_overlap_")))
    cols = list(table[0])
    print(" | ".join(cols))
    for row in table:
        print(" | ".join(str(row[c]) for c in cols))
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    with open(out / "ring_overlap.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=cols)
        writer.writeheader()
        writer.writerows(table)
    print(f"wrote {out / 'ring_overlap.csv'}")
    return None


if __name__ == "__main__":
    main()
