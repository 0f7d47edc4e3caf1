"""RunPlan: the one home of a run's layout (degrees, rank order, axes, algorithm name, sequence layout).

Pure Python (no MindSpore), so the config, the planner, checkpoints and resharding read it without a device.
``Mesh`` (parallel/mesh.py) is a ``RunPlan`` plus this process's rank and its communication groups.

Rank order (MindFormers' order, model parallel fastest, then context parallel, then data parallel, then the
pipeline stage: MindSpore's pipeline puts ``device_num / pipeline_stage`` consecutive ranks on each stage)::

    rank = stage * (dp * cp * mp) + dp_id * (cp * mp) + cp_id * mp + mp_id

Inside CP the ranks split into Ulysses x ring, Ulysses ranks contiguous (they exchange the most)::

    cp_id = ring_id * ulysses + ulysses_id

Axes (``Axis``; a group is the ranks that differ only in the listed coordinates):

    axis        ranks that differ only in            used for
    dp          dp_id                                 (with cp) gradient averaging
    cp          cp_id                                 all-gather / split of a sequence
    ulysses     ulysses_id (same ring_id)             Ulysses all-to-all
    ring        ring_id (same ulysses_id)             ring shift of K/V blocks
    mp          mp_id                                 tensor-parallel all-reduce
    pp          stage                                 pipeline transfers
    dp_cp       dp_id and cp_id                       gradient all-reduce (weights replicated over both)

Names defined here and imported everywhere else: ``CP_ALGOS`` (every algorithm of the table
``parallel/algorithms.py``; MindFormers' ``context_parallel_algo`` takes ``MINDFORMERS_ALGOS``),
``LEGACY_ALGO_SPELLINGS``, ``LAYOUTS`` (sequence layouts), ``ulysses_degree_of`` (the Ulysses part of CP for an
algorithm, from the table), ``world_size_of`` and the pipeline layer split (``stage_layers``, ``decoder_stage_of``).
"""
from dataclasses import dataclass
from enum import Enum
from typing import Dict, Mapping, Optional, Tuple

from mf_longseq.parallel.algorithms import ALGORITHMS, MINDFORMERS_ALGOS, algo_of


class Axis(str, Enum):
    DP = "dp"
    CP = "cp"
    ULYSSES = "ulysses"
    RING = "ring"
    MP = "mp"
    PP = "pp"
    DP_CP = "dp_cp"


class CpAlgo(str, Enum):
    """MindFormers' ``parallel_config.context_parallel_algo`` values."""

    RING = "colossalai_cp"
    ULYSSES = "ulysses_cp"
    HYBRID = "hybrid_cp"


CP_ALGOS = tuple(ALGORITHMS)                   # every algorithm of the table; MindFormers' own: MINDFORMERS_ALGOS
LEGACY_ALGO_SPELLINGS = {"hybird_cp": CpAlgo.HYBRID.value}
LAYOUTS = ("contiguous", "zigzag")


def ulysses_degree_of(algo: str, cp: int, ulysses_degree_in_cp: int = 1) -> int:
    """Ranks of one Ulysses group inside CP, as the algorithm's row of ``ALGORITHMS`` says: 1 for colossalai_cp
    (or cp = 1), cp for ulysses_cp, ``parallel_config.ulysses_degree_in_cp`` for hybrid_cp.

    Raises:
        ValueError: an algorithm the table does not have.
    """
    if algo not in ALGORITHMS:
        raise ValueError(f"algo = {algo!r}: unknown context-parallel algorithm. Fix: use one of {', '.join(CP_ALGOS)}")
    return ALGORITHMS[algo].ulysses_degree(cp, ulysses_degree_in_cp)


def world_size_of(dp: int, mp: int, cp: int, pp: int) -> int:
    """Ranks of a run: the product of its degrees (usable before the degrees are known to fit together)."""
    return dp * mp * cp * pp


