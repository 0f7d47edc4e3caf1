"""The CP algorithm table (``parallel/algorithms.py``): every part that knows an algorithm reads its row, and a
name outside MindFormers' enum goes through ``long_seq.cp_algo``."""
from dataclasses import replace

import numpy as np
import pytest

from mf_longseq.config import ConfigError, LongSeqConfig
from mf_longseq.parallel import algorithms
from mf_longseq.parallel.algorithms import ALGORITHMS, MINDFORMERS_ALGOS, resolve
from mf_longseq.parallel.plan import RunPlan, ulysses_degree_of

MODEL = {"seq_length": 64, "num_heads": 4, "n_kv_heads": 2, "num_layers": 2}


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_every_reference_of_every_row_resolves(name):
    row = ALGORITHMS[name]
    for ref in (row.run, row.masks, row.bytes_sent, row.buffers):
        assert callable(resolve(ref)), (name, ref)


def test_mindformers_names_are_its_enum():
    assert set(MINDFORMERS_ALGOS) == {"colossalai_cp", "ulysses_cp", "hybrid_cp"}


def test_a_bad_reference_is_named():
    with pytest.raises(ValueError, match="'no.such.module:f' does not name a function"):
        resolve("no.such.module:f")


@pytest.fixture
def extra_row(monkeypatch):
    """A new algorithm registered by one row: no Ulysses split; its run returns 2 q; its formulas constants."""
    calls = []

    def run(q, k, v, **kw):
        calls.append(kw)
        return q * 2

    row = replace(ALGORITHMS["colossalai_cp"], name="twice_cp", mindformers=False, run=run,
                  bytes_sent=lambda call, j: {"gather": {"forward": 7, "backward": 11}},
                  buffers=lambda shape, layout, settings: 123)
    monkeypatch.setitem(algorithms.ALGORITHMS, "twice_cp", row)
    return calls


def test_dispatch_is_the_rows_run(extra_row):
    from mindspore import Tensor
    from mf_longseq.attention import context_parallel_attention
    from mf_longseq.parallel import Mesh
    q = Tensor(np.ones((1, 8, 2, 4), np.float32))
    mesh = Mesh(plan=RunPlan(algo="twice_cp"), rank=0)
    out = context_parallel_attention(q, q, q, mesh=mesh, algo="twice_cp", causal=True)
    assert np.array_equal(out.asnumpy(), 2 * q.asnumpy()) and len(extra_row) == 1
    assert len(extra_row[0]["masks"]) == 1                                  # the row's masks: CP = 1, one part


def test_mesh_shape_and_planner_read_the_row(extra_row):
    from mf_longseq.planner import comm
    from mf_longseq.planner.run_settings import Settings
    from mf_longseq.planner.memory import memory_per_device
    from mf_longseq.planner.shapes import model_shape
    assert ulysses_degree_of("twice_cp", 4, 2) == 1
    assert RunPlan(cp=4, algo="twice_cp").ring == 4
    with pytest.raises(ValueError, match="does not take ulysses = 2"):
        RunPlan(cp=4, ulysses=2, algo="twice_cp")
    call = comm.AttentionCall(1, 64, 4, 2, 8, 2, cp=4, algo="twice_cp")
    assert comm.attention_bytes(call) == {"gather": 18}
    assert comm.attention_bytes(call, "forward") == {"gather": 7}
    layout = RunPlan(dp=1, mp=1, cp=4, algo="twice_cp")
    assert memory_per_device(model_shape("llama2-7b"), layout, Settings(seq_len=4096)).attention == 123


def test_unknown_algorithm_is_refused_by_name():
    with pytest.raises(ValueError, match="algo = 'nope_cp': unknown context-parallel algorithm"):
        ulysses_degree_of("nope_cp", 4)


# ------------------------------------------------------------------------------------------ the config keys
def test_cp_algo_names_the_run_algorithm():
    config = LongSeqConfig(context_parallel=4, cp_algo="ulysses_cp")
    assert config.algo == "ulysses_cp" and config.plan.algo == "ulysses_cp" and config.ulysses_degree == 4


def test_cp_algo_unknown_has_a_did_you_mean():
    with pytest.raises(ConfigError, match=r"long_seq.cp_algo = 'ulyses_cp': unknown algorithm. Fix: did you mean "
                                          r"'ulysses_cp'"):
        LongSeqConfig(context_parallel=2, cp_algo="ulyses_cp")


def test_the_two_keys_may_not_disagree():
    with pytest.raises(ConfigError, match=r"long_seq.cp_algo = 'colossalai_cp': disagrees with "
                                          r"parallel_config.context_parallel_algo = 'ulysses_cp'"):
        LongSeqConfig(context_parallel=2, context_parallel_algo="ulysses_cp", cp_algo="colossalai_cp")


