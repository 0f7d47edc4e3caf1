"""MindSpore's own Ascend memory pool against the planner (``planner/memory.py``) on the dry run (batch
``planner_w1``: one rank, ``MS_SIMULATION_LEVEL=1``, bf16, FlashAttention, context_parallel 1).

Every figure is ``ms.runtime.max_memory_allocated`` of one forward + backward (``ms.value_and_grad`` of the
loss over the trainable parameters; no optimizer step), peak statistics reset just before it; the planner's
figure is ``planner.run.planned_memory`` of the same config tree.

``offload_saves_layer_inputs``: 8 layers, hidden 256, S = 32768, vocabulary 256, so that the layer inputs
(8 x 16 MiB) outweigh the weight gradients (2.25 MiB a layer) and the head.  One warm-up step first (PyNative
uploads each weight to the pool when a step first reads it), then the same non-reentrant recompute with and
without ``long_seq.offload_layer_inputs``.  The pool peak must drop by the planner's own figure for the inputs
that leave the device (its total without offload minus with: (L - 2) x S x H x e = 96 MiB) within -20 % / +5 %:
the planner counts every weight gradient for the whole backward, the pool allocates a layer's when its backward
runs, and the peak moves from the top layer's backward (without offload: every input, few gradients) to the bottom one's
(with it: two inputs, every gradient), so the measured saving is the inputs minus (L - 2) layers' gradients
(82.5 MiB here).  Before this case the saving went unseen: ``cases_sp_offload.py``'s shape (hidden 1024,
S/CP/MP = 2048 tokens) has 4 MiB inputs beside 18 MiB of gradients a layer, so its peak is the bottom layer's
backward, where the inputs are already released with or without offload.

``llama2_7b_*``: one LLaMA2-7B-sized layer (hidden 4096, 32 heads, FFN 11008, fp32 weights, bf16 compute,
FlashAttention) at S = 32768 tokens on the rank, vocabulary 1024 (the real 32000 would add 0.5 GB of fp32
embedding and head on the host per copy; at 1024 the head's logits are 0.5 GB of a 10-12 GB peak), one layer
(the host holds the fp32 weights: 0.8 GB a layer, the worker stays near 2.4 GB resident), one step with the
layer's weights not yet in the pool (they upload during the step and count in its peak, as the planner's
``weights`` term does), against the planner's total without the optimizer (no optimizer step runs).  Within
+-20 %, or the documented gap
(``docs/planner_memory.md``, "Measured against the Ascend dry run"): untiled, the planner adds the attention
buffers on top of the larger of the MLP's backward working set and the logits although none of the three is
alive with another (it over-predicts by about 32 %); with only the largest of the three, both cases are within 20 %.
"""
import gc

import numpy as np
import mindspore as ms

from asim_worker import batch, case
from cases_model import _tiny_tree

PLANNER_BATCH = batch("planner_w1", rank_size=1)
MIB = 2 ** 20
OFFLOAD_SHAPE = dict(num_layers=8, hidden_size=256, num_heads=8, n_kv_heads=4, intermediate_size=512,
                     seq_length=32768, vocab_size=256)


def _tree(shape: dict, recompute: bool, **long_seq) -> dict:
    tree = _tiny_tree("llama2/7b_32k_cp4_colossalai_cp.yaml", 1, 1, 1, 1)
    tree["model"]["model_config"].update(shape)
    tree["recompute_config"]["recompute"] = recompute
    tree["long_seq"].update(long_seq)
    return tree


def _build(tree):
    from mf_longseq.config import LongSeqConfig
    from mf_longseq.models import build_model
    from mf_longseq.parallel import Mesh
    config = LongSeqConfig.from_mindformers(tree)
    model = build_model(tree, mesh=Mesh.from_config(config, rank=0).create_groups())
    seq = tree["model"]["model_config"]["seq_length"]
    ids = ms.Tensor(np.zeros((1, seq), np.int32))
    return model, model.make_batch(ids, ids, ms.Tensor(np.ones((1, seq), np.float32)))


def step_peak_mib(model, batch_, steps: int = 1):
    """(peak, base) in MiB of the last of ``steps`` forward + backward passes: the pool's peak during the step
    above what it held just before it (``base``: what earlier steps or cases left, e.g. uploaded weights)."""
    params = model.trainable_params()
    for _ in range(steps):
        gc.collect()
        ms.runtime.synchronize()
        ms.runtime.reset_peak_memory_stats()
        base = ms.runtime.memory_allocated()
        _, grads = ms.value_and_grad(lambda b: model.forward_batch(b)[0], None, params)(batch_)
        assert [g.shape for g in grads] == [p.shape for p in params]
        ms.runtime.synchronize()
        del grads
    return (ms.runtime.max_memory_allocated() - base) / MIB, base / MIB


