"""AdamW (decoupled weight decay, bias-corrected moments) and the learning-rate schedule of a run.

The update, per parameter p with gradient g at step t = 1, 2, ... (Loshchilov & Hutter, arXiv:1711.05101)::

    m = b1 * m + (1 - b1) * g            v = b2 * v + (1 - b2) * g * g
    p = p * (1 - lr * wd)                (only for weights with ndim >= 2: not norms, not biases)
    p = p - lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)

This is exactly MindFormers' ``AdamW`` (``mindformers.core.optim.AdamW``, with the no-decay groups of
``get_optimizer_grouped_parameters``: 1-D weights and biases); ``tests/unit/test_train_optim.py`` checks the two
agree.  It is kept because it does two things MindFormers' optimizer cannot here: it updates all parameters as
one flat float32 buffer (a handful of element-wise ops per step in PyNative, where MindFormers' hyper_map
dispatches a dozen ops per parameter), and its moments are per-parameter checkpoint entries
(``adam_m.<param>`` / ``adam_v.<param>``) that ``train/checkpoint.py`` reshards across layouts.

The learning rate is MindFormers' own: the ``lr_schedule`` section is built by MindFormers' ``build_lr``
(any registered schedule: ``CosineWithWarmUpLR``, ``ConstantWarmUpLR``, ``LinearWithWarmUpLR``...) and evaluated
at the 0-based update number, as MindFormers' optimizer evaluates it at ``global_step``.  ``total_steps: -1`` (or
absent) means the run's ``--steps``, as MindFormers uses epochs x dataset size.

Settings come from MindFormers' sections::

    optimizer:    {type: AdamW, betas: [0.9, 0.95], eps: 1.e-8, weight_decay: 0.1, learning_rate: ...}
    lr_schedule:  {type: <a MindFormers LR schedule>, learning_rate, warmup_steps | warmup_ratio, ...}
"""
from dataclasses import dataclass, field
from typing import Mapping, Optional

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, ops

from mf_longseq.config import ConfigError

OPTIMIZER_TYPES = (None, "AdamW", "adamw", "AdamWeightDecay", "FusedAdamWeightDecay", "LongSeqAdamW")
_SCHEDULES = {}     # frozen schedule items -> built MindFormers schedule (one build per distinct section)


def build_schedule(section: Mapping):
    """MindFormers' LR schedule of an ``lr_schedule`` section (``build_lr``).

    Raises:
        ConfigError: ``lr_schedule.type`` not registered in MindFormers, or arguments it rejects (key named).
    """
    from mindformers.core.lr import build_lr
    from mindformers.tools.register import MindFormerModuleType, MindFormerRegister
    section = dict(section)
    name = section.get("type")
    if not MindFormerRegister.is_exist(MindFormerModuleType.LR, name):
        known = sorted(MindFormerRegister.registry.get(MindFormerModuleType.LR, {}))
        raise ConfigError("lr_schedule.type", name, "not a MindFormers learning-rate schedule",
                          f"use one of {', '.join(known)}")
    key = tuple(sorted((k, repr(v)) for k, v in section.items()))
    if key not in _SCHEDULES:
        try:
            _SCHEDULES[key] = build_lr(section)
        except (TypeError, ValueError, OverflowError, RuntimeError) as err:   # Runtime: no Tensor holds e.g. 1e100
            raise ConfigError("lr_schedule", section, f"MindFormers' {name} rejects it ({err})",
                              f"give {name} the arguments it takes") from err
    return _SCHEDULES[key]


