"""Attention forward+backward: per-rank peak memory and time for S x CP x algorithm, with MindSpore's own
batched-matmul throughput measured in the same run as the roofline.

    python benchmarks/attention_bench.py                       # S in 4k..32k, CP in 1, 2, 4, every algorithm
    python benchmarks/attention_bench.py --seq 4096 8192 --cp 1 2 --heads 4 --kv-heads 2

Every case runs in fresh processes (CP = 1: one process per S; CP > 1: one msrun launch of CP CPU workers per
(S, algorithm)), twice: memory is the first run's peak RSS above the RSS before inputs were made (VmHWM), time
is the second run's (the first pays one-time op set-up, and after it MindSpore's memory pool hides the peak).  Prints a table and writes benchmarks/results/attention.csv.
Efficiency counts only unmasked FLOPs: 12 * D * heads * visible (query, key) pairs (forward 2 matmuls,
backward 4), against the batched-matmul rate measured on this machine, now.
"""
import argparse
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
ALGOS = {1: ["local"], 2: ["colossalai_cp", "ulysses_cp"], 4: ["colossalai_cp", "ulysses_cp", "hybrid_cp"]}


# --------------------------------------------------------------------------------------------------- worker side
def _status(field: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


def _reset_peak():
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")                                    # resets VmHWM to the current RSS
    except OSError:
        pass


def run_case(seq_len, algo, args, mesh):
    import mindspore as ms
    from mindspore import Tensor
    from mf_longseq.attention import BlockwiseKernel, context_parallel_attention
    cp = 1 if mesh is None else mesh.cp
    local = seq_len // cp
    baseline = _status("VmRSS")
    _reset_peak()
    rng = np.random.default_rng(0)
    q, dout = (Tensor(rng.standard_normal((1, local, args.heads, args.head_dim)).astype(np.float32)) for _ in range(2))
    k, v = (Tensor(rng.standard_normal((1, local, args.kv_heads, args.head_dim)).astype(np.float32)) for _ in range(2))
    kernel = BlockwiseKernel(args.block)
    if mesh is None:
        from mf_longseq.parallel import Mesh
        mesh = Mesh(cp=1, rank=0)
    algo_name = "colossalai_cp" if algo == "local" else algo
    fn = ms.grad(lambda a, b, c: (context_parallel_attention(a, b, c, mesh=mesh, algo=algo_name, kernel=kernel,
                                                             layout="zigzag") * dout).sum(), grad_position=(0, 1, 2))
    mesh.stats.reset()
    start = time.time()
    grads = fn(q, k, v)
    _ = [g.asnumpy() for g in grads]
    seconds = time.time() - start
    return {"seq_len": seq_len, "cp": cp, "algo": algo, "rank": mesh.rank, "seconds": seconds,
            "peak_mib": _status("VmHWM") - baseline, "logical_bytes": mesh.stats.total("logical"),
            "wire_bytes": mesh.stats.total("wire")}


def matmul_rate(block: int, head_dim: int, heads: int, kv_heads: int) -> dict:
    """GFLOP/s of MindSpore BatchMatMul on the kernel's tile shapes and on 2048-wide square blocks."""
    import mindspore as ms
    from mindspore import Tensor, ops
    g = heads // kv_heads
    rates = {}
    shapes = {"tile_qk": ((1, kv_heads, g * block, head_dim), (1, kv_heads, block, head_dim), True),
              "square_2048": ((1, 1, 2048, 2048), (1, 1, 2048, 2048), False)}
    for name, (a_shape, b_shape, transpose_b) in shapes.items():
        a, b = Tensor(np.ones(a_shape, np.float32)), Tensor(np.ones(b_shape, np.float32))
        mm = ops.BatchMatMul(transpose_b=transpose_b)
        mm(a, b).asnumpy()
        reps, start = 5, time.time()
        for _ in range(reps):
            out = mm(a, b)
        out.asnumpy()
        flops = 2 * np.prod(a_shape) * (b_shape[2] if transpose_b else b_shape[3])
        rates[name] = flops * reps / (time.time() - start) / 1e9
    return rates


def worker_main(args):
    import mindspore as ms
    ms.set_device("CPU")
    mesh = None
    if args.cp > 1:
        from mindspore.communication import init
        init()
    for seq_len in args.seq:
        for algo in ([args.algo] if args.algo else ALGOS[args.cp]):
            if args.cp > 1:
                from mf_longseq.parallel import Mesh
                ulysses = {"colossalai_cp": 1, "ulysses_cp": args.cp, "hybrid_cp": 2}[algo]
                mesh = Mesh(cp=args.cp, ulysses=ulysses).create_groups()
            first = run_case(seq_len, algo, args, mesh)       # memory: the first run in a fresh process
            second = run_case(seq_len, algo, args, mesh)      # time: the second (no one-time op set-up)
            second["peak_mib"] = first["peak_mib"]            # (a warm pool would hide the second's peak)
            print("RESULT " + json.dumps(second), flush=True)


# --------------------------------------------------------------------------------------------------- driver side
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _results(text: str):
    return [json.loads(line.split("RESULT ", 1)[1]) for line in text.splitlines() if "RESULT " in line]


def launch(args, cp, seqs, workdir):
    common = ["--heads", str(args.heads), "--kv-heads", str(args.kv_heads),
              "--head-dim", str(args.head_dim), "--block", str(args.block), "--cp", str(cp), "--as-worker"]
    env = dict(os.environ, PYTHONPATH=f"{HERE.parent}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               LOCAL_DEFAULT_PATH=os.path.join(workdir, "mfout"), GLOG_v="3",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    if cp == 1:
        rows = []
        for s in seqs:                                         # a fresh process per S: clean peak memory
            cmd = [sys.executable, __file__, "--seq", str(s), *common]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=workdir, check=True)
            rows += _results(proc.stdout)
        return rows
    rows = []
    for s in seqs:                                             # one launch per (S, algorithm): fresh processes
        for algo in ALGOS[cp]:
            log_dir = os.path.join(workdir, f"log_cp{cp}_{s}_{algo}")
            cmd = ["msrun", "--worker_num", str(cp), "--local_worker_num", str(cp), "--master_port",
                   str(_free_port()), "--log_dir", log_dir, "--join", "True", __file__, "--seq", str(s),
                   "--algo", algo, *common]
            subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=workdir, check=True)
            rows += [row for log in sorted(Path(log_dir).glob("worker_*.log")) for row in _results(log.read_text())]
    return rows


