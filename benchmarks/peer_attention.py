"""The peers of ``attention_bench.py``, on torch (``pip install -e .[bench]``: torch 2.13.0 and DeepSpeed; DeepSpeed
installs on CPU with ``DS_BUILD_OPS=0``), measured exactly as ours: same inputs (``attention_oracle.inputs``), one
warm-up and ``--steps`` steps of forward + ``out.backward(dout)``, memory = peak RSS during the steps minus the
RSS once the inputs exist, the same sampled rows checked against the float64 oracle.

* ``torch_sdpa`` (CP = 1): ``torch.nn.functional.scaled_dot_product_attention`` (CPU flash, ``enable_gqa``).
* ``torch_ring`` (CP = 2): ring attention over ``torch.distributed`` (gloo), written here from the published
  algorithm (Liu et al., "Ring Attention", 2023; the zigzag layout and the log-sum-exp merge of
  ring-flash-attention; FlashAttention-2's backward from the final out and lse): each rank holds chunks r and
  2R-1-r; K and V (one (2, B, K, S_loc, D) tensor) travel with isend/irecv started before the block is computed;
  every block is ``aten::_scaled_dot_product_flash_attention_for_cpu`` and its ``_backward``; in backward the
  K/V travel again with a float32 dK/dV buffer every rank adds to.
* ``ds_ulysses`` (CP = 2): ``deepspeed.sequence.layer.DistributedAttention`` over gloo, batch-first
  (scatter heads, gather sequence), SDPA (CPU flash) inside; contiguous sequence shards.

Workers are started by ``launch`` (one process per rank: RANK, WORLD_SIZE, MASTER_ADDR/PORT), each bound to its
core as ours are, with ``torch.set_num_threads(--threads)``.
"""
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def _rss_mib() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024


def _peak_mib() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM")) / 1024


# ----------------------------------------------------------------------------------------------------- torch ring
def _flash(q, k, v, causal, scale):
    import torch
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, attn_mask=None,
                                                                          scale=scale)
    return out, lse


def _pairs(rank: int, src: int, world: int):
    """(query half, key half, causal) of the zigzag blocks rank ``rank`` computes against rank ``src``'s K/V:
    chunk a sees chunk b fully when b < a, causally when b == a, not at all when b > a."""
    mine, theirs = (rank, 2 * world - 1 - rank), (src, 2 * world - 1 - src)
    return [(i, j, a == b) for i, a in enumerate(mine) for j, b in enumerate(theirs) if b <= a]


class _Ring:
    """Started isend of ``x`` to rank+1 and irecv of a tensor like it from rank-1."""

    def __init__(self, x, rank, world):
        import torch.distributed as dist
        self.received = x.new_empty(x.shape)
        self.works = [dist.isend(x, (rank + 1) % world), dist.irecv(self.received, (rank - 1) % world)]

    def wait(self):
        for work in self.works:
            work.wait()
        return self.received


