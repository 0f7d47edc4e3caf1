"""Issue 11: every case the mutation run found is a unit test with its right outcome: refused by name (key, value,
fix, ConfigError, never another exception), or accepted and built with the shapes the YAML names."""
import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from mf_longseq.config import ConfigError, canonical_model_keys, model_config_section, model_facts
from mf_longseq.models import build_model, parameter_shapes
from mf_longseq.parallel import Mesh
from mf_longseq.tools import validate as V
from mf_longseq.train.validation import InputError, check_run

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "yaml_templates" / "tiny" / "llama2_tiny_s256_cp1_colossalai_cp.yaml"
TINY_CP = ROOT / "yaml_templates" / "tiny" / "llama2_tiny_s256_cp2_colossalai_cp.yaml"
ASCEND = ROOT / "yaml_templates" / "llama2" / "7b_32k_cp4_colossalai_cp.yaml"


def template(path=TINY, **changes):
    """The template as a dict with ``section.key=value`` changes (dotted paths; value DELETE removes the key)."""
    tree = yaml.safe_load(Path(path).read_text())
    for dotted, value in changes.items():
        *parents, last = dotted.split("__")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        if value is DELETE:
            node.pop(last, None)
        else:
            node[last] = value
    return tree


DELETE = object()


def refused(tree, key, *texts):
    """check_run refuses ``tree`` with a ConfigError on ``key`` whose message holds ``texts``."""
    with pytest.raises(ConfigError) as info:
        check_run(tree)
    err = info.value
    assert err.key == key, str(err)
    assert str(err).startswith(f"{key} = {err.value!r}: ") and ". Fix: " in str(err) and err.fix
    for text in texts:
        assert text in str(err), str(err)
    return err


def cli(*args, cwd):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "mf_longseq.cli", "validate", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, env=env, timeout=300)


def strict_json(text):
    def refuse(name):
        raise AssertionError(f"non-standard JSON constant {name}")
    return json.loads(text, parse_constant=refuse)


