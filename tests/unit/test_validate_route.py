"""``validate --route mindformers|train``: every broken rule of the route at once; working Trainer-route YAMLs are
not refused for keys only ``mf-longseq train`` refuses; the model refuses graph mode when it is built."""
from pathlib import Path

import pytest
import yaml

from mf_longseq.config import ConfigError, ConfigErrors
from mf_longseq.tools import validate as V
from mf_longseq.train.validation import check_run

ROOT = Path(__file__).resolve().parents[2]
TINY_CP = ROOT / "yaml_templates" / "tiny" / "llama2_tiny_s256_cp2_colossalai_cp.yaml"


def tiny(**sections):
    tree = yaml.safe_load(TINY_CP.read_text())
    for dotted, value in sections.items():
        *parents, last = dotted.split("__")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return tree


def test_mindformers_route_reports_every_broken_rule_at_once():
    """Our model named, MindFormers' trainer, wrapper, dataset task, graph mode, semi-auto parallel and sink mode:
    one report lists all six (before: only the first, and none of these on validate's only route)."""
    tree = tiny(trainer__type="CausalLanguageModelingTrainer", runner_wrapper__type="MFTrainOneStepCell",
                train_dataset_task__type="CausalLanguageModelDataset", context__mode=0, parallel__parallel_mode=1,
                runner_config__sink_mode=True)
    report = V.validate(tree)
    assert report.route == "mindformers" and not report.valid
    keys = [e["key"] for e in report.errors]
    assert sorted(keys) == sorted(["trainer.type", "context.mode", "parallel.parallel_mode", "runner_wrapper.type",
                                   "train_dataset_task.type", "runner_config.sink_mode"]), keys
    assert report.error == report.errors[0]
    text = V.format_report(report)
    assert text.count("  error: ") == 6 and "INVALID (route mindformers)" in text
    with pytest.raises(ConfigErrors) as info:
        check_run(tree, route="mindformers")
    assert len(info.value.errors) == 6 and "6 settings must change" in str(info.value)


def test_trainer_route_keys_are_judged_by_the_route_the_yaml_names():
    """A working run_mindformer.py YAML with MindFormers' checkpoint callback options is OK on its own route and
    refused (naming the key) only with --route train."""
    tree = tiny(callbacks=[{"type": "MFLossMonitor"}, {"type": "CheckpointMonitor", "save_checkpoint_steps": 10,
                                                       "integrated_save": False}])
    assert V.validate(tree).valid and V.validate(tree).route == "mindformers"
    train = V.validate(tree, route="train")
    assert not train.valid and [e["key"] for e in train.errors] == ["callbacks[1].integrated_save"]
    del tree["trainer"]
    assert V.validate(tree).route == "train"


def test_sink_mode_and_finetuning_columns_are_refused_on_the_trainer_route():
    """sink_mode: True was silently accepted (N samples -> N x N PyNative steps); (input_ids, labels) columns
    failed at the first step."""
    report = V.validate(tiny(runner_config__sink_mode=True, train_dataset__input_columns=["input_ids", "labels"]),
                        route="mindformers")
    assert [e["key"] for e in report.errors] == ["runner_config.sink_mode", "train_dataset.input_columns"]


def test_the_trainer_refuses_all_at_once():
    from mf_longseq.config import LongSeqConfig
    from mf_longseq.train.mf_route_rules import route_refusals
    tree = tiny(context__mode=0, runner_config__sink_mode=True)
    keys = [e.key for e in route_refusals(tree, LongSeqConfig.from_mindformers(tree))]
    assert keys == ["context.mode", "runner_config.sink_mode"]


def test_the_model_refuses_graph_mode_when_built():
    """MindFormers' trainer with context.mode 0 used to build the model and fail later in graph compile with
    ``RuntimeError: Unsupported statement 'Delete'``."""
    import mindspore as ms
    from mf_longseq.models import build_model
    from mf_longseq.parallel import Mesh
    tree = tiny(parallel_config__context_parallel=1, long_seq__device_num=1)
    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        with pytest.raises(ConfigError) as info:
            build_model(tree, mesh=Mesh(rank=0), registered=True)        # the class MindFormers builds
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)
    assert info.value.key == "context.mode" and "trainer.type: LongSeqTrainer" in info.value.fix
