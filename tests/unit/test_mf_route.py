"""MindFormers' Trainer route, single process: every template loads into MindFormers' Trainer with the plugin's
classes; what the route and ``mf-longseq train`` refuse, by key; the model's MindFormers column forms; the run
header of ``mf-longseq train`` names the MindRecord it read."""
import io
from pathlib import Path

import numpy as np
import pytest
import mindspore as ms

from mf_longseq.config import ConfigError, LongSeqConfig
from mf_longseq.train.job import load_tree
from mf_longseq.mf_route.trainer import LongSeqTrainer, route_refusals
from mf_longseq.train.support import refusals

ROOT = Path(__file__).resolve().parents[2]
ALL = sorted((ROOT / "yaml_templates").glob("*/*.yaml"))
TINY_CP1 = ROOT / "yaml_templates" / "tiny" / "llama2_tiny_s256_cp1_colossalai_cp.yaml"


def _cfg(path):
    from mindformers import MindFormerConfig
    return MindFormerConfig(str(path))


@pytest.mark.parametrize("path", ALL, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_template_loads_into_mindformers_trainer(path):
    from mindformers import Trainer
    from mindformers.tools.register import MindFormerModuleType as T, MindFormerRegister as R
    cfg = _cfg(path)
    trainer = Trainer(cfg)                                   # trainer.type resolved through auto_register
    assert isinstance(trainer.trainer, LongSeqTrainer)
    for kind, name in ((T.CONFIG, cfg.model.model_config.type), (T.MODELS, cfg.model.arch.type),
                       (T.DATASET, cfg.train_dataset_task.type), (T.WRAPPER, cfg.runner_wrapper.type)):
        assert R.is_exist(kind, name), name
    tree = load_tree(_cfg(path))
    ls = LongSeqConfig.from_mindformers(tree)
    assert tree["use_parallel"] == (ls.world_size > 1)
    keys = [e.key for e in route_refusals(tree, ls)]
    assert keys == (["parallel_config.pipeline_stage"] if ls.pipeline_stage > 1 else []), keys
    if path.parent.name == "tiny":
        assert tree["train_dataset"]["num_parallel_workers"] <= 2
    assert refusals(tree) == []                              # mf-longseq train honours every key of the template


def test_tiny_template_builds_its_network_through_long_seq_trainer():
    trainer = LongSeqTrainer(model_name="llama2_tiny")
    trainer._take_layout(_cfg(TINY_CP1))
    net = trainer.create_network()
    assert type(net).__name__ == "LlamaLongSeqForCausalLM" and net.mesh.world_size == 1


@pytest.mark.parametrize("change, key", [
    ({"context": {"mode": 0}}, "context.mode"),
    ({"parallel": {"parallel_mode": 1}}, "parallel.parallel_mode"),
    ({"parallel_config": {"pipeline_stage": 2, "micro_batch_num": 2}}, "parallel_config.pipeline_stage"),
    ({"train_dataset_task": {"type": "CausalLanguageModelDataset"}}, "train_dataset_task.type"),
    ({"runner_wrapper": {"type": "MFTrainOneStepCell"}, "parallel_config": {"model_parallel": 2}},
     "runner_wrapper.type"),
    ({"runner_wrapper": {"type": "MFTrainOneStepCell"}, "parallel": {"parallel_mode": 0, "gradients_mean": True}},
     "runner_wrapper.type"),
])
def test_trainer_route_refuses_by_key(change, key):
    tree = load_tree(_cfg(ROOT / "yaml_templates" / "tiny" / "llama2_tiny_s256_cp2_colossalai_cp.yaml"))
    for section, values in change.items():
        tree[section] = {**tree.get(section, {}), **values}
    tree["long_seq"]["device_num"] = None
    errors = route_refusals(tree, LongSeqConfig.from_mindformers(tree))
    assert [e.key for e in errors] == [key] and "Fix:" in str(errors[0])


@pytest.mark.parametrize("change, key", [
    ({"runner_config": {"gradient_accumulation_steps": 4}}, "runner_config.gradient_accumulation_steps"),
    ({"runner_config": {"sink_mode": True}}, "runner_config.sink_mode"),
    ({"runner_config": {"epochs": 3}}, "runner_config.epochs"),
    ({"runner_wrapper": {"scale_sense": 1024}}, "runner_wrapper.scale_sense"),
    ({"runner_wrapper": {"local_norm": True}}, "runner_wrapper.local_norm"),
    ({"callbacks": [{"type": "MFLossMonitor"}, {"type": "SummaryMonitor"}]}, "callbacks[1].type"),
    ({"callbacks": [{"type": "CheckpointMonitor", "keep_checkpoint_max": 2}]}, "callbacks[0].keep_checkpoint_max"),
    ({"train_dataset": {"data_loader": {"type": "MindDataset", "dataset_dir": "/nonexistent/x.mindrecord"}}},
     "train_dataset.data_loader.dataset_dir"),
    ({"lr_schedule": {"type": "NoSuchLR", "learning_rate": 0.1}}, "lr_schedule.type"),
    ({"optimizer": {"type": "SGD"}}, "optimizer.type"),
    ({"calculate_per_token_loss": True}, "calculate_per_token_loss"),
])
def test_mf_longseq_train_refuses_by_key(change, key):
    tree = load_tree(_cfg(TINY_CP1))
    for section, values in change.items():
        tree[section] = {**tree[section], **values} if isinstance(tree.get(section), dict) else values
    errors = refusals(tree)
    assert [e.key for e in errors] == [key], [str(e) for e in errors]
    assert isinstance(errors[0], ConfigError) and "Fix:" in str(errors[0])


def test_model_takes_mindformers_columns():
    """(B, S + 1) pretraining column and the 5 packed columns (by position or by name) give the global mean: the
    registered class (mf_route/models.py) against the plain model's shards form, same weights."""
    from mf_longseq.models import build_model
    from packed_docs import pack_documents
    tree = load_tree(_cfg(TINY_CP1))
    tree["model"]["model_config"]["seq_length"] = 32
    model, plain = build_model(tree, registered=True), build_model(tree)
    rng = np.random.default_rng(3)
    tokens = rng.integers(3, 256, (2, 33)).astype(np.int32)
    tokens[0, 30:] = 0                                                       # pad_token_id 0: masked labels
    ids, labels = tokens[:, :-1], tokens[:, 1:]
    mask = (labels != 0).astype(np.float32)
    loss_sum, count = plain(ms.Tensor(ids), ms.Tensor(labels), ms.Tensor(mask))
    want = float(loss_sum.asnumpy()) / float(count.asnumpy())
    assert float(model(ms.Tensor(tokens)).asnumpy()) == pytest.approx(want, rel=1e-6)
    tokens[1, 10] = 2
    packed = pack_documents(tokens[:, :-1], 2, 4)
    cols = [ms.Tensor(x) for x in (tokens[:, :-1], tokens[:, 1:], mask, packed["position_ids"].astype(np.int32),
                                    packed["actual_seq_len"].astype(np.int32))]
    by_position = float(model(*cols).asnumpy())
    by_name = float(model(cols[0], labels=cols[1], loss_mask=cols[2], position_ids=cols[3],
                          actual_seq_len=cols[4]).asnumpy())
    old_sum, old_count = plain(cols[0], cols[1], cols[2], cols[4])
    assert by_position == by_name == pytest.approx(float(old_sum.asnumpy()) / float(old_count.asnumpy()), rel=1e-6)
    with pytest.raises(ValueError, match=r"input_ids of shape \(2, 32\): MindFormers' pretraining column must be "
                                         r"\(batch, model.model_config.seq_length \+ 1 = 33\)"):
        model(cols[0])


def test_mf_longseq_train_reads_dataset_dir(tmp_path):
    """With train_dataset.data_loader.dataset_dir set (and no --data) the run reads that MindRecord and says so."""
    import sys
    sys.path.insert(0, str(ROOT / "tests"))
    from mf_route import write_tokens
    from mf_longseq.train.job import JobOptions, run_job
    path = write_tokens(tmp_path / "d.mindrecord", np.random.default_rng(0).integers(1, 256, (2, 33)))
    tree = load_tree(_cfg(TINY_CP1))
    tree["model"]["model_config"]["seq_length"] = 32
    tree["train_dataset"]["data_loader"].update(dataset_dir=path, shuffle=False)
    stream = io.StringIO()
    records = run_job(JobOptions(config=tree, steps=1, output_dir=str(tmp_path / "out")), stream=stream)
    assert f"data dataset_dir {path}," in stream.getvalue()
    synthetic = run_job(JobOptions(config={**tree, "train_dataset": {}}, steps=1), stream=io.StringIO())
    assert records[0].loss != synthetic[0].loss


def test_clipping_uses_the_whole_models_norm_and_mindformers_formula():
    """One rank: the norm is the L2 norm of every gradient; the factor is MindFormers' ClipGradNorm's."""
    from mindformers.core.clip_grad import ClipGradNorm
    from mf_longseq.parallel import Mesh
    from mf_longseq.train.clip import clip_grads
    rng = np.random.default_rng(5)
    grads = [ms.Tensor(rng.standard_normal(s).astype(np.float32)) for s in ((3, 4), (4,), (2, 2))]
    want = np.sqrt(sum(float(np.square(g.asnumpy().astype(np.float64)).sum()) for g in grads))
    for max_norm in (0.5, 100.0):
        clipped, norm = clip_grads(grads, ["a", "b", "c"], Mesh(rank=0), max_norm)
        assert norm == pytest.approx(want, rel=1e-6)
        theirs, their_norm = ClipGradNorm(max_norm=max_norm)(tuple(grads))
        assert float(their_norm.asnumpy()) == pytest.approx(want, rel=1e-6)
        for a, b in zip(clipped, theirs):
            np.testing.assert_allclose(a.asnumpy(), b.asnumpy(), rtol=1e-6, atol=1e-7)


def test_mf_longseq_train_refuses_dataset_dir_rows_of_seq_length(tmp_path):
    """The trial's case: rows of seq_length (256) tokens under the tiny template, refused naming dataset_dir with
    the Trainer route's check (seq_length + 1 = 257), before any step."""
    import sys
    sys.path.insert(0, str(ROOT / "tests"))
    from mf_route import write_tokens
    from mf_longseq.train.job import JobOptions, run_job
    path = write_tokens(tmp_path / "d.mindrecord", np.random.default_rng(0).integers(1, 256, (2, 256)))
    tree = load_tree(_cfg(TINY_CP1))
    tree["train_dataset"]["data_loader"].update(dataset_dir=path)
    stream = io.StringIO()
    with pytest.raises(ValueError, match=rf"train_dataset.data_loader.dataset_dir {path}: input_ids of shape "
                                         r"\(1, 256\): MindFormers' pretraining column must be \(batch, "
                                         r"model.model_config.seq_length \+ 1 = 257\). Fix: write samples of 257"):
        run_job(JobOptions(config=tree, steps=1), stream=stream)
    assert "step 1" not in stream.getvalue()


def test_route_applies_runtime_num_threads_before_binding_the_rank(monkeypatch):
    """MindFormers 1.9's ``build_context`` drops ``context.runtime_num_threads``; ``LongSeqTrainer`` applies it, then
    synchronous dispatch and the rank binding (which sizes the rank's CPU set by it: unapplied, MindSpore's default
    of one thread per CPU made 2 ranks on 2 CPUs bind nothing and spin on each other's core)."""
    from mf_longseq.mf_route import trainer as mf_trainer
    seen = []
    monkeypatch.setattr(mf_trainer, "configure_op_dispatch", lambda target: seen.append(("dispatch", target)))
    monkeypatch.setattr(mf_trainer, "bind_rank_cores",
                        lambda target: seen.append(("bind", target, ms.get_context("runtime_num_threads"))))
    before = ms.get_context("runtime_num_threads")
    cfg = _cfg(TINY_CP1)
    cfg.context.runtime_num_threads = before + 1
    try:
        LongSeqTrainer(model_name="llama2_tiny")._take_layout(cfg)
    finally:
        ms.set_context(runtime_num_threads=before)
    assert seen == [("dispatch", "CPU"), ("bind", "CPU", before + 1)]


def test_route_refuses_a_bad_runtime_num_threads():
    cfg = _cfg(TINY_CP1)
    cfg.context.runtime_num_threads = 0
    with pytest.raises(ValueError, match=r"context\.runtime_num_threads = 0: must be a positive integer"):
        LongSeqTrainer(model_name="llama2_tiny")._take_layout(cfg)
