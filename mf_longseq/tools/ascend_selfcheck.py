"""First run on an Ascend NPU: FlashKernel and every CP algorithm against the blockwise kernel, errors reported.

    python -m mf_longseq.tools.ascend_selfcheck --launch [--devices 8] [--dry-run]   # what the script runs
    python -m mf_longseq.tools.ascend_selfcheck --output-dir DIR [--seq-len 8192]    # every rank (msrun)
    python -m mf_longseq.tools.ascend_selfcheck --report DIR                         # the table, exit status

``--launch`` (``scripts/ascend_selfcheck.sh``) prints and runs the msrun command of the other two: every rank
runs the checks, then the report.  With ``--dry-run`` it prints the command and runs rank 0's checks in this
process instead: under the test-only fake CANN (MS_SIMULATION_LEVEL, RANK_SIZE from its env.sh) all of them,
otherwise the kernel checks only.  What is compared (see docs/design.md, "Ascend: what is checked
where"): values the CPU tests and the simulation tier cannot check, i.e. FlashAttentionScore's masks and
statistics, the ``_attention_in`` stand-in FlashAttentionScoreGrad receives, lse merging of bf16 partial
results, and the order in which HCCL delivers the exchanges.

* kernel checks (every rank the same): ``LocalAttention(FlashKernel())`` on bf16 inputs against
  ``LocalAttention(BlockwiseKernel())`` on the same values in float32, forward (out, lse) and backward
  (dq, dk, dv of sum(out * dout)), for each kind of FlashAttentionScore call ``flash_args`` plans and for the
  ring-step masks of one zigzag rank;
* algorithm checks (world size > 1, CP = world size): ``context_parallel_attention`` with FlashKernel in bf16
  (ring; Ulysses with AlltoAll and with AllGather; hybrid U = 2 when the world size allows) against the
  whole sequence through the blockwise kernel in float32 on the same rank, compared on this rank's shard.

Errors are relative: max |x - ref| / max |ref| over the tensor (rows a mask leaves empty excluded from lse).
A check passes below ``--tolerance`` (bf16 inputs carry about 4e-3 relative rounding).  Under
MS_SIMULATION_LEVEL (the test-only fake CANN) nothing is computed: the numbers are meaningless and only the
fact that every check runs is reported.
"""
import argparse
import glob
import json
import math
import os
import sys
from typing import Dict, List

import numpy as np

DEFAULT_TOLERANCE = 3e-2
FIELDS = ("out", "lse", "dq", "dk", "dv")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="ascend_selfcheck", description=__doc__.split("\n")[0])
    parser.add_argument("--launch", action="store_true", help="run every rank under msrun, then the report")
    parser.add_argument("--devices", type=int, default=8, help="--launch: NPUs used as one CP group (default 8)")
    parser.add_argument("--port", type=int, default=8129, help="--launch: msrun master port")
    parser.add_argument("--dry-run", action="store_true", help="--launch: print the command, run rank 0 here")
    parser.add_argument("--output-dir", help="write this rank's results to DIR/selfcheck_rank<r>.json")
    parser.add_argument("--report", metavar="DIR", help="print the table of DIR's results; exit 1 on a failure")
    parser.add_argument("--seq-len", type=int, default=8192, help="tokens of the whole sequence (default 8192)")
    parser.add_argument("--heads", type=int, default=8, help="query heads (default 8)")
    parser.add_argument("--kv-heads", type=int, default=2, help="kv heads (default 2, GQA)")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE)
    parser.add_argument("--kernel-only", action="store_true", help="skip the algorithm checks")
    parser.add_argument("--device", default="Ascend", help="device target (default Ascend)")
    args = parser.parse_args(argv)
    if args.report is None and args.seq_len % 64:
        parser.error(f"--seq-len {args.seq_len}: must be a multiple of 64 (zigzag chunks of up to 8 x 2 ranks)")
    if args.devices < 1:
        parser.error(f"--devices {args.devices}: must be a positive integer, e.g. --devices 8")
    return args


