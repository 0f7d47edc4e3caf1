"""Checkpoint resharding between rank layouts, in one process (pure NumPy).

The oracle is the full state itself: every rank's state is cut from it with the ShardSpec rules, and a
reshard must give, on every target rank, exactly what cutting the full state for that rank gives.
"""
import numpy as np
import pytest

from mf_longseq.parallel.plan import RunPlan
from mf_longseq.parallel.reshard import merge_rank_states, split_rank_state
from mf_longseq.parallel.tensor_parallel import REPLICATED, SPLIT, ShardSpec, merge_shards, shard_array

HEADS, KV, HEAD_DIM, HIDDEN, FFN, VOCAB, LAYERS = 4, 2, 3, 12, 16, 32, 4

SPECS = {
    "embed.weight": ShardSpec(SPLIT, 0),
    "lm_head.weight": ShardSpec(SPLIT, 0),
    "norm.weight": ShardSpec(REPLICATED),
}
for _i in range(LAYERS):
    SPECS.update({
        f"layers.{_i}.q_proj.weight": ShardSpec(SPLIT, 0, HEADS),
        f"layers.{_i}.k_proj.weight": ShardSpec(SPLIT, 0, KV),
        f"layers.{_i}.k_proj.bias": ShardSpec(SPLIT, 0, KV),
        f"layers.{_i}.o_proj.weight": ShardSpec(SPLIT, 1, HEADS),
        f"layers.{_i}.up_proj.weight": ShardSpec(SPLIT, 0),
        f"layers.{_i}.down_proj.weight": ShardSpec(SPLIT, 1),
        f"layers.{_i}.input_norm.weight": ShardSpec(REPLICATED),
    })
SHAPES = {"embed.weight": (VOCAB, HIDDEN), "lm_head.weight": (VOCAB, HIDDEN), "norm.weight": (HIDDEN,)}
for _i in range(LAYERS):
    SHAPES.update({f"layers.{_i}.q_proj.weight": (HEADS * HEAD_DIM, HIDDEN),
                   f"layers.{_i}.k_proj.weight": (KV * HEAD_DIM, HIDDEN),
                   f"layers.{_i}.k_proj.bias": (KV * HEAD_DIM,),
                   f"layers.{_i}.o_proj.weight": (HIDDEN, HEADS * HEAD_DIM),
                   f"layers.{_i}.up_proj.weight": (FFN, HIDDEN),
                   f"layers.{_i}.down_proj.weight": (HIDDEN, FFN),
                   f"layers.{_i}.input_norm.weight": (HIDDEN,)})


def reshard(states, source, target, specs, stage_of=None, *, check_replicas=True):
    """Per-rank states of ``target`` from per-rank states written under ``source`` (merge, then cut per rank)."""
    full = merge_rank_states(states, source, specs, check_replicas=check_replicas)
    return {r: split_rank_state(full, specs, target, r, stage_of) for r in range(target.world_size)}


def stage_of(name, pp):
    if name.startswith(("adam_m.", "adam_v.")):
        name = name.split(".", 1)[1]
    if name.startswith("embed"):
        return 0
    if name.startswith("layers."):
        return int(name.split(".")[1]) * pp // LAYERS
    return pp - 1


def full_state(seed=0):
    rng = np.random.default_rng(seed)
    state = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in SHAPES.items()}
    state.update({f"adam_m.{n}": rng.standard_normal(s).astype(np.float32) for n, s in SHAPES.items()})
    return state


def states_of(full, layout):
    return {r: split_rank_state(full, SPECS, layout, r, stage_of) for r in range(layout.world_size)}


def assert_states_equal(a, b):
    assert a.keys() == b.keys()
    for rank in a:
        assert a[rank].keys() == b[rank].keys(), rank
        for name in a[rank]:
            np.testing.assert_array_equal(a[rank][name], b[rank][name], err_msg=f"rank {rank} {name}")


