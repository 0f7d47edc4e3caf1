"""Run plan (rank layout), communication groups, exchanges and sequence sharding.

Names load on first use, so ``mf_longseq.parallel.plan`` (pure Python) imports without MindSpore.
"""
import importlib

_HOMES = {"RunPlan": "plan", "Axis": "plan", "CpAlgo": "plan", "CommStats": "comm", "Group": "mesh",
          "Mesh": "mesh", "cp_order": "sharding", "gather_sequence": "sharding", "global_positions": "sharding",
          "positions_for": "sharding", "shard_sequence": "sharding"}


def __getattr__(name):
    if name in _HOMES:
        return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_HOMES)
