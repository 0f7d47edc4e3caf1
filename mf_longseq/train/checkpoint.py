"""Checkpoints: one MindSpore checkpoint file per rank, plus a metadata JSON and a copy of the config.

    <output_dir>/checkpoints/step_000005/
        rank_0.ckpt  rank_1.ckpt ...   weights + AdamW moments of that rank (mindspore.save_checkpoint)
        config.yaml                    the run's config, as resolved
        meta.json                      step, layout, data/rng state, optimizer settings, loss history

``meta.json`` is written last, by rank 0, after every rank has written its file (the caller passes a barrier):
a step directory without it is incomplete and is never resumed from.

Weights are replicated over the dp x cp ranks (mp and pp do not split them here), so a checkpoint can be resumed
under another dp / cp layout (any rank file holds the whole model); a different mp or pp needs resharding.
"""
import json
import os
import re
import time
from dataclasses import dataclass
from typing import Callable, List, Optional


FORMAT = "mf_longseq.checkpoint/1"
META = "meta.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def step_dir(output_dir: str, step: int) -> str:
    return os.path.join(output_dir, "checkpoints", f"step_{step:06d}")


def rank_file(directory: str, rank: int) -> str:
    return os.path.join(directory, f"rank_{rank}.ckpt")


@dataclass(frozen=True)
class Layout:
    """How the run is split; recorded in the metadata and checked on resume."""

    dp: int
    cp: int
    mp: int
    pp: int
    ulysses: int
    layout: str
    context_parallel_algo: str

    @property
    def world_size(self) -> int:
        return self.dp * self.cp * self.mp * self.pp

    @classmethod
    def of(cls, config) -> "Layout":
        """Layout of a ``LongSeqConfig``."""
        return cls(dp=config.data_parallel, cp=config.context_parallel, mp=config.model_parallel,
                   pp=config.pipeline_stage, ulysses=config.ulysses_degree, layout=config.layout,
                   context_parallel_algo=config.context_parallel_algo)

    def as_dict(self) -> dict:
        return {"dp": self.dp, "cp": self.cp, "mp": self.mp, "pp": self.pp, "ulysses": self.ulysses,
                "ring": self.cp // self.ulysses, "layout": self.layout,
                "context_parallel_algo": self.context_parallel_algo, "world_size": self.world_size}


def save_rank(directory: str, rank: int, parameters) -> str:
    """Write this rank's Parameters (weights and optimizer state) to ``rank_<rank>.ckpt``; returns the path."""
    import mindspore as ms
    os.makedirs(directory, exist_ok=True)
    path = rank_file(directory, rank)
    tmp = path + ".tmp.ckpt"
    ms.save_checkpoint([{"name": p.name, "data": p} for p in parameters], tmp)
    os.replace(tmp, path)
    return path


def write_meta(directory: str, *, step: int, layout: Layout, config_tree: dict, data: dict, optimizer: dict,
               losses: List[float], extra: Optional[dict] = None) -> str:
    """Write ``config.yaml`` and then ``meta.json`` (which marks the step directory complete)."""
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
            **(extra or {})}
    tmp = os.path.join(directory, META + ".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(meta, handle, indent=2)
    os.replace(tmp, os.path.join(directory, META))
    return os.path.join(directory, META)


def save(output_dir: str, *, step: int, rank: int, parameters, barrier: Callable[[], None], layout: Layout,
         config_tree: dict, data: dict, optimizer: dict, losses: List[float]) -> str:
    """Every rank calls this at the same step: rank files, a barrier, then rank 0 writes the metadata."""
    directory = step_dir(output_dir, step)
    save_rank(directory, rank, parameters)
    barrier()
    if rank == 0:
        write_meta(directory, step=step, layout=layout, config_tree=config_tree, data=data, optimizer=optimizer,
                   losses=losses)
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


def file_for_rank(directory: str, meta: dict, rank: int, layout: Layout) -> str:
    """The rank file this rank loads: its own under the same layout, else any (weights replicated over dp x cp)."""
    saved = meta["layout"]
    if (saved["mp"], saved["pp"]) != (layout.mp, layout.pp):
        raise ValueError(f"--resume {directory}: written with model_parallel = {saved['mp']}, pipeline_stage = "
                         f"{saved['pp']}; this run has {layout.mp}, {layout.pp}. Fix: resume with the same "
                         "parallel_config.model_parallel and pipeline_stage (or reshard the checkpoint first).")
    same = saved["world_size"] == layout.world_size and (saved["dp"], saved["cp"]) == (layout.dp, layout.cp)
    name = meta["rank_files"].get(str(rank)) if same else meta["rank_files"]["0"]
    path = os.path.join(directory, name)
    if not os.path.isfile(path):
        raise ValueError(f"--resume {directory}: missing {name}. Fix: copy the whole checkpoint directory.")
    return path


def load_into(path: str, parameters) -> List[str]:
    """Copy the checkpoint's values into ``parameters`` (matched by name); every parameter must be present."""
    import mindspore as ms
    stored = ms.load_checkpoint(path)
    missing = [p.name for p in parameters if p.name not in stored]
    if missing:
        raise ValueError(f"--resume: {path} lacks {len(missing)} parameters of this model (first: {missing[0]}). "
                         "Fix: resume with the model config the checkpoint was written with (its config.yaml).")
    for p in parameters:
        value = stored[p.name].asnumpy()
        if tuple(value.shape) != tuple(p.shape):
            raise ValueError(f"--resume: {p.name} has shape {tuple(value.shape)} in {path}, the model has "
                             f"{tuple(p.shape)}. Fix: resume with the checkpoint's config.yaml.")
        p.set_data(ms.Tensor(value).astype(p.dtype))
    return sorted(stored)


def run_dir_of(path: str) -> str:
    """The run's output directory of ``path`` (a step directory or the output directory itself)."""
    if os.path.isfile(os.path.join(path, META)):
        return os.path.dirname(os.path.dirname(os.path.abspath(path)))
    return path


def config_of(path: str) -> str:
    """The config.yaml a checkpoint was written with (``path``: output dir or step dir)."""
    return os.path.join(find_resume_dir(path), "config.yaml")