def test_the_two_keys_may_not_disagree_in_a_yaml_even_at_the_default():
    tree = {"parallel_config": {"context_parallel": 2, "context_parallel_algo": "colossalai_cp"},
            "long_seq": {"cp_algo": "ulysses_cp"}, "model": {"model_config": MODEL}}
    with pytest.raises(ConfigError, match="disagrees with parallel_config.context_parallel_algo"):
        LongSeqConfig.from_mindformers(tree)
    tree["parallel_config"]["context_parallel_algo"] = "ulysses_cp"
    assert LongSeqConfig.from_mindformers(tree).algo == "ulysses_cp"          # equal: fine
    del tree["parallel_config"]["context_parallel_algo"]
    assert LongSeqConfig.from_mindformers(tree).algo == "ulysses_cp"          # alone: fine


def test_a_plugin_name_in_mindformers_key_points_to_cp_algo(extra_row):
    with pytest.raises(ConfigError, match=r"parallel_config.context_parallel_algo = 'twice_cp': is not one of "
                                          r"MindFormers' ContextParallelAlgo values.*write long_seq.cp_algo: twice_cp"):
        LongSeqConfig(context_parallel=2, context_parallel_algo="twice_cp")
    assert LongSeqConfig(context_parallel=2, cp_algo="twice_cp").plan.algo == "twice_cp"


# ------------------------------------------------------------------------------------------ kvallgather_cp
def test_how_to_add_an_algorithm_names_files_that_exist():
    """docs/design.md's "How to add an algorithm": every file it names exists, and the package files the worked
    example touched are at most four."""
    import re
    from pathlib import Path
    root = Path(__file__).resolve().parents[2]
    text = (root / "docs" / "design.md").read_text(encoding="utf-8")
    section = text.split("## How to add an algorithm", 1)[1].split("### How to add a model family", 1)[0]
    named = set(re.findall(r"`((?:mf_longseq|tests)/[\w/]+\.py)`", section))
    assert {"mf_longseq/attention/kvallgather.py", "mf_longseq/parallel/algorithms.py"} <= named
    assert not [name for name in named if not (root / name).is_file()]
    touched = re.findall(r"^\d\. `(mf_longseq/[\w/]+\.py)`", section, flags=re.M)
    assert 1 <= len(touched) <= 4, touched


def test_kvallgather_is_a_plugin_name_with_its_own_formulas():
    from mf_longseq.planner import comm
    row = ALGORITHMS["kvallgather_cp"]
    assert not row.mindformers and row.ulysses_degree(8, 4) == 1
    call = comm.AttentionCall(batch=1, seq_len=1024, heads=8, kv_heads=2, head_dim=64, itemsize=2, cp=4,
                              algo="kvallgather_cp")
    kv = 2 * 1 * 2 * 256 * 64 * 2                                          # this rank's K and V, bf16
    assert comm.attention_bytes(call, "forward") == {"kv_all_gather": 3 * kv, "dkv_reduce_scatter": 0}
    assert comm.attention_bytes(call, "backward") == {"kv_all_gather": 3 * kv, "dkv_reduce_scatter": 3 * 2 * kv}


def test_plan_compares_kvallgather():
    """``mf-longseq plan``'s comparison of the algorithms at the best layout has a kvallgather_cp row, with the
    bytes of its row's formulas (LLaMA2-70B, 8 kv heads: one per mp rank at mp = 8)."""
    from mf_longseq.planner import cli
    from mf_longseq.planner.run_settings import Settings
    from mf_longseq.planner.shapes import model_shape
    shape, settings = model_shape("llama2-70b"), Settings(seq_len=131072)
    rows = {row[0]: row for row in cli._algo_rows(shape, RunPlan(dp=1, mp=8, cp=8), settings)}
    mine, ring = (RunPlan(dp=1, mp=8, cp=8, algo=a).label() for a in ("kvallgather_cp", "colossalai_cp"))
    kv = 2 * settings.micro_batch * 1 * (131072 // 8) * 128 * settings.bytes_of("compute")
    assert rows[mine][1] == 7 * kv                                          # forward: (CP-1) x own K and V
    assert rows[mine][3] > rows[ring][3]                                    # the whole K/V in the buffers


def test_plan_ranks_mindformers_algorithms_unless_one_is_named():
    """The planner's search (and the YAML it writes) keeps to MindFormers' three algorithms by default; a plugin
    algorithm is searched when ``--algo`` names it, and its YAML names it by long_seq.cp_algo."""
    import inspect
    from mf_longseq.planner.run_settings import Settings
    from mf_longseq.planner.recommend import closest, layouts, recommend
    from mf_longseq.planner.shapes import model_shape
    from mf_longseq.planner.template import template
    shape = model_shape("llama2-70b")
    for search in (recommend, closest):
        assert tuple(inspect.signature(search).parameters["algos"].default) == MINDFORMERS_ALGOS
    assert {p.algo for p in layouts(16, shape, ["kvallgather_cp"]) if p.cp > 1} == {"kvallgather_cp"}
    tree = template("llama2-7b", RunPlan(cp=4, algo="kvallgather_cp"), Settings(seq_len=8192))
    assert "context_parallel_algo" not in tree["parallel_config"] and tree["long_seq"]["cp_algo"] == "kvallgather_cp"
    assert LongSeqConfig.from_mindformers(tree).plan.algo == "kvallgather_cp"