def launch(args) -> int:
    """Print and run the msrun command of every rank's checks, then the report (``--dry-run``: see above)."""
    import subprocess
    from mf_longseq.tools.msrun import msrun_command, msrun_env
    out_dir = args.output_dir or os.path.join("output", "ascend_selfcheck")
    check = [sys.executable, "-m", "mf_longseq.tools.ascend_selfcheck", "--seq-len", str(args.seq_len),
             "--heads", str(args.heads), "--kv-heads", str(args.kv_heads), "--head-dim", str(args.head_dim),
             "--batch", str(args.batch), "--tolerance", str(args.tolerance), "--device", args.device,
             "--output-dir", out_dir]
    cmd = check if args.devices == 1 else msrun_command(check[1:], worker_num=args.devices, master_port=args.port,
                                                        log_dir=os.path.join(out_dir, "msrun_log"), guard=False)
    print("+ " + " ".join(cmd), flush=True)
    env = msrun_env()
    if args.dry_run:
        if not simulated():
            check.append("--kernel-only")
            env["RANK_SIZE"] = "1"
        what = f"simulated device, RANK_SIZE={env.get('RANK_SIZE', '1')}" if simulated() else "kernel checks only"
        print(f"dry run: rank 0 in this process ({what})", flush=True)
        return subprocess.run(check, env=env, check=False).returncode
    for old in glob.glob(os.path.join(out_dir, "selfcheck_rank*.json")):
        os.remove(old)
    status = subprocess.run(cmd, env=env, check=False).returncode
    if status:
        print(f"ascend_selfcheck: the checks exited with {status}; logs in {out_dir}", file=sys.stderr)
    return report(out_dir) or status


def simulated() -> bool:
    return bool(os.environ.get("MS_SIMULATION_LEVEL"))


def relative_error(x: np.ndarray, ref: np.ndarray) -> float:
    scale = float(np.max(np.abs(ref))) if ref.size else 0.0
    return float(np.max(np.abs(x - ref))) / max(scale, 1e-30) if ref.size else 0.0


def _inputs(args, seed: int = 0):
    """Float32 q (B, S, N, D), k, v (B, S, K, D) and dout (B, S, N, D), the same on every rank."""
    rng = np.random.default_rng(seed)
    b, s, n, k, d = args.batch, args.seq_len, args.heads, args.kv_heads, args.head_dim
    return [rng.standard_normal(shape).astype(np.float32)
            for shape in ((b, s, n, d), (b, s, k, d), (b, s, k, d), (b, s, n, d))]


def _errors(got: Dict[str, np.ndarray], ref: Dict[str, np.ndarray]) -> Dict[str, float]:
    errors = {}
    for name in FIELDS:
        if name not in ref:
            continue
        a, r = got[name].astype(np.float64), ref[name].astype(np.float64)
        if name == "lse":
            keep = np.isfinite(r)
            a, r = a[keep], r[keep]
        errors[name] = relative_error(a, r)
    return errors


def _grad_run(fn, arrays, dtype):
    """out = fn(q, k, v) and the gradients of sum(out * dout), as float32 NumPy; fn returns out or (out, lse)."""
    import mindspore as ms
    q, k, v = (ms.Tensor(x).astype(dtype) for x in arrays[:3])
    dout = ms.Tensor(arrays[3])
    result = fn(q, k, v)
    out, lse = result if isinstance(result, tuple) else (result, None)

    def loss(a, b, c):
        o = fn(a, b, c)
        o = o[0] if isinstance(o, tuple) else o
        return (o.astype(ms.float32) * dout).sum()
    grads = ms.grad(loss, grad_position=(0, 1, 2))(q, k, v)
    got = {"out": out.astype(ms.float32).asnumpy()}
    if lse is not None:
        got["lse"] = lse.asnumpy()
    got.update({name: g.astype(ms.float32).asnumpy() for name, g in zip(("dq", "dk", "dv"), grads)})
    return got


