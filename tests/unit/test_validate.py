"""``mf-longseq validate``: every rule of the issue reported with key, value and fix; exit 0/1; --json; and a
property test: thousands of random configs never give a traceback, only a valid config or a clear error."""
import argparse
import json
import re
from dataclasses import fields

import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from mf_longseq.config import (MODEL_FACTS, ConfigError, LongSeqConfig, canonical_model_keys, key_path,
                               model_config_section,
                               model_facts)
from mf_longseq.tools import validate as V

GOOD = {
    "context": {"device_target": "Ascend"},
    "parallel": {"enable_alltoall": True},
    "parallel_config": {"data_parallel": 2, "model_parallel": 4, "context_parallel": 8, "pipeline_stage": 1,
                        "micro_batch_num": 1, "context_parallel_algo": "hybrid_cp", "ulysses_degree_in_cp": 2,
                        "use_seq_parallel": False, "vocab_emb_dp": True},
    "model": {"model_config": {"seq_length": 131072, "num_heads": 64, "n_kv_heads": 8, "num_layers": 80,
                               "use_flash_attention": True, "use_attn_mask_compression": True}},
}


def tree(**changes):
    """GOOD with ``section__key=value`` changes (``model_config__x`` goes under model.model_config)."""
    out = json.loads(json.dumps(GOOD))
    for name, value in changes.items():
        section, key = name.split("__")
        node = out["model"]["model_config"] if section == "model_config" else out.setdefault(section, {})
        node[key] = value
    return out


def run_cli(argv, capsys):
    parser = argparse.ArgumentParser()
    V.register(parser.add_subparsers())
    args = parser.parse_args(["validate", *argv])
    code = args.func(args)
    return code, capsys.readouterr().out


