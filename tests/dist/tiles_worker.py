"""msrun worker (2 ranks): the tiled LM head + loss and the tiled MLP under model_parallel = 2, and the tiny
Qwen-vocabulary run tiled and untiled under context_parallel = 2.

Usage (under msrun, 2 workers): python tiles_worker.py OUT_DIR [case,case,...]

* ``cells_mp2``: ``TiledHeadLoss`` (behind ``CopyToMP``, as the model uses it) and ``TiledMLP`` (between
  ``CopyToMP`` and ``ReduceFromMP``) on this rank's vocabulary / FFN slice of full float32 inputs drawn from a
  fixed seed; OUT_DIR/cells_mp2/rank<r>.npz holds the loss, the MLP output and every gradient (weights: this
  rank's slice).  The test compares them with its float64 NumPy oracle.
* ``qwen_vocab_cp2``: ``run_job`` (the ``mf-longseq train`` path) of a tiny model with Qwen's vocabulary
  (151936) at S = ``SEQ`` on cp2 (ring), ``STEPS`` steps, once with ``long_seq.loss_tile: 0, mlp_tile: 0``
  and once with the default loss tile and ``mlp_tile: 128``; OUT_DIR/qwen_vocab_cp2/rank<r>.json holds both
  runs' losses.
"""
import io
import json
import os

import numpy as np

from worker_main import join_launch, run_cases

WORLD = 2
SEQ = 1024
STEPS = 3
VOCAB = 151936
# the cells' sizes: tokens, hidden, vocabulary, FFN width, tiles
N, H, V, F = 11, 8, 38, 20
LOSS_TILE, MLP_TILE = 4, 3


def cell_inputs():
    """Full float32 inputs of the cell case (the same on every rank and in the test's oracle)."""
    rng = np.random.default_rng(5)
    return {"hidden": rng.normal(0, 1, (N, H)), "weight": rng.normal(0, 0.7, (V, H)),
            "labels": rng.integers(0, V, N), "mask": (rng.random(N) > 0.3) * 1.0,
            "x": rng.normal(0, 1, (1, N, H)), "w_gate": rng.normal(0, 0.5, (F, H)),
            "w_up": rng.normal(0, 0.5, (F, H)), "w_down": rng.normal(0, 0.5, (H, F)),
            "dy": rng.normal(0, 1, (1, N, H))}


def run_cells(rank, out_dir):
    import mindspore as ms
    from mindspore import Tensor
    from mf_longseq.config import LongSeqConfig
    from mf_longseq.models.tiled_loss import TiledHeadLoss
    from mf_longseq.models.tiled_mlp import TiledMLP
    from mf_longseq.parallel import Mesh
    from mf_longseq.parallel.tensor_parallel import CopyToMP, ReduceFromMP
    mp = Mesh.from_config(LongSeqConfig(model_parallel=2), rank=rank).create_groups().group("mp")
    a = {k: Tensor(np.asarray(v, np.int32 if k == "labels" else np.float32)) for k, v in cell_inputs().items()}
    vp, fp = V // 2, F // 2
    head, copy, reduce = TiledHeadLoss(LOSS_TILE, mp, vocab_start=mp.index * vp), CopyToMP(mp), ReduceFromMP(mp)
    w = a["weight"][mp.index * vp:(mp.index + 1) * vp]

    def loss_fn(hidden, weight):
        return head(copy(hidden), weight, a["labels"], a["mask"])[0]

    loss, (d_hidden, d_weight) = ms.value_and_grad(loss_fn, grad_position=(0, 1))(a["hidden"], w)
    mlp, cols = TiledMLP(MLP_TILE), slice(mp.index * fp, (mp.index + 1) * fp)
    weights = (a["w_gate"][cols], a["w_up"][cols], a["w_down"][:, cols])

    def mlp_fn(x, wg, wu, wd):
        return reduce(mlp(copy(x), wg, wu, wd))

    out = mlp_fn(a["x"], *weights)
    grads = ms.grad(lambda *args: (mlp_fn(*args) * a["dy"]).sum(), grad_position=(0, 1, 2, 3))(a["x"], *weights)
    np.savez(os.path.join(out_dir, "cells_mp2", f"rank{rank}.npz"), loss=loss.asnumpy(),
             d_hidden=d_hidden.asnumpy(), d_weight=d_weight.asnumpy(), y=out.asnumpy(),
             **{f"mlp_{i}": g.asnumpy() for i, g in enumerate(grads)})


def qwen_vocab_tree(loss_tile, mlp_tile, seq=SEQ):
    """A tiny Qwen1.5-shaped model with Qwen's vocabulary on cp2 (ring); ``loss_tile`` None: the default."""
    tiles = {"mlp_tile": mlp_tile, **({} if loss_tile is None else {"loss_tile": loss_tile})}
    return {
        "seed": 0,
        "runner_config": {"batch_size": 1},
        "optimizer": {"type": "AdamW", "betas": [0.9, 0.95], "eps": 1.0e-8, "weight_decay": 0.0},
        "lr_schedule": {"type": "ConstantWarmUpLR", "learning_rate": 1.0e-3, "warmup_steps": 0},
        "parallel_config": {"data_parallel": 1, "model_parallel": 1, "context_parallel": 2,
                            "pipeline_stage": 1, "micro_batch_num": 1, "context_parallel_algo": "colossalai_cp"},
        "context": {"device_target": "CPU"},
        "model": {"model_config": {"type": "Qwen2LongSeqConfig", "vocab_size": VOCAB, "hidden_size": 32,
                                   "num_layers": 2, "num_heads": 4, "n_kv_heads": 2, "intermediate_size": 64,
                                   "seq_length": seq, "init_seed": 11},
                  "arch": {"type": "Qwen2LongSeqForCausalLM"}},
        "long_seq": {"layout": "zigzag", "block_size": 512, **tiles},
    }


def run_qwen_vocab(rank, out_dir):
    from mf_longseq.train.job import JobOptions, run_job
    losses = {}
    for name, tiles in (("untiled", (0, 0)), ("tiled", (None, 128))):
        opts = JobOptions(config=qwen_vocab_tree(*tiles), steps=STEPS,
                          output_dir=os.path.join(out_dir, "qwen_vocab_cp2", name))
        losses[name] = [r.loss for r in run_job(opts, stream=io.StringIO())]
    with open(os.path.join(out_dir, "qwen_vocab_cp2", f"rank{rank}.json"), "w", encoding="utf-8") as handle:
        json.dump(losses, handle)


CASES = {"cells_mp2": run_cells, "qwen_vocab_cp2": run_qwen_vocab}


def main():
    rank, out_dir, only = join_launch(WORLD)

    def run(name):
        os.makedirs(os.path.join(out_dir, name), exist_ok=True)
        CASES[name](rank, out_dir)
    run_cases(list(CASES), run, only, rank, name_of=lambda name: name)


if __name__ == "__main__":
    main()
