"""Move a checkpoint from one rank layout to another: merge the shards into full tensors, cut them again.

A run's per-rank state is a dict ``name -> ndarray`` per global rank.  Ranks follow the ``RunPlan`` order
(parallel/plan.py).  Weights (and their optimizer moments) are

* replicated over dp and cp (any dp_id / cp_id holds the same values),
* cut over mp as their ``ShardSpec`` says (``tensor_parallel.shard_array`` / ``merge_shards``),
* held by one pipeline stage (``stage_of(name, pp)``).

So ``merge_rank_states`` reads dp_id = cp_id = 0 of every (stage, mp_id) and rebuilds the full tensors, and
``split_rank_state`` cuts them for one rank of the target layout.  Both are pure NumPy: changing the sequence
length (and with it cp, mp, pp) needs no device and no communication.  Example: saved at mp2 x cp2, resumed at
cp4 or on one rank (``load_resharded``).
"""
import json
import os
from typing import Callable, Dict, Mapping, Optional

import numpy as np

from mf_longseq.parallel.plan import RunPlan, decoder_stage_of
from mf_longseq.parallel.tensor_parallel import REPLICATED, ShardSpec, merge_shards, shard_array

OPTIMIZER_PREFIXES = ("adam_m.", "adam_v.")


def spec_of(name: str, specs: Mapping[str, ShardSpec]) -> ShardSpec:
    """The spec of a weight or of its optimizer moment (``adam_m.<weight>``); unknown names are replicated."""
    for prefix in OPTIMIZER_PREFIXES:
        if name.startswith(prefix) and name[len(prefix):] in specs:
            return specs[name[len(prefix):]]
    return specs.get(name, ShardSpec(REPLICATED))


def merge_rank_states(states: Mapping[int, Mapping[str, np.ndarray]], plan: RunPlan,
                      specs: Mapping[str, ShardSpec], *, check_replicas: bool = True,
                      rtol: float = 0.0) -> Dict[str, np.ndarray]:
    """Full tensors from the per-rank states of a run.

    Args:
        states: global rank -> {name: array}; every rank of ``plan`` must be present.
        plan: the degrees the states were written under.
        specs: weight name -> ``ShardSpec`` (optimizer moments follow their weight; missing names: replicated).
        check_replicas: verify that the dp x cp copies (and the mp copies of replicated tensors) agree.
        rtol: relative tolerance of that check (0: identical).

    Returns:
        {name: full array}.

    Raises:
        ValueError: a rank is missing, or replicas disagree (the checkpoint is not from one consistent run).
    """
    missing = [r for r in range(plan.world_size) if r not in states]
    if missing:
        raise ValueError(f"checkpoint of layout {plan} lacks rank files {missing}. Fix: copy every rank_<r> file")
    full = {}
    for stage in range(plan.pp):
        heads = [states[plan.rank_of(stage=stage, dp_id=0, cp_id=0, mp_id=m)] for m in range(plan.mp)]
        for name in heads[0]:
            spec = spec_of(name, specs)
            shards = [np.asarray(h[name]) for h in heads]
            full[name] = merge_shards(shards, spec)
            if check_replicas:
                _check_replicas(name, spec, states, plan, stage, shards, rtol)
    return full


def _check_replicas(name, spec, states, plan, stage, shards, rtol):
    for m in range(plan.mp):
        expect = shards[0] if spec.kind == REPLICATED else shards[m]
        for d in range(plan.dp):
            for c in range(plan.cp):
                rank = plan.rank_of(stage=stage, dp_id=d, cp_id=c, mp_id=m)
                got = np.asarray(states[rank][name])
                if got.shape != expect.shape or not np.allclose(got, expect, rtol=rtol, atol=0.0):
                    raise ValueError(f"checkpoint tensor {name!r}: rank {rank} differs from its replica on rank "
                                     f"{plan.rank_of(stage=stage, dp_id=0, cp_id=0, mp_id=m)}. Fix: use a "
                                     "checkpoint written by one consistent run (gradients synchronised over dp x cp)")


