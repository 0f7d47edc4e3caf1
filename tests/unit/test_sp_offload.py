"""Sequence parallelism (``parallel_config.use_seq_parallel``) and layer-input offload
(``long_seq.offload_layer_inputs``) on one process: the rules and their messages, SP with model_parallel = 1 (a
no-op), and offload changing no loss or gradient while every layer's input really goes through the host copy.
The multi-rank SP parity (mp2 x cp2, ring and Ulysses) is tests/dist/test_seq_parallel.py.
"""
import copy
from pathlib import Path

import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor

from mf_longseq.config import ConfigError, LongSeqConfig
from mf_longseq.models import build_model
from mf_longseq.models.offload import LayerInputOffload

TINY = Path(__file__).resolve().parents[2] / "yaml_templates" / "tiny" / "llama2_tiny_s256_cp1_colossalai_cp.yaml"
SEQ = 64


def tiny_tree(**long_seq):
    import yaml
    tree = yaml.safe_load(TINY.read_text(encoding="utf-8"))
    tree["model"]["model_config"]["seq_length"] = SEQ
    tree["long_seq"] = {**(tree.get("long_seq") or {}), **long_seq}
    return tree


def loss_and_grads(net, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, net.config.vocab_size, (2, SEQ + 1))
    ids, labels = Tensor(tokens[:, :-1].astype(np.int32)), Tensor(tokens[:, 1:].astype(np.int32))
    mask = Tensor(np.ones((2, SEQ), np.float32))
    params = net.trainable_params()
    loss, grads = ms.value_and_grad(lambda a, b, c: net(a, b, c)[0], None, params)(ids, labels, mask)
    return float(loss.asnumpy()), [np.array(g.asnumpy()) for g in grads]


# ------------------------------------------------------------------------------------------------ the rules
def settings(**kw):
    return dict(dict(model_parallel=2, context_parallel=2, use_seq_parallel=True), **kw)


def test_seq_parallel_with_context_parallel_is_accepted_by_every_algorithm():
    for algo in ("colossalai_cp", "ulysses_cp", "hybrid_cp"):
        cfg = LongSeqConfig(**settings(context_parallel_algo=algo))
        cfg.check_model({"seq_length": 64, "num_heads": 4, "n_kv_heads": 2, "num_layers": 2})
        assert cfg.use_seq_parallel


def test_seq_parallel_needs_the_cp_part_divisible_by_model_parallel():
    cfg = LongSeqConfig(**settings(model_parallel=4, layout="contiguous"))
    with pytest.raises(ConfigError) as err:
        cfg.check_model({"seq_length": 36, "num_heads": 4, "n_kv_heads": 4, "num_layers": 2})   # 36 / 2 = 18
    assert str(err.value) == (
        "model.model_config.seq_length = 36: parallel_config.use_seq_parallel splits each rank's seq_length / "
        "context_parallel tokens over model_parallel = 4 ranks, so seq_length must be divisible by "
        "context_parallel x model_parallel = 8. Fix: use a seq_length divisible by 8, or set "
        "parallel_config.use_seq_parallel: False.")


def test_seq_parallel_with_model_parallel_1_is_accepted_as_a_no_op_with_a_note():
    cfg = LongSeqConfig(**settings(model_parallel=1))
    notes = cfg.notes({"seq_length": 64, "num_heads": 4})
    assert any("parallel_config.use_seq_parallel = True with parallel_config.model_parallel = 1" in n
               and "no effect" in n for n in notes)
    plain, split = build_model(tiny_tree()), build_model({**tiny_tree(), "parallel_config": {
        **tiny_tree()["parallel_config"], "use_seq_parallel": True}})
    assert split.model.sp.degree == 1 and not split.model.sp.on
    loss, grads = loss_and_grads(plain)
    loss_sp, grads_sp = loss_and_grads(split)
    assert loss == loss_sp and all(np.array_equal(a, b) for a, b in zip(grads, grads_sp))


def test_offload_key_is_a_flag_and_needs_recompute():
    with pytest.raises(ConfigError, match=r"long_seq.offload_layer_inputs = 'yes': must be True or False"):
        LongSeqConfig.from_mindformers(tiny_tree(offload_layer_inputs="yes"))
    tree = tiny_tree(offload_layer_inputs=True)
    tree["recompute_config"] = {**(tree.get("recompute_config") or {}), "recompute": False}
    with pytest.raises(ConfigError) as err:
        build_model(tree)
    assert str(err.value) == (
        "long_seq.offload_layer_inputs = True: offloads the one input each recomputed layer keeps, but "
        "recompute_config.recompute is False. Fix: set recompute_config.recompute: True, or "
        "long_seq.offload_layer_inputs: False.")
    from mf_longseq.train.validation import _recompute_refusals
    assert [e.key for e in _recompute_refusals(tree)] == ["long_seq.offload_layer_inputs"]


# ------------------------------------------------------------------------------------------------ offload
def recomputed(offload: bool):
    tree = tiny_tree(offload_layer_inputs=offload)
    tree["recompute_config"] = {**(tree.get("recompute_config") or {}), "recompute": True}
    return build_model(copy.deepcopy(tree))


def test_offload_moves_each_layer_input_through_the_host_and_changes_no_result(monkeypatch):
    moves = []
    original = ms.Tensor.move_to

    def spy(tensor, to, blocking=True):
        moves.append((to, tuple(tensor.shape), blocking))
        return original(tensor, to, blocking)
    monkeypatch.setattr(ms.Tensor, "move_to", spy)
    plain, offloaded = recomputed(False), recomputed(True)
    assert plain.model.layer_offload is None and isinstance(offloaded.model.layer_offload, LayerInputOffload)
    loss, grads = loss_and_grads(plain)
    assert moves == []
    loss_off, grads_off = loss_and_grads(offloaded)
    layers, hidden = offloaded.config.num_layers, offloaded.config.hidden_size
    # per layer: its input to the host in the forward, back to the device before its backward, asynchronously
    assert sorted(moves) == sorted([("CPU", (2, SEQ, hidden), False)] * (2 * layers))
    assert loss == loss_off
    assert all(np.array_equal(a, b) for a, b in zip(grads, grads_off))
    assert any(np.abs(g).max() > 0 for g in grads_off)
