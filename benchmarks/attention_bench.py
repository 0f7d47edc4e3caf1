"""Context-parallel attention forward + backward, ours beside the peers in one run: CP = 2 (ring, Ulysses) and
CP = 1, against torch SDPA, a torch ring and DeepSpeed Ulysses (``peer_attention.py``; ``.[bench]`` extra).

    python benchmarks/attention_bench.py                      # S 16k and 32k, kv heads 8 and 2, CP 1 and 2, peers
    python benchmarks/attention_bench.py --seq 16384 --kv-heads 8 --steps 3 --no-peers

Shapes: B = 1, ``--heads`` query heads (8), ``--kv-heads`` kv heads, D = 64, causal, float32; ours in the zigzag
layout (Ulysses over the host transport unless ``--exchange allgather``).  CP = 1 is one process with
``--cp1-threads`` threads (2); CP > 1 is one launch of CP workers with ``--threads`` (1) each, bound to their own
cores.  Every case runs ``--warmup`` steps and reports the median of ``--steps``; a case's time is the maximum
over its ranks.  A step is forward + backward with dout as the output's gradient (ours: ``GradOperation`` with
``sens_param``; torch: ``out.backward(dout)``), nothing of a step outliving it.  Memory (both sides alike): peak
RSS during the steps (VmHWM, reset before the first) minus the RSS once the inputs exist, per rank.  Every result
is checked against a float64 oracle on sampled rows (``attention_oracle.py``: out, dq, dk, dv; the worst relative
error is printed).  Ops are dispatched as in training (``train.context.configure_op_dispatch``) unless
``--async-dispatch``.  ``time_vs_cp1`` = per-rank time / our CP = 1 time at the same S; ``cpu_vs_cp1`` the same
for CPU time.  GFLOP/s counts unmasked FLOPs: 12 * D * heads * visible (query, key) pairs per step / time.
Prints the table of every case (benchmarks/results/<csv>) and, with the peers, ours against them
(<csv>_peers: time and memory ratios, the least memory of any peer at the same CP, both oracle errors).
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
PEERS = {1: ["torch_sdpa"], 2: ["torch_ring", "ds_ulysses"], 4: ["torch_ring", "ds_ulysses"]}  # peer_attention.py
PEER_OF = {"local": "torch_sdpa", "colossalai_cp": "torch_ring", "ulysses_cp": "ds_ulysses", "hybrid_cp": "torch_ring"}


def _runs(args, cp: int, kv: int):
    """(name, is_peer) of every case at this CP: ours, then the peers (``--algos`` keeps only the named ones;
    DeepSpeed Ulysses needs the kv heads divisible by CP)."""
    ours = [(algo, False) for algo in ALGOS[cp]]
    peers = [(impl, True) for impl in PEERS.get(cp, []) if args.peers and (impl != "ds_ulysses" or kv % cp == 0)]
    return [(name, peer) for name, peer in ours + peers if not args.algos or name in args.algos]


# --------------------------------------------------------------------------------------------------- worker side
def _attention_cell(args, mesh, kernel):
    """A Cell (q, k, v) -> out of our attention for ``args.algo`` (CP = 1: the same call on a one-rank mesh)."""
    from mindspore import nn
    from mf_longseq.attention import context_parallel_attention
    algo = "colossalai_cp" if args.algo == "local" else args.algo

    class Attention(nn.Cell):
        def construct(self, q, k, v):
            return context_parallel_attention(q, k, v, mesh=mesh, algo=algo, kernel=kernel, layout="zigzag",
                                              use_alltoall=args.exchange == "alltoall")
    return Attention()


def run_case(args, mesh):
    """Warm-up + ``args.steps`` timed steps on this rank; returns its result row (and saves its sampled rows).

    A step is forward + backward with ``dout`` as the output's gradient (sens): what torch's ``out.backward(dout)``
    does, so both sides hold the same tensors.
    """
    import mindspore as ms
    from mindspore import Tensor
    from attention_oracle import inputs, reset_peak, save_rows
    from mf_longseq.attention import BlockwiseKernel, select_kernel
    from mf_longseq.parallel import global_positions
    from mf_longseq.train.monitor import peak_rss_mib, rss_mib
    positions = global_positions(args.seq, mesh, "zigzag") if mesh.cp > 1 else np.arange(args.seq)
    q, k, v, dout = (Tensor(np.ascontiguousarray(x[positions])[None]) for x in
                     inputs(args.seq, args.heads, args.kv, args.head_dim))
    kernel = BlockwiseKernel(args.block) if args.kernel == "blockwise" else select_kernel("CPU", args.block)
    cell = _attention_cell(args, mesh, kernel)
    grad = ms.ops.GradOperation(get_all=True, sens_param=True)(cell)
    baseline = rss_mib()
    times, cpu = [], []
    for i in range(args.warmup + args.steps):
        if i == args.warmup:
            reset_peak()                                       # the warm-up (transport connect) is not measured
        mesh.stats.reset()
        start, start_cpu = time.perf_counter(), time.process_time()
        grads = grad(q, k, v, dout)
        for g in grads:
            g.asnumpy()                                        # waits; shares the tensor's memory (no copy)
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
        if i + 1 < args.warmup + args.steps:
            del grads, g                                       # nothing of a step outlives it (the loop's g too)
    peak = peak_rss_mib() - baseline
    out = cell(q, k, v)
    rows = os.path.join(args.rows_dir, f"{args.algo}_{args.seq}_{args.kv}_rank{mesh.rank}.npz")
    save_rows(rows, positions, *(x.asnumpy()[0] for x in (out, *grads)), seq=args.seq)
    return {"seq_len": args.seq, "kv_heads": args.kv, "cp": mesh.cp, "algo": args.algo, "rank": mesh.rank,
            "impl": "ours", "kernel": kernel.name, "seconds": statistics.median(times), "all_seconds": times,
            "cpu_seconds": statistics.median(cpu), "peak_mib": peak, "rows": rows,
            "logical_bytes": mesh.stats.total("logical")}


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
    """The RESULT rows of a worker's output (a line still being written is skipped)."""
    rows = []
    for line in text.splitlines():
        if line.startswith("RESULT "):
            try:
                rows.append(json.loads(line.split("RESULT ", 1)[1]))
            except json.JSONDecodeError:
                pass
    return rows