def _ring_function():
    import torch

    class RingAttention(torch.autograd.Function):
        """q (B, N, S_loc, D), kv (2, B, K, S_loc, D), zigzag halves -> out (B, N, S_loc, D)."""

        @staticmethod
        def forward(ctx, q, kv, scale):
            import torch.distributed as dist
            rank, world = dist.get_rank(), dist.get_world_size()
            c = q.shape[2] // 2
            out = torch.zeros_like(q, dtype=torch.float32)
            lse = torch.full(q.shape[:3], float("-inf"), dtype=torch.float32)
            block = kv
            for step in range(world):
                ring = _Ring(block, rank, world) if step + 1 < world else None
                for i, j, causal in _pairs(rank, (rank - step) % world, world):
                    qi = slice(i * c, (i + 1) * c)
                    kj = slice(j * c, (j + 1) * c)
                    b_out, b_lse = _flash(q[:, :, qi], block[0][:, :, kj], block[1][:, :, kj], causal, scale)
                    new = torch.logaddexp(lse[:, :, qi], b_lse)
                    out[:, :, qi].mul_(torch.exp(lse[:, :, qi] - new).unsqueeze(-1))
                    out[:, :, qi].add_(b_out * torch.exp(b_lse - new).unsqueeze(-1))
                    lse[:, :, qi] = new
                    del b_out, b_lse
                block = ring.wait() if ring is not None else None
            ctx.save_for_backward(q, kv, out, lse)
            ctx.scale = scale
            return out

        @staticmethod
        def backward(ctx, dout):
            import torch.distributed as dist
            q, kv, out, lse = ctx.saved_tensors
            rank, world = dist.get_rank(), dist.get_world_size()
            c = q.shape[2] // 2
            dout = dout.contiguous()
            dq = torch.zeros_like(q, dtype=torch.float32)
            dkv = torch.zeros_like(kv, dtype=torch.float32)
            block = kv
            for step in range(world):
                ring = _Ring(block, rank, world) if step + 1 < world else None
                for i, j, causal in _pairs(rank, (rank - step) % world, world):
                    qi, kj = slice(i * c, (i + 1) * c), slice(j * c, (j + 1) * c)
                    g_q, g_k, g_v = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                        dout[:, :, qi], q[:, :, qi], block[0][:, :, kj], block[1][:, :, kj], out[:, :, qi],
                        lse[:, :, qi], 0.0, causal, attn_mask=None, scale=ctx.scale)
                    dq[:, :, qi] += g_q
                    dkv[0][:, :, kj] += g_k
                    dkv[1][:, :, kj] += g_v
                    del g_q, g_k, g_v
                moving = _Ring(dkv, rank, world)                     # dK/dV of this block to its next holder
                block = ring.wait() if ring is not None else None
                dkv = moving.wait()
            return dq, dkv, None

    return RingAttention


# ----------------------------------------------------------------------------------------------------- the cases
def _setup(impl, args, rank, world):
    """(step function taking dout, the leaves, their global positions) for ``impl`` on this rank."""
    import torch
    from attention_oracle import inputs
    q, k, v, dout = inputs(args.seq, args.heads, args.kv, args.head_dim)
    scale = args.head_dim ** -0.5
    if impl == "torch_sdpa":
        positions = np.arange(args.seq)
    elif impl == "torch_ring":
        c = args.seq // (2 * world)
        positions = np.concatenate([np.arange(rank * c, (rank + 1) * c),
                                    np.arange((2 * world - 1 - rank) * c, (2 * world - rank) * c)])
    else:
        s_loc = args.seq // world
        positions = np.arange(rank * s_loc, (rank + 1) * s_loc)
    q, k, v, dout = (np.ascontiguousarray(x[positions]) for x in (q, k, v, dout))
    if impl == "ds_ulysses":                                    # (B, S_loc, H, D), batch first
        leaves = [torch.from_numpy(x[None]).requires_grad_() for x in (q, k, v)]
        sdpa = lambda a, b, c_, *_, **__: torch.nn.functional.scaled_dot_product_attention(   # noqa: E731
            a.transpose(1, 2), b.transpose(1, 2), c_.transpose(1, 2), is_causal=True, scale=scale,
            enable_gqa=True).transpose(1, 2)
        from deepspeed.sequence.layer import DistributedAttention
        attention = DistributedAttention(sdpa, torch.distributed.group.WORLD, scatter_idx=2, gather_idx=1)
        forward = lambda: attention(*leaves, batch_dim_idx=0)      # noqa: E731
        d_out = torch.from_numpy(dout[None])
        unpack = lambda grads: grads                                # noqa: E731
    else:                                                       # (B, H, S, D), head major
        qt, dt = (torch.from_numpy(np.ascontiguousarray(x.transpose(1, 0, 2))[None]) for x in (q, dout))
        kt, vt = (np.ascontiguousarray(x.transpose(1, 0, 2))[None] for x in (k, v))
        if impl == "torch_sdpa":
            leaves = [qt.requires_grad_(), torch.from_numpy(kt).requires_grad_(), torch.from_numpy(vt).requires_grad_()]
            forward = lambda: torch.nn.functional.scaled_dot_product_attention(   # noqa: E731
                *leaves, is_causal=True, scale=scale, enable_gqa=True)
            unpack = lambda grads: grads                            # noqa: E731
        else:
            leaves = [qt.requires_grad_(), torch.from_numpy(np.stack([kt, vt])).requires_grad_()]
            ring = _ring_function()
            forward = lambda: ring.apply(leaves[0], leaves[1], scale)   # noqa: E731
            unpack = lambda grads: [grads[0], grads[1][0], grads[1][1]]  # noqa: E731
        d_out = dt
    return forward, leaves, d_out, positions, unpack, impl != "ds_ulysses"


