"""Checkpoints: one MindSpore checkpoint file per rank, plus a metadata JSON and a copy of the config.

    <output_dir>/checkpoints/step_000005/
        rank_0.ckpt  rank_1.ckpt ...   weights + AdamW moments of that rank (mindspore.save_checkpoint)
        config.yaml                    the run's config, as resolved
        meta.json                      step, run_plan, data/rng state, optimizer settings, loss history, save_id

A save is atomic: every rank writes its file into a fresh directory ``checkpoints/.step_000005.partial-<save_id>``
(``save_id``: 12 hex digits drawn by rank 0 and shared with every rank by the caller, a world collective), then a
barrier; rank 0 writes ``config.yaml`` and ``meta.json`` there and makes the directory visible as ``step_000005``
with one ``os.rename`` (an older ``step_000005`` is first renamed away and deleted after).  A save that dies at any
point leaves at most a ``.step_*.partial-*`` directory, which nothing reads: resume only looks at ``step_NNNNNN``
directories, and those only ever hold files of one save.  Why a fresh directory and one rename rather than
per-file save ids: ranks are separate processes (on one or several nodes), a rank can die between any two
writes, and a rename is the one step that is atomic on a POSIX file system and on NFS; no rank ever writes into a
directory another save may have made visible.  Several nodes need ``output_dir`` on a shared file system (every
rank's file must end up in one step directory); after the rename every rank checks that its file is there and
refuses otherwise, so a node-local ``output_dir`` is found at the first save, not at the resume.

"The latest" checkpoint of an output directory is the highest ``step_NNNNNN``.  A run never leaves steps of an
abandoned history there: when it starts with checkpointing on, rank 0 moves aside (``checkpoints/abandoned/``)
every step directory that is not on its own history - all of them for a fresh run or a run resumed from another
directory, those after the resumed step for a run resumed from its own output directory
(``retire_abandoned``).

Weights are replicated over the dp x cp ranks, cut over mp (each split tensor as its ``ShardSpec`` says) and held
by one pipeline stage (a rank file under pp holds only its stage's weights and moments).  ``meta.json`` records
the RunPlan (``run_plan``: degrees, rank order, algorithm, ``seq_layout``; a checkpoint written before it has the
same under ``layout``, still read: ``reshard.saved_plan``), the shard spec of every mp-split tensor
(``shard_specs``) and ``num_layers``, so ``state_for_rank`` can resume under any plan: with the same mp and pp a
rank reads one file (its own, or the dp x cp replica with its stage and mp index); with another mp or pp every
file is merged and cut again (``parallel/reshard.py``).
After a resume the dp x cp replicas compare a digest of what they loaded (``state_digest``, exchanged by the
runner over the dp x cp group) and refuse, naming the step directory, when they differ.
"""
import hashlib
import json
import os
import re
import shutil
import time
from typing import Callable, Dict, List, Mapping, Optional

import numpy as np

from mf_longseq.parallel.plan import RunPlan
from mf_longseq.parallel.reshard import PLAN_KEY, plan_record, saved_plan
from mf_longseq.train.files import OutputError, os_error, remove_quietly, safe_path, write_atomic


FORMAT = "mf_longseq.checkpoint/1"
META = "meta.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")
ABANDONED = "abandoned"


def step_dir(output_dir: str, step: int) -> str:
    return os.path.join(output_dir, "checkpoints", f"step_{step:06d}")


def partial_dir(output_dir: str, step: int, save_id: str) -> str:
    """Where the ranks write the save ``save_id`` of ``step`` before it is published (never read by a resume)."""
    return os.path.join(output_dir, "checkpoints", f".step_{step:06d}.partial-{save_id}")


def rank_file(directory: str, rank: int) -> str:
    return os.path.join(directory, f"rank_{rank}.ckpt")


def save_rank(directory: str, rank: int, parameters) -> str:
    """Write this rank's Parameters (weights and optimizer state) to ``rank_<rank>.ckpt``; returns the path.

    Raises:
        OutputError: the write failed (a full disk: ENOSPC named); the rank's partial files are removed.
    """
    import mindspore as ms
    path = rank_file(directory, rank)
    try:
        os.makedirs(directory, exist_ok=True)
        ms.save_checkpoint([{"name": p.name, "data": p} for p in parameters], path)
    except OSError as err:
        remove_quietly([path, os.path.splitext(path)[0] + ".tmp"])         # MindSpore writes <name>.tmp first
        raise os_error(path, err) from None
    return path


