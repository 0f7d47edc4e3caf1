"""Rank mesh, communication groups, exchanges and sequence sharding."""
from mf_longseq.parallel.comm import CommStats
from mf_longseq.parallel.mesh import Axis, Group, Mesh
from mf_longseq.parallel.sharding import cp_order, gather_sequence, global_positions, positions_for, shard_sequence

__all__ = ["CommStats", "Axis", "Group", "Mesh", "cp_order", "gather_sequence", "global_positions",
           "positions_for", "shard_sequence"]