def _log_rows(log_dir: str, ranks: int):
    """Every rank's RESULT row from its msrun log, re-read for up to 30 s while a log is still being flushed."""
    for _ in range(30):
        rows = [row for log in sorted(Path(log_dir).glob("worker_*.log")) for row in _results(log.read_text())]
        if len(rows) == ranks:
            break
        time.sleep(1)
    return rows


def _env(args, workdir):
    from mf_longseq.tools.msrun import msrun_env
    return msrun_env(dict(os.environ, LOCAL_DEFAULT_PATH=os.path.join(workdir, "mfout"), GLOG_v="3",
                          OMP_NUM_THREADS=str(args.threads)), root=HERE.parent)


def launch(args, cp, seq, kv, algo, workdir):
    """One fresh process (CP = 1) or msrun launch (CP > 1); returns the ranks' result rows."""
    common = ["--seq", str(seq), "--kv", str(kv), "--algo", algo, "--cp", str(cp), "--heads", str(args.heads),
              "--head-dim", str(args.head_dim), "--block", str(args.block), "--threads", str(args.threads),
              "--steps", str(args.steps), "--warmup", str(args.warmup), "--kernel", args.kernel,
              "--exchange", args.exchange, "--rows-dir", args.rows_dir, "--as-worker"]
    common += ["--async-dispatch"] if args.async_dispatch else []
    from mf_longseq.tools.msrun import free_port, msrun_command
    env = _env(args, workdir)
    if cp == 1:
        proc = subprocess.run([sys.executable, __file__, *common], capture_output=True, text=True, env=env,
                              cwd=workdir)
        if proc.returncode != 0:
            raise RuntimeError(f"CP=1 S={seq} kv={kv} failed:\n{proc.stderr[-3000:]}")
        return _results(proc.stdout)
    log_dir = os.path.join(workdir, f"log_cp{cp}_{seq}_{kv}_{algo}")
    cmd = msrun_command([__file__, *common], worker_num=cp, master_port=free_port(), log_dir=log_dir, guard=False)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=workdir)
    rows = _log_rows(log_dir, cp)
    if proc.returncode != 0 or len(rows) != cp:
        raise RuntimeError(f"CP={cp} {algo} S={seq} kv={kv} failed; logs in {log_dir}")
    return rows


def report(rows, args, errors):
    """One row per (S, kv heads, CP, implementation): max over ranks of time and memory, ratios to our CP = 1,
    the worst relative error against the float64 oracle."""
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
                      "comm_mib_per_rank": round(max(r["logical_bytes"] for r in ranks) / 2**20, 2),
                      "oracle_rel_error": f"{errors[(seq, kv, cp, algo)]:.1e}"})
    return table


