"""msrun worker: peak memory (RSS) of one training step of a tiny model, for the planner's memory model.

Usage (under msrun): python planner_memory_worker.py CONFIG.yaml OUT_DIR

Measured: the rise of this process's peak resident memory (VmHWM, ``train.monitor.peak_rss_mib``) over its
resident memory just before the model is built, after a warm-up step of a tiny model of the same kind (kernels loaded, communication groups
created, MindSpore's memory pool started).  The step is what the runner does: forward + backward of
loss_sum / count, gradients all-reduced over dp x cp, one AdamW update.  Writes OUT_DIR/rank<r>.json.
"""
import gc
import json
import os
import sys

import numpy as np

from mf_longseq.train.monitor import peak_rss_mib, rss_mib


def _step(model, mesh, seq_len, vocab, optimizer):
    import mindspore as ms
    from mindspore import Tensor
    from mf_longseq.parallel import shard_sequence
    from mf_longseq.parallel.comm import all_reduce
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, vocab, (1, seq_len)).astype(np.int32)
    ids = Tensor(shard_sequence(tokens, mesh, model.long_seq.layout, seq_dim=1))
    mask = Tensor(np.ones(ids.shape, np.float32))
    params = optimizer.parameters

    def loss_fn(i, l, m):
        loss_sum, _ = model(i, l, m)
        return loss_sum / float(seq_len)

    _, grads = ms.value_and_grad(loss_fn, None, params)(ids, ids, mask)
    grads = tuple(all_reduce(g, mesh.group("dp_cp")) for g in grads)
    optimizer(grads)


def main():
    import mindspore as ms
    from mindspore import nn
    from mindspore.communication import get_rank, init
    ms.set_device("CPU")
    init()
    from mf_longseq.config import LongSeqConfig
    from mf_longseq.models import build_model, model_config_from
    from mf_longseq.parallel import Mesh
    path, out_dir = sys.argv[1], sys.argv[2]
    long_seq = LongSeqConfig.from_mindformers(path)
    mesh = Mesh.from_config(long_seq, rank=get_rank()).create_groups()
    model_config = model_config_from(path)
    warm_config = type(model_config)(**{**model_config.to_dict(), "hidden_size": 32, "num_layers": 1,
                                        "intermediate_size": 64, "vocab_size": 64, "seq_length": 64})
    warm = build_model(warm_config, mesh=mesh, long_seq_config=long_seq)
    _step(warm, mesh, 64, 64, nn.AdamWeightDecay(warm.trainable_params(), 1e-3))
    del warm
    gc.collect()
    before = int(rss_mib() * 2**20)
    model = build_model(path, mesh=mesh)
    _step(model, mesh, model_config.seq_length, model_config.vocab_size,
          nn.AdamWeightDecay(model.trainable_params(), 1e-3))
    peak = int(peak_rss_mib() * 2**20)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"rank{get_rank()}.json"), "w", encoding="utf-8") as handle:
        json.dump({"before": before, "peak": peak, "peak_delta": peak - before}, handle)


if __name__ == "__main__":
    main()
