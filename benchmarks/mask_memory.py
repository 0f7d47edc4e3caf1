"""Mask memory, dense vs compressed, and attention peak memory, for sequence lengths from 4k to 128k.

    python benchmarks/mask_memory.py                     # table, CSV and docs/img/mask_memory.png
    python benchmarks/mask_memory.py --max-run 16384     # run forward+backward only up to 16k (default 64k)
    python benchmarks/mask_memory.py --probe 32768 --compression off    # one measurement, one JSON line
    python benchmarks/mask_memory.py --from-csv docs/img/mask_memory.csv   # table + plot again

Each measurement runs in a fresh process (so its peak RSS is its own): a tiny one-layer model
(``mf_longseq.models.build_model``: hidden 16, 1 head of 16, vocabulary 64; batch 1, CPU, blockwise kernel)
does forward + backward at sequence length S with ``model.model_config.use_attn_mask_compression`` on or off.
"peak delta" is the peak RSS (getrusage) minus the RSS just before the step.

Mask memory: dense = B * S^2 bytes of uint8 (MindFormers' (B, 1, S, S) mask), compressed = 2048^2 bytes at any
S.  Dense masks are allocated only where they fit in MAX_ALLOC (4 GiB); beyond, and wherever the step was not
run, the table says "analytic" or "not run".  The CPU step is the same code as on Ascend apart from the kernel.
"""
import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SEQ_LENS = [4096, 8192, 16384, 32768, 65536, 131072]
MAX_ALLOC = 4 << 30                 # dense masks larger than this (S > 64k) are never allocated
COMPRESSED_BYTES = 2048 * 2048
MIB = float(1 << 20)


def _rss() -> int:
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def _tiny_model(seq_len: int, compression: bool, block: int):
    import mindspore as ms
    from mf_longseq.config import LongSeqConfig
    from mf_longseq.models import build_model
    from mf_longseq.models.llama2 import LlamaLongSeqConfig
    from mf_longseq.parallel import Mesh
    ms.set_device("CPU")
    cfg = LlamaLongSeqConfig.from_preset("tiny", seq_length=seq_len, hidden_size=16, num_layers=1, num_heads=1,
                                         n_kv_heads=1, intermediate_size=32, vocab_size=64,
                                         use_attn_mask_compression=compression)
    long_seq = LongSeqConfig(block_size=block)
    return build_model(cfg, mesh=Mesh(rank=0), long_seq_config=long_seq)


def probe(seq_len: int, compression: bool, block: int = 2048) -> dict:
    """Forward + backward of the tiny model in this process; returns RSS figures in bytes and the time."""
    import numpy as np
    import mindspore as ms
    from mindspore import Tensor
    model = _tiny_model(seq_len, compression, block)
    rng = np.random.default_rng(0)
    ids = Tensor(rng.integers(0, 64, (1, seq_len)).astype(np.int32))
    labels = Tensor(rng.integers(0, 64, (1, seq_len)).astype(np.int32))
    loss_mask = Tensor(np.ones((1, seq_len), np.float32))
    step = ms.value_and_grad(lambda a, b, c: model(a, b, c)[0], None, model.trainable_params())
    base = _rss()
    start = time.time()
    loss, grads = step(ids, labels, loss_mask)
    _ = float(loss.asnumpy()) + sum(float(g.sum().asnumpy()) for g in grads)
    from mf_longseq.train.monitor import peak_rss_mib
    peak = int(peak_rss_mib() * MIB)
    return {"seq_len": seq_len, "compression": compression, "base_rss": base, "peak_rss": peak,
            "peak_delta": peak - base, "seconds": round(time.time() - start, 2)}


def run_probe(seq_len: int, compression: bool, block: int, timeout: float) -> dict:
    """``probe`` in a fresh Python process (own peak RSS)."""
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    env.setdefault("LOCAL_DEFAULT_PATH", "/tmp/mf_longseq_bench/mfout")
    env.setdefault("GLOG_v", "3")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--probe", str(seq_len),
           "--compression", "on" if compression else "off", "--block", str(block)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd="/tmp")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"probe failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


