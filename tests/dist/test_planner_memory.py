"""The planner's memory model against the measured peak memory of a real training step on 2 CPU ranks
(CP = 2, ring, zigzag; a tiny LLaMA2 whose step is dominated by attention tiles, activations and logits).

What is compared: the rise of each rank's peak resident memory over its resident memory before the model was
built (``planner_memory_worker.py``), against ``memory_per_device(...).total()`` for backend "cpu", float32,
no optimizer sharding (mf_longseq's runner keeps everything on every rank).  Tolerance: 15%.
"""
import json
from pathlib import Path

import pytest
import yaml

from mf_longseq.parallel.plan import RunPlan
from mf_longseq.planner.layout import Settings
from mf_longseq.planner.memory import memory_per_device
from mf_longseq.planner.shapes import model_shape

WORKER = Path(__file__).resolve().parent / "planner_memory_worker.py"
SEQ, BLOCK = 4096, 1024
CONFIG = {
    "context": {"device_target": "CPU"},
    "parallel_config": {"data_parallel": 1, "model_parallel": 1, "context_parallel": 2, "pipeline_stage": 1,
                        "context_parallel_algo": "colossalai_cp", "use_seq_parallel": False},
    "long_seq": {"layout": "zigzag", "block_size": BLOCK},
    "model": {"model_config": {"type": "LlamaLongSeqConfig", "vocab_size": 4096, "hidden_size": 256,
                               "num_layers": 2, "num_heads": 8, "n_kv_heads": 2, "intermediate_size": 704,
                               "seq_length": SEQ, "compute_dtype": "float32", "param_init_type": "float32"},
              "arch": {"type": "LlamaLongSeqForCausalLM"}},
}


@pytest.mark.dist
def test_memory_model_within_15_percent_of_measured_peak(msrun, tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(CONFIG))
    msrun(WORKER, [path, tmp_path / "out"], workers=2, timeout=900)
    predicted = memory_per_device(model_shape(str(path)), RunPlan(cp=2, algo="colossalai_cp"), Settings(
        seq_len=SEQ, param_dtype="float32", grad_dtype="float32", compute_dtype="float32", zero=0, backend="cpu",
        block_size=BLOCK)).total(recompute=False)
    for rank in range(2):
        measured = json.loads((tmp_path / "out" / f"rank{rank}.json").read_text())["peak_delta"]
        assert abs(measured - predicted) <= 0.15 * measured, (rank, measured / 2 ** 20, predicted / 2 ** 20)
