"""Gradient clipping by the global norm (``runner_wrapper.use_clip_grad``, ``max_grad_norm``), on any layout.

The formula is MindFormers' ``ClipGradNorm`` (``mindformers/core/clip_grad.py``)::

    norm  = sqrt(sum over every weight of the model of sum(g * g))
    grads = grads * max_grad_norm / (max(norm, max_grad_norm) + 1e-6)

MindFormers' cell sums the squares of the gradients it holds, which is the whole model only on one rank.  Here
the gradients are already summed over dp x cp (identical on those ranks); a weight split over model parallelism
(``shard_specs``) contributes the sum of its shards (an all-reduce over mp), a replicated one its own value once,
and pipeline stages hold disjoint weights (an all-reduce over pp).  So every rank clips with the norm of the
whole model's gradient, the number one rank would compute.
"""
from typing import Dict, Optional, Sequence

import numpy as np
import mindspore as ms
from mindspore import Tensor, ops

from mf_longseq.parallel.comm import all_reduce
from mf_longseq.parallel.tensor_parallel import REPLICATED


def global_grad_norm(grads: Sequence, names: Sequence[str], mesh, sharded: Optional[Dict] = None) -> float:
    """L2 norm of the whole model's gradient (host float).

    Args:
        grads: this rank's gradient tensors (already summed over dp x cp).
        names: their parameter names, in the same order.
        mesh: this rank's ``Mesh`` (its mp and pp groups).
        sharded: names of mp-split parameters (``shard_specs(model)``); None: nothing is split.
    """
    split, whole = Tensor(np.zeros(1, np.float32)), Tensor(np.zeros(1, np.float32))
    for name, g in zip(names, grads):
        sq = ops.square(g.astype(ms.float32)).sum().reshape(1)                 # on the device
        spec = (sharded or {}).get(name)
        if spec is None or spec.kind == REPLICATED:
            whole = whole + sq
        else:                                   # a unit held by mp / units ranks is counted once
            split = split + sq * (min(spec.units, mesh.mp) / mesh.mp if spec.units else 1.0)
    if mesh.mp > 1:
        split = all_reduce(split, mesh.group("mp"))
    total = split + whole
    if mesh.pp > 1:
        total = all_reduce(total, mesh.group("pp"))
    return float(np.sqrt(float(total.asnumpy()[0])))


def clip_coefficient(norm: float, max_grad_norm: float) -> float:
    """MindFormers' ClipGradNorm factor: max / (max(norm, max) + 1e-6)."""
    return max_grad_norm / (max(norm, max_grad_norm) + 1e-6)


def clip_grads(grads: Sequence, names: Sequence[str], mesh, max_grad_norm: float, sharded=None):
    """(clipped gradients as a tuple, the global norm)."""
    norm = global_grad_norm(grads, names, mesh, sharded)
    coef = Tensor(np.float32(clip_coefficient(norm, max_grad_norm)))
    return tuple((g.astype(ms.float32) * coef).astype(g.dtype) for g in grads), norm


__all__ = ["global_grad_norm", "clip_coefficient", "clip_grads"]
