"""``mf-longseq adopt`` on MindFormers' own shipped YAMLs (tests/data/mindformers_yamls, origins in its README):
the rewritten file passes ``validate`` on the chosen route, every change carries a reason, and what cannot be
carried over is refused by key.  (Training the adopted files with CP = 2: tests/dist/test_adopt_route.py.)"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mf_longseq.tools.adopt import REMOVED, adopt
from mf_longseq.train.validation import collect_run

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "tests" / "data" / "mindformers_yamls"
LLAMA2 = SHIPPED / "v1.5.0_pretrain_llama2_7b.yaml"
QWEN1_5 = SHIPPED / "v1.5.0_pretrain_qwen1_5_7b.yaml"
QWEN = SHIPPED / "v1.3.2_finetune_qwen_7b.yaml"
LLAMA3_1 = SHIPPED / "head_finetune_llama3_1_8b.yaml"
FINETUNE_LLAMA2 = SHIPPED / "v1.5.0_finetune_llama2_7b.yaml"


def _changed(result) -> dict:
    return {c.key: c for c in result.changes}


@pytest.mark.parametrize("path, columns, config_type, route", [
    (LLAMA2, False, "LlamaLongSeqConfig", "mindformers"),
    (QWEN1_5, False, "Qwen2LongSeqConfig", "mindformers"),
    (QWEN, True, "QwenLongSeqConfig", "mindformers"),
    (LLAMA3_1, True, "LlamaLongSeqConfig", "mindformers"),
    (FINETUNE_LLAMA2, True, "LlamaLongSeqConfig", "mindformers"),
    (LLAMA2, False, "LlamaLongSeqConfig", "train"),
    (QWEN1_5, False, "Qwen2LongSeqConfig", "train"),
])
def test_shipped_yamls_adopt_into_files_that_validate_on_the_route(path, columns, config_type, route):
    result = adopt(str(path), route=route, cp=2, algo="colossalai_cp", pretraining_columns=columns)
    assert result.refusals == [], [str(e) for e in result.refusals]
    tree = result.tree
    assert tree["model"]["model_config"]["type"] == config_type
    assert tree["model"]["arch"]["type"] == config_type.replace("Config", "ForCausalLM")
    assert (tree["trainer"]["type"], tree["context"]["mode"], tree["parallel"]["parallel_mode"]) == \
        ("LongSeqTrainer", 1, 0)
    assert tree["runner_config"]["sink_mode"] is False
    assert tree["parallel_config"]["context_parallel"] == 2
    assert all(c.reason and c.old != c.new for c in result.changes)
    assert "ObsMonitor" not in str(tree.get("callbacks")) + str(tree.get("eval_callbacks"))   # not in MindFormers 1.9
    check, errors = collect_run(tree, route=route)
    assert errors == [] and check.long_seq.context_parallel == 2
    assert yaml.safe_load(open(path, encoding="utf-8"))["model"]["model_config"]["type"] != config_type  # untouched


def test_family_specific_rewrites_keep_the_model_shape():
    """Qwen v1: MindFormers' intermediate_size is one SwiGLU half (11008), the plugin's both; rotary_emb_base is
    theta.  Qwen1.5 (MindFormers' LlamaConfig with q/k/v bias) becomes Qwen2LongSeqConfig."""
    qwen = _changed(adopt(str(QWEN), cp=2, algo="colossalai_cp", pretraining_columns=True))
    assert (qwen["model.model_config.intermediate_size"].old, qwen["model.model_config.intermediate_size"].new) == \
        (11008, 22016)
    assert qwen["model.model_config.rotary_emb_base"].new == REMOVED and qwen["model.model_config.theta"].new == 10000
    q15 = adopt(str(QWEN1_5), cp=2, algo="ulysses_cp")
    check, _ = collect_run(q15.tree, route="mindformers")
    assert (check.model.ffn_hidden_size, check.model.theta, check.model.qkv_has_bias) == (11008, 1000000.0, True)
    assert _changed(q15)["parallel_config.use_seq_parallel"].new is False
    llama3 = adopt(str(LLAMA3_1), cp=2, pretraining_columns=True).tree["optimizer"]                 # AdamW
    assert (llama3["type"], llama3["betas"]) == ("LongSeqAdamW", [0.9, 0.95])


def test_what_cannot_be_carried_over_is_refused_by_key():
    refused = adopt(str(FINETUNE_LLAMA2), cp=2, algo="colossalai_cp")
    assert [e.key for e in refused.refusals] == ["train_dataset.input_columns"]
    assert "--pretraining-columns" in refused.refusals[0].fix
    tree = yaml.safe_load(LLAMA2.read_text())
    tree["model"]["model_config"]["scaling_factor"] = 2.0                     # RoPE scaling: not implemented
    tree["model"]["arch"]["type"] = "GLM2ForConditionalGeneration"
    keys = [e.key for e in adopt(tree, cp=2).refusals]
    assert keys == ["model.model_config.type"]
    tree["model"]["arch"]["type"] = "LlamaForCausalLM"
    tree["parallel_config"]["pipeline_stage"] = 2
    keys = [e.key for e in adopt(tree, cp=2).refusals]
    assert keys == ["model.model_config.scaling_factor", "parallel_config.pipeline_stage"]
    assert adopt(tree, cp=2, route="train").refusals[0].key == "model.model_config.scaling_factor"


def test_cli_prints_every_change_with_its_reason_and_writes_only_what_validates(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = tmp_path / "adopted.yaml"
    proc = subprocess.run([sys.executable, "-m", "mf_longseq.cli", "adopt", str(LLAMA2), "--cp", "4", "--algo",
                           "hybrid_cp", "-o", str(out)], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "context.mode: 0 -> 1    # PyNative" in proc.stderr
    assert "runner_config.sink_mode: True -> False    # " in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "mf_longseq.cli", "validate", "--route", "mindformers", str(out),
                           "--set", "parallel_config.ulysses_degree_in_cp=2"], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0 and "OK (route mindformers)" in proc.stdout, proc.stdout + proc.stderr[-2000:]
    bad = tmp_path / "bad.yaml"
    proc = subprocess.run([sys.executable, "-m", "mf_longseq.cli", "adopt", str(FINETUNE_LLAMA2), "-o", str(bad)],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 1 and not bad.exists()
    assert "train_dataset.input_columns = ['input_ids', 'labels']" in proc.stderr


def test_algo_offers_every_registered_algorithm():
    """``--algo`` lists every name of ``parallel/algorithms.py`` ALGORITHMS (not only MindFormers' three); a name
    outside MindFormers' enum is written as ``long_seq.cp_algo`` (MindFormers' key removed) and validates."""
    import argparse
    from mf_longseq.parallel.algorithms import ALGORITHMS, MINDFORMERS_ALGOS
    from mf_longseq.tools import adopt as adopt_tool
    parser = argparse.ArgumentParser()
    adopt_tool.register(parser.add_subparsers())
    choices = next(a for a in parser._subparsers._group_actions[0].choices["adopt"]._actions
                   if a.dest == "algo").choices
    assert tuple(choices) == tuple(ALGORITHMS) and set(MINDFORMERS_ALGOS) < set(choices)
    for name in set(ALGORITHMS) - set(MINDFORMERS_ALGOS):
        result = adopt(str(LLAMA2), cp=2, algo=name)
        assert result.tree["long_seq"]["cp_algo"] == name
        assert "context_parallel_algo" not in result.tree["parallel_config"]
        check, errors = collect_run(result.tree, route="mindformers")
        assert errors == [] and check.long_seq.algo == name