def kernel_masks(seq_len: int):
    """(name, AttentionMask) for each kind of call flash_args plans, and zigzag ring steps of rank 1 of CP = 4."""
    from mf_longseq.attention.attention_plan import ring_masks
    from mf_longseq.attention.mask import AttentionMask, DenseMask, dense_attention_mask
    from mf_longseq.parallel.mesh import Mesh
    pos = np.arange(seq_len, dtype=np.int64)
    docs = np.searchsorted([seq_len // 7, seq_len // 2, seq_len // 2 + 5, seq_len], pos, side="right")
    tail = pos[seq_len - seq_len // 4:]
    masks = [("causal (sparse_mode 2)", AttentionMask(pos, pos, True)),
             ("not causal (no mask)", AttentionMask(pos, pos, False)),
             ("suffix queries (sparse_mode 3)", AttentionMask(tail, pos, True)),
             ("packed documents (TND)", AttentionMask(pos, pos, True, docs, docs)),
             ("dense mask (compression off)", DenseMask(pos, pos, True, docs, docs,
                                                        grid=dense_attention_mask(1, seq_len, docs)))]
    for j, mask in enumerate(ring_masks(seq_len, Mesh(cp=4, rank=1), "zigzag", True)):
        if mask.visible_pairs():
            masks.append((f"zigzag ring step cp4 rank1 <- rank{j}", mask))
    return masks


def check_kernels(args, flash=None) -> List[dict]:
    """Rows of kernel errors; ``flash``: kernel factory under test (default ``FlashKernel``)."""
    import mindspore as ms
    from mf_longseq.attention.flash import FlashKernel
    from mf_longseq.attention.kernel import BlockwiseKernel, LocalAttention, default_scale
    flash = flash or FlashKernel
    q, k, v, dout = _inputs(args)
    scale = default_scale(args.head_dim)
    rows = []
    for name, mask in kernel_masks(args.seq_len):
        picked = (q[:, mask.q_pos], k[:, mask.k_pos], v[:, mask.k_pos], dout[:, mask.q_pos])  # global positions
        arrays = [np.ascontiguousarray(x.transpose(0, 2, 1, 3)) for x in picked]             # (B, S, H, D) -> BNSD
        got = _grad_run(LocalAttention(flash(), mask, scale), arrays, ms.bfloat16)
        ref = _grad_run(LocalAttention(BlockwiseKernel(), mask, scale), arrays, ms.float32)
        rows.append({"check": f"kernel: {name}", **_errors(got, ref)})
    return rows


def algorithms(world: int):
    """(label, algo, ulysses degree, use_alltoall) runnable with CP = world: every row of ``ALGORITHMS`` at its
    smallest planner Ulysses degree (pure Ulysses with both exchanges, a Ulysses x ring split with AlltoAll).  At
    CP = 1 every algorithm is the local kernel: MindFormers' three are checked, the plugin's add nothing."""
    from mf_longseq.parallel.algorithms import ALGORITHMS
    found = []
    for name, row in ALGORITHMS.items():
        degrees = row.planner_degrees(world)
        if not degrees or (world == 1 and not row.mindformers):
            continue
        u, split = degrees[0], row.ulysses_degree(4, 2)            # the split it takes: none, all Ulysses, or both
        if split == 1:
            found.append((f"{name} ({row.summary.split(':')[0]})", name, 1, False))
        elif split == 4:
            found += [(f"{name} AlltoAll", name, u, True), (f"{name} AllGather", name, u, False)]
        else:
            found.append((f"{name} {u}x{world // u}", name, u, True))
    return found


def check_algorithms(args, world: int, rank: int, flash=None) -> List[dict]:
    """Rows of algorithm errors on this rank of CP = ``world``; ``flash`` as in ``check_kernels``."""
    import mindspore as ms
    from mf_longseq.attention.api import context_parallel_attention
    from mf_longseq.attention.flash import FlashKernel
    from mf_longseq.attention.kernel import BlockwiseKernel
    from mf_longseq.parallel.mesh import Mesh
    from mf_longseq.parallel.plan import RunPlan
    from mf_longseq.parallel.sharding import shard_sequence
    flash = flash or FlashKernel
    full = _inputs(args, seed=1)
    single = Mesh(rank=0, device_target=args.device)
    ref_full = _grad_run(lambda a, b, c: context_parallel_attention(a, b, c, mesh=single, kernel=BlockwiseKernel()),
                         full, ms.float32)
    rows = []
    for label, algo, ulysses, use_alltoall in algorithms(world):
        if args.heads % ulysses or (args.kv_heads % ulysses and ulysses % args.kv_heads):
            rows.append({"check": f"algorithm: {label}", "skipped": "heads not divisible by the Ulysses degree"})
            continue
        mesh = Mesh(plan=RunPlan(cp=world, ulysses=ulysses, algo=algo), rank=rank,
                    device_target=args.device).create_groups()

        def shard(x):
            return np.ascontiguousarray(shard_sequence(x, mesh, "zigzag", seq_dim=1))
        got = _grad_run(lambda a, b, c: context_parallel_attention(a, b, c, mesh=mesh, algo=algo, kernel=flash(),
                                                                    use_alltoall=use_alltoall),
                        [shard(x) for x in full], ms.bfloat16)
        ref = {name: shard(ref_full[name]) for name in ("out", "dq", "dk", "dv")}
        rows.append({"check": f"algorithm: {label}", **_errors(got, ref)})
    return rows


def judge(rows: List[dict], tolerance: float) -> List[dict]:
    for row in rows:
        if "skipped" not in row:
            worst = max(row.get(name, 0.0) for name in FIELDS)
            row["ok"] = bool(math.isfinite(worst) and worst <= tolerance)
    return rows


def format_table(rows: List[dict], tolerance: float) -> str:
    lines = [f"{'check':<46} {'rank':>4} " + " ".join(f"{n:>9}" for n in FIELDS) + "  result"]
    for row in rows:
        if "skipped" in row:
            lines.append(f"{row['check']:<46} {row.get('rank', 0):>4}  skipped: {row['skipped']}")
            continue
        cells = " ".join(f"{row[n]:9.2e}" if n in row else f"{'-':>9}" for n in FIELDS)
        lines.append(f"{row['check']:<46} {row.get('rank', 0):>4} {cells}  {'ok' if row['ok'] else 'FAIL'}")
    note = ("  (MS_SIMULATION_LEVEL is set: simulated device, the numbers are meaningless)" if simulated()
            else f"  (relative error max|x-ref|/max|ref|; tolerance {tolerance:g})")
    return "\n".join(lines + [note])


def report(directory: str) -> int:
    rows = []
    for path in sorted(glob.glob(os.path.join(directory, "selfcheck_rank*.json"))):
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
        rows.extend(data["rows"])
        tolerance = data["tolerance"]
    if not rows:
        print(f"ascend_selfcheck: no selfcheck_rank*.json in {directory}", file=sys.stderr)
        return 2
    print(format_table(rows, tolerance))
    failed = [r for r in rows if r.get("ok") is False]
    print(f"{len(rows)} checks, {len(failed)} failed")
    return 1 if failed and not simulated() else 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.report:
        return report(args.report)
    if args.launch:
        return launch(args)
    import mindspore as ms
    ms.set_context(mode=ms.PYNATIVE_MODE, pynative_synchronize=True)
    ms.set_device(args.device)
    world, rank = 1, 0
    if int(os.environ.get("RANK_SIZE", os.environ.get("MS_WORKER_NUM", "1"))) > 1:
        from mindspore.communication import get_group_size, get_rank, init
        init()
        world, rank = get_group_size(), get_rank()
    rows = check_kernels(args) if rank == 0 else []
    if world > 1 and not args.kernel_only:
        rows += check_algorithms(args, world, rank)
    for row in rows:
        row["rank"] = rank
    rows = judge(rows, args.tolerance)
    print(format_table(rows, args.tolerance), flush=True)
    if args.output_dir:
        os.makedirs(args.output_dir, exist_ok=True)
        with open(os.path.join(args.output_dir, f"selfcheck_rank{rank}.json"), "w", encoding="utf-8") as handle:
            json.dump({"rank": rank, "world": world, "tolerance": args.tolerance, "rows": rows}, handle, indent=1)
    return 0 if all(r.get("ok", True) for r in rows) or simulated() else 1


if __name__ == "__main__":
    sys.exit(main())