def write_meta(directory: str, *, step: int, plan: RunPlan, config_text: str, data: dict, optimizer: dict,
               losses: List[float], shard_specs: Mapping[str, dict], num_layers: Optional[int],
               extra: Optional[dict] = None) -> str:
    """Write ``config.yaml`` (``config_text``, the run's YAML) and then ``meta.json`` into ``directory`` (a save's
    partial directory); ``plan`` is recorded under ``run_plan`` (``reshard.plan_record``).

    ``shard_specs``: weight name -> ``ShardSpec.to_dict()`` of every mp-split tensor; ``num_layers``: decoder
    layers (which stage holds which layer).  Both are what resharding to another mp / pp needs.
    """
    write_atomic(os.path.join(directory, "config.yaml"), config_text)
    files = {str(r): os.path.basename(rank_file(directory, r)) for r in range(plan.world_size)}
    meta = {"format": FORMAT, "step": int(step), "config": "config.yaml", PLAN_KEY: plan_record(plan),
            "rank_files": files, "replicated_over": "dp_cp", "data": data, "optimizer": optimizer,
            "rng": {"data_seed": data.get("seed"), "next_sample_step": int(step),
                    "note": "batches are a pure function of (seed, step, dp_id); no other random state is used "
                            "after initialisation"},
            "losses": [float(x) for x in losses], "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "shard_specs": dict(shard_specs), "num_layers": num_layers, **(extra or {})}
    return write_atomic(os.path.join(directory, META), json.dumps(meta, indent=2))


def publish(output_dir: str, step: int, save_id: str) -> str:
    """Make the save ``save_id`` visible as ``step_NNNNNN`` by one rename (rank 0, after every rank wrote).

    An existing ``step_NNNNNN`` (an earlier save of that step) is renamed away first and deleted after; a crash
    in between leaves no ``step_NNNNNN`` (the resume then takes the previous step), never a mixed one.  Partial
    directories of saves that died earlier are deleted.
    """
    final, partial = step_dir(output_dir, step), partial_dir(output_dir, step, save_id)
    old = None
    if os.path.lexists(final):
        old = os.path.join(os.path.dirname(final), f".{os.path.basename(final)}.replaced-{save_id}")
        os.rename(final, old)
    os.rename(partial, final)
    root = os.path.dirname(final)
    stale = [os.path.join(root, n) for n in os.listdir(root) if n.startswith(".step_")]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return final


def save(output_dir: str, *, step: int, rank: int, parameters, barrier: Callable[[], None], save_id: str,
         plan: RunPlan, config_text: str, data: dict, optimizer: dict, losses: List[float],
         shard_specs: Mapping[str, dict], num_layers: Optional[int], wait_visible: float = 30.0) -> str:
    """Every rank calls this at the same step with the same ``save_id`` (module docstring: an atomic save).

    Rank files into the partial directory, a barrier, rank 0 writes the metadata and publishes, a barrier, then
    every rank checks that its file is in the published directory (for up to ``wait_visible`` s: a shared file
    system may show another node's rename late).

    Raises:
        OutputError: a write failed (this rank's partial files removed; on rank 0 the partial directory too).
        ValueError: this rank's file is not in the published directory (``output_dir`` not shared by the nodes).
    """
    checkpoints = safe_path(output_dir, "checkpoints")
    directory = partial_dir(output_dir, step, save_id)
    os.makedirs(checkpoints, exist_ok=True)
    try:
        save_rank(directory, rank, parameters)
        barrier()
        if rank == 0:
            write_meta(directory, step=step, plan=plan, config_text=config_text, data=data,
                       optimizer=optimizer, losses=losses, shard_specs=shard_specs, num_layers=num_layers,
                       extra={"save_id": save_id})
            publish(output_dir, step, save_id)
    except OutputError:
        if rank == 0:
            shutil.rmtree(directory, ignore_errors=True)
        raise
    barrier()
    final = step_dir(output_dir, step)
    deadline = time.time() + wait_visible
    while not os.path.isfile(rank_file(final, rank)):
        if time.time() > deadline:
            raise ValueError(f"checkpoint {final}: rank {rank}'s file {os.path.basename(rank_file(final, rank))} "
                             "is not there after the save. Fix: put --output-dir on a file system every node "
                             "shares (each rank writes its file into one step directory).")
        time.sleep(0.2)
    return final


def new_save_id() -> str:
    """12 hex digits naming one save (rank 0 draws it; the runner shares it with every rank)."""
    return os.urandom(6).hex()


def retire_abandoned(output_dir: str, *, start_step: int, resumed_from: Optional[str]) -> List[str]:
    """Move aside (into ``checkpoints/abandoned/<time>/``) the step directories not on this run's history.

    ``resumed_from``: the step directory this run resumed from (None: a fresh run).  Kept: the steps up to
    ``start_step`` when that directory lies in ``output_dir/checkpoints``; everything else is moved, so "the
    latest" step of ``output_dir`` is always one this run wrote or resumed after.  Returns the moved paths.
    """
    root = os.path.join(output_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    own = resumed_from is not None and os.path.realpath(os.path.dirname(resumed_from)) == os.path.realpath(root)
    moved, target = [], os.path.join(root, ABANDONED, time.strftime("%Y%m%dT%H%M%S") + f"-{new_save_id()[:4]}")
    for name in sorted(os.listdir(root)):
        match = _STEP_DIR.match(name)
        if match and not (own and int(match.group(1)) <= start_step):
            os.makedirs(target, exist_ok=True)
            os.rename(os.path.join(root, name), os.path.join(target, name))
            moved.append(os.path.join(target, name))
    return moved


def state_digest(values: Mapping[str, np.ndarray]) -> List[int]:
    """A digest of loaded state (names, shapes, dtypes, bytes) as 4 integers < 2**24 (exact in float32, so
    replicas can exchange it with a float AllReduce).  Cost: one BLAKE2b pass over the state (~1 GB/s)."""
    digest = hashlib.blake2b(digest_size=12)
    for name in sorted(values):
        value = np.ascontiguousarray(values[name])
        digest.update(f"{name}|{value.dtype.str}|{value.shape}|".encode())
        digest.update(memoryview(value).cast("B"))
    raw = int.from_bytes(digest.digest(), "big")
    return [(raw >> (24 * i)) & 0xFFFFFF for i in range(4)]


def check_replicas(directory: str, digests: List[List[int]], group_ranks) -> None:
    """Refuse a resume whose dp x cp replicas (global ranks ``group_ranks``) loaded different state.

    ``digests``: ``state_digest`` of every replica, in group order.

    Raises:
        ValueError: naming the step directory and the ranks whose state differs.
    """
    differ = [r for r, d in zip(group_ranks, digests) if list(d) != list(digests[0])]
    if differ:
        raise ValueError(f"--resume {directory}: the dp x cp replicas loaded different weights (ranks "
                         f"{', '.join(map(str, differ))} differ from rank {group_ranks[0]}): the checkpoint mixes "
                         "files of different saves (a torn save, or files copied from several runs). Fix: resume "
                         "from another checkpoints/step_NNNNNN directory.")


def find_resume_dir(path: str) -> str:
    """A complete step directory: ``path`` itself, or the latest complete one under ``path/checkpoints``."""
    if os.path.isfile(os.path.join(path, META)):
        return path
    root = os.path.join(path, "checkpoints")
    steps = []
    if os.path.isdir(root):
        for name in os.listdir(root):
            match = _STEP_DIR.match(name)
            if match and os.path.isfile(os.path.join(root, name, META)):
                steps.append((int(match.group(1)), os.path.join(root, name)))
    if not steps:
        raise ValueError(f"--resume {path}: no complete checkpoint (a step_NNNNNN directory with {META}) there. "
                         "Fix: give a run's --output-dir or one of its checkpoints/step_NNNNNN directories.")
    return max(steps)[1]


def read_meta(directory: str) -> dict:
    with open(os.path.join(directory, META), encoding="utf-8") as handle:
        meta = json.load(handle)
    if meta.get("format") != FORMAT:
        raise ValueError(f"--resume {directory}: {META} has format {meta.get('format')!r}, expected {FORMAT!r}. "
                         "Fix: resume from a checkpoint written by mf-longseq train.")
    return meta


def same_split(meta: dict, plan: RunPlan) -> bool:
    """True when the checkpoint was written with this run's model_parallel and pipeline_stage (no resharding)."""
    saved = saved_plan(meta)
    return (saved.mp, saved.pp) == (plan.mp, plan.pp)


def file_for_rank(directory: str, meta: dict, rank: int, plan: RunPlan) -> str:
    """The rank file this rank loads when mp and pp are unchanged: its own under the same plan, else the file of
    the saved rank with the same pipeline stage and mp index at dp_id = cp_id = 0 (weights replicated over dp x cp).
    """
    assert same_split(meta, plan), "file_for_rank: another mp / pp needs state_for_rank (resharding)"
    saved = saved_plan(meta)
    if saved.world_size == plan.world_size and (saved.dp, saved.cp) == (plan.dp, plan.cp):
        source = rank
    else:
        c = plan.coords(rank)
        source = saved.rank_of(stage=c["stage"], dp_id=0, cp_id=0, mp_id=c["mp_id"])
    name = meta["rank_files"][str(source)]
    path = os.path.join(directory, name)
    if not os.path.isfile(path):
        raise ValueError(f"--resume {directory}: missing {name}. Fix: copy the whole checkpoint directory.")
    return path


def state_for_rank(directory: str, meta: dict, rank: int, plan: RunPlan) -> Dict[str, np.ndarray]:
    """Name -> array of everything rank ``rank`` of ``plan`` holds (weights and ``adam_m.`` / ``adam_v.`` moments).

    Same mp and pp: one rank file (``file_for_rank``).  Otherwise every rank file is merged into full tensors and
    cut for this rank (``reshard.load_resharded``), which needs the metadata's ``shard_specs`` and ``num_layers``.

    Raises:
        ValueError: the checkpoint lacks what resharding needs (it was written before they were recorded).
    """
    import mindspore as ms
    if same_split(meta, plan):
        return {k: v.asnumpy() for k, v in ms.load_checkpoint(file_for_rank(directory, meta, rank, plan)).items()}
    from mf_longseq.parallel.reshard import load_resharded
    saved = saved_plan(meta)
    needs = {"shard_specs": saved.mp != plan.mp, "num_layers": max(saved.pp, plan.pp) > 1}
    lacking = [key for key, needed in needs.items() if needed and meta.get(key) is None]
    if lacking:
        raise ValueError(f"--resume {directory}: written with model_parallel = {saved.mp}, pipeline_stage = "
                         f"{saved.pp}; this run has {plan.mp}, {plan.pp}, and its {META} has no "
                         f"{' / '.join(lacking)} to reshard with. Fix: resume with parallel_config.model_parallel: "
                         f"{saved.mp} and pipeline_stage: {saved.pp}.")
    return load_resharded(directory, target=plan, rank=rank)


def assign(values: Mapping[str, np.ndarray], parameters, source: str) -> None:
    """Copy ``values`` into ``parameters`` (matched by name); every parameter must be present with its shape."""
    import mindspore as ms
    missing = [p.name for p in parameters if p.name not in values]
    if missing:
        raise ValueError(f"--resume: {source} lacks {len(missing)} parameters of this model (first: {missing[0]}). "
                         "Fix: resume with the model config the checkpoint was written with (its config.yaml).")
    for p in parameters:
        value = np.asarray(values[p.name])
        if tuple(value.shape) != tuple(p.shape):
            raise ValueError(f"--resume: {p.name} has shape {tuple(value.shape)} in {source}, the model has "
                             f"{tuple(p.shape)}. Fix: resume with the checkpoint's config.yaml.")
        p.set_data(ms.Tensor(np.ascontiguousarray(value)).astype(p.dtype))


def load_into(path: str, parameters) -> List[str]:
    """Copy one rank file's values into ``parameters`` (matched by name); returns the file's names."""
    import mindspore as ms
    stored = {k: v.asnumpy() for k, v in ms.load_checkpoint(path).items()}
    assign(stored, parameters, path)
    return sorted(stored)


def run_dir_of(path: str) -> str:
    """The run's output directory of ``path`` (a step directory or the output directory itself)."""
    if os.path.isfile(os.path.join(path, META)):
        return os.path.dirname(os.path.dirname(os.path.abspath(path)))
    return path


def config_of(path: str) -> str:
    """The config.yaml a checkpoint was written with (``path``: output dir or step dir)."""
    return os.path.join(find_resume_dir(path), "config.yaml")
