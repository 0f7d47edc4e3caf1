"""The ``parallel:`` section goes to MindSpore's auto-parallel context and reads back; world-size check."""
import logging
import os

import pytest
from mindspore import context

from mf_longseq.config import LongSeqConfig
from mf_longseq.train.settings import RunSettings, RuntimeKeys
from mf_longseq.train.context import apply_parallel_context, parallel_context_kwargs, \
    resolve_parallel_mode


@pytest.fixture(autouse=True)
def reset_context():
    yield
    context.reset_auto_parallel_context()


@pytest.mark.parametrize("value, mode", [(0, "data_parallel"), (1, "semi_auto_parallel"), (2, "auto_parallel"),
                                         (3, "hybrid_parallel"), ("SEMI_AUTO_PARALLEL", "semi_auto_parallel"),
                                         ("MANUAL_PARALLEL", "stand_alone"), ("data_parallel", "data_parallel")])
def test_mindformers_parallel_mode_spellings(value, mode):
    assert resolve_parallel_mode(value) == mode


def test_applied_keys_read_back_from_mindspore(caplog):
    parallel = {"parallel_mode": 1, "enable_alltoall": True, "gradients_mean": False, "search_mode":
                "sharding_propagation", "enable_parallel_optimizer": True, "strategy_ckpt_config":
                {"save_file": "/tmp/strategy.ckpt"}, "full_batch": True}
    with caplog.at_level(logging.INFO, logger="mf_longseq.train.context"):
        applied = apply_parallel_context(parallel, world_size=4, rank=2)
    get = context.get_auto_parallel_context
    assert get("enable_alltoall") is True and applied["enable_alltoall"] is True
    assert get("parallel_mode") == "stand_alone"                  # semi_auto is not a PyNative mode
    assert get("gradients_mean") is False and get("search_mode") == "sharding_propagation"
    assert get("enable_parallel_optimizer") is True
    assert get("strategy_ckpt_config")["save_file"] == "/tmp/strategy.ckpt"
    assert get("full_batch") is False                             # as MindFormers does outside auto modes
    assert (get("device_num"), get("global_rank")) == (4, 2)      # from the world, not the YAML
    assert "using stand_alone" in caplog.text and "not used by mf_longseq" in caplog.text

    apply_parallel_context({"parallel_mode": 0, "enable_alltoall": False}, world_size=2, rank=1)
    assert (get("parallel_mode"), get("enable_alltoall")) == ("data_parallel", False)


def test_device_num_in_yaml_is_replaced_by_the_world():
    kwargs = parallel_context_kwargs({"device_num": 64, "global_rank": 7}, world_size=2, rank=1)
    assert (kwargs["device_num"], kwargs["global_rank"]) == (2, 1)


@pytest.mark.parametrize("parallel, match", [
    ({"enable_all_to_all": True}, r"parallel\.enable_all_to_all = True: not a mindspore\.set_auto_parallel_context "
                                  r"key\. Fix: did you mean parallel\.enable_alltoall\?"),
    ({"parallel_mode": 7}, r"parallel\.parallel_mode = 7: unknown mode\. Fix: use 0 \(data_parallel\)"),
])
def test_bad_parallel_keys(parallel, match):
    with pytest.raises(ValueError, match=match):
        parallel_context_kwargs(parallel, world_size=1, rank=0)


def test_setup_checks_the_world_size_with_the_config_rule():
    """``setup`` refuses degrees that do not multiply to the running ranks, with ``config.check_world_size``'s
    message (one rule, tested word for word in tests/dist/test_compose.py)."""
    from mf_longseq.train.context import setup
    cfg = LongSeqConfig(context_parallel=2, data_parallel=2)
    with pytest.raises(ValueError, match=r"data_parallel x model_parallel x context_parallel x pipeline_stage = "
                                         r"2 x 1 x 2 x 1 = 4, but 1 ranks were started\. Fix: launch msrun with "
                                         r"--worker_num 4"):
        setup(RunSettings(long_seq=cfg, model=None, model_class=object))


@pytest.mark.parametrize("target, blocking", [("CPU", True), ("Ascend", False), ("GPU", False)])
def test_op_dispatch_is_synchronous_on_cpu_only(monkeypatch, target, blocking):
    """One decision for training, the demo and the benchmarks: ops run on the Python thread on CPU (no busy-waiting
    executor thread beside the kernels), asynchronously on a device."""
    import mindspore as ms
    from mf_longseq.train.context import configure_op_dispatch
    calls = []
    monkeypatch.setattr(ms.runtime, "launch_blocking", lambda: calls.append(1))
    assert configure_op_dispatch(target) is blocking
    assert calls == ([1] if blocking else [])


def test_setup_applies_the_op_dispatch_decision(monkeypatch):
    """``setup`` (every training run and the demo) goes through ``configure_op_dispatch``."""
    from mf_longseq.train import context
    seen = []
    monkeypatch.setattr(context, "configure_op_dispatch", lambda target: seen.append(target) or True)
    run = context.setup(RunSettings(long_seq=LongSeqConfig(), model=None, model_class=object,
                                    runtime=RuntimeKeys(context={"runtime_num_threads": 1})))
    assert seen == ["CPU"] and run.world_size == 1


