"""Planner: per-device memory and communication of a long-sequence run, and the layouts that fit.

    from mf_longseq.planner import model_shape, RunPlan, Settings, memory_per_device, attention_bytes, recommend
    shape = model_shape("llama2-70b")
    mem = memory_per_device(shape, RunPlan(dp=1, mp=8, cp=8, algo="colossalai_cp"), Settings(seq_len=131072))

The command is ``mf-longseq plan`` (``planner/cli.py``).
"""
from mf_longseq.planner.comm import AttentionCall, attention_bytes
from mf_longseq.parallel.plan import RunPlan
from mf_longseq.planner.run_settings import Settings
from mf_longseq.planner.memory import Memory, memory_per_device
from mf_longseq.planner.recommend import Candidate, Hardware, recommend
from mf_longseq.planner.shapes import ModelShape, available_models, model_shape

__all__ = ["AttentionCall", "attention_bytes", "RunPlan", "Settings", "Memory", "memory_per_device", "Candidate",
           "Hardware", "recommend", "ModelShape", "available_models", "model_shape"]
