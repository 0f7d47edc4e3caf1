"""Local attention kernels side by side, one process, same inputs: the fused CPU kernel, the blockwise reference
kernel and torch's ``F.scaled_dot_product_attention`` (CPU flash attention), forward + backward.

    python benchmarks/kernel_bench.py                                  # S 4k..32k, kv heads 8 and 2, 2 threads
    python benchmarks/kernel_bench.py --seq 4096 8192 --kv-heads 8 --steps 3 --blockwise-max-seq 8192

Shapes: B = 1, 8 query heads, D = 64, causal, float32 (q (B, N, S, D), k/v (B, K, S, D)).  Every (S, kv heads,
implementation) runs in a fresh process with the thread count set explicitly (MindSpore runtime_num_threads,
torch.set_num_threads, OMP_NUM_THREADS): one warm-up step, then the median of ``--steps`` steps.  Memory is the
steady-state extra peak: VmHWM over the warm-up and all steps (``train.monitor.peak_rss_mib``) minus the RSS
once the inputs exist.  GFLOP/s counts unmasked FLOPs only: 12 * D * N * visible (query, key) pairs per step
(forward 2 matmuls, backward 4).  ``*_cpu_s`` is the process CPU time of a step (all threads): on a shared,
oversubscribed machine the wall-time ratio carries the load, the CPU-time ratio the work.  MindSpore ops are
dispatched as in training (``train.context.configure_op_dispatch``: synchronously on CPU); ``fused_cpu_async``
(not in the default set) is the fused kernel under PyNative's asynchronous dispatch, whose Python thread
busy-waits (AsyncRQueue::Wait) beside the kernel's threads.  Prints a table and writes
benchmarks/results/kernel.csv.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from bench_table import write_table

HERE = Path(__file__).resolve().parent
IMPLS = ("fused_cpu", "blockwise", "torch_sdpa", "fused_cpu_async")
DEFAULT_IMPLS = IMPLS[:3]


# --------------------------------------------------------------------------------------------------- worker side
def _inputs(args):
    rng = np.random.default_rng(0)
    n, kv, s, d = args.heads, args.kv, args.seq, args.head_dim
    return [rng.standard_normal(shape).astype(np.float32)
            for shape in ((1, n, s, d), (1, kv, s, d), (1, kv, s, d), (1, n, s, d))]


def _mindspore_step(args, arrays):
    """A function running one forward + backward of the MindSpore kernel ``args.impl``."""
    import mindspore as ms
    from mindspore import Tensor
    from mf_longseq.attention.kernel import BlockwiseKernel, LocalAttention, default_scale
    from mf_longseq.attention.cpu_fused import FusedCpuKernel
    from mf_longseq.attention.mask import AttentionMask
    from mf_longseq.train.context import configure_op_dispatch
    ms.set_device("CPU")
    ms.set_context(runtime_num_threads=args.threads)
    if args.impl != "fused_cpu_async":
        configure_op_dispatch("CPU")                           # as training does: ops on the Python thread
    q, k, v, dout = (Tensor(a) for a in arrays)
    pos = np.arange(args.seq)
    kernel = FusedCpuKernel() if args.impl.startswith("fused_cpu") else BlockwiseKernel(args.block)
    cell = LocalAttention(kernel, AttentionMask(pos, pos, True), default_scale(args.head_dim))
    # dout enters as the output's gradient (sens), as torch's out.backward(dout) does; lse gets a zero gradient.
    grad = ms.ops.GradOperation(get_all=True, sens_param=True)(cell)
    sens = (dout, ms.ops.zeros(tuple(q.shape[:3]), ms.float32))

    def step():
        for g in grad(q, k, v, sens):
            g.asnumpy()                                        # shares the tensor's memory (no copy)
    return step


def _torch_step(args, arrays):
    import torch
    torch.set_num_threads(args.threads)
    q, k, v = (torch.from_numpy(a).requires_grad_() for a in arrays[:3])
    dout = torch.from_numpy(arrays[3])

    def step():
        for t in (q, k, v):
            t.grad = None
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                               enable_gqa=args.kv != args.heads)
        out.backward(dout)
    return step


def worker(args):
    from mf_longseq.train.monitor import peak_rss_mib, rss_mib
    arrays = _inputs(args)
    step = _torch_step(args, arrays) if args.impl == "torch_sdpa" else _mindspore_step(args, arrays)
    baseline = rss_mib()
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")                                        # VmHWM := current RSS
    times, cpu = [], []
    for i in range(args.warmup + args.steps):
        start, start_cpu = time.perf_counter(), time.process_time()
        step()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
    print("RESULT " + json.dumps({"impl": args.impl, "seq_len": args.seq, "kv_heads": args.kv,
                                  "seconds": statistics.median(times), "all_seconds": times,
                                  "cpu_seconds": statistics.median(cpu),
                                  "extra_peak_mib": peak_rss_mib() - baseline}), flush=True)


# --------------------------------------------------------------------------------------------------- driver side
def run_one(args, impl, seq, kv):
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), GLOG_v="3",
               PYTHONPATH=f"{HERE.parent}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    steps = args.steps if impl != "blockwise" else min(args.steps, 2)
    cmd = [sys.executable, __file__, "--worker", "--impl", impl, "--seq", str(seq), "--kv", str(kv),
           "--threads", str(args.threads), "--steps", str(steps), "--warmup", str(args.warmup),
           "--heads", str(args.heads), "--head-dim", str(args.head_dim), "--block", str(args.block)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=args.workdir)
    rows = [json.loads(line.split("RESULT ", 1)[1]) for line in proc.stdout.splitlines() if "RESULT " in line]
    if proc.returncode != 0 or not rows:
        raise RuntimeError(f"{impl} S={seq} kv={kv} failed:\n{proc.stderr[-3000:]}")
    return rows[0]


def table_rows(results, args):
    """One row per (S, kv heads): each implementation's time, GFLOP/s and memory; fused / torch ratios."""
    from mf_longseq.attention.mask import AttentionMask
    rows = []
    for seq, kv in sorted({(r["seq_len"], r["kv_heads"]) for r in results}):
        pos = np.arange(seq)
        flops = 12 * args.head_dim * args.heads * AttentionMask(pos, pos, True).visible_pairs()
        by = {r["impl"]: r for r in results if (r["seq_len"], r["kv_heads"]) == (seq, kv)}
        row = {"seq_len": seq, "kv_heads": kv, "threads": args.threads}
        for impl in args.impls:
            r = by.get(impl)
            row[f"{impl}_s"] = round(r["seconds"], 3) if r else ""
            row[f"{impl}_cpu_s"] = round(r["cpu_seconds"], 3) if r else ""
            row[f"{impl}_gflops"] = round(flops / r["seconds"] / 1e9, 1) if r else ""
            row[f"{impl}_mib"] = round(r["extra_peak_mib"], 1) if r else ""
        if by.get("fused_cpu") and by.get("fused_cpu_async"):
            row["time_async_over_sync"] = round(by["fused_cpu_async"]["seconds"] / by["fused_cpu"]["seconds"], 3)
        fused, torch_ = by.get("fused_cpu"), by.get("torch_sdpa")
        if fused and torch_:
            row["time_fused_over_torch"] = round(fused["seconds"] / torch_["seconds"], 3)
            row["cpu_fused_over_torch"] = round(fused["cpu_seconds"] / torch_["cpu_seconds"], 3)
            row["mem_fused_over_torch"] = round(fused["extra_peak_mib"] / max(torch_["extra_peak_mib"], 1.0), 3)
        if fused and by.get("blockwise"):
            row["speedup_over_blockwise"] = round(by["blockwise"]["seconds"] / fused["seconds"], 2)
        rows.append(row)
    return rows


