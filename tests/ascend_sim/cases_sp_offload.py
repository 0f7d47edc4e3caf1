"""Sequence parallelism and layer-input offload on the Ascend path (batch ``sp_offload_w4``: rank 0 of
``RANK_SIZE=4``, mp2 x cp2 ring, bf16, FlashAttention).

One forward + backward of a small LLaMA2 (8 layers, hidden 1024, S = 8192, so S/CP = 4096 tokens per rank) per
setting, each in a fresh model, with MindSpore's own peak of its Ascend memory pool (``max_memory_allocated``,
reset before each).  The offload case must reach ``Tensor.move_to(..., blocking=False)`` both ways on Ascend
(device -> CPU after each layer's forward starts, CPU -> Ascend before its backward); SP must reach HCCL with the
reduce-scatter's and all-gather's shapes.  The peaks are reported (``info``) and ordered as the memory model
says: SP below no SP; with recompute, offload below no offload (the model: by (layers - 2) layer inputs; the
measured saving is reported beside it, and a variant with blocking copies shows whether the asynchronous copies
hold device memory longer).
"""
import gc

import numpy as np
import mindspore as ms

from asim_worker import batch, case
from cases_model import _tiny_tree

LAYERS, HIDDEN, SEQ = 8, 1024, 8192
SP_BATCH = batch("sp_offload_w4", rank_size=4)


def _peak_mib(sp: bool, recompute: bool, offload: bool, reentrant: bool = True) -> dict:
    """MindSpore's pool peak of one forward + backward; ``reentrant=False``: recompute the way offload does
    (``Cell.recompute(use_reentrant=False)``) but keep the inputs on the device."""
    from mf_longseq.config import LongSeqConfig
    from mf_longseq.models import build_model
    from mf_longseq.parallel import Mesh
    tree = _tiny_tree("llama2/7b_32k_cp4_colossalai_cp.yaml", 1, 2, 2, 1)
    tree["model"]["model_config"].update(num_layers=LAYERS, hidden_size=HIDDEN, num_heads=8, n_kv_heads=4,
                                         intermediate_size=2 * HIDDEN, seq_length=SEQ)
    tree["parallel_config"]["use_seq_parallel"] = sp
    tree["recompute_config"]["recompute"] = recompute and reentrant      # non-reentrant: applied below
    tree["long_seq"]["offload_layer_inputs"] = offload
    config = LongSeqConfig.from_mindformers(tree)
    model = build_model(tree, mesh=Mesh.from_config(config, rank=0).create_groups())
    if not reentrant:
        for layer in model.model.layers:
            layer.recompute(use_reentrant=False, early_stop=False)
    s_loc = SEQ // config.context_parallel
    ids = ms.Tensor(np.zeros((1, s_loc), np.int32))
    batch_ = model.make_batch(ids, ids, ms.Tensor(np.ones((1, s_loc), np.float32)))
    params = model.trainable_params()
    gc.collect()
    ms.runtime.synchronize()
    ms.runtime.reset_peak_memory_stats()
    base = ms.runtime.memory_allocated()
    _, grads = ms.value_and_grad(lambda b: model.forward_batch(b)[0], None, params)(batch_)
    for g, p in zip(grads, params):
        assert g.shape == p.shape, (p.name, g.shape, p.shape)
    ms.runtime.synchronize()
    peak = ms.runtime.max_memory_allocated() - base
    del grads, model
    return {"peak_mib": round(peak / 2 ** 20, 1), "sp_degree": 2 if sp else 1}


@case(SP_BATCH, "sp_and_offload_memory")
def sp_and_offload_memory():
    from mindspore import Tensor
    moves, force_blocking = [], [False]
    original = Tensor.move_to

    def spy(tensor, to, blocking=True):
        moves.append((to, blocking))
        return original(tensor, to, blocking or force_blocking[0])
    Tensor.move_to = spy
    try:
        rows = {name: _peak_mib(*flags) for name, flags in {
            "sp_off": (False, False, False), "sp_on": (True, False, False),
            "sp_on_rc": (True, True, False), "sp_on_rc_offload": (True, True, True)}.items()}
        assert sorted(set(moves)) == [("Ascend", False), ("CPU", False)], moves
        assert len(moves) == 2 * LAYERS, moves
        force_blocking[0] = True                        # the same copies, each waited for: does async hold memory?
        rows["sp_on_rc_offload_blocking_copies"] = _peak_mib(True, True, True)
        rows["sp_on_rc_nonreentrant"] = _peak_mib(True, True, False, reentrant=False)
    finally:
        Tensor.move_to = original
    assert rows["sp_on"]["peak_mib"] < rows["sp_off"]["peak_mib"], rows
    assert rows["sp_on_rc_offload"]["peak_mib"] < rows["sp_on_rc"]["peak_mib"], rows
    layer_input_mib = SEQ // 2 // 2 * HIDDEN * 2 / 2 ** 20               # (S/CP/MP) x H x bf16
    saved = rows["sp_on_rc"]["peak_mib"] - rows["sp_on_rc_offload"]["peak_mib"]
    same_recompute = rows["sp_on_rc_nonreentrant"]["peak_mib"] - rows["sp_on_rc_offload"]["peak_mib"]
    return {"rows": rows, "layer_input_mib": layer_input_mib, "offload_saved_mib": round(saved, 1),
            "offload_saved_vs_same_recompute_mib": round(same_recompute, 1),
            "model_saved_mib": (LAYERS - 2) * layer_input_mib}
