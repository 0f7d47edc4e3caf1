"""Settings parsed once: ``check_run`` returns one frozen ``RunSettings`` and nothing below it reads the YAML.

Checked here: the object and its sections are frozen; every section is filled from the YAML; no function of
``train/``, ``planner/`` or ``tools/`` outside the parsers takes the raw tree (read from the source with ``ast``);
``runner_config.batch_size`` and ``seed`` are read in the parser only, and ``run_job`` uses the values of the
object ``check_run`` returned (not a second read of the YAML).
"""
import ast
import dataclasses
import io
import json
from pathlib import Path

import pytest

from mf_longseq.train.validation import check_run

PACKAGE = Path(__file__).resolve().parents[2] / "mf_longseq"

# (file under mf_longseq/, function) -> why it may take the raw tree.  Everything else below check_run reads
# RunSettings.  A module named with function "*" is a parser as a whole.
EXEMPT = {
    ("train/validation.py", "*"): "the parser: check_run and the rules it runs on the YAML",
    ("train/support.py", "*"): "the train route's refusals, run by check_run (validation._train_refusals)",
    ("train/mf_route_rules.py", "*"): "MindFormers' route's refusals, run by check_run (route='mindformers')",
    ("train/settings.py", "read_settings"): "the one reader of the values, called by check_run",
    ("train/settings.py", "_section"): "read_settings' copy of a section",
    ("train/optim.py", "from_mindformers"): "OptimSettings' section parser, called by check_run only",
    ("train/packing.py", "from_mindformers"): "PackingSettings' section parser, called by check_run only",
    ("train/job.py", "with_dataset_dir"): "makes the tree check_run reads (--dataset-dir written into it)",
    ("train/demo.py", "write_demo_config"): "writes the demo's YAML (a tree producer, before any check)",
    ("tools/validate.py", "_apply"): "applies --set KEY=VALUE to the tree before check_run",
    ("tools/adopt.py", "__init__"): "adopt rewrites a YAML into a YAML: its input and output are trees",
}
# The key paths read once, in the parser: any call in another module with one of them as an argument reads the YAML.
READ_ONCE = ("runner_config.batch_size", "seed")
PARSERS = {"train/validation.py", "train/support.py", "train/settings.py", "train/mf_route_rules.py",
           "tools/adopt.py"}                  # adopt rewrites the YAML itself (its EXEMPT entry above)


def _reads_the_yaml(call: ast.Call) -> bool:
    """``node_at(x, KEY)`` / ``_positive(x, KEY, ...)`` or ``tree.get(KEY)`` with KEY one of READ_ONCE."""
    if not any(isinstance(a, ast.Constant) and a.value in READ_ONCE for a in call.args):
        return False
    func = call.func
    if isinstance(func, ast.Name):
        return func.id in ("node_at", "_positive")
    return isinstance(func, ast.Attribute) and func.attr == "get" and isinstance(func.value, ast.Name) \
        and func.value.id == "tree"


def _tree(**over):
    tree = {"seed": 9, "runner_config": {"batch_size": 2},
            "model": {"model_config": {"seq_length": 16, "num_heads": 2, "vocab_size": 24, "pad_token_id": 0,
                                       "eos_token_id": 3}},
            "optimizer": {"type": "AdamW", "weight_decay": 0.01, "learning_rate": 0.003},
            "runner_wrapper": {"use_clip_grad": True, "max_grad_norm": 0.5},
            "callbacks": [{"type": "MFLossMonitor"}, {"type": "CheckpointMonitor", "save_checkpoint_steps": 4}],
            "train_dataset": {"data_loader": {"config": {"create_compressed_eod_mask": True, "eod_pad_length": 8}}},
            "recompute_config": {"recompute": True},
            "context": {"runtime_num_threads": 1},
            "parallel": {"parallel_mode": 1, "enable_alltoall": False}}
    tree.update(over)
    return tree


