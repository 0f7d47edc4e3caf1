"""The tiny CP = 2 templates, built by MindFormers' own builder on 2 real msrun CPU ranks, give the CP = 1 loss
and gradients of the same weights after one step."""
import json
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
TINY = HERE.parents[1] / "yaml_templates" / "tiny"
TEMPLATES = ["llama2_tiny_s256_cp2_colossalai_cp.yaml", "llama2_tiny_s256_cp2_ulysses_cp.yaml",
             "qwen1_5_tiny_s256_cp2_colossalai_cp.yaml", "qwen1_5_tiny_s256_cp2_ulysses_cp.yaml",
             "qwen_tiny_s256_cp2_colossalai_cp.yaml"]


@pytest.mark.dist
def test_tiny_cp2_templates_step_through_mindformers_builder(msrun, tmp_path):
    msrun(HERE / "mf_builder_worker.py", [tmp_path, *(TINY / t for t in TEMPLATES)], workers=2, timeout=900)
    for rank in (0, 1):
        results = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert sorted(results) == sorted(TEMPLATES)
        for name, r in results.items():
            assert r["cp"] == 2 and r["type"].endswith("LongSeqForCausalLM"), name
            assert abs(r["loss"] - r["ref_loss"]) <= 1e-5 * r["ref_loss"], (name, r)
            assert r["grad_err"] < 1e-5, (name, r)