def compare(table):
    """Ours against the peers, side by side: our ring vs torch ring, Ulysses vs DeepSpeed Ulysses, CP = 1 vs SDPA;
    ``best_peer_mib``: the least memory of any peer at the same CP (ring and Ulysses are both CP = 2 peers)."""
    by = {(r["seq_len"], r["kv_heads"], r["algo"]): r for r in table}
    rows = []
    for (seq, kv, algo), ours in sorted(by.items()):
        peer = by.get((seq, kv, PEER_OF.get(algo)))
        if peer is None:
            continue
        same_cp = [r for r in table if r["seq_len"] == seq and r["kv_heads"] == kv and r["cp"] == ours["cp"]
                   and r["algo"] in PEERS.get(ours["cp"], [])]
        best = min(r["peak_mib_per_rank"] for r in same_cp)
        rows.append({"seq_len": seq, "kv_heads": kv, "cp": ours["cp"], "ours": algo, "ours_s": ours["seconds_per_rank"],
                     "ours_mib": ours["peak_mib_per_rank"], "peer": peer["algo"], "peer_s": peer["seconds_per_rank"],
                     "peer_mib": peer["peak_mib_per_rank"],
                     "time_ratio": round(ours["seconds_per_rank"] / peer["seconds_per_rank"], 2),
                     "mem_ratio": round(ours["peak_mib_per_rank"] / peer["peak_mib_per_rank"], 2),
                     "best_peer_mib": best, "mem_vs_best_peer": round(ours["peak_mib_per_rank"] / best, 2),
                     "oracle_rel_error": f"{ours['oracle_rel_error']} / {peer['oracle_rel_error']}"})
    return rows


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seq", type=int, nargs="+", default=[16384, 32768])
    parser.add_argument("--kv-heads", type=int, nargs="+", default=[8, 2])
    parser.add_argument("--cp", type=int, nargs="+", default=[1, 2], help="1, 2 and/or 4 (4: hybrid 2 x 2)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads of every CP > 1 process (rank)")
    parser.add_argument("--cp1-threads", type=int, default=2, help="CPU threads of the CP = 1 process")
    parser.add_argument("--steps", type=int, default=3, help="timed steps after the warm-up (median reported)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--kernel", choices=["fused", "blockwise"], default="fused")
    parser.add_argument("--exchange", choices=["alltoall", "allgather"], default="alltoall",
                        help="Ulysses exchange (parallel.enable_alltoall True / False)")
    parser.add_argument("--peers", action=argparse.BooleanOptionalAction, default=True,
                        help="run torch SDPA, a torch ring and DeepSpeed Ulysses beside ours (needs .[bench])")
    parser.add_argument("--async-dispatch", action="store_true",
                        help="keep PyNative's asynchronous dispatch (the Python thread busy-waits beside the kernel)")
    parser.add_argument("--csv", default="attention.csv", help="file name under benchmarks/results/")
    parser.add_argument("--algos", nargs="+", default=[],
                        help="run only these cases (e.g. colossalai_cp torch_ring hybrid_cp); default: all")
    parser.add_argument("--oracle-cache", help="directory keeping the float64 oracle between runs")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--block", type=int, default=2048)
    parser.add_argument("--algo", default="local", help=argparse.SUPPRESS)
    parser.add_argument("--kv", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--rows-dir", help=argparse.SUPPRESS)
    parser.add_argument("--as-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.as_worker:
        args.seq, args.cp = args.seq[0], args.cp[0]
    return args


def main():
    args = parse_args()
    if args.as_worker:
        return worker_main(args)
    import peer_attention
    from attention_oracle import error, oracle
    workdir = tempfile.mkdtemp(prefix="mfls_bench_")
    args.rows_dir = workdir
    rows, errors = [], {}
    for seq in args.seq:
        for kv in args.kv_heads:
            reference = oracle(seq, args.heads, kv, args.head_dim, cache_dir=args.oracle_cache or workdir)
            for cp in args.cp:                                 # interleaved: load drift hits every case alike
                threads = args.threads
                args.threads = args.cp1_threads if cp == 1 else threads
                for algo, peer in _runs(args, cp, kv):
                    got = (peer_attention.launch(args, algo, cp, seq, kv, _env(args, workdir), workdir) if peer
                           else launch(args, cp, seq, kv, algo, workdir))
                    errors[(seq, kv, cp, algo)] = error([r["rows"] for r in got], reference)
                    rows += got
                    print(f"  S={seq} kv={kv} CP={cp} {algo}: {max(r['seconds'] for r in got):.2f} s, "
                          f"{max(r['peak_mib'] for r in got):.0f} MiB, oracle error "
                          f"{errors[(seq, kv, cp, algo)]:.1e}  (load {os.getloadavg()[0]:.1f})", flush=True)
                args.threads = threads
    table = report(rows, args, errors)
    write_table(table, args.csv)
    if args.peers:
        write_table(compare(table), args.csv.replace(".csv", "_peers.csv"))


if __name__ == "__main__":
    main()
