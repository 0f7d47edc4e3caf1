"""msrun worker for Ulysses / hybrid with any head counts (issue 14): one launch of 4 CPU workers runs every
attention case of ``CASES`` (shards saved as ``attention_worker`` saves them, with the rank's logical bytes) and
trains a tiny LLaMA2 for ``TRAIN_STEPS`` steps in every layout of ``TRAIN_CASES`` (6 query / 3 kv heads at
Ulysses 2 x dp 2; 6 / 2 at mp 2 x Ulysses 2).

Usage (under msrun): python uneven_heads_worker.py OUT_DIR [case,case,...]
"""
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from attention_worker import run_case  # noqa: E402
from cases import WORLD, Case  # noqa: E402
from worker_main import join_launch, run_cases  # noqa: E402

CASES = [
    Case("u2_n6k3", "ulysses_cp", 2, ulysses=2, use_alltoall=True, heads=6, kv_heads=3, seq_len=32),
    Case("u2_n6k3_noncausal_allgather", "ulysses_cp", 2, ulysses=2, causal=False, heads=6, kv_heads=3, seq_len=32),
    Case("u4_n10k2", "ulysses_cp", 4, ulysses=4, use_alltoall=True, heads=10, kv_heads=2, seq_len=32),
    Case("u4_n10k2_noncausal_allgather", "ulysses_cp", 4, ulysses=4, causal=False, heads=10, kv_heads=2,
         seq_len=32),
    Case("u2_n5k5", "ulysses_cp", 2, ulysses=2, use_alltoall=True, heads=5, kv_heads=5, seq_len=32),
    Case("u2_n5k5_noncausal_allgather", "ulysses_cp", 2, ulysses=2, causal=False, heads=5, kv_heads=5, seq_len=32),
    Case("u4_n6k3", "ulysses_cp", 4, ulysses=4, use_alltoall=True, heads=6, kv_heads=3, seq_len=32),
    # N = K = 40 at U = 16 needs 16 ranks: U = 4 (10 heads per group as 3, 3, 2, 2) is the largest that fits here.
    Case("u4_n40k40", "ulysses_cp", 4, ulysses=4, use_alltoall=True, heads=40, kv_heads=40, head_dim=2, seq_len=32),
    Case("u4_n40k40_noncausal_allgather", "ulysses_cp", 4, ulysses=4, causal=False, heads=40, kv_heads=40,
         head_dim=2, seq_len=32),
    Case("hybrid_u2r2_n6k3", "hybrid_cp", 4, ulysses=2, use_alltoall=True, heads=6, kv_heads=3, seq_len=48),
    Case("hybrid_u2r2_n6k3_noncausal_contiguous_allgather", "hybrid_cp", 4, ulysses=2, causal=False,
         layout="contiguous", heads=6, kv_heads=3, seq_len=48),
]
TRAIN_STEPS = 3
# name: (dp, mp, cp, algo, query heads, kv heads); the reference is the same model on one process.
TRAIN_CASES = {
    "train_llama2_u2_n6k3": (2, 1, 2, "ulysses_cp", 6, 3),
    # mp 2 x Ulysses 2: 3 query heads and 1 kv head per mp rank, split 2 + 1 over the Ulysses ranks.
    "train_llama2_mp2_u2_n6k2": (1, 2, 2, "ulysses_cp", 6, 2),
}


def train_tree(dp: int = 1, mp: int = 1, cp: int = 1, algo: str = "colossalai_cp", heads: int = 6,
               kv_heads: int = 3) -> dict:
    """train_worker's tiny LLaMA2 with ``heads`` query heads over ``kv_heads`` kv heads (head dim 8)."""
    from train_worker import case_tree
    tree = case_tree("llama2", cp=cp, dp=dp, algo=algo)
    tree["parallel_config"]["model_parallel"] = mp
    tree["model"]["model_config"].update(num_heads=heads, n_kv_heads=kv_heads, hidden_size=8 * heads)
    return tree


def run_training(name: str, rank: int, out_dir: str) -> None:
    from mf_longseq.train.job import JobOptions, build_default_model, run_job
    from train_worker import weights
    folder = os.path.join(out_dir, name)
    os.makedirs(folder, exist_ok=True)
    built = []

    def factory(settings, mesh):
        built.append(build_default_model(settings, mesh))
        return built[-1]

    records = run_job(JobOptions(config=train_tree(*TRAIN_CASES[name]), steps=TRAIN_STEPS,
                                 output_dir=os.path.join(folder, "run")), model_factory=factory)
    np.savez(os.path.join(folder, f"rank{rank}.npz"), **weights(built[-1]))
    with open(os.path.join(folder, f"rank{rank}.json"), "w", encoding="utf-8") as handle:
        json.dump({"losses": [r.loss for r in records]}, handle)


def main():
    rank, out_dir, only = join_launch(WORLD)
    run_cases(CASES, lambda case: run_case(case, rank, out_dir), only, rank)
    run_cases(TRAIN_CASES, lambda name: run_training(name, rank, out_dir), only, rank, name_of=lambda name: name)


if __name__ == "__main__":
    main()
