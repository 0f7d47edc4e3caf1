"""The context-parallel algorithms by name: one table, ``ALGORITHMS``, read by every part that needs to know one.

Each ``CpAlgorithm`` knows

* its mesh shape: the Ulysses degree it takes inside a CP degree (``ulysses``; ring degree = CP / that) and the
  Ulysses degrees the planner tries (``planner_degrees``);
* its per-step masks (``masks``: this rank's queries against each part of the keys, ``AttentionPlan.build``);
* how it runs (``run``: ``(q, k, v, *, mesh, kernel, masks, scale, use_alltoall, token_major) -> out``, called by
  ``attention/api.py``);
* its planner formulas: bytes a rank sends per attention layer (``bytes_sent``: ``(AttentionCall, ulysses_index)
  -> {kind: {"forward": n, "backward": n}}``, read by ``planner/comm.py``) and the transient bytes of one
  layer's attention backward (``buffers``: ``(ModelShape, RunPlan, Settings) -> int``, read by
  ``planner/memory.py``).

This module is pure Python and sits at the bottom (the config, ``RunPlan`` and the planner read it without a
device), so ``run``, ``masks`` and the formulas are named by import path (``"package.module:function"``) and
imported on first use (``resolve``): nothing here imports ``attention/`` or ``planner/``.

Names: MindFormers' ``parallel_config.context_parallel_algo`` takes only its ``ContextParallelAlgo`` values
(``mindformers=True`` here); any other name is written in the plugin key ``long_seq.cp_algo`` (``config.py``).
Adding an algorithm: its own module under ``attention/`` (run, and its planner formulas) and one row below
(docs/design.md, "How to add an algorithm").
"""
import importlib
from dataclasses import dataclass
from typing import Callable, Dict, Tuple, Union

Ref = Union[str, Callable]


def resolve(ref: Ref) -> Callable:
    """The function a row names (``"package.module:function"``), imported now; a callable is returned as is.

    Raises:
        ValueError: the module or the function does not exist (names the reference).
    """
    if callable(ref):
        return ref
    module, _, name = ref.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"CP algorithm table: {ref!r} does not name a function ({err}). Fix: the row's reference "
                         "is 'package.module:function' of an existing function") from err


def _ring_only(cp: int, ulysses_degree_in_cp: int) -> int:
    return 1


def _ulysses_only(cp: int, ulysses_degree_in_cp: int) -> int:
    return cp


def _hybrid(cp: int, ulysses_degree_in_cp: int) -> int:
    return ulysses_degree_in_cp


def _divisors_between(cp: int) -> Tuple[int, ...]:
    return tuple(u for u in range(2, cp) if cp % u == 0)


@dataclass(frozen=True)
class CpAlgorithm:
    """One row of ``ALGORITHMS`` (see the module docstring for what each reference must take and return).

    Attributes:
        name: the key (``context_parallel_algo`` / ``long_seq.cp_algo`` value).
        summary: one line for tables and error messages.
        mindformers: a value of MindFormers' ``ContextParallelAlgo`` (else only ``long_seq.cp_algo`` takes it).
        ulysses: (cp, parallel_config.ulysses_degree_in_cp) -> Ulysses degree inside CP (cp > 1).
        planner_degrees: cp -> the Ulysses degrees the planner considers.
        run, masks, bytes_sent, buffers: references (``resolve``).
    """

    name: str
    summary: str
    mindformers: bool
    ulysses: Callable[[int, int], int]
    planner_degrees: Callable[[int], Tuple[int, ...]]
    run: Ref
    masks: Ref = "mf_longseq.attention.attention_plan:ring_masks"
    bytes_sent: Ref = "mf_longseq.planner.comm:ulysses_and_ring_bytes"
    buffers: Ref = "mf_longseq.planner.memory:attention_buffers"

    def ulysses_degree(self, cp: int, ulysses_degree_in_cp: int = 1) -> int:
        """Ranks of one Ulysses group inside CP (1 when CP is off)."""
        return 1 if cp == 1 else self.ulysses(cp, ulysses_degree_in_cp)

    def takes(self, cp: int, ulysses: int) -> bool:
        """Whether the algorithm runs on cp ranks split into ``ulysses`` x (cp / ulysses)."""
        return self.ulysses_degree(cp, ulysses) == ulysses


_TABLE = (
    CpAlgorithm("colossalai_cp", "ring: K/V blocks travel round the CP ranks", True, _ring_only,
                lambda cp: (1,), run="mf_longseq.attention.runners:run_ring"),
    CpAlgorithm("ulysses_cp", "Ulysses: all-to-all from sequence to head shards and back", True, _ulysses_only,
                lambda cp: (cp,), run="mf_longseq.attention.runners:run_ulysses"),
    CpAlgorithm("hybrid_cp", "Ulysses inside, ring across (ulysses_degree_in_cp x ring)", True, _hybrid,
                _divisors_between, run="mf_longseq.attention.runners:run_hybrid"),
    CpAlgorithm("kvallgather_cp", "all-gather KV: every rank gathers the sequence's K and V", False, _ring_only,
                lambda cp: (1,), run="mf_longseq.attention.kvallgather:run_kvallgather",
                bytes_sent="mf_longseq.attention.kvallgather:bytes_sent",
                buffers="mf_longseq.attention.kvallgather:buffers"),
)
ALGORITHMS: Dict[str, CpAlgorithm] = {row.name: row for row in _TABLE}
MINDFORMERS_ALGOS = tuple(name for name, row in ALGORITHMS.items() if row.mindformers)


def algo_of(cp: int, ulysses: int) -> str:
    """The MindFormers algorithm a bare split implies: ring without Ulysses, Ulysses without a ring, else hybrid."""
    if ulysses == 1:
        return "colossalai_cp"
    return "ulysses_cp" if ulysses == cp else "hybrid_cp"


__all__ = ["ALGORITHMS", "CpAlgorithm", "MINDFORMERS_ALGOS", "algo_of", "resolve"]
