"""msrun worker: context parallelism composed with data, model (tensor) and pipeline parallelism on 4 CPU ranks.

Usage (under msrun, 4 workers): python compose_worker.py OUT_DIR [case,case,...]

Every case trains a tiny LLaMA2 with GQA (4 heads, 2 kv heads) for ``STEPS`` steps and writes, per rank,
OUT_DIR/<case>/rank<r>.npz: the losses and this rank's trained weights (its mp shard; its stage's weights).
The test merges the shards (``reshard.merge_rank_states``) and compares them with a one-rank run of the same
functions (``train_case(.., single=True)``) in the pytest process.

``mp2_cp2`` also saves a checkpoint after ``STEPS`` steps (per-rank files + metadata with the shard specs) and
records its next-step loss; ``resume_cp4`` loads that checkpoint resharded to cp4 and runs the next step.
``world_size`` records the error ``check_world_size`` raises for a config of 8 ranks started on 4.
"""
import json
import os
import sys

import numpy as np

WORLD = 4
STEPS = 5
GLOBAL_BATCH = 2
SEQ = 32

# name: (dp, mp, cp, pp, algo, micro_batch_num)
CASES = {
    "dp2_cp2": (2, 1, 2, 1, "colossalai_cp", 1),
    "mp2_cp2": (1, 2, 2, 1, "colossalai_cp", 1),
    "pp2_cp2": (1, 1, 2, 2, "colossalai_cp", 2),
    "mp2_ulysses2": (1, 2, 2, 1, "ulysses_cp", 1),
    "mp4_kv_replicated": (1, 4, 1, 1, "colossalai_cp", 1),
}