def report(rows, rates, args):
    from mf_longseq.attention.mask import AttentionMask
    base = {r["seq_len"]: r for r in rows if r["cp"] == 1}
    table = []
    for (s, cp, algo) in sorted({(r["seq_len"], r["cp"], r["algo"]) for r in rows}):
        ranks = [r for r in rows if (r["seq_len"], r["cp"], r["algo"]) == (s, cp, algo)]
        peak, seconds = max(r["peak_mib"] for r in ranks), max(r["seconds"] for r in ranks)
        pos = np.arange(s)
        visible = AttentionMask(pos, pos, True).visible_pairs()
        gflops = 12 * args.head_dim * args.heads * visible / seconds / 1e9
        table.append({"seq_len": s, "cp": cp, "algo": algo, "peak_mib_per_rank": round(peak, 1),
                      "mem_vs_cp1": round(peak / base[s]["peak_mib"], 3) if s in base else "",
                      "seconds": round(seconds, 2), "gflops_total": round(gflops, 2),
                      "gflops_per_rank": round(gflops / cp, 2),
                      "eff_vs_tile_matmul": round(gflops / cp / rates["tile_qk"], 3),
                      "comm_mib_per_rank": round(max(r["logical_bytes"] for r in ranks) / 2**20, 2)})
    return table


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seq", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    parser.add_argument("--cp", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--block", type=int, default=1024)
    parser.add_argument("--algo", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--as-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.as_worker:
        args.cp = args.cp[0]
        return worker_main(args)
    import mindspore as ms
    ms.set_device("CPU")
    rates = matmul_rate(args.block, args.head_dim, args.heads, args.kv_heads)
    workdir = tempfile.mkdtemp(prefix="mfls_bench_")
    rows = []
    for cp in args.cp:
        rows += launch(args, cp, args.seq, workdir)
    table = report(rows, rates, args)
    print(f"batched matmul (measured now): tile {rates['tile_qk']:.1f} GFLOP/s, "
          f"2048-square {rates['square_2048']:.1f} GFLOP/s")
    from results_table import write_table
    path = write_table(table, "attention")
    fit_memory_exponent(table)
    print(f"wrote {path}")


def fit_memory_exponent(table):
    """Least-squares slope of log(peak memory) against log(S) over 8k..32k, per (cp, algo)."""
    for key in sorted({(r["cp"], r["algo"]) for r in table}):
        pts = [(r["seq_len"], r["peak_mib_per_rank"]) for r in table
               if (r["cp"], r["algo"]) == key and 8192 <= r["seq_len"] <= 32768 and r["peak_mib_per_rank"] > 0]
        if len(pts) >= 2:
            x, y = np.log([p[0] for p in pts]), np.log([p[1] for p in pts])
            print(f"memory growth exponent cp={key[0]} {key[1]}: {np.polyfit(x, y, 1)[0]:.2f}")


if __name__ == "__main__":
    main()