def split_rank_state(full: Mapping[str, np.ndarray], specs: Mapping[str, ShardSpec], plan: RunPlan, rank: int,
                     stage_of: Optional[Callable[[str, int], int]] = None) -> Dict[str, np.ndarray]:
    """The state one rank of ``plan`` holds: the tensors of its stage, cut for its mp index.

    ``stage_of(name, pp)`` gives the pipeline stage of a tensor (required when plan.pp > 1).
    """
    c = plan.coords(rank)
    if plan.pp > 1 and stage_of is None:
        raise ValueError("split_rank_state: a layout with pipeline stages needs stage_of(name, pp)")
    out = {}
    for name, value in full.items():
        if plan.pp > 1 and stage_of(name, plan.pp) != c["stage"]:
            continue
        out[name] = np.ascontiguousarray(shard_array(np.asarray(value), spec_of(name, specs), plan.mp, c["mp_id"]))
    return out


def read_rank_states(directory: str, meta: Mapping) -> Dict[int, Dict[str, np.ndarray]]:
    """Every rank file of a checkpoint directory (``mf_longseq.train.checkpoint`` format) as NumPy arrays."""
    import mindspore as ms
    states = {}
    for rank, name in meta["rank_files"].items():
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            raise ValueError(f"checkpoint {directory}: missing {name}. Fix: copy the whole checkpoint directory")
        states[int(rank)] = {key: value.asnumpy() for key, value in ms.load_checkpoint(path).items()}
    return states


PLAN_KEY = "run_plan"          # meta.json's key of the RunPlan a checkpoint was written under


def plan_record(plan: RunPlan) -> dict:
    """``plan`` as ``meta.json`` records it under ``run_plan``: ``RunPlan.as_dict`` with the sequence cut
    (contiguous / zigzag) named ``seq_layout``."""
    record = plan.as_dict()
    record["seq_layout"] = record.pop("layout")
    return record


def saved_plan(meta: Mapping) -> RunPlan:
    """The RunPlan a checkpoint's ``meta.json`` was written under: ``run_plan`` (``plan_record``), or in a
    checkpoint written before it, ``layout`` (the same fields, the sequence cut named ``layout``)."""
    if PLAN_KEY not in meta:
        return RunPlan.from_dict(meta["layout"])
    record = dict(meta[PLAN_KEY])
    record["layout"] = record.pop("seq_layout", "zigzag")
    return RunPlan.from_dict(record)


def load_resharded(directory: str, *, target: RunPlan, rank: int,
                   stage_of: Optional[Callable[[str, int], int]] = None) -> Dict[str, np.ndarray]:
    """The state rank ``rank`` of ``target`` needs, from a checkpoint written under any layout.

    The metadata (``meta.json``) must name the plan it was written under and, for mp > 1 on either side, the
    shard spec of every split tensor (``shard_specs``, as ``ShardSpec.to_dict``).  Pipeline stages follow
    ``stage_of`` (default: the decoder's layer split, with ``num_layers`` from the metadata).
    """
    with open(os.path.join(directory, "meta.json"), encoding="utf-8") as handle:
        meta = json.load(handle)
    source = saved_plan(meta)
    specs = {name: ShardSpec.from_dict(d) for name, d in (meta.get("shard_specs") or {}).items()}
    if (source.mp > 1 or target.mp > 1) and source.mp != target.mp and not specs:
        raise ValueError(f"checkpoint {directory}: written with model_parallel = {source.mp}, loading with "
                         f"{target.mp}, but its meta.json has no shard_specs. Fix: load it with model_parallel = "
                         f"{source.mp}")
    if stage_of is None and (source.pp > 1 or target.pp > 1):
        num_layers = int(meta["num_layers"])
        stage_of = lambda name, pp: decoder_stage_of(name, pp, num_layers)    # noqa: E731
    full = merge_rank_states(read_rank_states(directory, meta), source, specs)
    return split_rank_state(full, specs, target, rank, stage_of)


__all__ = ["spec_of", "merge_rank_states", "split_rank_state", "read_rank_states",
           "load_resharded", "OPTIMIZER_PREFIXES", "plan_record", "saved_plan", "PLAN_KEY"]
