"""msrun worker (2 CPU ranks): the tiny CP=2 templates built by MindFormers' own builder, one training step.

Usage (under msrun, 2 workers): python mf_builder_worker.py OUT_DIR TEMPLATE [TEMPLATE ...]
Each template is built with ``build_network(config.model, default_args={"parallel_config": ...})`` (as
MindFormers' trainer does), runs forward and backward on this rank's zigzag shard, and the loss and the
gradients summed over the CP ranks are compared with a CP = 1 model of the same weights on the whole batch.
Rank r writes OUT_DIR/rank<r>.json: {template: {"loss", "ref_loss", "grad_err", "type"}}.
"""
import json
import os
import sys

import numpy as np


def one_step(model, ids, labels, mask, group=None):
    import mindspore as ms
    from mindspore import Tensor
    from mf_longseq.parallel.comm import all_reduce
    args = (Tensor(ids), Tensor(labels), Tensor(mask))
    params = model.trainable_params()
    loss, count = model.forward_batch(model.make_batch(*args))          # the plain model's form (shards)
    grads = ms.grad(lambda a, b, c: model.forward_batch(model.make_batch(a, b, c))[0], None, params)(*args)
    if group is not None:
        loss, count = all_reduce(loss, group), all_reduce(count, group)
        grads = [all_reduce(g, group) for g in grads]
    total = float(count.asnumpy())
    return float(loss.asnumpy()) / total, [np.array(g.asnumpy()) / total for g in grads]


def run(path: str) -> dict:
    from mindformers import MindFormerConfig
    from mindformers.models.build_model import build_network
    from mf_longseq.config import LongSeqConfig
    from mf_longseq.models import build_model
    from mf_longseq.parallel import Mesh, shard_sequence
    cfg = MindFormerConfig(path)
    net = build_network(cfg.model, default_args={"parallel_config": cfg.parallel_config})
    ls = net.long_seq
    tree = cfg.to_dict()
    reference = build_model(tree, mesh=Mesh(rank=0), long_seq_config=LongSeqConfig())
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 256, (2, net.config.seq_length + 1))
    ids, labels = tokens[:, :-1].astype(np.int32), tokens[:, 1:].astype(np.int32)
    mask = (rng.random(ids.shape) > 0.1).astype(np.float32)
    shard = [shard_sequence(a, net.mesh, ls.layout, 1) for a in (ids, labels, mask)]
    loss, grads = one_step(net, *shard, group=net.mesh.group("cp"))
    ref_loss, ref_grads = one_step(reference, ids, labels, mask)
    err = max(float(np.abs(a - b).max() / np.abs(b).max()) for a, b in zip(grads, ref_grads))
    return {"loss": loss, "ref_loss": ref_loss, "grad_err": err, "type": type(net).__name__,
            "algo": ls.context_parallel_algo, "cp": ls.context_parallel}


def main() -> None:
    import mindspore as ms
    from mindspore.communication import get_rank, init
    ms.set_device("CPU")
    init()
    out_dir, templates = sys.argv[1], sys.argv[2:]
    results = {os.path.basename(t): run(t) for t in templates}
    with open(os.path.join(out_dir, f"rank{get_rank()}.json"), "w", encoding="utf-8") as handle:
        json.dump(results, handle)


if __name__ == "__main__":
    main()
