"""Context-parallel attention forward + backward: CP = 2 (ring, Ulysses) against CP = 1, per-rank time and
steady-state peak memory, every rank on a fixed number of threads.

    python benchmarks/attention_bench.py                      # S 4k..32k, kv heads 8 and 2, CP 1 and 2, 1 thread
    python benchmarks/attention_bench.py --seq 8192 16384 --kv-heads 8 --cp 1 2 --steps 3

Shapes: B = 1, ``--heads`` query heads (8), ``--kv-heads`` kv heads, D = 64, causal, zigzag layout, float32.
CP = 1 is one process; CP > 1 is one msrun launch of CP CPU workers per (S, kv heads, algorithm).  Every
process sets ``runtime_num_threads`` (and OMP_NUM_THREADS) to ``--threads``, runs one warm-up step and reports the
median of ``--steps`` steps; a case's time is the maximum over its ranks.  Memory is the steady-state extra peak
per rank: VmHWM over all steps (``train.monitor.peak_rss_mib``) minus the RSS once the inputs exist.
The kernel is ``select_kernel("CPU")`` (the fused kernel) unless ``--kernel blockwise``; ops are dispatched as in
training (``train.context.configure_op_dispatch``: synchronously on CPU) unless ``--async-dispatch``, and msrun
workers are bound to their own cores as in training (``train.context.bind_rank_cores``).
``time_vs_cp1`` = per-rank time / CP = 1 time at the same S (ideal 1/CP); ``cpu_vs_cp1`` the same for the CPU
time of the rank's process (threads included): on a shared, oversubscribed machine it shows the split of the work
where wall time mostly shows the load.  GFLOP/s counts unmasked FLOPs:
12 * D * heads * visible (query, key) pairs, per step, divided by the case's time.
Prints a table and writes benchmarks/results/attention.csv.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench_table import write_table

HERE = Path(__file__).resolve().parent
ALGOS = {1: ["local"], 2: ["colossalai_cp", "ulysses_cp"], 4: ["colossalai_cp", "ulysses_cp", "hybrid_cp"]}


# --------------------------------------------------------------------------------------------------- worker side
def run_case(args, mesh):
    """Warm-up + ``args.steps`` timed steps on this rank; returns its result row."""
    import mindspore as ms
    from mindspore import Tensor
    from mf_longseq.attention import BlockwiseKernel, context_parallel_attention, select_kernel
    from mf_longseq.train.monitor import peak_rss_mib, rss_mib
    local = args.seq // mesh.cp
    rng = np.random.default_rng(0)
    q, dout = (Tensor(rng.standard_normal((1, local, args.heads, args.head_dim)).astype(np.float32))
               for _ in range(2))
    k, v = (Tensor(rng.standard_normal((1, local, args.kv, args.head_dim)).astype(np.float32)) for _ in range(2))
    kernel = BlockwiseKernel(args.block) if args.kernel == "blockwise" else select_kernel("CPU", args.block)
    algo = "colossalai_cp" if args.algo == "local" else args.algo
    fn = ms.grad(lambda a, b, c: (context_parallel_attention(a, b, c, mesh=mesh, algo=algo, kernel=kernel,
                                                             layout="zigzag") * dout).sum(), grad_position=(0, 1, 2))
    baseline = rss_mib()
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")                                        # VmHWM := current RSS
    times, cpu = [], []
    for i in range(args.warmup + args.steps):
        mesh.stats.reset()
        start, start_cpu = time.perf_counter(), time.process_time()
        _ = [g.asnumpy() for g in fn(q, k, v)]
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
    return {"seq_len": args.seq, "kv_heads": args.kv, "cp": mesh.cp, "algo": args.algo, "rank": mesh.rank,
            "kernel": kernel.name, "seconds": statistics.median(times), "all_seconds": times,
            "cpu_seconds": statistics.median(cpu),
            "peak_mib": peak_rss_mib() - baseline, "logical_bytes": mesh.stats.total("logical")}


def worker_main(args):
    import mindspore as ms
    from mf_longseq.parallel import Mesh
    from mf_longseq.train.context import bind_rank_cores, configure_op_dispatch
    ms.set_device("CPU")
    ms.set_context(runtime_num_threads=args.threads)
    if not args.async_dispatch:
        configure_op_dispatch("CPU")
    if args.cp > 1:
        from mindspore.communication import init
        init()
        ulysses = {"colossalai_cp": 1, "ulysses_cp": args.cp, "hybrid_cp": 2}[args.algo]
        mesh = Mesh(cp=args.cp, ulysses=ulysses).create_groups()
        bind_rank_cores("CPU")                                 # as training does (train.context.setup)
    else:
        mesh = Mesh(cp=1, rank=0)
    print("RESULT " + json.dumps(run_case(args, mesh)), flush=True)


# --------------------------------------------------------------------------------------------------- driver side
def _results(text: str):
    return [json.loads(line.split("RESULT ", 1)[1]) for line in text.splitlines() if "RESULT " in line]


def launch(args, cp, seq, kv, algo, workdir):
    """One fresh process (CP = 1) or msrun launch (CP > 1); returns the ranks' result rows."""
    common = ["--seq", str(seq), "--kv", str(kv), "--algo", algo, "--cp", str(cp), "--heads", str(args.heads),
              "--head-dim", str(args.head_dim), "--block", str(args.block), "--threads", str(args.threads),
              "--steps", str(args.steps), "--warmup", str(args.warmup), "--kernel", args.kernel, "--as-worker"]
    common += ["--async-dispatch"] if args.async_dispatch else []
    from mf_longseq.tools.msrun import free_port, msrun_command, msrun_env
    env = msrun_env(dict(os.environ, LOCAL_DEFAULT_PATH=os.path.join(workdir, "mfout"), GLOG_v="3",
                         OMP_NUM_THREADS=str(args.threads)), root=HERE.parent)
    if cp == 1:
        proc = subprocess.run([sys.executable, __file__, *common], capture_output=True, text=True, env=env,
                              cwd=workdir)
        if proc.returncode != 0:
            raise RuntimeError(f"CP=1 S={seq} kv={kv} failed:\n{proc.stderr[-3000:]}")
        return _results(proc.stdout)
    log_dir = os.path.join(workdir, f"log_cp{cp}_{seq}_{kv}_{algo}")
    cmd = msrun_command([__file__, *common], worker_num=cp, master_port=free_port(), log_dir=log_dir, guard=False)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=workdir)
    rows = [row for log in sorted(Path(log_dir).glob("worker_*.log")) for row in _results(log.read_text())]
    if proc.returncode != 0 or len(rows) != cp:
        raise RuntimeError(f"CP={cp} {algo} S={seq} kv={kv} failed; logs in {log_dir}")
    return rows


