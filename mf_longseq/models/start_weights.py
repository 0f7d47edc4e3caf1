"""Start a run from weights: read a checkpoint in our layout or in MindFormers' own, and fill a built model.

    weights = read_start_weights(path, model_config)     # full tensors, our names, every weight checked
    fill_parameters(parameters, weights, model=model, mesh=mesh, source=path)   # this rank's shard of each

Used by both routes: ``load_checkpoint:`` on MindFormers' Trainer route (``LongSeqTrainer`` loads it itself, so
MindFormers' ``preload_ckpt``, which needs a Barrier kernel CPU does not have, never runs) and
``mf-longseq train --load-checkpoint`` / ``load_checkpoint:`` (weights only: the optimizer and the step start
fresh; ``--resume`` continues a run).

Accepted: a MindSpore ``.ckpt`` or a ``.safetensors`` file with our names (``mf-longseq convert``, a
``checkpoints/step_NNNNNN`` folder of ``mf-longseq train``) or MindFormers' LLaMA2 / Qwen1.5 / Qwen v1 names
(split or fused, ``mf_names.py``); optimizer state in the file is skipped.  Every weight of the model must be
there with its shape: anything else raises ValueError naming the first missing or wrong tensor (MindSpore's
own loader only warns and leaves the weight at its random initial value).
"""
import os
from typing import Dict, Iterable, Optional

import numpy as np

from mf_longseq.models.convert import check_weights, read_ours, read_tensors
from mf_longseq.models.model_config import LongSeqModelConfig
from mf_longseq.models.mf_names import is_state, looks_like_mindformers, mf_to_ours


def read_start_weights(path: str, config: LongSeqModelConfig) -> Dict[str, np.ndarray]:
    """Full weights (our names, float32) of the model ``config`` describes, from ``path`` in either layout.

    Raises:
        ValueError: unreadable path, a weight missing or of the wrong shape, a tensor the model does not have.
    """
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "meta.json")):
        return read_ours(path, config)                 # refuses a step folder written under mp / pp
    tensors = read_tensors(path)
    if looks_like_mindformers(tensors):
        return mf_to_ours(tensors, config, source=path)
    weights = {k: v for k, v in tensors.items() if not is_state(k)}
    if config.tie_word_embeddings:
        weights.pop("lm_head.weight", None)
    check_weights(weights, config, path)
    return weights


def fill_parameters(parameters: Iterable, weights: Dict[str, np.ndarray], *, model, mesh=None,
                    source: str = "checkpoint") -> int:
    """Set every Parameter in ``parameters`` (a model's, or one pipeline stage's) to its part of ``weights``: the
    full tensor, or under model_parallel this rank's shard (``shard_specs`` of ``model``).  Returns the count.

    Raises:
        ValueError: a parameter has no tensor in ``weights`` (names the first ones) or a different shape.
    """
    import mindspore as ms
    from mf_longseq.parallel.reshard import spec_of
    from mf_longseq.parallel.tensor_parallel import shard_array, shard_specs
    parameters = list(parameters)
    missing = [p.name for p in parameters if p.name not in weights]
    if missing:
        raise ValueError(f"load_checkpoint {source}: {len(missing)} weights of this model are not in it (first: "
                         f"{', '.join(missing[:3])}). Fix: load a checkpoint of the same model family and size.")
    specs = shard_specs(model)
    mp = mesh.mp if mesh is not None else 1
    mp_id = mesh.coords()["mp_id"] if mp > 1 else 0
    for p in parameters:
        value = shard_array(np.asarray(weights[p.name]), spec_of(p.name, specs), mp, mp_id)
        if tuple(value.shape) != tuple(p.shape):
            raise ValueError(f"load_checkpoint {source}: {p.name} has shape {tuple(value.shape)} on this rank, the "
                             f"model has {tuple(p.shape)}. Fix: load a checkpoint of the same model size.")
        p.set_data(ms.Tensor(np.ascontiguousarray(value)).astype(p.dtype))
    return len(parameters)


def load_start_weights(model, path: str, *, mesh=None, parameters: Optional[Iterable] = None) -> int:
    """``read_start_weights`` for ``model.config`` then ``fill_parameters`` (default: every model parameter)."""
    weights = read_start_weights(path, model.config)
    params = model.get_parameters() if parameters is None else parameters
    return fill_parameters(params, weights, model=model, mesh=mesh, source=path)


__all__ = ["read_start_weights", "fill_parameters", "load_start_weights"]
