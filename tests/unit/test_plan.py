"""RunPlan: MindFormers' rank order written out by hand, axis groups partition the world, one home per fact."""
import pytest

from mf_longseq.config import LongSeqConfig
from mf_longseq.parallel.mesh import Mesh
from mf_longseq.parallel.plan import CP_ALGOS, Axis, RunPlan, ulysses_degree_of

# dp2 x cp2 (ulysses 2, ring 1) x mp2 x pp2, written out rank by rank in MindFormers' order: model parallel
# fastest, then context parallel, then data parallel; the pipeline stage slowest (MindSpore gives each stage
# device_num / pipeline_stage consecutive ranks).  (stage, dp_id, cp_id, mp_id) of ranks 0..15:
TABLE_16 = [
    (0, 0, 0, 0), (0, 0, 0, 1), (0, 0, 1, 0), (0, 0, 1, 1),
    (0, 1, 0, 0), (0, 1, 0, 1), (0, 1, 1, 0), (0, 1, 1, 1),
    (1, 0, 0, 0), (1, 0, 0, 1), (1, 0, 1, 0), (1, 0, 1, 1),
    (1, 1, 0, 0), (1, 1, 0, 1), (1, 1, 1, 0), (1, 1, 1, 1),
]


def test_rank_order_is_mindformers_table():
    plan = RunPlan(dp=2, cp=2, mp=2, pp=2, ulysses=2)
    assert plan.algo == "ulysses_cp" and plan.ring == 1 and plan.world_size == 16
    for rank, (stage, dp_id, cp_id, mp_id) in enumerate(TABLE_16):
        c = plan.coords(rank)
        assert (c["stage"], c["dp_id"], c["cp_id"], c["mp_id"]) == (stage, dp_id, cp_id, mp_id)
        assert (c["ulysses_id"], c["ring_id"]) == (cp_id, 0)
        assert plan.rank_of(stage=stage, dp_id=dp_id, cp_id=cp_id, mp_id=mp_id) == rank
        assert stage == rank // (plan.world_size // plan.pp)         # MindSpore's per-stage rank blocks


def test_groups_of_one_rank_by_hand():
    # dp2 x cp4 (ulysses 2 x ring 2) x mp2 x pp2; rank 13 = stage 0, dp_id 1, cp_id 2 (ring 1, ulysses 0), mp_id 1
    plan = RunPlan(dp=2, cp=4, mp=2, pp=2, ulysses=2)
    assert plan.algo == "hybrid_cp"
    assert plan.coords(13) == {"stage": 0, "dp_id": 1, "cp_id": 2, "mp_id": 1, "ring_id": 1, "ulysses_id": 0}
    expected = {Axis.MP: (12, 13), Axis.ULYSSES: (13, 15), Axis.RING: (9, 13), Axis.CP: (9, 11, 13, 15),
                Axis.DP: (5, 13), Axis.PP: (13, 29), Axis.DP_CP: (1, 3, 5, 7, 9, 11, 13, 15)}
    for axis, ranks in expected.items():
        assert plan.ranks(axis, 13) == ranks, axis


@pytest.mark.parametrize("degrees", [dict(dp=2, cp=2, mp=2, pp=2, ulysses=2), dict(dp=2, cp=4, mp=2, pp=2, ulysses=2),
                                     dict(cp=8, ulysses=4), dict(dp=3, mp=2, pp=2), dict(cp=6, ulysses=3, pp=2)])
def test_every_axis_group_partitions_the_world(degrees):
    plan = RunPlan(**degrees)
    sizes = {Axis.DP: plan.dp, Axis.CP: plan.cp, Axis.ULYSSES: plan.ulysses, Axis.RING: plan.ring, Axis.MP: plan.mp,
             Axis.PP: plan.pp, Axis.DP_CP: plan.dp * plan.cp}
    for axis in Axis:
        groups = {plan.ranks(axis, r) for r in range(plan.world_size)}
        members = sorted(r for g in groups for r in g)
        assert members == list(range(plan.world_size)), axis            # disjoint, and together the world
        assert {len(g) for g in groups} == {sizes[axis]}, axis
        for group in groups:                                             # the same group seen from each member
            assert all(plan.ranks(axis, r) == group for r in group)


def test_mesh_and_config_read_the_plan():
    cfg = LongSeqConfig(data_parallel=2, model_parallel=2, context_parallel=4,
                        context_parallel_algo="hybrid_cp", ulysses_degree_in_cp=2, layout="contiguous")
    plan = cfg.plan
    assert (plan.dp, plan.mp, plan.cp, plan.pp, plan.ulysses, plan.ring) == (2, 2, 4, 1, 2, 2)
    assert (plan.algo, plan.seq_layout) == ("hybrid_cp", "contiguous")
    assert (cfg.ulysses_degree, cfg.ring_degree, cfg.world_size) == (2, 2, 16)
    mesh = Mesh.from_config(cfg, rank=13)
    assert mesh.plan == plan and mesh.ranks("ring") == plan.ranks("ring", 13)
    assert RunPlan.from_dict(plan.as_dict()) == plan


@pytest.mark.parametrize("algo, expected", [("colossalai_cp", 1), ("ulysses_cp", 4), ("hybrid_cp", 2)])
def test_ulysses_degree_of_each_algorithm(algo, expected):
    assert algo in CP_ALGOS
    assert ulysses_degree_of(algo, 4, 2) == expected
    assert ulysses_degree_of(algo, 1, 2) == 1


@pytest.mark.parametrize("kwargs, message", [
    (dict(cp=4, ulysses=3), r"ulysses = 3: must divide cp = 4"),
    (dict(cp=4, ulysses=2, algo="colossalai_cp"), r"algo = 'colossalai_cp' with cp = 4 does not take ulysses = 2"),
    (dict(cp=4, ulysses=2, algo="ulysses_cp"), r"algo = 'ulysses_cp' with cp = 4 does not take ulysses = 2"),
    (dict(algo="ring"), r"algo = 'ring': unknown context-parallel algorithm"),
    (dict(seq_layout="stripe"), r"layout = 'stripe': unknown"),
    (dict(dp=0), r"dp = 0: must be a positive integer"),
])
def test_plan_refuses_inconsistent_degrees(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RunPlan(**kwargs)


def test_a_mesh_must_carry_the_settings_plan():
    """Algorithm and layout are read from the mesh only, so a mesh whose plan runs differently is refused;
    with CP off (or no ring) the layout names do not matter."""
    from mf_longseq.parallel import Mesh
    contiguous = LongSeqConfig(context_parallel=2, layout="contiguous")
    with pytest.raises(ValueError, match=r"^mesh plan dp1 mp1 cp2 pp1 colossalai_cp layout zigzag does not match the "
                                         r"parallel settings' dp1 mp1 cp2 pp1 colossalai_cp layout contiguous\. "
                                         r"Fix: build the mesh with Mesh\.from_config\(long_seq_config\)\.$"):
        Mesh(cp=2, rank=0).check_settings(contiguous)
    Mesh.from_config(contiguous, rank=1).check_settings(contiguous)
    Mesh(rank=0).check_settings(LongSeqConfig(layout="contiguous", context_parallel_algo="ulysses_cp"))   # CP off
    ulysses = LongSeqConfig(context_parallel=2, context_parallel_algo="ulysses_cp", layout="contiguous")
    Mesh(cp=2, ulysses=2, rank=0).check_settings(ulysses)                 # no ring: zigzag is the contiguous cut
    with pytest.raises(ValueError, match="does not match"):
        Mesh(cp=2, rank=0).check_settings(ulysses)                        # ring mesh, Ulysses settings
