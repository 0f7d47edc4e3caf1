"""``mf-longseq plan``: the byte model against the textbook formulas, the memory model against the model's own
parameter count and its scaling laws, the recommendations against ``LongSeqConfig``, and the CLI / --emit-yaml.

(The byte model is checked *exactly* against the engine's counters by tests/dist/test_planner_bytes.py.)
"""
import argparse
import json
from dataclasses import replace

import pytest
import yaml

from run_settings import checked_settings
from mf_longseq.models import CONFIG_CLASSES, count_parameters
from mf_longseq.planner import cli as plan_cli
from mf_longseq.planner.comm import AttentionCall, attention_bytes
from mf_longseq.parallel.plan import RunPlan
from mf_longseq.planner.run_settings import Settings
from mf_longseq.planner.memory import layer_activations, memory_per_device, stage_params
from mf_longseq.planner.recommend import Hardware, layouts, recommend
from mf_longseq.planner.shapes import available_models, model_shape
from mf_longseq.tools.validate import validate


# ----------------------------------------------------------------------------------------------- bytes
@pytest.mark.parametrize("p, heads, kv", [(2, 8, 8), (4, 32, 8), (8, 64, 8), (4, 16, 4)])
def test_forward_bytes_match_the_textbook_formulas(p, heads, kv):
    """Ulysses (P-1)/P^2 N h (2 + 2/r) and ring 2 (P-1)/P N h / r, N tokens, h = heads x D, r = heads / kv."""
    b, s, d, e = 2, 4096, 128, 2
    tokens, h, r = b * s, heads * d, heads / kv
    ulysses = attention_bytes(AttentionCall(b, s, heads, kv, d, e, cp=p, ulysses=p), "forward")
    ring = attention_bytes(AttentionCall(b, s, heads, kv, d, e, cp=p, ulysses=1), "forward")
    assert ulysses["all_to_all"] == pytest.approx((p - 1) / p ** 2 * tokens * h * (2 + 2 / r) * e)
    assert ring["ring_shift"] == pytest.approx(2 * (p - 1) / p * tokens * h / r * e)
    assert set(ulysses) == {"all_to_all"} and set(ring) == {"ring_shift"}


def test_backward_ring_adds_the_float32_dkv_buffer_and_ulysses_doubles():
    call = AttentionCall(1, 1024, 8, 2, 64, 2, cp=4)
    kv, dkv = 2 * 2 * 256 * 64 * 2, 2 * 2 * 256 * 64 * 4
    assert attention_bytes(call, "backward") == {"ring_shift": 3 * kv + 4 * dkv}
    u = AttentionCall(1, 1024, 8, 8, 64, 2, cp=4, ulysses=4)
    assert attention_bytes(u, "both")["all_to_all"] == 2 * attention_bytes(u, "forward")["all_to_all"]


def test_ulysses_repeats_few_kv_heads_and_allgather_moves_u_times_more():
    few = AttentionCall(1, 512, 8, 1, 16, 4, cp=4, ulysses=4)              # 1 kv head repeated to 4
    assert few.kv_heads_exchanged == 4
    q = 512 // 4 * 8 * 16 * 4
    assert attention_bytes(few, "forward")["all_to_all"] == 2 * q * 3 // 4 + 2 * (q // 2) * 3 // 4
    gather = replace(few, use_alltoall=False)
    assert attention_bytes(gather, "forward") == {"all_gather": 4 * attention_bytes(few, "forward")["all_to_all"]}


def test_hybrid_is_ulysses_then_a_ring_over_the_rest():
    call = AttentionCall(1, 2048, 8, 4, 32, 2, cp=8, ulysses=2)
    got = attention_bytes(call, "forward")
    assert got["all_to_all"] == attention_bytes(replace(call, cp=2, seq_len=512), "forward")["all_to_all"]
    ring_alone = AttentionCall(1, 2048, 4, 2, 32, 2, cp=4)                 # half the heads per Ulysses rank
    assert got["ring_shift"] == attention_bytes(ring_alone, "forward")["ring_shift"]


# ----------------------------------------------------------------------------------------------- shapes, memory
@pytest.mark.parametrize("name", ["llama2-7b", "llama2-70b", "qwen-72b", "qwen1_5-14b"])
def test_shapes_come_from_the_model_presets(name):
    family, size = name.split("-")
    shape = model_shape(name)
    assert shape.total_params == count_parameters(CONFIG_CLASSES[family].from_preset(size))
    assert stage_params(shape, RunPlan()) == shape.total_params


def test_unknown_model_names_the_choices():
    with pytest.raises(ValueError, match=r"--model = 'gpt-9b': unknown model\. Fix: use one of .*llama2-70b"):
        model_shape("gpt-9b")
    assert "qwen1_5-72b" in available_models()


def test_model_parallel_and_pipeline_split_the_weights():
    shape = model_shape("llama2-13b")
    one = stage_params(shape, RunPlan())
    mp8 = stage_params(shape, RunPlan(mp=8))
    layer_norms = 2 * shape.hidden * shape.layers + shape.norm_params
    assert mp8 == (one - layer_norms) // 8 + layer_norms                    # norms replicated, the rest split
    pp2 = stage_params(shape, RunPlan(pp=2))
    assert pp2 == shape.layers // 2 * shape.layer_params + max(shape.embedding_params,
                                                                shape.head_params + shape.norm_params)