@dataclass(frozen=True, kw_only=True)
class RunPlan:
    """dp x pp x cp (ulysses x ring) x mp degrees of a run, its rank order and its CP algorithm.

    Attributes:
        dp, mp, cp, pp: parallel degrees (``parallel_config`` data_parallel, model_parallel, context_parallel,
            pipeline_stage); their product is the world size.
        ulysses: Ulysses degree inside CP (must divide cp); ring degree = cp // ulysses.
        algo: CP algorithm, one of ``CP_ALGOS`` (default: the one the degrees imply).
        seq_layout: how a sequence is split across the CP ranks, one of ``LAYOUTS``.

    Raises:
        ValueError: a degree is not a positive integer, ulysses does not divide cp, or the algorithm is unknown
            or does not fit the degrees (colossalai_cp needs ulysses = 1, ulysses_cp needs ulysses = cp).
    """

    dp: int = 1
    mp: int = 1
    cp: int = 1
    pp: int = 1
    ulysses: int = 1
    algo: Optional[str] = None
    seq_layout: str = "zigzag"

    def __post_init__(self):
        for name in ("dp", "mp", "cp", "pp", "ulysses"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Mesh {name} = {value!r}: must be a positive integer")
        if self.cp % self.ulysses != 0:
            raise ValueError(f"Mesh ulysses = {self.ulysses}: must divide cp = {self.cp}")
        if self.algo is None:
            object.__setattr__(self, "algo", algo_of(self.cp, self.ulysses))
        if self.algo not in ALGORITHMS:
            raise ValueError(f"algo = {self.algo!r}: unknown context-parallel algorithm. Fix: use one of "
                             f"{', '.join(CP_ALGOS)}")
        if not ALGORITHMS[self.algo].takes(self.cp, self.ulysses):
            raise ValueError(f"algo = {self.algo!r} with cp = {self.cp} does not take ulysses = {self.ulysses}. "
                             "Fix: use hybrid_cp, or ulysses = 1 for colossalai_cp and ulysses = cp for ulysses_cp")
        if self.seq_layout not in LAYOUTS:
            raise ValueError(f"layout = {self.seq_layout!r}: unknown; use one of {', '.join(LAYOUTS)}")

    @classmethod
    def from_config(cls, config) -> "RunPlan":
        """Plan of a ``LongSeqConfig``."""
        cp = config.context_parallel
        return cls(dp=config.data_parallel, mp=config.model_parallel, cp=cp, pp=config.pipeline_stage,
                   ulysses=ulysses_degree_of(config.algo, cp, config.ulysses_degree_in_cp),
                   algo=config.algo, seq_layout=config.layout)

    @classmethod
    def from_dict(cls, d: Mapping) -> "RunPlan":
        """Inverse of ``as_dict`` (missing degrees are 1; ``layout`` is the sequence layout)."""
        return cls(dp=int(d.get("dp", 1)), mp=int(d.get("mp", 1)), cp=int(d.get("cp", 1)), pp=int(d.get("pp", 1)),
                   ulysses=int(d.get("ulysses", 1)), algo=d.get("context_parallel_algo"),
                   seq_layout=d.get("layout", "zigzag"))

    def as_dict(self) -> dict:
        """The plan as recorded in a checkpoint's ``meta.json`` (``layout``)."""
        return {"dp": self.dp, "cp": self.cp, "mp": self.mp, "pp": self.pp, "ulysses": self.ulysses,
                "ring": self.ring, "layout": self.seq_layout, "context_parallel_algo": self.algo,
                "world_size": self.world_size}

    @property
    def ring(self) -> int:
        return self.cp // self.ulysses

    @property
    def world_size(self) -> int:
        return world_size_of(self.dp, self.mp, self.cp, self.pp)

    @property
    def ulysses_degree_in_cp(self) -> int:
        """``parallel_config.ulysses_degree_in_cp`` for this plan (the inverse of ``ulysses_degree_of``): the
        Ulysses degree under hybrid_cp, 1 otherwise (MindFormers reads the key only for hybrid_cp)."""
        return self.ulysses if self.algo == CpAlgo.HYBRID.value else 1

    def runs_like(self, other: "RunPlan") -> bool:
        """Same degrees and, when CP is on, the same algorithm and the same cut of the sequence (zigzag without a
        ring is the contiguous cut; with CP off neither matters)."""
        def key(plan):
            cut = plan.seq_layout if plan.ring > 1 else "contiguous"
            return (plan.dp, plan.mp, plan.cp, plan.pp, plan.ulysses) + ((plan.algo, cut) if plan.cp > 1 else ())
        return key(self) == key(other)

    def label(self) -> str:
        """Short text, e.g. ``dp1 mp8 cp8 pp1 hybrid_cp u2xr4``."""
        algo = self.algo if self.cp > 1 else "cp off"
        inner = f" u{self.ulysses}xr{self.ring}" if self.algo == CpAlgo.HYBRID.value and self.cp > 1 else ""
        return f"dp{self.dp} mp{self.mp} cp{self.cp} pp{self.pp} {algo}{inner}"

    # ------------------------------------------------------------------------------------------- rank order
    def coords(self, rank: int) -> Dict[str, int]:
        """stage, dp_id, cp_id, mp_id, ring_id, ulysses_id of a global rank."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside a mesh of {self.world_size} ranks (dp={self.dp} x "
                             f"mp={self.mp} x cp={self.cp} x pp={self.pp}): check the degrees against msrun "
                             "--worker_num")
        mp_id, rest = rank % self.mp, rank // self.mp
        cp_id, rest = rest % self.cp, rest // self.cp
        return {"stage": rest // self.dp, "dp_id": rest % self.dp, "cp_id": cp_id, "mp_id": mp_id,
                "ring_id": cp_id // self.ulysses, "ulysses_id": cp_id % self.ulysses}

    def rank_of(self, *, stage: int, dp_id: int, cp_id: int, mp_id: int) -> int:
        """Global rank of a coordinate (inverse of ``coords``)."""
        return ((stage * self.dp + dp_id) * self.cp + cp_id) * self.mp + mp_id

    def ranks(self, axis: str, rank: int) -> Tuple[int, ...]:
        """Global ranks of the ``axis`` group that contains ``rank``, in group order."""
        c = self.coords(rank)
        axis = Axis(axis)

        def at(**changes):
            d = {"stage": c["stage"], "dp_id": c["dp_id"], "cp_id": c["cp_id"], "mp_id": c["mp_id"], **changes}
            return self.rank_of(**d)

        if axis is Axis.DP:
            return tuple(at(dp_id=i) for i in range(self.dp))
        if axis is Axis.CP:
            return tuple(at(cp_id=i) for i in range(self.cp))
        if axis is Axis.ULYSSES:
            return tuple(at(cp_id=c["ring_id"] * self.ulysses + u) for u in range(self.ulysses))
        if axis is Axis.RING:
            return tuple(at(cp_id=i * self.ulysses + c["ulysses_id"]) for i in range(self.ring))
        if axis is Axis.MP:
            return tuple(at(mp_id=i) for i in range(self.mp))
        if axis is Axis.PP:
            return tuple(at(stage=i) for i in range(self.pp))
        return tuple(at(dp_id=d, cp_id=i) for d in range(self.dp) for i in range(self.cp))


# ----------------------------------------------------------------------------------------- pipeline layer split
def stage_layers(num_layers: int, num_stages: int, stage: int) -> range:
    """Decoder layers of ``stage``: contiguous, sizes differ by at most one (the first stages take the extra)."""
    if num_layers < num_stages:
        raise ValueError(f"parallel_config.pipeline_stage = {num_stages}: more stages than "
                         f"model.model_config.num_layers = {num_layers}. Fix: use at most {num_layers} stages")
    base, extra = divmod(num_layers, num_stages)
    start = stage * base + min(stage, extra)
    return range(start, start + base + (1 if stage < extra else 0))


def check_micro_batches(batch_size: int, micro_batch_num: int) -> None:
    """A pipelined step cuts each dp rank's ``runner_config.batch_size`` samples into ``micro_batch_num`` equal
    micro-batches along B.

    Raises:
        ValueError: ``batch_size`` not divisible by ``micro_batch_num``.
    """
    if batch_size % micro_batch_num:
        raise ValueError(f"runner_config.batch_size = {batch_size}: must be divisible by parallel_config."
                         f"micro_batch_num = {micro_batch_num}. Fix: use a batch size that is a multiple "
                         f"of {micro_batch_num}")


def decoder_stage_of(name: str, num_stages: int, num_layers: int) -> int:
    """Pipeline stage of a decoder tensor (Hugging Face names; optimizer moments ``adam_m.<name>`` follow it)."""
    for prefix in ("adam_m.", "adam_v."):
        if name.startswith(prefix):
            name = name[len(prefix):]
    if name.startswith("model.embed_tokens."):
        return 0
    if name.startswith("model.layers."):
        layer = int(name.split(".")[2])
        return next(s for s in range(num_stages) if layer in stage_layers(num_layers, num_stages, s))
    return num_stages - 1


__all__ = ["Axis", "CpAlgo", "CP_ALGOS", "MINDFORMERS_ALGOS", "LEGACY_ALGO_SPELLINGS", "LAYOUTS", "RunPlan",
           "check_micro_batches", "decoder_stage_of",
           "stage_layers", "ulysses_degree_of", "world_size_of"]