def growth_exponents(rows):
    """Slope of log(extra peak MiB) against log(S) per (implementation, kv heads): 1.0 = linear."""
    out = {}
    for kv in sorted({r["kv_heads"] for r in rows}):
        for impl in sorted({k.rsplit("_", 1)[0] for k in rows[0] if k.endswith("_mib")}):
            pts = [(r["seq_len"], r[f"{impl}_mib"]) for r in rows if r["kv_heads"] == kv and r[f"{impl}_mib"] != ""
                   and r[f"{impl}_mib"] > 0]
            if len(pts) >= 2:
                out[(impl, kv)] = float(np.polyfit(np.log([p[0] for p in pts]), np.log([p[1] for p in pts]), 1)[0])
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seq", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    parser.add_argument("--kv-heads", type=int, nargs="+", default=[8, 2])
    parser.add_argument("--impls", nargs="+", default=list(DEFAULT_IMPLS), choices=IMPLS)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="timed steps after the warm-up (median reported)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--blockwise-max-seq", type=int, default=16384, help="skip the slow reference above this S")
    parser.add_argument("--csv", default="kernel.csv", help="file name under benchmarks/results/")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--block", type=int, default=2048, help="blockwise kernel tile")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--impl", help=argparse.SUPPRESS)
    parser.add_argument("--kv", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.seq = args.seq[0]
        return worker(args)
    args.workdir = os.environ.get("TMPDIR", "/tmp")
    results = []
    for seq in args.seq:
        for kv in args.kv_heads:
            for impl in args.impls:                            # interleaved: load drift hits all three alike
                if impl == "blockwise" and seq > args.blockwise_max_seq:
                    continue
                results.append(run_one(args, impl, seq, kv))
                print(f"  {impl:10s} S={seq:6d} kv={kv}: {results[-1]['seconds']:.2f} s, "
                      f"{results[-1]['cpu_seconds']:.2f} CPU-s, +{results[-1]['extra_peak_mib']:.0f} MiB", flush=True)
    rows = table_rows(results, args)
    write_table(rows, args.csv)
    for (impl, kv), slope in growth_exponents(rows).items():
        print(f"memory growth exponent {impl} kv={kv}: {slope:.2f}")


if __name__ == "__main__":
    main()