def report(rows, args):
    """One row per (S, kv heads, CP, algorithm): max over ranks of time and memory, ratios to CP = 1."""
    from mf_longseq.attention.mask import AttentionMask
    key = lambda r: (r["seq_len"], r["kv_heads"], r["cp"], r["algo"])            # noqa: E731
    cases = {}
    for r in rows:
        cases.setdefault(key(r), []).append(r)
    table = []
    for (seq, kv, cp, algo), ranks in sorted(cases.items()):
        seconds, peak = max(r["seconds"] for r in ranks), max(r["peak_mib"] for r in ranks)
        cpu = max(r["cpu_seconds"] for r in ranks)
        base = cases.get((seq, kv, 1, "local"))
        pos = np.arange(seq)
        flops = 12 * args.head_dim * args.heads * AttentionMask(pos, pos, True).visible_pairs()
        table.append({"seq_len": seq, "kv_heads": kv, "cp": cp, "algo": algo, "kernel": ranks[0]["kernel"],
                      "threads_per_rank": args.threads, "seconds_per_rank": round(seconds, 3),
                      "time_vs_cp1": round(seconds / max(r["seconds"] for r in base), 3) if base else "",
                      "cpu_s_per_rank": round(cpu, 3),
                      "cpu_vs_cp1": round(cpu / max(r["cpu_seconds"] for r in base), 3) if base else "",
                      "peak_mib_per_rank": round(peak, 1),
                      "mem_vs_cp1": round(peak / max(r["peak_mib"] for r in base), 3) if base else "",
                      "gflops_total": round(flops / seconds / 1e9, 1),
                      "comm_mib_per_rank": round(max(r["logical_bytes"] for r in ranks) / 2**20, 2)})
    return table


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seq", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    parser.add_argument("--kv-heads", type=int, nargs="+", default=[8, 2])
    parser.add_argument("--cp", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--threads", type=int, default=1, help="CPU threads of every process (rank)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps after the warm-up (median reported)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--kernel", choices=["fused", "blockwise"], default="fused")
    parser.add_argument("--async-dispatch", action="store_true",
                        help="keep PyNative's asynchronous dispatch (the Python thread busy-waits beside the kernel)")
    parser.add_argument("--csv", default="attention.csv", help="file name under benchmarks/results/")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--block", type=int, default=2048)
    parser.add_argument("--algo", default="local", help=argparse.SUPPRESS)
    parser.add_argument("--kv", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--as-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.as_worker:
        args.seq, args.cp = args.seq[0], args.cp[0]
        return worker_main(args)
    workdir = tempfile.mkdtemp(prefix="mfls_bench_")
    rows = []
    for seq in args.seq:
        for kv in args.kv_heads:
            for cp in args.cp:                                 # interleaved: load drift hits every CP alike
                for algo in ALGOS[cp]:
                    rows += launch(args, cp, seq, kv, algo, workdir)
                    print(f"  S={seq} kv={kv} CP={cp} {algo}: {max(r['seconds'] for r in rows[-cp:]):.2f} s",
                          flush=True)
    write_table(report(rows, args), args.csv)


if __name__ == "__main__":
    main()