def test_activations_shrink_linearly_with_cp_and_recompute_keeps_layer_inputs():
    shape = model_shape("llama2-7b")
    settings = Settings(seq_len=65536)
    one = memory_per_device(shape, RunPlan(cp=1), settings)
    four = memory_per_device(shape, RunPlan(cp=4), settings)
    assert four.activations * 4 == one.activations
    assert layer_activations(shape, RunPlan(cp=4), settings) * 4 == layer_activations(shape, RunPlan(), settings)
    s = 65536 // 4
    assert four.activations_recompute == shape.layers * s * shape.hidden * 2 + layer_activations(
        shape, RunPlan(cp=4), settings)


def test_optimizer_sharding_and_mask():
    shape = model_shape("llama2-7b")
    layout = RunPlan(dp=2, cp=4)
    base = Settings(seq_len=8192, zero=0)
    plain = memory_per_device(shape, layout, base)
    assert plain.optimizer == 8 * shape.total_params
    z3 = memory_per_device(shape, layout, replace(base, zero=3))
    assert (z3.optimizer, z3.gradients, z3.weights) == (plain.optimizer // 8, plain.gradients // 8,
                                                         plain.weights // 8)
    assert plain.mask == 2048 ** 2
    assert memory_per_device(shape, layout, replace(base, mask_compression=False)).mask == 8192 ** 2


# ----------------------------------------------------------------------------------------------- recommendations
def test_every_recommendation_is_valid_and_fits():
    shape = model_shape("qwen-7b")
    settings = Settings(seq_len=32768)
    hw = Hardware(memory=64 * 2 ** 30)
    ranked = recommend(shape, 16, settings, hw)
    assert ranked, "a 7B model at 32k on 16 x 64 GiB must fit somewhere"
    for cand in ranked:
        lay = cand.plan
        assert lay.world_size == 16 and cand.memory_total <= hw.usable
        checked_settings(seq_length=32768, num_heads=shape.heads, num_kv_heads=shape.kv_heads,
                         num_layers=shape.layers, data_parallel=lay.dp, model_parallel=lay.mp, context_parallel=lay.cp,
                         pipeline_stage=lay.pp, micro_batch_num=cand.settings.micro_batch_num,
                         context_parallel_algo=lay.algo,
                         ulysses_degree_in_cp=lay.ulysses if lay.algo == "hybrid_cp" else 1, device_target="Ascend")
    assert [c.step_seconds for c in ranked] == sorted(c.step_seconds for c in ranked)


def test_layouts_the_config_rejects_are_never_recommended():
    shape = model_shape("llama2-70b")                                       # 64 heads, 8 kv heads
    settings = Settings(seq_len=131072, zero=3)
    ranked = recommend(shape, 64, settings, Hardware())
    valid = {c.plan for c in ranked}
    for lay in layouts(64, shape, ("ulysses_cp",)):
        if lay.mp == 8 and lay.cp == 8:
            assert lay in valid                                               # 8 heads per mp rank, U = 8: ok
    assert not any(c.plan.algo == "ulysses_cp" and (64 // c.plan.mp) % c.plan.ulysses for c in ranked)


# ----------------------------------------------------------------------------------------------- CLI
def _run(argv, capsys):
    parser = argparse.ArgumentParser()
    plan_cli.register(parser.add_subparsers())
    args = parser.parse_args(["plan", *argv])
    return args.func(args), capsys.readouterr().out


def test_issue_example_reports_memory_and_traffic(capsys):
    code, out = _run(["--model", "llama2-70b", "--seq-len", "131072", "--devices", "64", "--device-memory", "64GiB"],
                     capsys)
    assert "68.98 B parameters" in out
    for algo in ("colossalai_cp", "ulysses_cp", "hybrid_cp"):
        assert algo in out
    for item in ("weights", "gradients", "optimizer", "activations", "activations_recompute", "attention", "mask"):
        assert f"  {item} " in out
    assert code == 0 or "NO LAYOUT FITS" in out


def test_emit_yaml_writes_a_valid_template_of_the_best_layout(tmp_path, capsys):
    path = tmp_path / "best.yaml"
    code, out = _run(["--model", "qwen1_5-7b", "--seq-len", "32768", "--devices", "16", "--json",
                      "--emit-yaml", str(path)], capsys)
    report = json.loads(out)
    assert code == 0 and report["emitted_yaml"] == str(path)
    best = report["best"]["plan"]
    tree = yaml.safe_load(path.read_text())
    pc = tree["parallel_config"]
    assert (pc["data_parallel"], pc["model_parallel"], pc["context_parallel"], pc["pipeline_stage"],
            pc["context_parallel_algo"]) == (best["dp"], best["mp"], best["cp"], best["pp"], best["algo"])
    assert validate(str(path), devices=16).valid
    assert tree["model"]["model_config"]["type"] == "Qwen2LongSeqConfig"


@pytest.mark.parametrize("text, value", [("64GiB", 64 * 2 ** 30), ("80GB", 80 * 10 ** 9), ("512 MiB", 2 ** 29),
                                         ("1024", 1024)])
def test_parse_size(text, value):
    assert plan_cli.parse_size(text) == value


def test_bad_size_names_the_flag():
    with pytest.raises(ValueError, match=r"--device-memory = '64 parsecs': not a size\. Fix: write e\.g\. 64GiB"):
        plan_cli.parse_size("64 parsecs")