@dataclass(frozen=True)
class OptimSettings:
    """Hyper-parameters of AdamW and the MindFormers ``lr_schedule`` section (None: constant learning_rate)."""

    learning_rate: float = 1e-3
    betas: tuple = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.0
    lr_schedule: Optional[dict] = field(default=None, compare=True)
    total_steps: int = 0             # the schedule's horizon; 0 means the run's --steps

    @classmethod
    def from_mindformers(cls, tree: Mapping, steps: int) -> "OptimSettings":
        """Read ``optimizer`` and ``lr_schedule``; the schedule is built once here (errors before device work)."""
        opt = {k: v for k, v in dict(tree.get("optimizer") or {}).items() if v is not None}   # null: the default
        sched = {k: v for k, v in dict(tree.get("lr_schedule") or {}).items() if v is not None}
        if opt.get("type") not in OPTIMIZER_TYPES:
            raise ConfigError("optimizer.type", opt.get("type"), "the mf_longseq runner implements AdamW only",
                              "set optimizer.type: AdamW")
        betas = tuple(float(b) for b in opt.get("betas", cls.betas))
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ConfigError("optimizer.betas", opt.get("betas"), "need two numbers in [0, 1)",
                              "e.g. betas: [0.9, 0.95]")
        lr = float(sched.get("learning_rate", opt.get("learning_rate", cls.learning_rate)))
        total = int(sched.get("total_steps") or 0)
        total = total if total > 0 else steps
        schedule = None
        if "type" not in sched and set(sched) - {"learning_rate", "total_steps"}:
            raise ConfigError("lr_schedule.type", None, f"lr_schedule sets {sorted(sched)} but names no schedule",
                              "add type: (e.g. CosineWithWarmUpLR), or keep only learning_rate for a constant rate")
        if "type" in sched:
            schedule = {**sched, "learning_rate": lr, "total_steps": total}
            build_schedule(schedule)
        return cls(learning_rate=lr, betas=betas, eps=float(opt.get("eps", cls.eps)),
                   weight_decay=float(opt.get("weight_decay", cls.weight_decay)), lr_schedule=schedule,
                   total_steps=total)

    def lr_at(self, step: int) -> float:
        """Learning rate of update number ``step`` (0-based): MindFormers' schedule at global_step = step."""
        if not self.lr_schedule:
            return self.learning_rate
        value = build_schedule(self.lr_schedule)(Tensor(np.array(step, np.int32)))
        return float(np.asarray(value.asnumpy()).reshape(-1)[0])


STEP_CHUNK = 1 << 20     # elements of one piece of the update: 4 MiB of float32 (``step_transient_bytes``)
STEP_TEMPORARIES = 10    # float32 piece-sized buffers alive at once in ``update_piece`` (counted below)


@dataclass(frozen=True)
class Piece:
    """A contiguous part [start, stop) of the flat order that one ``update_piece`` call updates: whole
    consecutive parameters ``params`` with one weight decay (``rows`` None), or the row slab ``rows`` = (r0, r1)
    of the one parameter ``params[0]`` (a parameter larger than the chunk)."""

    start: int
    stop: int
    params: tuple
    rows: Optional[tuple]
    decay: float             # this piece's weight decay (0.0: none)