def run(impl, args, rank, world):
    """Warm-up + ``args.steps`` steps; returns this rank's result row and saves its sampled rows."""
    import torch
    from attention_oracle import reset_peak, save_rows
    forward, leaves, d_out, positions, unpack, head_major = _setup(impl, args, rank, world)
    baseline = _rss_mib()
    times, cpu = [], []
    for i in range(args.warmup + args.steps):
        if i == args.warmup:
            reset_peak()                                        # as ours: the warm-up is not measured
        for leaf in leaves:
            leaf.grad = None
        start, start_cpu = time.perf_counter(), time.process_time()
        out = forward()
        out.backward(d_out)
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
        if i + 1 < args.warmup + args.steps:
            del out
    peak = _peak_mib() - baseline
    token_major = (lambda x: x[0].transpose(0, 1)) if head_major else (lambda x: x[0])   # noqa: E731
    grads = unpack([leaf.grad for leaf in leaves])
    rows = os.path.join(args.rows_dir, f"{impl}_{args.seq}_{args.kv}_rank{rank}.npz")
    with torch.no_grad():
        save_rows(rows, positions, *(token_major(x).float().numpy() for x in (out.detach(), *grads)), seq=args.seq)
    return {"seq_len": args.seq, "kv_heads": args.kv, "cp": world, "algo": impl, "rank": rank, "impl": impl,
            "kernel": "torch", "seconds": statistics.median(times), "all_seconds": times,
            "cpu_seconds": statistics.median(cpu), "peak_mib": peak, "rows": rows, "logical_bytes": 0}


def worker_main(args):
    import torch
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    torch.set_num_threads(args.threads)
    if world > 1:
        cpus = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpus[rank % len(cpus)]})         # as train.context.bind_rank_cores does
        if args.algo == "ds_ulysses":
            import deepspeed
            deepspeed.init_distributed(dist_backend="gloo")
        else:
            torch.distributed.init_process_group("gloo")
    print("RESULT " + json.dumps(run(args.algo, args, rank, world)), flush=True)
    if world > 1:
        torch.distributed.destroy_process_group()


def launch(args, impl, cp, seq, kv, env, workdir):
    """``cp`` worker processes of ``impl``; returns their result rows."""
    from mf_longseq.tools.msrun import free_port
    common = ["--seq", str(seq), "--kv", str(kv), "--algo", impl, "--cp", str(cp), "--heads", str(args.heads),
              "--head-dim", str(args.head_dim), "--threads", str(args.threads), "--steps", str(args.steps),
              "--warmup", str(args.warmup), "--rows-dir", args.rows_dir, "--as-worker"]
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, str(HERE / "peer_attention.py"), *common], cwd=workdir, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env=dict(env, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(cp),
                                       MASTER_ADDR="127.0.0.1", MASTER_PORT=port, DS_ACCELERATOR="cpu"))
             for r in range(cp)]
    rows = []
    for proc in procs:
        stdout, stderr = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"{impl} CP={cp} S={seq} kv={kv} failed:\n{stderr[-3000:]}")
        rows += [json.loads(line.split("RESULT ", 1)[1]) for line in stdout.splitlines() if "RESULT " in line]
    return rows


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    from attention_bench import parse_args
    worker_main(parse_args())