@case(PLANNER_BATCH, "offload_saves_layer_inputs")
def offload_saves_layer_inputs():
    from mindspore import Tensor
    from mf_longseq.planner.run import planned_memory
    from mf_longseq.train.validation import check_run
    moves, original = [], Tensor.move_to

    def spy(tensor, to, blocking=True):
        moves.append(to)
        return original(tensor, to, blocking)
    peaks, bases = {}, {}
    Tensor.move_to = spy
    try:
        for offload in (False, True):
            model, batch_ = _build(_tree(OFFLOAD_SHAPE, offload, offload_layer_inputs=offload))
            if not offload:                     # the recompute offload uses, inputs kept on the device
                for layer in model.model.layers:
                    layer.recompute(use_reentrant=False, early_stop=False)
            peaks[offload], bases[offload] = step_peak_mib(model, batch_, steps=2)
            del model, batch_
    finally:
        Tensor.move_to = original
    layers = OFFLOAD_SHAPE["num_layers"]
    assert moves.count("CPU") == moves.count("Ascend") == 2 * layers, moves      # two steps, every layer
    with_, without = (planned_memory(check_run(_tree(OFFLOAD_SHAPE, True, offload_layer_inputs=off)))[0].total(True)
                      for off in (True, False))
    planned = (without - with_) / MIB
    saved = peaks[False] - peaks[True]
    info = {"peak_mib_without": round(peaks[False], 1), "peak_mib_with": round(peaks[True], 1),
            "saved_mib": round(saved, 1), "planned_saving_mib": planned, "ratio": round(saved / planned, 3),
            "pool_before_step_mib": {"without": round(bases[False], 1), "with": round(bases[True], 1)}}
    assert 0.8 * planned <= saved <= 1.05 * planned, info
    return info


LLAMA2_7B = dict(num_layers=1, hidden_size=4096, num_heads=32, n_kv_heads=32, intermediate_size=11008,
                 seq_length=32768, vocab_size=1024)


def _against_planner(recompute: bool, **long_seq) -> dict:
    from mf_longseq.planner.run import planned_memory
    from mf_longseq.train.validation import check_run
    tree = _tree(LLAMA2_7B, recompute, **long_seq)
    memory, rc = planned_memory(check_run(tree))
    model, batch_ = _build(tree)
    measured, base = step_peak_mib(model, batch_)
    del model, batch_
    rows = {name: round(value / MIB, 1) for name, value in memory.rows()}
    planned = (memory.total(rc) - memory.optimizer) / MIB
    return {"measured_mib": round(measured, 1), "pool_before_step_mib": round(base, 1),
            "planned_mib": round(planned, 1), "planned_over_measured": round(planned / measured, 3), "planner_rows_mib": rows}


def _largest_transient(info: dict) -> float:
    """The planner's figure with only the largest of its transient terms (``backward``, ``attention``,
    ``logits``) instead of the planner's max(backward, logits) + attention: none of the three is alive with
    another (docs/planner_memory.md)."""
    rows = info["planner_rows_mib"]
    in_total = max(rows["backward"], rows["logits"]) + rows["attention"]          # planner/memory.py Memory.total
    return info["planned_mib"] - in_total + max(rows["backward"], rows["attention"], rows["logits"])


@case(PLANNER_BATCH, "llama2_7b_layer_untiled")
def llama2_7b_layer_untiled():
    info = _against_planner(False)
    info["largest_transient_over_measured"] = round(_largest_transient(info) / info["measured_mib"], 3)
    assert 1.2 < info["planned_over_measured"] < 1.5, info                      # the gap the docs explain
    assert 0.8 <= info["largest_transient_over_measured"] <= 1.2, info
    return info


@case(PLANNER_BATCH, "llama2_7b_layer_mlp_tile")
def llama2_7b_layer_mlp_tile():
    info = _against_planner(False, mlp_tile=4096)
    info["largest_transient_over_measured"] = round(_largest_transient(info) / info["measured_mib"], 3)
    assert 0.8 <= info["planned_over_measured"] <= 1.2, info
    assert 0.8 <= info["largest_transient_over_measured"] <= 1.2, info
    return info
