"""Communication groups of one rank: ``Mesh`` = a ``RunPlan`` (degrees, rank order, axes) + this rank + its groups.

The rank order and the axes are the plan's (parallel/plan.py, the one home of both).  Each group is a ``Group``:
its global ranks in order, this rank's index, a communication-group name.

A ``Mesh`` built with an explicit ``rank`` and no communication is plain arithmetic: unit tests simulate every
rank in a loop.  ``Mesh.create_groups()`` creates the communication groups this rank belongs to (under msrun,
after ``mindspore.communication.init()``), including the two-rank groups that the CPU exchanges need.
"""
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

from mf_longseq.parallel.comm import CommStats
from mf_longseq.parallel.plan import Axis, RunPlan


@dataclass(frozen=True)
class Group:
    """The ranks of one mesh axis that include this rank.

    Attributes:
        axis: mesh axis name.
        ranks: global ranks of the group, in group order (index 0 first).
        index: this rank's position in ``ranks``.
        name: communication-group name (the world group's name when the group is the whole world).
        device_target: backend the exchanges run on ("CPU" selects the AllReduce-based emulation).
        stats: byte counters shared by every group of the mesh.
        pair_names: name of the two-rank group for each pair of group indices (i, j), i < j.
    """

    axis: str
    ranks: Tuple[int, ...]
    index: int
    name: str
    device_target: str = "CPU"
    stats: CommStats = field(default_factory=CommStats, compare=False, repr=False)
    pair_names: Dict[Tuple[int, int], str] = field(default_factory=dict, compare=False, repr=False)

    @property
    def size(self) -> int:
        return len(self.ranks)

    def pair(self, i: int, j: int) -> str:
        """Name of the two-rank group of group indices i and j."""
        key = (min(i, j), max(i, j))
        if key not in self.pair_names:
            raise KeyError(f"no two-rank group for indices {key} of {self.axis} group {self.ranks}: "
                           "call Mesh.create_groups() first")
        return self.pair_names[key]