def table_rows(max_run: int, block: int, timeout: float):
    """One row per S: mask bytes (dense analytic, whether it fits) and measured peaks with/without compression."""
    rows = []
    for seq_len in SEQ_LENS:
        dense = seq_len * seq_len                                             # B = 1, uint8
        row = {"seq_len": seq_len, "dense_mask_bytes": dense, "compressed_mask_bytes": COMPRESSED_BYTES,
               "dense_fits": dense <= MAX_ALLOC}
        for comp in (True, False):
            name = "on" if comp else "off"
            runnable = seq_len <= max_run and (comp or dense <= MAX_ALLOC)
            result = run_probe(seq_len, comp, block, timeout) if runnable else None
            row[f"peak_delta_{name}"] = None if result is None else result["peak_delta"]
            row[f"seconds_{name}"] = None if result is None else result["seconds"]
            print(f"  S={seq_len} compression {name}: "
                  + ("not run" if result is None else f"{result['peak_delta'] / MIB:.0f} MiB, {result['seconds']} s"),
                  flush=True)
        rows.append(row)
    return rows


def _fmt(value, unit=MIB):
    return "not run" if value is None else f"{value / unit:,.0f}"


def print_table(rows) -> None:
    print(f"{'S':>7} | {'dense mask MiB':>32} | {'compressed MiB':>14} | {'step peak, on':>14} | "
          f"{'step peak, off':>14} | {'off - on':>9}")
    for r in rows:
        dense = f"{r['dense_mask_bytes'] / MIB:,.0f}" + ("" if r["dense_fits"] else " (analytic, not allocated)")
        on, off = r["peak_delta_on"], r["peak_delta_off"]
        diff = "-" if on is None or off is None else f"{(off - on) / MIB:,.0f}"
        off_txt = _fmt(off) if r["dense_fits"] else "too large"
        print(f"{r['seq_len']:>7} | {dense:>32} | {r['compressed_mask_bytes'] / MIB:>14,.0f} | {_fmt(on):>14} | "
              f"{off_txt:>14} | {diff:>9}")
    print("peak = peak RSS during one forward+backward minus RSS before it (MiB); dense mask = B*S^2 bytes, B = 1;")
    print(f"dense masks above {MAX_ALLOC >> 30} GiB are not allocated; 'not run': S above --max-run.")


def write_csv(rows, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="ascii") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def plot(rows, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    s = [r["seq_len"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.loglog(s, [r["dense_mask_bytes"] / MIB for r in rows], "o-", label="dense (B,1,S,S) uint8 mask")
    too_big = [(r["seq_len"], r["dense_mask_bytes"] / MIB) for r in rows if not r["dense_fits"]]
    if too_big:
        ax.loglog(*zip(*too_big), "o", color="white", markeredgecolor="C0", label="dense: analytic, not allocated")
    ax.loglog(s, [r["compressed_mask_bytes"] / MIB for r in rows], "s-", label="compressed 2048x2048 mask")
    for key, style, label in (("peak_delta_on", "^--", "fwd+bwd peak, compression on"),
                              ("peak_delta_off", "v--", "fwd+bwd peak, compression off")):
        pts = [(r["seq_len"], r[key] / MIB) for r in rows if r[key] is not None]
        if pts:
            ax.loglog(*zip(*pts), style, label=label)
    ax.set_xlabel("sequence length S (tokens)")
    ax.set_ylabel("memory (MiB)")
    ax.set_title("Attention mask memory, dense vs compressed (tiny model, CPU, B = 1)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def read_csv(path: Path):
    """Rows written by ``write_csv`` (numbers back as int, empty cells as None)."""
    def value(text):
        if text in ("", "None"):
            return None
        if text in ("True", "False"):
            return text == "True"
        return int(text) if text.lstrip("-").isdigit() else float(text)
    with open(path, encoding="ascii") as handle:
        return [{key: value(text) for key, text in row.items()} for row in csv.DictReader(handle)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--probe", type=int, help="run one forward+backward at this S and print JSON")
    parser.add_argument("--compression", choices=("on", "off"), default="on")
    parser.add_argument("--block", type=int, default=2048, help="blockwise kernel tile (long_seq.block_size)")
    parser.add_argument("--max-run", type=int, default=65536, help="largest S whose step is run")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per probe process")
    parser.add_argument("--csv", type=Path, default=ROOT / "docs" / "img" / "mask_memory.csv")
    parser.add_argument("--png", type=Path, default=ROOT / "docs" / "img" / "mask_memory.png")
    parser.add_argument("--from-csv", type=Path, help="print and plot an earlier run's CSV instead of running")
    args = parser.parse_args(argv)
    if args.probe:
        print(json.dumps(probe(args.probe, args.compression == "on", args.block)), flush=True)
        return 0
    rows = read_csv(args.from_csv) if args.from_csv else table_rows(args.max_run, args.block, args.timeout)
    print_table(rows)
    if not args.from_csv:
        write_csv(rows, args.csv)
    plot(rows, args.png)
    print(f"wrote {args.png}" + ("" if args.from_csv else f" and {args.csv}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
