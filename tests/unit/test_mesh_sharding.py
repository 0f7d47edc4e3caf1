"""Mesh rank arithmetic and sequence sharding, every rank simulated in one process."""
import numpy as np
import pytest

from mf_longseq.parallel import Mesh, cp_order, global_positions, positions_for, shard_sequence


def test_rank_order_matches_mindformers():
    mesh = Mesh(dp=2, mp=2, cp=2, pp=2, rank=0)
    for rank in range(mesh.world_size):
        c = mesh.coords(rank)
        assert rank == c["stage"] * 8 + c["dp_id"] * 4 + c["cp_id"] * 2 + c["mp_id"]
        assert mesh.rank_of(stage=c["stage"], dp_id=c["dp_id"], cp_id=c["cp_id"], mp_id=c["mp_id"]) == rank


def test_groups_partition_the_world():
    for rank in range(16):
        mesh = Mesh(dp=2, mp=2, cp=2, pp=2, rank=rank)
        world = mesh.world_size
        for axis, size in (("dp", 2), ("cp", 2), ("mp", 2), ("pp", 2), ("dp_cp", 4)):
            ranks = mesh.ranks(axis)
            assert len(ranks) == size and rank in ranks
        # every axis group seen from each of its members is the same group
        for axis in ("dp", "cp", "mp", "pp", "dp_cp"):
            for other in mesh.ranks(axis):
                assert Mesh(dp=2, mp=2, cp=2, pp=2, rank=other).ranks(axis) == mesh.ranks(axis)
        assert world == 16


def test_ulysses_ranks_contiguous_ring_strided():
    mesh = Mesh(cp=8, ulysses=2, rank=5)           # cp_id 5 = ring_id 2 * 2 + ulysses_id 1
    assert mesh.coords()["ring_id"] == 2 and mesh.coords()["ulysses_id"] == 1
    assert mesh.ranks("ulysses") == (4, 5)
    assert mesh.ranks("ring") == (1, 3, 5, 7)
    assert mesh.group("ring").index == 2


def test_mesh_rejects_bad_rank():
    with pytest.raises(ValueError, match="rank 4 is outside a mesh of 4 ranks"):
        Mesh(cp=4, rank=4)


def test_zigzag_positions_balance_causal_work():
    s, r = 64, 4
    parts = [positions_for(s, ring_size=r, ring_index=i, layout="zigzag") for i in range(r)]
    assert parts[0].tolist() == list(range(0, 8)) + list(range(56, 64))
    assert sorted(np.concatenate(parts).tolist()) == list(range(s))
    work = [int((p + 1).sum()) for p in parts]      # causal keys seen by each rank's queries
    assert len(set(work)) == 1


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
@pytest.mark.parametrize("cp, ulysses", [(2, 1), (4, 1), (4, 2), (4, 4), (6, 3)])
def test_shards_cover_sequence_once(layout, cp, ulysses):
    s = 120
    meshes = [Mesh(cp=cp, ulysses=ulysses, rank=r) for r in range(cp)]
    order = cp_order(s, meshes[0], layout)
    assert sorted(order.tolist()) == list(range(s))
    x = np.arange(2 * s).reshape(2, s)
    for mesh in meshes:
        assert (shard_sequence(x, mesh, layout, seq_dim=1) == x[:, global_positions(s, mesh, layout)]).all()


def test_ulysses_group_pieces_form_the_ring_part():
    s, cp, u = 96, 4, 2
    for ring_id in range(cp // u):
        pieces = [global_positions(s, Mesh(cp=cp, ulysses=u, rank=ring_id * u + j), "zigzag") for j in range(u)]
        assert np.concatenate(pieces).tolist() == positions_for(s, ring_size=2, ring_index=ring_id).tolist()


def test_zigzag_needs_even_chunks():
    with pytest.raises(ValueError, match="multiple of 2 x ring degree = 8"):
        positions_for(100, ring_size=4, ring_index=0, layout="zigzag")