class Mesh:
    """A ``RunPlan``, this process's rank in it, and the groups of that rank.

    Args:
        dp, mp, cp, pp: parallel degrees; their product is the world size.
        ulysses: Ulysses degree inside CP (must divide cp); ring degree = cp // ulysses.
        rank: this process's global rank (default: ``mindspore.communication.get_rank()``, 0 without init).
        device_target: "CPU" (emulated exchanges) or "Ascend"/"GPU" (native collectives).
        plan: the whole plan (then dp, mp, cp, pp, ulysses are not given).

    Raises:
        ValueError: as ``RunPlan``, or the rank is outside the plan's world.
    """

    def __init__(self, *, dp: int = 1, mp: int = 1, cp: int = 1, pp: int = 1, ulysses: int = 1,
                 rank: Optional[int] = None, device_target: str = "CPU", plan: Optional[RunPlan] = None):
        self.plan = plan if plan is not None else RunPlan(dp=dp, mp=mp, cp=cp, pp=pp, ulysses=ulysses)
        self.rank = _current_rank() if rank is None else rank
        self.plan.coords(self.rank)                         # raises when the rank is outside the world
        self.device_target = device_target
        self.stats = CommStats()
        self._pair_names: Dict[Tuple[int, int], str] = {}

    @classmethod
    def from_config(cls, config, *, rank: Optional[int] = None) -> "Mesh":
        """Mesh of a ``LongSeqConfig`` (its ``plan``)."""
        return cls(plan=config.plan, rank=rank, device_target=config.device_target)

    dp = property(lambda self: self.plan.dp)
    mp = property(lambda self: self.plan.mp)
    cp = property(lambda self: self.plan.cp)
    pp = property(lambda self: self.plan.pp)
    ulysses = property(lambda self: self.plan.ulysses)
    ring = property(lambda self: self.plan.ring)
    world_size = property(lambda self: self.plan.world_size)

    def __repr__(self) -> str:
        return (f"Mesh(dp={self.dp}, mp={self.mp}, cp={self.cp} (ulysses={self.ulysses} x ring={self.ring}), "
                f"pp={self.pp}, rank={self.rank})")

    def check_settings(self, config) -> None:
        """A mesh passed beside the parallel settings (``LongSeqConfig``) must carry their plan: degrees, algorithm
        and sequence layout are read from the mesh only.

        Raises:
            ValueError: the plans differ (names both and the fix).
        """
        if not self.plan.runs_like(config.plan):
            raise ValueError(f"mesh plan {self.plan.label()} layout {self.plan.seq_layout} does not match the "
                             f"parallel settings' {config.plan.label()} layout {config.plan.seq_layout}. "
                             "Fix: build the mesh with Mesh.from_config(long_seq_config).")

    # ------------------------------------------------------------------------------------------- coordinates
    def coords(self, rank: Optional[int] = None) -> Dict[str, int]:
        """stage, dp_id, cp_id, mp_id, ring_id, ulysses_id of a rank (default: this one); ``RunPlan.coords``."""
        return self.plan.coords(self.rank if rank is None else rank)

    def rank_of(self, *, stage: int, dp_id: int, cp_id: int, mp_id: int) -> int:
        return self.plan.rank_of(stage=stage, dp_id=dp_id, cp_id=cp_id, mp_id=mp_id)

    def ranks(self, axis: str, rank: Optional[int] = None) -> Tuple[int, ...]:
        """Global ranks of the ``axis`` group that contains ``rank`` (default: this one), in group order."""
        return self.plan.ranks(axis, self.rank if rank is None else rank)

    def group(self, axis: str) -> Group:
        """This rank's ``axis`` group."""
        ranks = self.ranks(axis)
        pairs = {}
        for i in range(len(ranks)):
            for j in range(i + 1, len(ranks)):
                name = self._pair_names.get((min(ranks[i], ranks[j]), max(ranks[i], ranks[j])))
                if name is not None:
                    pairs[(i, j)] = name
        return Group(axis=Axis(axis).value, ranks=ranks, index=ranks.index(self.rank), name=self._group_name(ranks),
                     device_target=self.device_target, stats=self.stats, pair_names=pairs)

    # ------------------------------------------------------------------------------------------- communication
    def _group_name(self, ranks: Tuple[int, ...]) -> str:
        if len(ranks) == self.world_size and ranks == tuple(range(self.world_size)):
            from mindspore.communication import GlobalComm
            return GlobalComm.WORLD_COMM_GROUP
        return "mfls_" + "_".join(str(r) for r in ranks)

    def _needed_groups(self):
        """Group rank tuples this rank belongs to, and the rank pairs its exchanges use."""
        groups, pairs = set(), set()
        for axis in Axis:
            ranks = self.ranks(axis)
            if len(ranks) > 1:
                groups.add(ranks)
        # Two-rank groups: ring neighbours (ring shift), every Ulysses pair (pairwise all-to-all),
        # pipeline neighbours (stage transfers).
        for axis in (Axis.RING, Axis.ULYSSES, Axis.PP):
            ranks = self.ranks(axis)
            me = ranks.index(self.rank)
            partners = range(len(ranks)) if axis is Axis.ULYSSES else (me - 1, me + 1)
            for j in partners:
                other = ranks[j % len(ranks)]
                if other != self.rank:
                    pairs.add((min(self.rank, other), max(self.rank, other)))
        return groups, pairs

    def create_groups(self) -> "Mesh":
        """Create every communication group this rank takes part in (call once, on every rank)."""
        from mindspore.communication import create_group
        groups, pairs = self._needed_groups()
        for ranks in sorted(groups) + sorted(pairs):
            name = self._group_name(tuple(ranks))
            if name.startswith("mfls_") and name not in self._created:
                create_group(name, list(ranks))
                self._created.add(name)
        for a, b in pairs:
            self._pair_names[(a, b)] = self._group_name((a, b))
        return self

    _created: set = set()  # group names created in this process (creating one twice is an error)


def _current_rank() -> int:
    try:
        from mindspore.communication import get_rank
        return get_rank()
    except Exception:  # communication not initialised: a single process
        return 0