def test_check_run_returns_every_section():
    from mf_longseq.config import LongSeqConfig
    from mf_longseq.train.optim import OptimSettings
    from mf_longseq.train.settings import RunSettings
    settings = check_run(_tree(), steps=7)
    assert isinstance(settings, RunSettings) and isinstance(settings.long_seq, LongSeqConfig)
    assert (settings.model.seq_length, settings.model.vocab_size, settings.model_class.__name__) == \
        (16, 24, "LlamaLongSeqForCausalLM")
    data = settings.data
    assert (data.batch_size, data.seed, data.pad_token_id, data.dataset_dir) == (2, 9, 0, None)
    assert (data.packing.eod_token_id, data.packing.eod_pad_length) == (3, 8)
    assert isinstance(settings.optimizer, OptimSettings)
    assert (settings.optimizer.learning_rate, settings.optimizer.weight_decay, settings.optimizer.total_steps) == \
        (0.003, 0.01, 7)
    loop = settings.loop
    assert (loop.steps, loop.checkpoint_period, loop.max_grad_norm, loop.recompute) == (7, 4, 0.5, True)
    assert dict(settings.runtime.context) == {"runtime_num_threads": 1}
    assert dict(settings.runtime.parallel) == {"parallel_mode": 1, "enable_alltoall": False}
    assert "batch_size: 2" in settings.config_text


def test_the_settings_are_frozen():
    settings = check_run(_tree())
    for obj, name, value in ((settings, "data", None), (settings.data, "batch_size", 3), (settings.loop, "steps", 1),
                             (settings.runtime, "context", {}), (settings, "long_seq", None)):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(obj, name, value)
    with pytest.raises(TypeError):                                   # the mapping sections are read-only too
        settings.data.train_dataset["data_loader"] = {}


def _files(*folders):
    return sorted(p for folder in folders for p in (PACKAGE / folder).rglob("*.py"))


def _functions(path):
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def test_no_function_below_check_run_takes_the_raw_tree():
    found = []
    for path in _files("train", "planner", "tools"):
        rel = path.relative_to(PACKAGE).as_posix()
        if (rel, "*") in EXEMPT:
            continue
        for fn in _functions(path):
            args = fn.args
            names = [a.arg for a in (*args.posonlyargs, *args.args, *args.kwonlyargs)]
            if "tree" in names and (rel, fn.name) not in EXEMPT:
                found.append(f"{rel}:{fn.lineno} {fn.name}")
    assert not found, f"functions below check_run that take the raw tree (read RunSettings instead): {found}"


def test_the_exemptions_name_real_functions():
    for (rel, name) in EXEMPT:
        path = PACKAGE / rel
        assert path.is_file(), rel
        assert name == "*" or name in {fn.name for fn in _functions(path)}, (rel, name)


def test_batch_size_and_seed_are_read_in_the_parser_only():
    """No call outside the parsers names ``runner_config.batch_size`` or ``seed`` as an argument (a second read of
    the YAML, e.g. ``tree.get("seed")`` or ``node_at(tree, "runner_config.batch_size")``)."""
    found = []
    for path in _files("train", "planner", "tools"):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel in PARSERS:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and _reads_the_yaml(node):
                found.append(f"{rel}:{node.lineno}")
    assert not found, f"the YAML's batch_size / seed read again outside the parser: {found}"


def test_run_job_uses_the_values_check_run_parsed(monkeypatch, tmp_path):
    """run_job takes batch size and seed from the object check_run returned, not from a second read of the YAML:
    the object is replaced by one with batch_size 3 and seed 7 (the YAML says 2 and 5); the run uses 3 and 7."""
    from mf_longseq.train import validation
    from mf_longseq.train.job import JobOptions, run_job
    from test_train_runner import Bigram, job_tree
    parsed = validation.check_run

    def check_run_spy(*args, **kwargs):
        settings = parsed(*args, **kwargs)
        return dataclasses.replace(settings, data=dataclasses.replace(settings.data, batch_size=3, seed=7))
    monkeypatch.setattr(validation, "check_run", check_run_spy)
    stream = io.StringIO()
    run_job(JobOptions(config=job_tree(), steps=1, save_every=1, output_dir=str(tmp_path)),
            model_factory=lambda settings, mesh: Bigram(seed=5), stream=stream)
    assert "batch 3 per dp rank" in stream.getvalue()
    meta = json.loads((tmp_path / "checkpoints" / "step_000001" / "meta.json").read_text())
    assert (meta["data"]["batch_size"], meta["data"]["seed"]) == (3, 7)


def test_a_bad_batch_size_is_one_error():
    from mf_longseq.config import ConfigError, ConfigErrors
    with pytest.raises(ConfigError) as err:
        check_run(_tree(runner_config={"batch_size": 0}), steps=2)
    errors = err.value.errors if isinstance(err.value, ConfigErrors) else [err.value]
    assert [e.key for e in errors].count("runner_config.batch_size") == 1
