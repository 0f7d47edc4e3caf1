"""msrun worker: context parallelism composed with data, model (tensor) and pipeline parallelism on 4 CPU ranks.

Usage (under msrun, 4 workers): python compose_worker.py OUT_DIR [case,case,...]

Library cases (``CASES``): a tiny LLaMA2 with GQA (4 heads, 2 kv heads) trains for ``STEPS`` steps on hand-built
trainers (``train_case``); per rank OUT_DIR/<case>/rank<r>.npz holds the losses and this rank's trained weights
(its mp shard; its stage's weights).  The test merges the shards (``reshard.merge_rank_states``) and compares them
with a one-rank run of the same functions (``train_case(.., single=True)``) in the pytest process.

User-path cases (``JOB_CASES``) go through ``train.job.run_job``, as ``mf-longseq train`` does, and its
checkpoints (``runner.save_checkpoint`` / ``runner.resume``); per rank OUT_DIR/<case>/rank<r>.json holds the
logged steps and losses:

* ``job_pp2_cp2``: pp2 x cp2 (1F1B, 2 micro-batches) for ``JOB_SAVE_STEP`` steps, saving at the last one;
* ``job_mp2_cp2``: mp2 x cp2 for ``JOB_SAVE_STEP`` steps, saving at the last one;
* ``job_resume_cp4``: that mp2 x cp2 checkpoint resumed under cp4 (resharded) up to step ``JOB_STEPS``.

``default_layers_main`` (``python compose_worker.py OUT_DIR --default-layers``, 2 workers, its own launch: 32 layers
are slow, and a stage that waits too long for the other under a loaded host must not fail the launch above) runs
``job_pp2_default_layers``: pp2 of a YAML without ``num_layers`` (``default_layers_tree``: the config class's
default, 32 layers) for ``DEFAULT_LAYERS_SAVE_STEP`` step(s), saving at the last one.

``world_size`` records the error the run set-up (``train.context.setup``) raises for a config of 8 ranks
started on 4.
"""
import io
import json
import os
import sys

import numpy as np

from worker_main import join_launch, run_cases

WORLD = 4
STEPS = 5
GLOBAL_BATCH = 2
SEQ = 32
JOB_SAVE_STEP = 3            # the user-path runs save here ...
JOB_STEPS = 5                # ... and the resumed run continues to here

# name: (dp, mp, cp, pp, algo, micro_batch_num)
CASES = {
    "dp2_cp2": (2, 1, 2, 1, "colossalai_cp", 1),
    "mp2_cp2": (1, 2, 2, 1, "colossalai_cp", 1),
    "pp2_cp2": (1, 1, 2, 2, "colossalai_cp", 2),
    "mp2_ulysses2": (1, 2, 2, 1, "ulysses_cp", 1),
    "mp4_kv_replicated": (1, 4, 1, 1, "colossalai_cp", 1),
}
# name: layout (as CASES) of a case trained on packed documents (EOD), against the packed one-rank reference
PACKED_CASES = {
    "pp2_cp2_packed": (1, 1, 2, 2, "colossalai_cp", 2),
}
EOD = 1                      # the packed cases' EOD token
# name: layout (as CASES) of a run_job case; job_resume_cp4 resumes job_mp2_cp2's checkpoint
JOB_CASES = {
    "job_pp2_cp2": (1, 1, 2, 2, "colossalai_cp", 2),
    "job_mp2_cp2": (1, 2, 2, 1, "colossalai_cp", 1),
    "job_resume_cp4": (1, 1, 4, 1, "colossalai_cp", 1),
}
DEFAULT_LAYERS_SAVE_STEP = 1     # job_pp2_default_layers saves here (32 layers: one step is enough)
DEFAULT_LAYERS = {"job_pp2_default_layers": (1, 1, 1, 2, "colossalai_cp", 2)}     # on 2 ranks


