"""msrun worker: runs every case of ``cases.CASES`` on this rank and saves its shards for the test to check.

Usage (under msrun): python attention_worker.py OUT_DIR
Each rank writes OUT_DIR/<case>/rank<r>.npz with its positions, output and gradients (dq, dk, dv).
"""
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cases import CASES, WORLD  # noqa: E402
from worker_main import join_launch, run_cases  # noqa: E402


def run_case(case, rank, out_dir):
    import mindspore as ms
    from mindspore import Tensor
    from mf_longseq.attention import context_parallel_attention, select_kernel
    from mf_longseq.parallel import Mesh, RunPlan, global_positions, shard_sequence

    plan = RunPlan(dp=case.dp, cp=case.cp, ulysses=case.ulysses, algo=case.algo)
    mesh = Mesh(plan=plan, rank=rank).create_groups()
    dp_id = mesh.coords()["dp_id"]
    rng = np.random.default_rng(1000 + dp_id)
    b, s, n, kv, d = case.batch, case.seq_len, case.heads, case.kv_heads, case.head_dim
    full = {name: rng.standard_normal(shape).astype(np.float32)
            for name, shape in (("q", (b, s, n, d)), ("k", (b, s, kv, d)), ("v", (b, s, kv, d)),
                                ("dout", (b, s, n, d)))}
    local = {name: Tensor(shard_sequence(x, mesh, case.layout, seq_dim=1)) for name, x in full.items()}
    kernel = select_kernel("CPU", case.block)          # the CPU default: the fused kernel

    def loss(q, k, v):
        out = context_parallel_attention(q, k, v, mesh=mesh, algo=case.algo, causal=case.causal,
                                         layout=case.layout, kernel=kernel, use_alltoall=case.use_alltoall)
        return (out * local["dout"]).sum(), out

    mesh.stats.reset()
    (_, out), grads = ms.value_and_grad(loss, grad_position=(0, 1, 2), has_aux=True)(
        local["q"], local["k"], local["v"])
    os.makedirs(os.path.join(out_dir, case.name), exist_ok=True)
    np.savez(os.path.join(out_dir, case.name, f"rank{rank}.npz"), dp_id=dp_id,
             positions=global_positions(s, mesh, case.layout), out=out.asnumpy(),
             dq=grads[0].asnumpy(), dk=grads[1].asnumpy(), dv=grads[2].asnumpy(),
             logical_bytes=mesh.stats.total("logical"), wire_bytes=mesh.stats.total("wire"),
             **{f"logical_{kind}": n for kind, n in mesh.stats.logical_bytes.items()})


def main():
    rank, out_dir, only = join_launch(WORLD)
    run_cases(CASES, lambda case: run_case(case, rank, out_dir), only, rank)


if __name__ == "__main__":
    main()