def write(tmp_path, data, name="run.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return str(path)


# ----------------------------------------------------------------------------------------------- CLI
def test_valid_config_exits_0_and_summarises(tmp_path, capsys):
    code, out = run_cli([write(tmp_path, GOOD), "--devices", "64"], capsys)
    assert code == 0
    assert "OK" in out and "hybrid_cp, CP=8 (ulysses 2 x ring 4)" in out
    assert "64 = data_parallel 2 x model_parallel 4 x context_parallel 8 x pipeline_stage 1" in out


def test_invalid_config_exits_1_with_key_value_fix(tmp_path, capsys):
    code, out = run_cli([write(tmp_path, GOOD), "--devices", "32"], capsys)
    assert code == 1
    assert "INVALID" in out
    assert "long_seq.device_num = 32: device_num must equal" in out and "= 64. Fix:" in out


def test_json_report_for_tools(tmp_path, capsys):
    code, out = run_cli([write(tmp_path, tree(parallel_config__context_paralel=2)), "--json"], capsys)
    report = json.loads(out)
    assert code == 1 and report["valid"] is False
    assert report["error"]["key"] == "parallel_config.context_paralel"
    assert report["error"]["value"] == 2
    assert "did you mean parallel_config.context_parallel?" in report["error"]["fix"]
    code, out = run_cli([write(tmp_path, GOOD), "--json"], capsys)
    report = json.loads(out)
    assert code == 0 and report["valid"] and report["error"] is None
    assert report["derived"] == {"ulysses_degree": 2, "ring_degree": 4, "world_size": 64}
    assert report["settings"]["parallel_config.context_parallel"] == 8


def test_several_files_one_bad_exits_1(tmp_path, capsys):
    good, bad = write(tmp_path, GOOD, "a.yaml"), write(tmp_path, tree(parallel_config__context_parallel=3), "b.yaml")
    code, out = run_cli([good, bad, "--json"], capsys)
    reports = json.loads(out)
    assert code == 1 and [r["valid"] for r in reports] == [True, False]


def test_set_overrides_and_unreadable_files(tmp_path, capsys):
    path = write(tmp_path, GOOD)
    code, out = run_cli([path, "--set", "parallel_config.context_parallel=3"], capsys)
    assert code == 1 and "parallel_config.ulysses_degree_in_cp = 2: must divide parallel_config.context_parallel = 3" in out
    code, out = run_cli([str(tmp_path / "missing.yaml")], capsys)
    assert code == 2 and "cannot be read" in out                  # an I/O error, not a refusal (issue 11) and "Fix: pass the path of a MindFormers YAML file" in out
    (tmp_path / "broken.yaml").write_text("model: [1, 2\n")
    code, out = run_cli([str(tmp_path / "broken.yaml")], capsys)
    assert code == 1 and "is not valid YAML" in out
    with pytest.raises(ConfigError, match=r"--set = 'nokey': is not KEY\.PATH=VALUE"):
        V.parse_override("nokey")


def test_legacy_spelling_is_refused_in_the_report():
    report = V.validate(tree(parallel_config__context_parallel_algo="hybird_cp"))
    assert not report.valid and report.error["key"] == "parallel_config.context_parallel_algo"
    assert "old spelling" in report.error["problem"] and report.error["fix"].endswith("hybrid_cp")


# ----------------------------------------------------------------------------------------------- each rule
RULES = [
    # (what the issue names, changes, expected key of the error, text in the message)
    ("device_num product", dict(long_seq__device_num=16), "long_seq.device_num", "= 64"),
    ("algorithm name", dict(parallel_config__context_parallel_algo="ring"), "parallel_config.context_parallel_algo",
     "use one of colossalai_cp, ulysses_cp, hybrid_cp"),
    ("algorithm misspelt", dict(parallel_config__context_parallel_algo="ulyses_cp"),
     "parallel_config.context_parallel_algo", "did you mean 'ulysses_cp'"),
    ("heads vs mp x ulysses", dict(parallel_config__model_parallel=8, parallel_config__ulysses_degree_in_cp=8,
                                   parallel_config__context_parallel=16, parallel_config__data_parallel=1,
                                   model_config__num_heads=32),
     "parallel_config.ulysses_degree_in_cp", "exceeds the query heads per model-parallel rank"),
    ("seq vs 2 CP zigzag", dict(model_config__seq_length=131080), "model.model_config.seq_length",
     "use a seq_length divisible by 16"),
    ("flash attention on Ascend", dict(model_config__use_flash_attention=False),
     "model.model_config.use_flash_attention", "set model.model_config.use_flash_attention: True"),
    ("use_seq_parallel: seq vs CP x MP", dict(parallel_config__use_seq_parallel=True,
                                              model_config__seq_length=131088), "model.model_config.seq_length",
     "use a seq_length divisible by 32, or set parallel_config.use_seq_parallel: False"),
    ("micro batches vs stages", dict(parallel_config__pipeline_stage=4, parallel_config__data_parallel=1,
                                     parallel_config__micro_batch_num=2),
     "parallel_config.micro_batch_num", "must be >= parallel_config.pipeline_stage = 4"),
    ("stages vs layers", dict(parallel_config__pipeline_stage=4, parallel_config__data_parallel=1,
                              parallel_config__micro_batch_num=4, model_config__num_layers=2),
     "parallel_config.pipeline_stage", "use at most 2 stages"),
    ("unknown key of ours", dict(long_seq__layuot="zigzag"), "long_seq.layuot", "did you mean long_seq.layout"),
    ("misspelt parallel_config key", dict(parallel_config__ulysses_degree_in_c=2),
     "parallel_config.ulysses_degree_in_c", "did you mean parallel_config.ulysses_degree_in_cp?"),
    ("section not a mapping", dict(long_seq__x=1), None, None),       # replaced below
]


@pytest.mark.parametrize("what, changes, key, text", RULES[:-1], ids=[r[0] for r in RULES[:-1]])
def test_each_rule_names_key_value_and_fix(what, changes, key, text):
    report = V.validate(tree(**changes))
    assert not report.valid, what
    err = report.error
    assert err["key"] == key
    assert err["message"].startswith(f"{key} = {err['value']!r}:")
    assert text in err["message"] and err["fix"]


@pytest.mark.parametrize("section, value", [("parallel_config", 4), ("model", [1, 2]), ("long_seq", "zigzag")])
def test_section_that_is_not_a_mapping(section, value):
    data = tree()
    data[section] = value
    expected = f"{section} = {value!r}: must be a section (a mapping of keys). Fix: write {section}: followed by"
    with pytest.raises(ConfigError, match="^" + re.escape(expected)):
        LongSeqConfig.from_mindformers(data)


def test_top_level_not_a_mapping_and_bad_device_num():
    with pytest.raises(ConfigError, match=r"^<top level> = 'list': a MindFormers config must be a mapping"):
        LongSeqConfig.from_mindformers([1, 2])
    with pytest.raises(ConfigError, match=r"^long_seq\.device_num = '8': must be a positive integer\. Fix: set it"):
        LongSeqConfig.from_mindformers(tree(long_seq__device_num="8"))


def test_unknown_parallel_config_key_without_a_close_match_lists_the_known_ones():
    with pytest.raises(ConfigError, match=r"parallel_config\.foo = 1: unknown key\. Fix: MindFormers accepts only "
                                          r"data_parallel, model_parallel"):
        LongSeqConfig.from_mindformers(tree(parallel_config__foo=1))


def test_mask_compression_below_2048_is_a_note_not_an_error():
    report = V.validate(tree(model_config__seq_length=1024))
    assert report.valid
    assert any("2048 x 2048" in n and "seq_length = 1024" in n for n in report.notes)
    assert not any("2048 x 2048" in n for n in V.validate(GOOD).notes)


def test_dense_mask_at_long_sequence_is_a_note():
    report = V.validate(tree(model_config__use_attn_mask_compression=False))
    assert report.valid and any("16.00 GiB per device" in n for n in report.notes)


# ----------------------------------------------------------------------------------------------- property
_DEG = st.sampled_from([1, 1, 1, 2, 2, 4, 8])
_ODD = st.one_of(st.sampled_from(["ulyses_cp", "ring", "zig", "cpu", 0, 4100, -1]), st.integers(-3, 70), st.integers(-10 ** 9, 10 ** 12), st.booleans(), st.none(),
                 st.floats(allow_nan=True), st.text(max_size=6), st.lists(st.integers(), max_size=2),
                 st.dictionaries(st.text(max_size=3), st.integers(), max_size=1))

# (section, key) -> strategy of plausible values; the tree is built from these, then perturbed.
_PLAUSIBLE = {
    ("parallel_config", "data_parallel"): _DEG, ("parallel_config", "model_parallel"): _DEG,
    ("parallel_config", "context_parallel"): _DEG, ("parallel_config", "pipeline_stage"): _DEG,
    ("parallel_config", "micro_batch_num"): st.sampled_from([1, 2, 4, 8]),
    ("parallel_config", "context_parallel_algo"): st.sampled_from(
        ["colossalai_cp", "ulysses_cp", "hybrid_cp", "hybrid_cp", "hybird_cp"]),
    ("parallel_config", "ulysses_degree_in_cp"): _DEG, ("parallel_config", "use_seq_parallel"): st.booleans(),
    ("model_config", "seq_length"): st.sampled_from([512, 1024, 2048, 4096, 8192, 131072, 6 * 1024]),
    ("model_config", "num_heads"): st.sampled_from([8, 16, 32, 40, 64]),
    ("model_config", "n_kv_heads"): st.sampled_from([None, 1, 2, 4, 8]),
    ("model_config", "num_layers"): st.sampled_from([1, 2, 4, 32, 80]),
    ("model_config", "use_flash_attention"): st.booleans(),
    ("model_config", "use_attn_mask_compression"): st.booleans(),
    ("parallel", "enable_alltoall"): st.booleans(),
    ("context", "device_target"): st.sampled_from(["CPU", "CPU", "Ascend", "GPU"]),
    ("long_seq", "layout"): st.sampled_from(["zigzag", "zigzag", "contiguous"]),
    ("long_seq", "block_size"): st.sampled_from([16, 2048]),
    ("long_seq", "offload_layer_inputs"): st.booleans(),
}
_KEYS = sorted(_PLAUSIBLE)
_SECTIONS = ["parallel_config", "model", "model_config", "parallel", "context", "long_seq"]


@st.composite
def random_trees(draw):
    """A plausible config (often valid), then 0-2 perturbations: a value of a wrong type or range, a section that
    is not a mapping, an unknown or misspelt key, a device_num."""
    out = {"parallel_config": {}, "model": {"model_config": {}}, "parallel": {}, "context": {}, "long_seq": {}}
    for section, key in _KEYS:
        if draw(st.integers(0, 5)):                   # leave some keys out (defaults)
            node = out["model"]["model_config"] if section == "model_config" else out[section]
            node[key] = draw(_PLAUSIBLE[(section, key)])
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 1, 2]))):
        kind = draw(st.integers(0, 5))
        section = draw(st.sampled_from(_SECTIONS))
        node = (out["model"].get("model_config") if isinstance(out["model"], dict) else None) \
            if section == "model_config" else out.get(section)
        if kind <= 2 and isinstance(node, dict):
            node[draw(st.sampled_from(_KEYS))[1]] = draw(_ODD)
        elif kind == 3:
            out[section if section != "model_config" else "model"] = draw(_ODD)
        elif kind == 4 and isinstance(node, dict):
            node[draw(st.sampled_from(["context_paralel", "layuot", "ulysses_degree", "foo", "device_num"]))] = 2
        elif kind == 5:
            out["long_seq"] = {"device_num": draw(st.sampled_from([1, 2, 4, 8, 16, 64, 3]))}
    return out


