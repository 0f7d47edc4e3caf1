"""msrun worker: sequence parallelism (``parallel_config.use_seq_parallel``) with context, model and pipeline
parallelism, and layer-input offload, trained for real on 4 CPU ranks.

Usage (under msrun, 4 workers): python sp_worker.py OUT_DIR [case,case,...]

Each case (``CASES``) trains compose_worker's tiny LLaMA2 with GQA (4 heads, 2 kv heads) for
``compose_worker.STEPS`` steps with hand-built trainers; per rank OUT_DIR/<case>/rank<r>.npz holds the losses and
this rank's trained weights.  Every SP-on case has its SP-off twin in the same launch (same layout), which the
test compares it with: the ranks hold the same shards, so losses and weights compare rank by rank.
"""
import os

import numpy as np

import compose_worker as cw
from worker_main import join_launch, run_cases

WORLD = 4

# name: (dp, mp, cp, pp, algo, micro_batch_num, use_seq_parallel, recompute, offload_layer_inputs)
CASES = {
    "mp2_ring2_sp_off": (1, 2, 2, 1, "colossalai_cp", 1, False, False, False),
    "mp2_ring2_sp_on": (1, 2, 2, 1, "colossalai_cp", 1, True, False, False),
    "mp2_ulysses2_sp_off": (1, 2, 2, 1, "ulysses_cp", 1, False, False, False),
    "mp2_ulysses2_sp_on": (1, 2, 2, 1, "ulysses_cp", 1, True, False, False),
    "mp2_ring2_sp_on_offload": (1, 2, 2, 1, "colossalai_cp", 1, True, True, True),
    "mp4_kv_replicated_sp_off": (1, 4, 1, 1, "colossalai_cp", 1, False, False, False),
    "mp4_kv_replicated_sp_on": (1, 4, 1, 1, "colossalai_cp", 1, True, False, False),
    "pp2_mp2_sp_off": (1, 2, 1, 2, "colossalai_cp", 2, False, False, False),
    "pp2_mp2_sp_on": (1, 2, 1, 2, "colossalai_cp", 2, True, False, False),
}
# SP-on case -> the SP-off case it must train like
TWINS = {"mp2_ring2_sp_on": "mp2_ring2_sp_off", "mp2_ulysses2_sp_on": "mp2_ulysses2_sp_off",
         "mp2_ring2_sp_on_offload": "mp2_ring2_sp_off", "mp4_kv_replicated_sp_on": "mp4_kv_replicated_sp_off",
         "pp2_mp2_sp_on": "pp2_mp2_sp_off"}


def tree_of(name):
    dp, mp, cp, pp, algo, micro, sp, recompute, offload = CASES[name]
    tree = cw.tiny_tree(dp, mp, cp, pp, algo, micro)
    tree["parallel_config"]["use_seq_parallel"] = sp
    tree["recompute_config"] = {"recompute": recompute}
    tree["long_seq"]["offload_layer_inputs"] = offload
    return tree


def run(name, rank, out_dir):
    os.makedirs(os.path.join(out_dir, name), exist_ok=True)
    _, _, trainer = cw.build(tree_of(name), rank=rank)
    losses = [trainer.step(step).loss for step in range(cw.STEPS)]
    state = {f"state/{k}": v for k, v in cw.trained_state(trainer).items()}
    sp = trainer.model.model.sp
    np.savez(os.path.join(out_dir, name, f"rank{rank}.npz"), losses=np.array(losses, np.float64),
             sp_degree=np.array(sp.degree), offload=np.array(trainer.model.model.layer_offload is not None), **state)


def main():
    rank, out_dir, only = join_launch(WORLD)
    run_cases(list(CASES), lambda name: run(name, rank, out_dir), only, rank, name_of=lambda name: name)


if __name__ == "__main__":
    main()
