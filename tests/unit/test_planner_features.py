"""The planner's memory features (issue 19): long_seq.loss_tile, long_seq.mlp_tile, parallel_config.use_seq_parallel
and long_seq.offload_layer_inputs -- what each saves (no more than its formula), the targets they reach, the CLI
flags and YAML keys that fix them, the emitted YAML, and the planned memory a run logs."""
import argparse
from dataclasses import replace

import pytest
import yaml

from mf_longseq.config import LongSeqConfig
from mf_longseq.parallel.plan import RunPlan
from mf_longseq.planner import cli as plan_cli
from mf_longseq.planner.run_settings import Settings
from mf_longseq.planner.memory import LOGIT_BYTES, memory_per_device
from mf_longseq.planner.recommend import Choices, Hardware, default_tile, recommend
from mf_longseq.planner.run import planned_memory
from mf_longseq.train.validation import check_run
from mf_longseq.planner.shapes import model_shape
from mf_longseq.train.monitor import StepRecord

QWEN = model_shape("qwen-7b")
LAYOUT = RunPlan(mp=4, cp=2, algo="ulysses_cp", ulysses=2)
BASE = Settings(seq_len=131072, recompute=True)
S = 131072 // 2


def _mem(**features):
    return memory_per_device(QWEN, LAYOUT, replace(BASE, **features))


