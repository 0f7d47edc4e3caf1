"""Checkpoints: one MindSpore checkpoint file per rank, plus a metadata JSON and a copy of the config.

    <output_dir>/checkpoints/step_000005/
        rank_0.ckpt  rank_1.ckpt ...   weights + AdamW moments of that rank (mindspore.save_checkpoint)
        config.yaml                    the run's config, as resolved
        meta.json                      step, layout, data/rng state, optimizer settings, loss history

``meta.json`` is written last, by rank 0, after every rank has written its file (the caller passes a barrier):
a step directory without it is incomplete and is never resumed from.

Weights are replicated over the dp x cp ranks, cut over mp (each split tensor as its ``ShardSpec`` says) and held
by one pipeline stage (a rank file under pp holds only its stage's weights and moments).  ``meta.json`` records
the layout, the shard spec of every mp-split tensor (``shard_specs``) and ``num_layers``, so ``state_for_rank``
can resume under any layout: with the same mp and pp a rank reads one file (its own, or the dp x cp replica with
its stage and mp index); with another mp or pp every file is merged and cut again (``parallel/reshard.py``).
"""
import json
import os
import re
import time
from typing import Callable, Dict, List, Mapping, Optional

import numpy as np

from mf_longseq.parallel.plan import RunPlan


FORMAT = "mf_longseq.checkpoint/1"
META = "meta.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def step_dir(output_dir: str, step: int) -> str:
    return os.path.join(output_dir, "checkpoints", f"step_{step:06d}")


def rank_file(directory: str, rank: int) -> str:
    return os.path.join(directory, f"rank_{rank}.ckpt")


def save_rank(directory: str, rank: int, parameters) -> str:
    """Write this rank's Parameters (weights and optimizer state) to ``rank_<rank>.ckpt``; returns the path."""
    import mindspore as ms
    os.makedirs(directory, exist_ok=True)
    path = rank_file(directory, rank)
    tmp = path + ".tmp.ckpt"
    ms.save_checkpoint([{"name": p.name, "data": p} for p in parameters], tmp)
    os.replace(tmp, path)
    return path


def write_meta(directory: str, *, step: int, layout: RunPlan, config_tree: dict, data: dict, optimizer: dict,
               losses: List[float], shard_specs: Mapping[str, dict], num_layers: Optional[int],
               extra: Optional[dict] = None) -> str:
    """Write ``config.yaml`` and then ``meta.json`` (which marks the step directory complete).

    ``shard_specs``: weight name -> ``ShardSpec.to_dict()`` of every mp-split tensor; ``num_layers``: decoder
    layers (which stage holds which layer).  Both are what resharding to another mp / pp needs.
    """
    import yaml
    with open(os.path.join(directory, "config.yaml"), "w", encoding="utf-8") as handle:
        yaml.safe_dump(config_tree, handle, sort_keys=False)
    files = {str(r): os.path.basename(rank_file(directory, r)) for r in range(layout.world_size)}
    meta = {"format": FORMAT, "step": int(step), "config": "config.yaml", "layout": layout.as_dict(),
            "rank_files": files, "replicated_over": "dp_cp", "data": data, "optimizer": optimizer,
            "rng": {"data_seed": data.get("seed"), "next_sample_step": int(step),
                    "note": "batches are a pure function of (seed, step, dp_id); no other random state is used "
                            "after initialisation"},
            "losses": [float(x) for x in losses], "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "shard_specs": dict(shard_specs), "num_layers": num_layers, **(extra or {})}
    tmp = os.path.join(directory, META + ".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(meta, handle, indent=2)
    os.replace(tmp, os.path.join(directory, META))
    return os.path.join(directory, META)


def save(output_dir: str, *, step: int, rank: int, parameters, barrier: Callable[[], None], layout: RunPlan,
         config_tree: dict, data: dict, optimizer: dict, losses: List[float], shard_specs: Mapping[str, dict],
         num_layers: Optional[int]) -> str:
    """Every rank calls this at the same step: rank files, a barrier, then rank 0 writes the metadata."""
    directory = step_dir(output_dir, step)
    save_rank(directory, rank, parameters)
    barrier()
    if rank == 0:
        write_meta(directory, step=step, layout=layout, config_tree=config_tree, data=data, optimizer=optimizer,
                   losses=losses, shard_specs=shard_specs, num_layers=num_layers)
    barrier()
    return directory


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


def same_split(meta: dict, layout: RunPlan) -> bool:
    """True when the checkpoint was written with this run's model_parallel and pipeline_stage (no resharding)."""
    saved = meta["layout"]
    return (saved["mp"], saved["pp"]) == (layout.mp, layout.pp)


def file_for_rank(directory: str, meta: dict, rank: int, layout: RunPlan) -> str:
    """The rank file this rank loads when mp and pp are unchanged: its own under the same layout, else the file of
    the saved rank with the same pipeline stage and mp index at dp_id = cp_id = 0 (weights replicated over dp x cp).
    """
    assert same_split(meta, layout), "file_for_rank: another mp / pp needs state_for_rank (resharding)"
    saved = meta["layout"]
    if saved["world_size"] == layout.world_size and (saved["dp"], saved["cp"]) == (layout.dp, layout.cp):
        source = rank
    else:
        c = layout.coords(rank)
        source = RunPlan.from_dict(saved).rank_of(stage=c["stage"], dp_id=0, cp_id=0, mp_id=c["mp_id"])
    name = meta["rank_files"][str(source)]
    path = os.path.join(directory, name)
    if not os.path.isfile(path):
        raise ValueError(f"--resume {directory}: missing {name}. Fix: copy the whole checkpoint directory.")
    return path


def state_for_rank(directory: str, meta: dict, rank: int, layout: RunPlan) -> Dict[str, np.ndarray]:
    """Name -> array of everything rank ``rank`` of ``layout`` holds (weights and ``adam_m.`` / ``adam_v.`` moments).

    Same mp and pp: one rank file (``file_for_rank``).  Otherwise every rank file is merged into full tensors and
    cut for this rank (``reshard.load_resharded``), which needs the metadata's ``shard_specs`` and ``num_layers``.

    Raises:
        ValueError: the checkpoint lacks what resharding needs (it was written before they were recorded).
    """
    import mindspore as ms
    if same_split(meta, layout):
        return {k: v.asnumpy() for k, v in ms.load_checkpoint(file_for_rank(directory, meta, rank, layout)).items()}
    from mf_longseq.parallel.reshard import load_resharded
    saved = meta["layout"]
    needs = {"shard_specs": saved["mp"] != layout.mp, "num_layers": max(saved["pp"], layout.pp) > 1}
    lacking = [key for key, needed in needs.items() if needed and meta.get(key) is None]
    if lacking:
        raise ValueError(f"--resume {directory}: written with model_parallel = {saved['mp']}, pipeline_stage = "
                         f"{saved['pp']}; this run has {layout.mp}, {layout.pp}, and its {META} has no "
                         f"{' / '.join(lacking)} to reshard with. Fix: resume with parallel_config.model_parallel: "
                         f"{saved['mp']} and pipeline_stage: {saved['pp']}.")
    return load_resharded(directory, target=layout, rank=rank)


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
