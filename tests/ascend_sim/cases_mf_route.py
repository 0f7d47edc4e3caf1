"""MindFormers' own Trainer route on rank 0 of cp = 2 (batch ``mf_route_cp2``: ``RANK_SIZE=2 RANK_ID=0``).

``MindFormerConfig`` -> ``build_context`` -> ``Trainer(config).train()`` (``tests/mf_route.py``, what
``run_mindformer.py`` runs) for one step of the tiny LLaMA2 cp = 2 template switched to Ascend
(``context.device_target: Ascend``, ``use_flash_attention: True``, bf16 compute), with the wrapper the user
guide tells Ascend users to use: MindFormers' ``MFTrainOneStepCell`` with dynamic loss scaling and clipping
(accepted by ``mf_route/trainer.py`` with model_parallel 1, ``parallel_mode: 0``, ``gradients_mean: False``).
The data is a one-sample MindRecord written by the case.  Checked: the step ran, the wrapper was
``MFTrainOneStepCell``, the attention ran ``FlashKernel`` (BNSD calls), the shapes / dtypes of the step's
outputs; never values (the dummy collectives return zeros).
"""
import os
import sys
from pathlib import Path

import numpy as np

from asim_worker import batch, case, host_count_as_if_every_rank_equal

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))          # tests/: mf_route

ASCEND_WRAPPER = {"type": "MFTrainOneStepCell", "use_clip_grad": True, "max_grad_norm": 1.0,
                  "scale_sense": {"type": "DynamicLossScaleUpdateCell", "loss_scale_value": 65536,
                                  "scale_factor": 2, "scale_window": 1000}}
ON_ASCEND = {"context.device_target": "Ascend", "model.model_config.use_flash_attention": True,
             "model.model_config.compute_dtype": "bfloat16"}


def mf_route_step():
    """One step of the Trainer route with ``MFTrainOneStepCell`` on this rank (see the module docstring)."""
    from collections import Counter
    import mindspore as ms
    from mindspore.nn import DynamicLossScaleUpdateCell
    from mindformers import MindFormerConfig, Trainer, build_context
    from mindformers.wrapper import MFTrainOneStepCell
    from cases_comm import Recorder
    from mf_longseq.attention.flash import FlashKernel
    from mf_longseq.mf_route.wrapper import plugin_model
    from mf_route import SEQ, VOCAB, RouteCase, loss_recorder, route_config, write_tokens
    work = Path.cwd()
    data = write_tokens(work / "tokens.mindrecord",
                        np.random.default_rng(0).integers(3, VOCAB, (1, SEQ + 1)))
    route = RouteCase("llama2_cp2_ascend", "llama2_tiny_s256_cp2_colossalai_cp.yaml", cp=2, overrides=ON_ASCEND)
    cfg = route_config(route, data, str(work / "run"))
    cfg.runner_wrapper = MindFormerConfig(**ASCEND_WRAPPER)
    host_count_as_if_every_rank_equal()
    os.environ.setdefault("REGISTER_PATH", str(Path(__file__).resolve().parents[2] / "mf_longseq"))
    build_context(cfg)
    assert ms.get_context("device_target") == "Ascend", ms.get_context("device_target")
    recorder = loss_recorder()
    with Recorder() as rec:
        Trainer(cfg, callbacks=[recorder]).train()
    assert len(recorder.losses) == 1, f"{len(recorder.losses)} steps ran, 1 expected"
    wrapper, outputs = recorder.last.train_network, recorder.last.net_outputs
    outputs = [(tuple(o.shape), str(o.dtype)) for o in outputs if hasattr(o, "shape")]
    assert type(wrapper) is MFTrainOneStepCell, type(wrapper)
    assert isinstance(wrapper.loss_scaling_manager, DynamicLossScaleUpdateCell), wrapper.loss_scaling_manager
    assert wrapper.use_clip_grad and wrapper.reducer_flag, (wrapper.use_clip_grad, wrapper.reducer_flag)
    model = plugin_model(wrapper.network)
    assert model.mesh.cp == 2 and model.mesh.rank == 0, repr(model.mesh)
    kernel = model.model.layers[0].self_attn.core.kernel
    assert isinstance(kernel, FlashKernel), type(kernel)
    layouts = {c.input_layout for c in rec.flash_calls}
    assert layouts == {"BNSD"}, f"FlashAttentionScore layouts {layouts}"
    moved = Counter((c["op"], c["dtype"]) for c in rec.calls)
    for op in ("isend", "irecv"):                                    # the ring's bf16 exchanges reached HCCL
        assert moved[(op, "BFloat16")] > 0, f"no bf16 {op} reached HCCL: {dict(moved)}"
    assert outputs[0] == ((), "Float32"), f"loss {outputs[0]}"               # the global mean loss, a scalar
    assert ((), "Bool") in outputs[1:], f"no overflow flag among the outputs {outputs}"
    return {"wrapper": type(wrapper).__name__, "outputs": outputs,
            "collectives": {f"{k[0]} {k[1]}": v for k, v in sorted(moved.items())}, "layouts": sorted(layouts),
            "mesh": repr(model.mesh)}


MF_ROUTE_CP2 = batch("mf_route_cp2", rank_size=2)
case(MF_ROUTE_CP2, "llama2_cp2_mf_trainer_mftrainonestepcell")(mf_route_step)