def tiny_tree(dp=1, mp=1, cp=1, pp=1, algo="colossalai_cp", micro=1):
    """A MindFormers-style config of the tiny model under one layout."""
    return {
        "seed": 0,
        "runner_config": {"batch_size": GLOBAL_BATCH // dp // (micro if pp > 1 else 1)},   # per micro-batch
        "optimizer": {"type": "AdamW", "betas": [0.9, 0.95], "eps": 1.0e-6, "weight_decay": 0.1},
        "lr_schedule": {"type": "ConstantWarmUpLR", "learning_rate": 1.0e-3, "warmup_steps": 0},
        "parallel_config": {"data_parallel": dp, "model_parallel": mp, "context_parallel": cp,
                            "pipeline_stage": pp, "micro_batch_num": micro, "context_parallel_algo": algo,
                            "use_seq_parallel": False},
        "context": {"device_target": "CPU"},
        "model": {"model_config": {"type": "LlamaLongSeqConfig", "vocab_size": 64, "hidden_size": 32,
                                   "num_layers": 2, "num_heads": 4, "n_kv_heads": 2, "intermediate_size": 48,
                                   "seq_length": SEQ, "init_seed": 7},
                  "arch": {"type": "LlamaLongSeqForCausalLM"}},
        "long_seq": {"layout": "zigzag", "block_size": 16},
    }


def default_layers_tree(*layout):
    """``tiny_tree(*layout)`` without ``model.model_config.num_layers``: the model builds its class's default."""
    tree = tiny_tree(*layout)
    del tree["model"]["model_config"]["num_layers"]
    return tree


def build(tree, rank=None, packed=False):
    """(config, mesh, trainer) of this rank for ``tree`` (rank=0 and no communication when it has one rank);
    ``packed``: samples hold several documents ending in ``EOD``, trained as packed documents."""
    from mf_longseq.config import LongSeqConfig
    from mf_longseq.models import build_model
    from mf_longseq.parallel import Mesh
    from mf_longseq.train.data import SyntheticTokens
    from mf_longseq.train.job import build_trainer, samples_per_step
    from mf_longseq.train.optim import OptimSettings
    from mf_longseq.train.packing import PackingSettings
    config = LongSeqConfig.from_mindformers(tree)
    mesh = Mesh.from_config(config, rank=rank)
    if mesh.world_size > 1:
        mesh.create_groups()
    trainer = build_trainer(model=build_model(tree, mesh=mesh), mesh=mesh, config=config,
                            settings=OptimSettings.from_mindformers(tree, STEPS + 1),
                            source=SyntheticTokens(64, SEQ, seed=3, eod_token_id=EOD if packed else None,
                                                   mean_document_length=8),
                            batch_size=samples_per_step(tree["runner_config"]["batch_size"], config),
                            pad_token_id=None,
                            packing=PackingSettings(EOD, 16) if packed else None)
    return config, mesh, trainer


def trained_state(trainer):
    """This rank's trained weights and optimizer moments, by name."""
    params = list(trainer.optimizer.params) + trainer.optimizer.state_parameters()
    return {p.name: p.asnumpy().copy() for p in params}   # a copy: asnumpy() is a view


def train_case(name, *, single=False, rank=None, packed=False):
    """Train case ``name`` (or its one-rank reference, packed or not); returns (losses, trainer)."""
    tree = tiny_tree() if single else tiny_tree(*{**CASES, **PACKED_CASES}[name])
    _, _, trainer = build(tree, rank=0 if single else rank, packed=packed or name in PACKED_CASES)
    losses = [trainer.step(step).loss for step in range(STEPS)]
    return losses, trainer


def run_dir(out_dir, name):
    return os.path.join(out_dir, name, "run")


def run_job_case(name, out_dir, *, rank):
    """Run a ``JOB_CASES`` case through ``run_job`` (the user path) and write this rank's steps and losses."""
    from mf_longseq.train.checkpoint import step_dir
    from mf_longseq.train.job import JobOptions, run_job
    if name in DEFAULT_LAYERS:
        tree = default_layers_tree(*DEFAULT_LAYERS[name])
        opts = JobOptions(config=tree, steps=DEFAULT_LAYERS_SAVE_STEP, save_every=DEFAULT_LAYERS_SAVE_STEP,
                          output_dir=run_dir(out_dir, name))
    elif name == "job_resume_cp4":
        opts = JobOptions(config=tiny_tree(*JOB_CASES[name]), steps=JOB_STEPS, output_dir=run_dir(out_dir, name),
                          resume=step_dir(run_dir(out_dir, "job_mp2_cp2"), JOB_SAVE_STEP))
    else:
        opts = JobOptions(config=tiny_tree(*JOB_CASES[name]), steps=JOB_SAVE_STEP, save_every=JOB_SAVE_STEP,
                          output_dir=run_dir(out_dir, name))
    records = run_job(opts, stream=io.StringIO())
    with open(os.path.join(out_dir, name, f"rank{rank}.json"), "w", encoding="utf-8") as handle:
        json.dump({"steps": [r.step for r in records], "losses": [r.loss for r in records]}, handle)


def world_size_message():
    """The error the run set-up raises for degrees of 8 ranks on the 4 running ones ("" if none)."""
    from mf_longseq.config import LongSeqConfig
    from mf_longseq.train.context import setup
    from mf_longseq.train.settings import RunSettings
    tree = tiny_tree(dp=2, cp=2, pp=2, micro=2)
    try:
        setup(RunSettings(long_seq=LongSeqConfig.from_mindformers(tree), model=None, model_class=object))
    except ValueError as err:
        return str(err)
    return ""


def run(name, rank, out_dir):
    os.makedirs(os.path.join(out_dir, name), exist_ok=True)
    path = os.path.join(out_dir, name, f"rank{rank}.npz")
    if name == "world_size":
        np.savez(path, message=np.array(world_size_message()))
        return
    if name in JOB_CASES or name in DEFAULT_LAYERS:
        run_job_case(name, out_dir, rank=rank)
        return
    if name in PACKED_CASES:
        np.savez(path, losses=np.array(train_case(name, rank=rank)[0], np.float64))
        return
    losses, trainer = train_case(name, rank=rank)
    from mf_longseq.parallel.tensor_parallel import shard_specs
    specs = json.dumps({k: spec.to_dict() for k, spec in shard_specs(trainer.model).items()})
    state = {f"state/{k}": v for k, v in trained_state(trainer).items()}                # after STEPS steps
    np.savez(path, losses=np.array(losses, np.float64), specs=np.array(specs), **state)


def default_layers_main():
    rank, out_dir, _ = join_launch(2)
    run_cases(list(DEFAULT_LAYERS), lambda name: run(name, rank, out_dir), None, rank, name_of=lambda name: name)


def main():
    rank, out_dir, only = join_launch(WORLD)
    names = list(CASES) + list(PACKED_CASES) + list(JOB_CASES) + ["world_size"]
    run_cases(names, lambda name: run(name, rank, out_dir), only, rank, name_of=lambda name: name)


if __name__ == "__main__":
    if "--default-layers" in sys.argv:
        sys.argv.remove("--default-layers")
        default_layers_main()
    else:
        main()
