"""msrun worker for training parity: every case of ``CASES`` trains on this rank through the real runner.

Usage (under msrun, 4 workers): python train_worker.py OUT_DIR [case,case,...]
Per case, each rank writes OUT_DIR/<case>/rank<r>.npz (final weights) and rank<r>.json (its logged losses);
rank 0 also writes init.npz (the weights every rank started from).  A case with ``resume`` saves at step 5,
then a fresh model and optimizer resume from that checkpoint and train steps 6-10 (resumed_rank<r>.*).

The CP=1 reference is the same global batch on one process (``reference_tree``): a dp x cp case with B
sequences per dp rank sees samples (step * dp + dp_id) * B + b, exactly the samples of one rank with B * dp.
"""
import json
import os
from dataclasses import dataclass

import numpy as np

from worker_main import join_launch, run_cases

WORLD = 4
STEPS = 10
GLOBAL_BATCH = 2
FAMILIES = {"llama2": ("LlamaLongSeqConfig", "LlamaLongSeqForCausalLM"),
            "qwen1_5": ("Qwen2LongSeqConfig", "Qwen2LongSeqForCausalLM")}


@dataclass(frozen=True)
class Case:
    name: str
    family: str
    algo: str
    cp: int
    ulysses_in_cp: int = 1
    resume: bool = False

    @property
    def dp(self) -> int:
        return WORLD // self.cp


CASES = [Case(f"{fam}_{tag}", fam, algo, cp, u, resume=(fam == "llama2" and tag == "ring_cp2"))
         for fam in FAMILIES
         for tag, algo, cp, u in (("ring_cp2", "colossalai_cp", 2, 1), ("ulysses_cp2", "ulysses_cp", 2, 1),
                                  ("hybrid_cp4", "hybrid_cp", 4, 2))]
CASES.append(Case("llama2_kvallgather_cp4", "llama2", "kvallgather_cp", 4))    # named by long_seq.cp_algo


def case_tree(family: str, *, cp: int = 1, dp: int = 1, algo: str = "colossalai_cp", ulysses_in_cp: int = 1):
    """A tiny model and run config in MindFormers' layout (fp32, S = 64)."""
    config_type, arch_type = FAMILIES[family]
    mindformers_algo = algo in ("colossalai_cp", "ulysses_cp", "hybrid_cp")      # else long_seq.cp_algo names it
    return {
        "seed": 3,
        "runner_config": {"batch_size": GLOBAL_BATCH // dp},
        "context": {"device_target": "CPU", "runtime_num_threads": 1},
        "parallel": {"parallel_mode": 1, "enable_alltoall": False},
        "parallel_config": {"data_parallel": dp, "model_parallel": 1, "context_parallel": cp, "pipeline_stage": 1,
                            **({"context_parallel_algo": algo} if mindformers_algo else {}),
                            "ulysses_degree_in_cp": ulysses_in_cp},
        "model": {"model_config": {"type": config_type, "vocab_size": 128, "hidden_size": 32, "num_layers": 2,
                                   "num_heads": 4, "n_kv_heads": 2, "intermediate_size": 64, "seq_length": 64,
                                   "compute_dtype": "float32", "param_init_type": "float32",
                                   "initializer_range": 0.1, "init_seed": 11},
                  "arch": {"type": arch_type}},
        "long_seq": {"layout": "zigzag", "block_size": 32, **({} if mindformers_algo else {"cp_algo": algo})},
        "optimizer": {"type": "AdamW", "betas": [0.9, 0.95], "eps": 1.0e-8, "weight_decay": 0.01},
        "lr_schedule": {"type": "ConstantWarmUpLR", "learning_rate": 0.01, "warmup_steps": 2},
    }


def tree_of(case: Case) -> dict:
    return case_tree(case.family, cp=case.cp, dp=case.dp, algo=case.algo, ulysses_in_cp=case.ulysses_in_cp)


def reference_tree(case: Case) -> dict:
    return case_tree(case.family)


def weights(model) -> dict:
    return {p.name: p.asnumpy().copy() for p in model.get_parameters()}   # a copy: asnumpy() is a view


def run_case(case: Case, rank: int, out_dir: str) -> None:
    from mf_longseq.train.checkpoint import step_dir
    from mf_longseq.train.job import JobOptions, build_default_model, run_job
    folder = os.path.join(out_dir, case.name)
    os.makedirs(folder, exist_ok=True)
    built = []

    def factory(settings, mesh):
        model = build_default_model(settings, mesh)
        if rank == 0 and not built:
            np.savez(os.path.join(folder, "init.npz"), **weights(model))
        built.append(model)
        return model

    run_dir = os.path.join(folder, "run")
    records = run_job(JobOptions(config=tree_of(case), steps=STEPS, save_every=5 if case.resume else 0,
                                 output_dir=run_dir), model_factory=factory)
    _save(folder, f"rank{rank}", built[-1], records)
    if case.resume:
        records = run_job(JobOptions(config=tree_of(case), steps=STEPS, resume=step_dir(run_dir, 5),
                                     output_dir=os.path.join(folder, "resumed")), model_factory=factory)
        _save(folder, f"resumed_rank{rank}", built[-1], records)


def _save(folder: str, stem: str, model, records) -> None:
    np.savez(os.path.join(folder, f"{stem}.npz"), **weights(model))
    with open(os.path.join(folder, f"{stem}.json"), "w", encoding="utf-8") as handle:
        json.dump({"steps": [r.step for r in records], "losses": [r.loss for r in records]}, handle)


def main():
    rank, out_dir, only = join_launch(WORLD)
    run_cases(CASES, lambda case: run_case(case, rank, out_dir), only, rank)


if __name__ == "__main__":
    main()