def test_loss_tile_keeps_one_tile_of_logits_and_the_per_token_statistics():
    plain, tiled = _mem(), _mem(loss_tile=1024)
    assert plain.logits == S * (QWEN.vocab // 4) * LOGIT_BYTES["ascend"]
    assert tiled.logits == 1024 * (QWEN.vocab // 4) * LOGIT_BYTES["ascend"] + 8 * S
    assert replace(tiled, logits=plain.logits) == plain                        # nothing else changes


def test_sequence_parallel_splits_layer_inputs_and_norms_but_keeps_the_gathered_inputs():
    plain, sp = _mem(), _mem(seq_parallel=True)
    e, h = 2, QWEN.hidden
    layers = QWEN.layers
    per_layer_plain = plain.activations_recompute - layers * S * h * e
    per_layer_sp = sp.activations_recompute - layers * S * h * e // 4
    # norms 2 (4 + e) s h -> / mp, plus the two all-gathered (s, h) inputs the projections keep
    assert per_layer_plain - per_layer_sp == 2 * (4 + e) * S * h - 2 * (4 + e) * S * h // 4 - 2 * S * h * e
    assert sp.backward == plain.backward - 2 * S * h * e + 2 * S * h * e // 4 + S * h * e
    assert memory_per_device(QWEN, replace(LAYOUT, mp=1, cp=8, ulysses=8), replace(BASE, seq_parallel=True)) == \
        memory_per_device(QWEN, replace(LAYOUT, mp=1, cp=8, ulysses=8), BASE)   # mp = 1: nothing to split


def test_offload_keeps_two_layer_inputs_on_the_device_and_the_rest_on_the_host():
    plain, off = _mem(), _mem(offload_layer_inputs=True)
    layer_input = S * QWEN.hidden * 2
    assert plain.activations_recompute - off.activations_recompute == (QWEN.layers - 2) * layer_input
    assert off.host == QWEN.layers * layer_input and plain.host == 0         # every input copied at its forward
    assert off.total(True) + off.host == plain.total(True) + 2 * layer_input  # two of them also on the device


def test_mlp_tile_drops_the_mlp_activations_for_one_tiles_working_set():
    plain, tiled = _mem(), _mem(mlp_tile=2048)
    f, e = QWEN.ffn // 4, 2
    assert plain.activations_recompute - tiled.activations_recompute == S * f * (4 * e + 4)
    assert tiled.backward - plain.backward == 2048 * f * (3 * e + 4 * e + 4) - 3 * S * f * e


def test_no_feature_ever_adds_memory_to_a_layout():
    for model in ("llama2-7b", "qwen-7b", "llama2-70b"):
        shape = model_shape(model)
        for layout in (RunPlan(mp=8, cp=2, pp=2), RunPlan(mp=2, cp=4, algo="ulysses_cp", ulysses=4)):
            base = memory_per_device(shape, layout, Settings(seq_len=262144)).total(True)
            for features in (dict(loss_tile=default_tile(shape.vocab // layout.mp * 4, 262144 // layout.cp)),
                             dict(mlp_tile=default_tile(shape.ffn // layout.mp * 12, 262144 // layout.cp)),
                             dict(seq_parallel=True), dict(offload_layer_inputs=True)):
                assert memory_per_device(shape, layout, Settings(seq_len=262144, **features)).total(True) <= base


def test_default_tile_keeps_one_tile_under_256_mib():
    assert default_tile(151936 * 4, 65536) == 256                  # Qwen vocabulary, mp 1: 256 x 0.58 MiB
    assert default_tile(151936 // 8 * 4, 65536) == 2048
    assert default_tile(32000 * 4, 100) == 100                     # never more than this rank's tokens
    for per_token in (1000, 151936 * 4, 11008 * 12):
        assert default_tile(per_token, 10 ** 6) * per_token <= 256 * 2 ** 20


@pytest.mark.parametrize("model, seq, devices", [("qwen-7b", 131072, 8), ("llama2-70b", 131072, 64),
                                                  ("llama2-7b", 1048576, 16), ("qwen-7b", 1048576, 32)])
def test_issue_19_targets_fit_with_the_features_and_not_without(model, seq, devices):
    shape, settings, hw = model_shape(model), Settings(seq_len=seq), Hardware()
    assert recommend(shape, devices, settings, hw, choices=Choices.off()) == []
    best = recommend(shape, devices, settings, hw, choices=Choices(seq_parallel=True))[0]
    assert best.memory_total <= hw.usable and best.settings.features() != "none"


def _args(**kw):
    base = dict(model="qwen-7b", no_features=False, loss_tile="auto", mlp_tile="auto", seq_parallel="auto",
                offload_layer_inputs="auto")
    return argparse.Namespace(**{**base, **kw})


def test_flags_and_yaml_keys_fix_the_features(tmp_path):
    assert plan_cli.choices(_args()) == Choices()
    assert plan_cli.choices(_args(no_features=True)) == Choices.off()
    assert plan_cli.choices(_args(loss_tile="0", seq_parallel="on")) == Choices(loss_tile=0, seq_parallel=True)
    with pytest.raises(ValueError, match=r"--mlp-tile = 'big': not a tile\. Fix"):
        plan_cli.choices(_args(mlp_tile="big"))
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"model": {"model_config": {"type": "QwenLongSeqConfig", "seq_length": 4096,
                                                               "num_heads": 32}},
                                    "long_seq": {"loss_tile": 512, "offload_layer_inputs": False}}))
    got = plan_cli.choices(_args(model=str(path), mlp_tile="64"))
    assert got == Choices(loss_tile=512, mlp_tile=64, seq_parallel=None, offload_layer_inputs=False)


def test_emit_yaml_writes_the_chosen_features(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    code = plan_cli.run(plan_cli_args(["--model", "qwen-7b", "--seq-len", "131072", "--devices", "8",
                                       "--seq-parallel", "off", "--emit-yaml", str(path)]))
    capsys.readouterr()
    tree = yaml.safe_load(path.read_text())
    assert code == 0 and tree["recompute_config"]["recompute"] is True
    assert tree["long_seq"]["loss_tile"] > 0 and tree["long_seq"]["offload_layer_inputs"] is True
    assert LongSeqConfig.from_mindformers(tree).loss_tile == tree["long_seq"]["loss_tile"]


def plan_cli_args(argv):
    parser = argparse.ArgumentParser()
    plan_cli.register(parser.add_subparsers())
    return parser.parse_args(["plan", *argv])


def test_a_run_plans_its_own_features_and_the_step_line_shows_both_figures():
    tree = {"context": {"device_target": "CPU"}, "recompute_config": {"recompute": True},
            "parallel_config": {"model_parallel": 2, "context_parallel": 2, "pipeline_stage": 1},
            "long_seq": {"loss_tile": 128, "offload_layer_inputs": True},
            "model": {"model_config": {"type": "QwenLongSeqConfig", "seq_length": 4096, "num_heads": 8,
                                       "hidden_size": 256, "num_layers": 4, "vocab_size": 151936,
                                       "intermediate_size": 512}}}
    memory, recompute = planned_memory(check_run(tree))
    assert recompute and memory.logits == 128 * (151936 // 2) * LOGIT_BYTES["cpu"] + 8 * 2048
    assert memory.host == 4 * 2048 * 256 * 4                      # 4 layers, each input copied (float32)
    rec = StepRecord(step=1, loss=1.0, tokens=8, seconds=1.0, lr=0.1, peak_rss_mib=[900.0, 910.0],
                     memory_planned_mib=[500.0, 500.0], memory_measured_mib=[480.0, 530.0])
    assert "model memory measured/planned (MiB): 480/500 530/500" in rec.line(1)


def test_long_seq_feature_keys_are_validated():
    # loss_tile's default is None: the model's 256 MiB rule (config.default_loss_tile), as the model and the
    # planner's run figure (planner/run.py) resolve it
    assert LongSeqConfig().loss_tile is None and LongSeqConfig().offload_layer_inputs is False
    with pytest.raises(ValueError, match=r"long_seq\.loss_tile = -1: must be a whole number of tokens per tile"):
        LongSeqConfig(loss_tile=-1)
    with pytest.raises(ValueError, match=r"long_seq\.offload_layer_inputs = 'yes': must be True or False"):
        LongSeqConfig(offload_layer_inputs="yes")
    with pytest.raises(ValueError, match=r"long_seq\.mlp_tiles = 4: unknown key.*did you mean long_seq\.mlp_tile"):
        LongSeqConfig.from_mindformers({"model": {"model_config": {"seq_length": 64, "num_heads": 4}},
                                        "long_seq": {"mlp_tiles": 4}})