def _oracle_holds(cfg: LongSeqConfig, m: dict) -> None:
    """Independent restatement of the main rules, checked on every config that validates (``m``: the model's
    facts as the YAML gives them)."""
    assert cfg.world_size == cfg.data_parallel * cfg.model_parallel * cfg.context_parallel * cfg.pipeline_stage
    assert cfg.device_num in (None, cfg.world_size)
    assert m["num_heads"] % cfg.model_parallel == 0
    assert cfg.ulysses_degree <= m["num_heads"] // cfg.model_parallel          # uneven head splits are fine
    assert cfg.ulysses_degree * cfg.ring_degree == cfg.context_parallel
    if cfg.use_seq_parallel and cfg.model_parallel > 1:                      # SP splits each CP part over mp
        assert m["seq_length"] % (cfg.context_parallel * cfg.model_parallel) == 0
    if cfg.context_parallel > 1:
        parts = 2 * cfg.context_parallel if (cfg.layout == "zigzag" and cfg.ring_degree > 1) else cfg.context_parallel
        assert m["seq_length"] % parts == 0
        assert cfg.device_target != "Ascend" or m["use_flash_attention"]
    assert m["num_layers"] >= cfg.pipeline_stage
    assert cfg.pipeline_stage == 1 or cfg.micro_batch_num >= cfg.pipeline_stage