def test_kv_heads_replicated_when_mp_exceeds_them():
    w = np.arange(KV * HEAD_DIM * 2).reshape(KV * HEAD_DIM, 2)              # head h = rows [3h, 3h+3)
    spec = ShardSpec(SPLIT, 0, KV)
    shards = [shard_array(w, spec, 4, m) for m in range(4)]                  # mp 4 > 2 kv heads
    for m in range(4):
        np.testing.assert_array_equal(shards[m], w[(m // 2) * HEAD_DIM:(m // 2 + 1) * HEAD_DIM])
    np.testing.assert_array_equal(merge_shards(shards, spec), w)
    halves = [shard_array(w, spec, 2, m) for m in range(2)]
    np.testing.assert_array_equal(np.concatenate(halves), w)


def test_row_parallel_split_is_on_input_dim():
    w = np.arange(HIDDEN * HEADS * HEAD_DIM).reshape(HIDDEN, HEADS * HEAD_DIM)
    shards = [shard_array(w, ShardSpec(SPLIT, 1, HEADS), 2, m) for m in range(2)]
    assert shards[0].shape == (HIDDEN, 2 * HEAD_DIM)
    np.testing.assert_array_equal(np.concatenate(shards, axis=1), w)


def test_units_that_do_not_divide_are_rejected():
    with pytest.raises(ValueError, match="model_parallel = 3 and 4 units"):
        shard_array(np.zeros((12, 2)), ShardSpec(SPLIT, 0, 4), 3, 0)


@pytest.mark.parametrize("source, target", [
    (RunPlan(mp=2, cp=2), RunPlan(cp=4)),
    (RunPlan(mp=2, cp=2), RunPlan()),
    (RunPlan(cp=4), RunPlan(mp=2, cp=2)),
    (RunPlan(mp=4), RunPlan(mp=2, pp=2)),             # mp 4 > 2 kv heads: replicas merge back
    (RunPlan(pp=2, mp=2, dp=2), RunPlan(pp=4, cp=2)),
    (RunPlan(pp=2, cp=2), RunPlan(mp=4, dp=2)),
])
def test_reshard_equals_cutting_the_full_state(source, target):
    full = full_state()
    got = reshard(states_of(full, source), source, target, SPECS, stage_of)
    assert_states_equal(got, states_of(full, target))


def test_round_trip_mp2_cp2_to_cp4_to_one_rank():
    full = full_state(1)
    a = states_of(full, RunPlan(mp=2, cp=2))
    b = reshard(a, RunPlan(mp=2, cp=2), RunPlan(cp=4), SPECS, stage_of)
    c = reshard(b, RunPlan(cp=4), RunPlan(), SPECS, stage_of)
    assert c[0].keys() == full.keys()
    for name in full:
        np.testing.assert_array_equal(c[0][name], full[name])
    back = reshard(c, RunPlan(), RunPlan(mp=2, cp=2), SPECS, stage_of)
    assert_states_equal(back, a)


def test_optimizer_moments_follow_their_weight():
    full = full_state(2)
    state = states_of(full, RunPlan(mp=2))[1]
    np.testing.assert_array_equal(state["adam_m.layers.0.q_proj.weight"],
                                  full["adam_m.layers.0.q_proj.weight"][2 * HEAD_DIM:])


def test_diverged_replica_is_reported():
    layout = RunPlan(mp=2, cp=2)
    states = states_of(full_state(), layout)
    states[3]["norm.weight"] = states[3]["norm.weight"] + 1.0               # cp_id 1, mp_id 1
    with pytest.raises(ValueError, match=r"checkpoint tensor 'norm.weight': rank 3 differs from its replica"):
        merge_rank_states(states, layout, SPECS)


def test_missing_rank_is_reported():
    layout = RunPlan(cp=2)
    states = states_of(full_state(), layout)
    del states[1]
    with pytest.raises(ValueError, match=r"lacks rank files \[1\]"):
        merge_rank_states(states, layout, SPECS)