# ----------------------------------------------------------------------------------------------- crashes, hangs
def test_cli_exit_status_and_strict_json_for_every_kind_of_bad_file(tmp_path):
    """``abc`` and ``"other.yaml"`` are YAML strings (refused, never read as paths); seq_length 10**200 with the
    dense mask on Ascend, theta nan / inf are refused by name; all exit 1 with strict JSON.  A directory is an I/O
    error (exit 2, which wins over refusals); a valid file exits 0."""
    (tmp_path / "abc.yaml").write_text("abc\n")
    (tmp_path / "other.yaml").write_text(TINY.read_text())
    (tmp_path / "str.yaml").write_text('"other.yaml"\n')
    (tmp_path / "output").mkdir()
    bad = {"huge.yaml": template(ASCEND, model__model_config__seq_length=10 ** 200,
                                 model__model_config__use_attn_mask_compression=False),
           "nan.yaml": template(model__model_config__theta=float("nan")),
           "inf.yaml": template(model__model_config__theta=float("inf"))}
    for name, tree in bad.items():
        (tmp_path / name).write_text(yaml.safe_dump(tree))
    names = ["abc.yaml", "str.yaml", *bad]
    proc = cli(*names, "--json", cwd=tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    reports = strict_json(proc.stdout)
    keys = [r["error"]["key"] for r in reports]
    assert keys == ["<top level>", "<top level>", "model.model_config.seq_length", "model.model_config.theta",
                    "model.model_config.theta"]
    assert [r["error"]["value"] for r in reports] == ["abc", "other.yaml", 10 ** 200, "nan", "inf"]
    assert not any(r["valid"] or r["io_error"] for r in reports)
    proc = cli("output", "abc.yaml", "--json", cwd=tmp_path)
    report = strict_json(proc.stdout)[0]
    assert proc.returncode == 2 and report["io_error"] and report["error"]["key"] == "CONFIG"
    assert "cannot be read" in report["error"]["problem"]
    proc = cli("other.yaml", cwd=tmp_path)
    assert proc.returncode == 0 and "other.yaml: OK" in proc.stdout
    with pytest.raises(InputError):
        check_run(str(tmp_path / "output"))


@pytest.mark.parametrize("heads", [1000000007, 10 ** 200 + 1])
def test_huge_head_counts_answer_in_bounded_time(heads):
    started = time.perf_counter()
    err = refused(template(ASCEND, model__model_config__num_heads=heads), "model.model_config.num_heads"
                  if heads > 2 ** 31 else "model.model_config.n_kv_heads")
    assert time.perf_counter() - started < 5.0
    assert len(str(err)) < 1000


def test_prime_head_count_lists_only_small_divisors_quickly():
    from mf_longseq.config import _divisors
    started = time.perf_counter()
    assert _divisors(1000000007) == [1, 1000000007]
    assert _divisors(12) == [1, 2, 3, 4, 6, 12]
    assert time.perf_counter() - started < 1.0


def test_huge_sequence_on_ascend_is_refused_before_notes():
    tree = template(ASCEND, model__model_config__seq_length=10 ** 200,
                    model__model_config__use_attn_mask_compression=False)
    refused(tree, "model.model_config.seq_length", "at most 2147483647")
    report = V.validate(tree)
    assert not report.valid and report.error["key"] == "model.model_config.seq_length"


# ----------------------------------------------------------------------------------------------- model shapes
@pytest.mark.parametrize("changes, key, text", [
    (dict(model__model_config__hidden_size=65), "model.model_config.hidden_size", "divisible by num_heads = 4"),
    (dict(model__model_config__hidden_size=36), "model.model_config.hidden_size", "odd head_dim 9"),
    (dict(model__model_config__vocab_size=0), "model.model_config.vocab_size", "positive integer"),
    (dict(model__model_config__intermediate_size=0), "model.model_config.intermediate_size", "positive integer"),
    (dict(model__model_config__intermediate_size=float("inf")), "model.model_config.intermediate_size",
     "positive integer"),
    (dict(model__model_config__compute_dtype="float64"), "model.model_config.compute_dtype", "unsupported dtype"),
    (dict(model__model_config__param_init_type="int8"), "model.model_config.param_init_type", "unsupported dtype"),
    (dict(model__model_config__type="FooConfig"), "model.model_config.type", "not registered in MindFormers"),
    (dict(model__model_config__type=None), "model.model_config.type", "not registered in MindFormers"),
    (dict(model__arch__type="LlamaForCausalLM"), "model.arch.type", "not one of mf_longseq's"),
    (dict(model__arch__type={"a": 1}), "model.arch.type", "not registered in MindFormers"),
    (dict(model__model_config__theta="abc"), "model.model_config.theta", "finite positive number"),
    (dict(model__model_config__rms_norm_eps=None), "model.model_config.rms_norm_eps", "finite positive number"),
    (dict(model__model_config__qkv_has_bias="yes"), "model.model_config.qkv_has_bias", "True or False"),
    (dict(model__model_config__n_kv_heads=3), "model.model_config.n_kv_heads", "must divide"),
    (dict(model__model_config__pad_token_id=256), "model.model_config.pad_token_id", "token id in [0, vocab_size"),
    (dict(model__model_config__n_kv_head=2), "model.model_config.n_kv_head", "did you mean "
                                                                            "model.model_config.n_kv_heads"),
    (dict(model__model_config__head_dim=8), "model.model_config.head_dim", "unknown key"),
    (dict(parallel_config__model_parallel=3, long_seq__device_num=3, model__model_config__num_heads=3,
          model__model_config__n_kv_heads=3, model__model_config__hidden_size=48),
     "parallel_config.model_parallel", "must divide model.model_config.vocab_size = 256"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_model_shapes_are_refused_by_name(changes, key, text):
    refused(template(**changes), key, text)


def test_hugging_face_kv_heads_spelling_builds_what_the_rules_checked():
    """``num_key_value_heads: 2`` without ``n_kv_heads``: rules and model both see 2 kv heads, k_proj (32, 64)."""
    tree = template(model__model_config__n_kv_heads=DELETE, model__model_config__num_key_value_heads=2)
    check = check_run(tree)
    assert check.model.n_kv_heads == 2                      # the one home of the fact the rules read
    assert parameter_shapes(check.model)["model.layers.0.self_attn.k_proj.weight"] == (32, 64)
    model = build_model(tree, mesh=Mesh.from_config(check.long_seq, rank=0))
    shapes = {name: tuple(p.shape) for name, p in model.parameters_and_names()}
    k_proj = [shape for name, shape in shapes.items() if name.endswith("layers.0.self_attn.k_proj.weight")]
    assert k_proj == [(32, 64)], shapes


def test_two_spellings_that_disagree_are_refused_and_that_agree_accepted():
    refused(template(model__model_config__num_key_value_heads=4), "model.model_config.num_key_value_heads",
            "another spelling of model.model_config.n_kv_heads, which is 2")
    refused(template(model__model_config__num_hidden_layers=3), "model.model_config.num_hidden_layers",
            "model.model_config.num_layers, which is 2")
    check = check_run(template(model__model_config__num_hidden_layers=2, model__model_config__rope_theta=10000.0))
    assert check.model.num_layers == 2 and check.model.theta == 10000.0


def test_missing_num_layers_is_the_models_default_not_one():
    tree = template(TINY, model__model_config__num_layers=DELETE)
    check = check_run(tree)
    rules_see = model_facts(canonical_model_keys(model_config_section(tree)))["num_layers"]   # what check_model reads
    assert rules_see == check.model.num_layers == 32
    tree = template(TINY, model__model_config__num_layers=DELETE, model__model_config__num_hidden_layers=4)
    assert check_run(tree).model.num_layers == 4


# ----------------------------------------------------------------------------------------------- run keys
@pytest.mark.parametrize("changes, key", [
    (dict(recompute_config__recompute=[True, False]), "recompute_config.recompute"),
    (dict(recompute_config__recompute=None), "recompute_config.recompute"),
    (dict(runner_config__batch_size=0), "runner_config.batch_size"),
    (dict(runner_config__batch_size=-1), "runner_config.batch_size"),
    (dict(runner_config__batch_size=2.5), "runner_config.batch_size"),
    (dict(runner_config__epochs="1"), "runner_config.epochs"),
    (dict(seed=-3), "seed"),
    (dict(optimizer__type="AdamWW"), "optimizer.type"),
    (dict(lr_schedule__type="CosineLR"), "lr_schedule.type"),
    (dict(optimizer__betas=[0.9]), "optimizer.betas"),
    (dict(lr_schedule__learning_rate=float("nan")), "lr_schedule.learning_rate"),
    (dict(lr_schedule__warmup_steps=-2), "lr_schedule.warmup_steps"),
    (dict(train_dataset__data_loader__type="NoSuchDataset"), "train_dataset.data_loader.type"),
    (dict(runner_config="fast"), "runner_config"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_run_keys_are_refused_before_any_device_work(changes, key):
    refused(template(**changes), key)


def test_steps_of_the_train_command():
    with pytest.raises(ConfigError, match=r"^--steps = 0: must be a positive integer"):
        check_run(template(), steps=0)
    assert check_run(template(), steps=3).model.num_layers == 2


# ----------------------------------------------------------------------------------------------- MindFormers' own
def test_hybird_cp_is_refused_as_mindformers_1_9_does():
    refused(template(TINY_CP, parallel_config__context_parallel_algo="hybird_cp"),
            "parallel_config.context_parallel_algo", "MindFormers 1.9 refuses", "hybrid_cp")
    from mindformers.modules.transformer.transformer import TransformerOpParallelConfig
    with pytest.raises(ValueError, match="'hybird_cp' is not a valid ContextParallelAlgo"):
        TransformerOpParallelConfig(context_parallel=2, context_parallel_algo="hybird_cp")


@pytest.mark.parametrize("changes, key", [
    (dict(parallel_config__vocab_emb_dp=[]), "parallel_config.vocab_emb_dp"),
    (dict(parallel_config__gradient_aggregation_group=0), "parallel_config.gradient_aggregation_group"),
    (dict(recompute_config__mp_comm_recompute="no"), "recompute_config.mp_comm_recompute"),
    (dict(recompute_config__recompute_everything=True), "recompute_config.recompute_everything"),
    (dict(swap_config__swap="x"), "swap_config.swap"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_mindformers_parallel_config_classes_refusals_are_named(changes, key):
    refused(template(**changes), key, "MindFormers refuses it" if key.startswith(("recompute_config.", "swap"))
            else "parallel_config")


def test_what_validates_passes_mindformers_build_parallel_config():
    """Every template: ours accepts it, and MindFormers' own ``build_parallel_config`` accepts it too."""
    from mindformers import MindFormerConfig
    from mindformers.core.parallel_config import build_parallel_config
    for path in sorted((ROOT / "yaml_templates").glob("*/*.yaml")):
        check_run(str(path))
        build_parallel_config(MindFormerConfig(str(path)))


def test_validate_report_names_the_model_it_builds():
    report = V.validate(str(TINY))
    assert report.valid and report.model["model_class"] == "LlamaLongSeqForCausalLM"
    assert (report.model["num_layers"], report.model["n_kv_heads"], report.model["head_dim"]) == (2, 2, 16)
    assert "model: LlamaLongSeqForCausalLM (LlamaLongSeqConfig), 2 layers" in V.format_report(report)


def test_tree_is_not_changed_by_checking():
    tree = template(TINY_CP)
    before = copy.deepcopy(tree)
    check_run(tree)
    assert tree == before


@pytest.mark.parametrize("changes, key", [
    ({"runner_wrapper__max_grad_norm": float("inf")}, "runner_wrapper.max_grad_norm"),     # every loss NaN
    ({"runner_wrapper__max_grad_norm": float("nan")}, "runner_wrapper.max_grad_norm"),
    ({"runner_wrapper__use_clip_grad": "False"}, "runner_wrapper.use_clip_grad"),         # a truthy string
    ({"runner_wrapper__scale_sense": True}, "runner_wrapper.scale_sense"),
    ({"load_checkpoint": "/nonexistent/x.ckpt"}, "load_checkpoint"),                      # silently ignored before
    ({"resume_training": True}, "resume_training"),
    ({"run_mode": "predict"}, "run_mode"),
    ({"do_eval": True}, "do_eval"),
    ({"callbacks": [{"type": "CheckpointMonitor", "save_checkpoint_steps": "x"}]},
     "callbacks[0].save_checkpoint_steps"),
])
def test_keys_train_would_ignore_or_misread_are_refused(changes, key):
    """Found by an adversarial pass after the merge of issues 10 and 11: each validated and then misbehaved."""
    refused(template(**changes), key)


def test_a_config_error_rebuilt_from_its_message_keeps_it():
    """MindFormers' builder re-raises ``type(e)(str(e))``: the plugin's message must survive that."""
    err = ConfigError("model.model_config.num_heads", 3, "must divide hidden_size", "use 4")
    assert str(type(err)(str(err))) == str(err)


def test_missing_base_config_and_unreadable_values_are_named(tmp_path):
    """A base_config that does not exist is an I/O error (exit 2) naming it; an integer YAML cannot read (more
    than 4300 digits) is a refusal naming the file, not a traceback."""
    text = TINY.read_text()
    missing = tmp_path / "b.yaml"
    missing.write_text("base_config: nothere.yaml\n" + text)
    with pytest.raises(InputError) as info:
        check_run(str(missing))
    assert info.value.key == "base_config"
    huge = tmp_path / "huge.yaml"
    huge.write_text(text.replace("seq_length: 256", "seq_length: 1" + "0" * 5000, 1))
    with pytest.raises(ConfigError, match="holds a value YAML cannot read"):
        check_run(str(huge))


@pytest.mark.parametrize("changes, key", [
    ({"optimizer__foo": 1}, "optimizer.foo"),
    ({"recompute_config__select_recompute": True}, "recompute_config.select_recompute"),
    ({"train_dataset__batch_size": 8}, "train_dataset.batch_size"),
    ({"callbacks": [{"type": "MFLossMonitor", "per_print_times": 5}]}, "callbacks[0].per_print_times"),
])
def test_keys_train_does_not_read_are_refused(changes, key):
    refused(template(**changes), key)


@pytest.mark.parametrize("key", ["compute_dtype", "param_init_type"])
def test_bfloat16_on_cpu_is_refused_before_it_fails_in_a_kernel(key):
    """Found by the adversarial pass: it validated, then run_job died in a CPU kernel (Reduce / Gather)."""
    refused(template(**{f"model__model_config__{key}": "bfloat16"}), f"model.model_config.{key}")



def test_pipeline_batch_size_is_per_micro_batch_as_in_mindformers():
    """With pipeline stages runner_config.batch_size is the micro-batch (MindFormers: global batch = batch_size x
    data_parallel x micro_batch_num): any batch size validates, and a step of mf-longseq train takes
    batch_size x micro_batch_num samples per dp rank, which always splits into the micro-batches."""
    from mf_longseq.train.job import samples_per_step
    pp2 = dict(parallel_config__pipeline_stage=2, parallel_config__micro_batch_num=2, long_seq__device_num=2)
    three = dict(runner_config__batch_size=3, train_dataset__batch_size=3)
    assert samples_per_step(3, check_run(template(**three, **pp2)).long_seq) == 6
    assert samples_per_step(3, check_run(template(**three)).long_seq) == 3                  # no stages



def test_a_key_holding_a_dot_is_refused_naming_its_section():
    """A key with a dot cannot be told apart from a nested key in the dotted names every refusal uses (found by
    test_validate_property: parallel_config: {'.': 0} was refused as 'parallel_config..')."""
    refused(template(parallel_config={".": 0}), "parallel_config", "holds a key with a dot")
    tree = template()
    tree["model"]["model_config"]["a.b"] = 1
    refused(tree, "model.model_config", "holds a key with a dot", "rename the key without dots")


def test_num_layers_null_is_refused_by_the_parallel_rules_and_the_model_alike():
    """``num_layers: null`` was taken as the default by LongSeqConfig but refused by the model check (found by
    test_validate's random configs): both now refuse it on the same key."""
    from mf_longseq.config import LongSeqConfig
    tree = template(model__model_config__num_layers=None)
    with pytest.raises(ConfigError) as info:
        LongSeqConfig.from_mindformers(tree)
    assert info.value.key == "model.model_config.num_layers"
    refused(tree, "model.model_config.num_layers", "must be a positive integer")
