"""msrun worker: the engine's own byte counters (``mesh.stats``) for every case of ``CASES``, forward alone and
forward + backward, saved as OUT_DIR/<case>/rank<r>.json for ``test_planner_bytes.py`` to compare with the
planner's byte model.

Usage (under msrun, 4 workers): python planner_worker.py OUT_DIR
"""
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from worker_main import join_launch, run_cases  # noqa: E402

WORLD = 4
# name, algo, cp, ulysses, use_alltoall, heads, kv_heads, seq_len, batch, dtype
CASES = [
    ("ring_cp4", "colossalai_cp", 4, 1, False, 4, 2, 64, 1, "float32"),
    ("ring_cp2_dp2_b2", "colossalai_cp", 2, 1, False, 4, 4, 48, 2, "float32"),
    ("ring_cp4_fp16", "colossalai_cp", 4, 1, False, 4, 1, 64, 1, "float16"),
    ("ulysses_cp4_alltoall_kv1", "ulysses_cp", 4, 4, True, 8, 1, 64, 1, "float32"),
    ("ulysses_cp4_allgather", "ulysses_cp", 4, 4, False, 4, 4, 32, 2, "float32"),
    ("ulysses_cp2_alltoall_fp16", "ulysses_cp", 2, 2, True, 4, 2, 32, 1, "float16"),
    ("hybrid_u2r2_alltoall", "hybrid_cp", 4, 2, True, 4, 2, 64, 1, "float32"),
    ("hybrid_u2r2_allgather_kv1", "hybrid_cp", 4, 2, False, 4, 1, 64, 1, "float32"),
]
HEAD_DIM, BLOCK = 8, 64                  # one tile per call: the bytes do not depend on it


def run_case(case, rank, out_dir):
    import mindspore as ms
    from mindspore import Tensor
    from mf_longseq.attention import BlockwiseKernel, context_parallel_attention
    from mf_longseq.parallel import Mesh

    name, algo, cp, ulysses, use_alltoall, heads, kv_heads, seq_len, batch, dtype = case
    mesh = Mesh(dp=WORLD // cp, cp=cp, ulysses=ulysses, rank=rank).create_groups()
    rng = np.random.default_rng(rank)
    s_loc = seq_len // cp
    q, k, v = (Tensor(rng.standard_normal((batch, s_loc, n, HEAD_DIM)).astype(dtype))
               for n in (heads, kv_heads, kv_heads))

    def attention(q_, k_, v_):
        out = context_parallel_attention(q_, k_, v_, mesh=mesh, algo=algo, causal=True, layout="zigzag",
                                         kernel=BlockwiseKernel(BLOCK), use_alltoall=use_alltoall)
        return out.astype(ms.float32).sum()

    mesh.stats.reset()
    attention(q, k, v)
    forward = mesh.stats.as_dict()
    mesh.stats.reset()
    ms.grad(attention, grad_position=(0, 1, 2))(q, k, v)
    both = mesh.stats.as_dict()
    os.makedirs(os.path.join(out_dir, name), exist_ok=True)
    with open(os.path.join(out_dir, name, f"rank{rank}.json"), "w", encoding="utf-8") as handle:
        json.dump({"forward": forward, "both": both}, handle)


def main():
    rank, out_dir, only = join_launch(WORLD)
    run_cases(CASES, lambda case: run_case(case, rank, out_dir), only, rank, name_of=lambda case: case[0])


if __name__ == "__main__":
    main()