@settings(max_examples=2000, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_trees())
def test_random_configs_are_valid_or_a_clear_error(data):
    try:
        cfg = LongSeqConfig.from_mindformers(data)
    except ConfigError as err:
        assert str(err).startswith(f"{err.key} = {err.value!r}: ") and ". Fix: " in str(err)
        assert err.fix and err.problem
        report = V.validate(data)
        assert report.valid is False and report.error["key"] == err.key
        event("invalid")
        return
    event("valid")
    _oracle_holds(cfg, model_facts(canonical_model_keys(model_config_section(data))))
    report = V.validate(data)
    if not report.valid:                     # validate checks more than the parallel rules (issue 11): the model,
        event("parallel rules hold, model or MindFormers refused")   # run keys and MindFormers' own classes
        assert report.error["key"] not in {key_path(name) for name in (*(f.name for f in fields(LongSeqConfig)),
                                                                        *MODEL_FACTS)} \
            or "MindFormers" in report.error["problem"]
        assert report.error["message"].startswith(f"{report.error['key']} = ") and report.error["fix"]
        return
    assert report.valid and report.settings["parallel_config.context_parallel"] == cfg.context_parallel


def test_the_mf_longseq_command_runs_validate(tmp_path):
    """The real entry point: ``python -m mf_longseq.cli validate`` (exit status 0 / 1)."""
    import os
    import subprocess
    import sys
    good, bad = write(tmp_path, GOOD, "good.yaml"), write(tmp_path, tree(parallel_config__context_parallel=3), "b.yaml")
    run = lambda *a: subprocess.run([sys.executable, "-m", "mf_longseq.cli", "validate", *a], cwd=tmp_path,  # noqa
                                    capture_output=True, text=True, env=dict(os.environ), timeout=300)
    ok, fail = run(good, "--devices", "64"), run(bad, "--json")
    assert ok.returncode == 0 and "OK" in ok.stdout, ok.stderr[-2000:]
    assert fail.returncode == 1 and json.loads(fail.stdout)["error"]["key"] == "parallel_config.ulysses_degree_in_cp"