def test_runtime_threads_from_the_context_section():
    from mf_longseq.train.context import runtime_context_kwargs
    assert runtime_context_kwargs({"runtime_num_threads": 1, "mode": 1}) == {"runtime_num_threads": 1}
    assert runtime_context_kwargs(None) == {}
    with pytest.raises(ValueError, match=r"context\.runtime_num_threads = 0: must be a positive integer"):
        runtime_context_kwargs({"runtime_num_threads": 0})


@pytest.mark.parametrize("algo, cp, ulysses_in_cp, alltoall", [
    ("colossalai_cp", 2, 1, False), ("ulysses_cp", 2, 1, True), ("hybrid_cp", 4, 2, True)])
def test_algo_and_alltoall_reach_every_attention_layer(algo, cp, ulysses_in_cp, alltoall):
    """parallel_config.context_parallel_algo and parallel.enable_alltoall, from one YAML tree, end up in MindSpore's
    context and in every attention layer of the model built from the same tree."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "dist"))
    from train_worker import case_tree
    from mf_longseq.attention.layer import ContextParallelAttention
    from mf_longseq.models import build_model
    from mf_longseq.parallel import Mesh

    tree = case_tree("qwen1_5", cp=cp, dp=1, algo=algo, ulysses_in_cp=ulysses_in_cp)
    tree["parallel"]["enable_alltoall"] = alltoall
    config = LongSeqConfig.from_mindformers(tree)
    apply_parallel_context(tree["parallel"], world_size=cp, rank=0)
    model = build_model(tree, mesh=Mesh.from_config(config, rank=0))
    layers = [cell for _, cell in model.cells_and_names() if isinstance(cell, ContextParallelAttention)]
    assert len(layers) == tree["model"]["model_config"]["num_layers"]
    assert context.get_auto_parallel_context("enable_alltoall") is alltoall
    for layer in layers:
        assert (layer.config.context_parallel_algo, layer.config.enable_alltoall) == (algo, alltoall)
        assert (layer.mesh.cp, layer.mesh.ulysses) == (cp, config.ulysses_degree)
    assert config.ulysses_degree == {"colossalai_cp": 1, "ulysses_cp": cp, "hybrid_cp": ulysses_in_cp}[algo]


def _worker_env(device_id, workers=2, host="127.0.0.1", role="MS_WORKER"):
    return {"MS_ROLE": role, "MS_WORKER_NUM": str(workers), "DEVICE_ID": str(device_id), "MS_SCHED_HOST": host}


def test_rank_cores_gives_each_local_worker_its_own_cpus():
    from mf_longseq.train.context import rank_cores
    assert rank_cores(_worker_env(0), {0, 1}, 1) == [0]
    assert rank_cores(_worker_env(1), {1, 0}, 1) == [1]
    assert rank_cores(_worker_env(1, workers=2), range(8), 3) == [3, 4, 5]
    assert rank_cores(_worker_env(1), [4, 6, 9], 1) == [6]                       # the usable CPUs, in order


def test_rank_cores_binds_nothing_it_cannot_split():
    from mf_longseq.train.context import rank_cores
    assert rank_cores(_worker_env(0, workers=4), {0, 1}, 1) is None              # more workers than CPUs
    assert rank_cores(_worker_env(0), {0, 1}, 2) is None                         # 2 ranks x 2 threads > 2 CPUs
    assert rank_cores(_worker_env(0, host="10.0.0.7"), {0, 1}, 1) is None        # several hosts
    assert rank_cores(_worker_env(0, role="MS_SCHED"), {0, 1}, 1) is None        # the scheduler
    assert rank_cores({}, {0, 1}, 1) is None                                     # not under msrun
    assert rank_cores({**_worker_env(0), "DEVICE_ID": "x"}, {0, 1}, 1) is None


def test_bind_rank_cores_leaves_other_devices_and_plain_processes_alone(monkeypatch):
    from mf_longseq.train.context import bind_rank_cores
    for name in ("MS_ROLE", "MS_WORKER_NUM", "DEVICE_ID", "MS_SCHED_HOST"):
        monkeypatch.delenv(name, raising=False)
    before = os.sched_getaffinity(0)
    assert bind_rank_cores("Ascend") is None
    assert bind_rank_cores("CPU") is None                                        # not an msrun worker
    assert os.sched_getaffinity(0) == before


def test_one_place_switches_the_op_dispatch_mode():
    """``ms.runtime.launch_blocking`` is called by ``configure_op_dispatch`` alone (read from the source): the
    pipeline executor asks it too instead of flipping the mode a second time (issue 21)."""
    import ast
    from pathlib import Path
    package = Path(__file__).resolve().parents[2] / "mf_longseq"
    callers = []
    for path in sorted(package.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for func in [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]:
            if any(isinstance(n, ast.Attribute) and n.attr == "launch_blocking" for n in ast.walk(func)):
                callers.append(f"{path.relative_to(package).as_posix()}:{func.name}")
    assert sorted(set(callers)) == ["train/context.py:configure_op_dispatch"]