def tiny_tree(dp=1, mp=1, cp=1, pp=1, algo="colossalai_cp", micro=1):
    """A MindFormers-style config of the tiny model under one layout."""
    return {
        "seed": 0,
        "runner_config": {"batch_size": GLOBAL_BATCH // dp},
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


def build(tree, rank=None):
    """(config, mesh, trainer) of this rank for ``tree`` (rank=0 and no communication when it has one rank)."""
    from mf_longseq.config import LongSeqConfig
    from mf_longseq.models import build_model
    from mf_longseq.parallel import Mesh
    from mf_longseq.parallel.pipeline import PipelineTrainer
    from mf_longseq.train.data import SyntheticTokens
    from mf_longseq.train.optim import AdamW, OptimSettings
    from mf_longseq.train.runner import Trainer
    config = LongSeqConfig.from_mindformers(tree)
    mesh = Mesh.from_config(config, rank=rank)
    if mesh.world_size > 1:
        mesh.create_groups()
    model = build_model(tree, mesh=mesh)
    settings = OptimSettings.from_mindformers(tree, STEPS + 1)
    source = SyntheticTokens(64, SEQ, seed=3)
    batch = tree["runner_config"]["batch_size"]
    if config.pipeline_stage > 1:
        trainer = PipelineTrainer(model=model, mesh=mesh, settings=settings, source=source, batch_size=batch,
                                  layout=config.layout, micro_batch_num=config.micro_batch_num)
    else:
        trainer = Trainer(model=model, mesh=mesh, optimizer=AdamW(model.trainable_params(), settings),
                          source=source, batch_size=batch, layout=config.layout)
    return config, mesh, trainer


def trained_state(trainer):
    """This rank's trained weights and optimizer moments, by name."""
    params = list(trainer.optimizer.params) + trainer.optimizer.state_parameters()
    return {p.name: p.asnumpy() for p in params}


def train_case(name, *, single=False, rank=None):
    """Train case ``name`` (or its one-rank reference); returns (losses, trainer)."""
    tree = tiny_tree() if single else tiny_tree(*CASES[name])
    _, _, trainer = build(tree, rank=0 if single else rank)
    losses = [trainer.step(step).loss for step in range(STEPS)]
    return losses, trainer


def save_checkpoint(trainer, mesh, config, directory):
    """Per-rank files (weights + moments) and, on rank 0, metadata naming the layout and the shard specs."""
    from mf_longseq.parallel.tensor_parallel import shard_specs
    from mf_longseq.train import checkpoint as ckpt
    from mf_longseq.train.runner import barrier
    ckpt.save_rank(directory, mesh.rank, list(trainer.optimizer.params) + trainer.optimizer.state_parameters())
    barrier(mesh.world_size)()
    if mesh.rank == 0:
        specs = {name: spec.to_dict() for name, spec in shard_specs(trainer.model).items()}
        ckpt.write_meta(directory, step=STEPS, layout=ckpt.Layout.of(config), config_tree={}, data={},
                        optimizer={"step_count": trainer.optimizer.step_count}, losses=trainer.losses,
                        extra={"shard_specs": specs, "num_layers": 2})
    barrier(mesh.world_size)()


def resume_next_loss(directory, tree, rank=None):
    """Load the checkpoint in ``directory`` resharded for ``tree``'s layout; return the next step's loss."""
    from mf_longseq.parallel.reshard import RankLayout, load_resharded
    config, mesh, trainer = build(tree, rank=rank)
    target = RankLayout(dp=mesh.dp, cp=mesh.cp, mp=mesh.mp, pp=mesh.pp)
    state = load_resharded(directory, target=target, rank=mesh.rank)
    weights, moments = list(trainer.optimizer.params), trainer.optimizer.state_parameters()
    missing = [p.name for p in weights + moments if p.name not in state]
    assert not missing, f"resharded state lacks {missing[:3]}"
    for p in weights + moments:
        p.set_data(_tensor(state[p.name], p))
    with open(os.path.join(directory, "meta.json"), encoding="utf-8") as handle:
        step_count = json.load(handle)["optimizer"]["step_count"]
    trainer.optimizer.load_state(moments, step_count)
    return trainer.step(STEPS).loss


def _tensor(value, like):
    from mindspore import Tensor
    return Tensor(np.ascontiguousarray(value)).astype(like.dtype)


def run(name, rank, out_dir):
    os.makedirs(os.path.join(out_dir, name), exist_ok=True)
    path = os.path.join(out_dir, name, f"rank{rank}.npz")
    if name == "world_size":
        from mf_longseq.config import LongSeqConfig, check_world_size
        try:
            check_world_size(LongSeqConfig.from_mindformers(tiny_tree(dp=2, cp=2, pp=2, micro=2)), WORLD)
            message = ""
        except ValueError as err:
            message = str(err)
        np.savez(path, message=np.array(message))
        return
    if name == "resume_cp4":
        loss = resume_next_loss(os.path.join(out_dir, "ckpt_mp2_cp2"), tiny_tree(cp=4), rank=rank)
        np.savez(path, next_loss=np.float64(loss))
        return
    losses, trainer = train_case(name, rank=rank)
    extra = {f"state/{k}": v for k, v in trained_state(trainer).items()}            # after STEPS steps
    if name == "mp2_cp2":
        from mf_longseq.config import LongSeqConfig
        save_checkpoint(trainer, trainer.mesh, LongSeqConfig.from_mindformers(tiny_tree(*CASES[name])),
                        os.path.join(out_dir, "ckpt_mp2_cp2"))
        extra["next_loss"] = np.float64(trainer.step(STEPS).loss)
    from mf_longseq.parallel.tensor_parallel import shard_specs
    specs = json.dumps({k: spec.to_dict() for k, spec in shard_specs(trainer.model).items()})
    np.savez(path, losses=np.array(losses, np.float64), specs=np.array(specs), **extra)


def main():
    import mindspore as ms
    from mindspore.communication import get_group_size, get_rank, init
    ms.set_device("CPU")
    init()
    ms.runtime.launch_blocking()      # emulated exchanges in several groups: run ops in the order they are issued
    rank = get_rank()
    assert get_group_size() == WORLD, f"launch with --worker_num {WORLD}"
    out_dir = sys.argv[1]
    names = sys.argv[2].split(",") if len(sys.argv) > 2 else list(CASES) + ["resume_cp4", "world_size"]
    for name in names:
        run(name, rank, out_dir)
        print(f"rank {rank}: {name} done", flush=True)


if __name__ == "__main__":
    main()