def plan_pieces(shapes, decays, chunk: Optional[int] = None) -> list:
    """Split the flat order of parameters with ``shapes`` and per-parameter ``decays`` into ``Piece``s of at most
    ``chunk`` elements (or one row, when a row is larger): runs of whole parameters with equal decay, and row
    slabs of the parameters larger than ``chunk`` (default ``STEP_CHUNK``)."""
    chunk = chunk or STEP_CHUNK
    pieces, group, start, offset = [], [], 0, 0

    def close():
        if group:
            pieces.append(Piece(start, offset, tuple(group), None, decays[group[0]]))
            group.clear()
    for i, shape in enumerate(shapes):
        n = int(np.prod(shape))
        if n > chunk and len(shape) >= 1 and shape[0] > 1:
            close()
            row = n // shape[0]
            per = max(1, chunk // row)
            for r0 in range(0, shape[0], per):
                r1 = min(r0 + per, shape[0])
                pieces.append(Piece(offset + r0 * row, offset + r1 * row, (i,), (r0, r1), decays[i]))
            offset += n
            start = offset
            continue
        if group and (decays[i] != decays[group[0]] or offset + n - start > chunk):
            close()
        if not group:
            start = offset
        group.append(i)
        offset += n
    close()
    return pieces


def adamw_flat_update(flat, grad, m, v, *, lr: float, step: int, betas, eps: float, decay: float = 0.0):
    """One AdamW update (the module docstring's formula) on float32 vectors, all (n,).

    Args:
        flat, grad, m, v: parameters, gradient, first and second moments of the same n elements.
        lr: learning rate of this update; step: its 1-based number (bias correction); betas: (b1, b2); eps.
        decay: the elements' weight decay (0: none).  The factor 1 - decay * lr is rounded in float32 as the
            element-wise float32 ops round it.

    Returns:
        (new parameters, new m, new v), each (n,) float32.
    """
    b1, b2 = betas
    grad = grad.astype(ms.float32)
    m = m * b1 + grad * (1.0 - b1)
    v = v * b2 + ops.square(grad) * (1.0 - b2)
    if decay:
        flat = flat * float(np.float32(1.0) - np.float32(decay) * np.float32(lr))
    flat = flat - (m / (1.0 - b1 ** step)) / (ops.sqrt(v / (1.0 - b2 ** step)) + eps) * lr
    return flat, m, v


def update_piece(params, piece: Piece, grad, m, v, **hyper) -> None:
    """Apply ``adamw_flat_update`` to one piece, in place: the flat moments ``m``, ``v`` (Tensors or Parameters,
    (N,) float32) by slice assignment, the parameters by slice assignment (row slab) or ``set_data`` (whole).

    Alive at once, each at most the piece's size in float32: the piece's weights, gradient, m and v, the new m
    and v, and at most four temporaries of the formula (``STEP_TEMPORARIES`` = 10; a half-precision
    parameter's float32 copy replaces the weights' slice)."""
    a, b = piece.start, piece.stop
    if piece.rows is not None:
        p, (r0, r1) = params[piece.params[0]], piece.rows
        flat = p[r0:r1].astype(ms.float32).reshape(-1)
    else:
        flat = ops.cat([params[i].astype(ms.float32).reshape(-1) for i in piece.params]) \
            if len(piece.params) > 1 else params[piece.params[0]].astype(ms.float32).reshape(-1)
    flat, new_m, new_v = adamw_flat_update(flat, grad[a:b], m[a:b], v[a:b], decay=piece.decay, **hyper)
    m[a:b] = new_m
    v[a:b] = new_v
    if piece.rows is not None:
        p[r0:r1] = flat.reshape((r1 - r0,) + tuple(p.shape[1:])).astype(p.dtype)
        return
    start = 0
    for i in piece.params:
        p = params[i]
        n = int(np.prod(p.shape))
        p.set_data(flat[start:start + n].reshape(p.shape).astype(p.dtype))
        start += n


def step_transient_bytes(params: int, chunk: int = STEP_CHUNK) -> int:
    """Bytes the update allocates beyond weights, gradients and moments: ``STEP_TEMPORARIES`` float32 buffers
    of one piece (at most ``chunk`` elements; ``planner/memory.py`` uses this)."""
    return STEP_TEMPORARIES * min(chunk, params) * 4


def apply_update(params, pieces, grad, m, v, **hyper) -> None:
    """One AdamW update of ``params`` with the flat (N,) float32 gradient ``grad``, piece by piece, in place."""
    for piece in pieces:
        update_piece(params, piece, grad, m, v, **hyper)


class AdamW:
    """Deterministic AdamW over a list of ``Parameter``s (see the module docstring for the formula).

    The moments live in two flat float32 buffers (all parameters concatenated in order); one update walks them
    in pieces of at most ``STEP_CHUNK`` elements (``plan_pieces``: runs of whole parameters with one weight
    decay, row slabs of larger ones) and writes moments and weights in place, so the step allocates a few
    piece-sized buffers whatever the parameter count (``step_transient_bytes``), and PyNative dispatches a
    handful of element-wise ops per piece.  The weight decay is one number per piece, not a per-element mask.

    Args:
        params: the trainable parameters, in a fixed order.
        settings: an ``OptimSettings``.
    """

    def __init__(self, params, settings: OptimSettings):
        self.params = list(params)
        self.settings = settings
        self.sizes = [int(np.prod(p.shape)) for p in self.params]
        total = sum(self.sizes)
        self.m = ops.zeros((total,), ms.float32)                                   # (sum of sizes,)
        self.v = ops.zeros((total,), ms.float32)
        decays = [settings.weight_decay if p.ndim >= 2 else 0.0 for p in self.params]
        self.pieces = plan_pieces([tuple(p.shape) for p in self.params], decays)
        self.step_count = 0          # updates applied so far

    @staticmethod
    def flatten(tensors):
        """Concatenate tensors into one float32 vector, in order: [(..)] -> (sum of sizes,)."""
        return ops.cat([t.astype(ms.float32).reshape(-1) for t in tensors])

    def step(self, grads) -> float:
        """Apply one update with ``grads`` (a list in ``params`` order); returns the learning rate used."""
        return self.step_flat(self.flatten(grads))

    def step_flat(self, grad) -> float:
        """Apply one update with the flat gradient (``flatten`` order); returns the learning rate used."""
        s = self.settings
        lr = s.lr_at(self.step_count)
        self.step_count += 1
        apply_update(self.params, self.pieces, grad, self.m, self.v, lr=lr, step=self.step_count, betas=s.betas,
                     eps=s.eps)
        return lr

    def state_parameters(self):
        """The moments as per-parameter ``Parameter``s (copies) named adam_m.<param> / adam_v.<param>."""
        out = []
        for prefix, flat in (("adam_m", self.m), ("adam_v", self.v)):
            start = 0
            for p, n in zip(self.params, self.sizes):
                out.append(Parameter(flat[start:start + n].reshape(p.shape), name=f"{prefix}.{p.name}",
                                     requires_grad=False))
                start += n
        return out

    def load_state(self, moments, step_count: int) -> None:
        """Restore from ``state_parameters()``-shaped Parameters (same order) and the update counter."""
        half = len(moments) // 2
        self.m = self.flatten(moments[:half])
        self.v = self.flatten(moments[half:])
        self.step_count = int(step_count)
