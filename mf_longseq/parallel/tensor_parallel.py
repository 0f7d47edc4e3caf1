"""Tensor (model) parallelism over the ``mp`` group of the mesh, Megatron style.

Conjugate operators (Shoeybi et al., "Megatron-LM", 2019, section 3, https://arxiv.org/abs/1909.08053):

    f = CopyToMP       forward: identity       backward: all-reduce over mp
    g = ReduceFromMP   forward: all-reduce     backward: identity

    column-parallel linear:  y_m = f(x) @ W_m^T          W split on output features (rows of W (out, in))
    row-parallel linear:     y   = g(x_m @ W_m^T) + b    W split on input features (columns of W)

Attention: q/k/v are column-parallel with whole heads per rank, o_proj is row-parallel; MLP: gate/up column,
down row.  With K kv heads and mp > K (mp % K == 0) each kv head lives on mp/K ranks ("replicated"); its
output gradient is summed over those replicas (``ReplicaSum``) so the copies get the full weight gradient and
stay equal.  Layers reading one input (q/k/v, gate/up) share one f (``SharedInputColumns``): on CPU, PyNative
may order independent backward branches differently on different ranks, so every backward collective has to
sit on the path all ranks walk in the same order.

Vocabulary parallel: rank m holds rows [m*V/mp, (m+1)*V/mp) of the embedding and of the LM head.  The
embedding looks up the ids it owns (zeros elsewhere) and all-reduces; the cross entropy combines the mp
ranks' max, sum of exponentials and target logit with all-reduces of (B, S) tensors, never the (B, S, V) logits.

Every collective here is an AllReduce (or the comm layer's all-gather of a (B, S, 1) max), so the same code runs
on CPU ranks.  Weights follow the (out, in) convention of ``nn.Dense`` / Hugging Face; a ``ShardSpec`` says how
a full tensor maps to the mp shards (``shard_array``, ``merge_shards``: also used to reshard checkpoints).
"""
from dataclasses import dataclass
from typing import Dict, Optional, Sequence

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops

from mf_longseq.parallel.comm import all_gather, all_reduce

REPLICATED = "replicated"
SPLIT = "split"


# --------------------------------------------------------------------------------------------------- shard specs
@dataclass(frozen=True)
class ShardSpec:
    """How a full tensor is cut across the ``mp`` ranks.

    Attributes:
        kind: ``replicated`` (every rank holds the whole tensor) or ``split``.
        dim: the split dimension.
        units: indivisible units along ``dim`` (heads for q/k/v, else the dimension's size).  When mp exceeds
            ``units`` (mp % units == 0) rank m holds unit m // (mp / units): units are replicated, not cut.
    """

    kind: str = REPLICATED
    dim: int = 0
    units: Optional[int] = None

    def to_dict(self) -> dict:
        return {"kind": self.kind, "dim": self.dim, "units": self.units}

    @classmethod
    def from_dict(cls, d: dict) -> "ShardSpec":
        return cls(kind=d["kind"], dim=int(d["dim"]), units=d.get("units"))


def _units(spec: ShardSpec, size: int) -> int:
    units = size if spec.units is None else spec.units
    if size % units:
        raise ValueError(f"dimension of size {size} does not hold {units} equal units")
    return units


def unit_range(units: int, mp: int, mp_id: int):
    """[first, last) units of ``mp_id``; with mp > units the single unit this rank replicates."""
    if units % mp == 0:
        per = units // mp
        return mp_id * per, (mp_id + 1) * per
    if mp % units == 0:
        unit = mp_id // (mp // units)
        return unit, unit + 1
    raise ValueError(f"model_parallel = {mp} and {units} units (heads or rows) must divide one another")


def shard_array(full: np.ndarray, spec: ShardSpec, mp: int, mp_id: int) -> np.ndarray:
    """This mp rank's part of a full tensor."""
    if spec.kind == REPLICATED or mp == 1:
        return full
    units = _units(spec, full.shape[spec.dim])
    first, last = unit_range(units, mp, mp_id)
    width = full.shape[spec.dim] // units
    return np.take(full, np.arange(first * width, last * width), axis=spec.dim)


def merge_shards(shards: Sequence[np.ndarray], spec: ShardSpec) -> np.ndarray:
    """Inverse of ``shard_array``: the full tensor from the shards of mp ranks 0..mp-1 (in order)."""
    mp = len(shards)
    if spec.kind == REPLICATED or mp == 1:
        return shards[0]
    units = spec.units
    if units is None or units % mp == 0:                               # every rank holds its own units
        return np.concatenate(list(shards), axis=spec.dim)
    return np.concatenate([shards[u * (mp // units)] for u in range(units)], axis=spec.dim)   # one per replica set


def local_units(units: int, mp: int) -> int:
    """Units (heads) one mp rank holds: units / mp, or 1 when replicated."""
    return max(units // mp, 1)


# --------------------------------------------------------------------------------------------------- conjugates
class CopyToMP(nn.Cell):
    """f: identity forward; backward sums the input gradients of the mp ranks (all-reduce)."""

    def __init__(self, group):
        super().__init__()
        self.group = group

    def construct(self, x):
        return x

    def bprop(self, x, out, dout):
        return (all_reduce(dout, self.group),)


class ReduceFromMP(nn.Cell):
    """g: all-reduce forward; identity backward (the objective downstream is replicated over mp)."""

    def __init__(self, group):
        super().__init__()
        self.group = group

    def construct(self, x):
        return all_reduce(x, self.group)

    def bprop(self, x, out, dout):
        return (dout,)


class GradScale(nn.Cell):
    """Identity forward; backward multiplies the gradient by ``scale`` (no communication)."""

    def __init__(self, scale: float):
        super().__init__()
        self.scale = scale

    def construct(self, x):
        return x

    def bprop(self, x, out, dout):
        return (dout * self.scale,)


class ReplicaSum(nn.Cell):
    """Identity forward on any number of tensors; backward sums their gradients over the mp ranks that replicate
    the same unit (kv head), in ONE all-reduce over mp of a (units, n) buffer holding this rank's flattened
    gradients in its unit's slot (no extra group needed).
    """

    def __init__(self, group, units: int):
        super().__init__()
        self.group, self.units = group, units
        self.slot = unit_range(units, group.size, group.index)[0]

    def construct(self, *xs):
        return xs

    def bprop(self, *args):
        douts = args[-1]
        flat = ops.cat([d.reshape(-1) for d in douts])                          # (n,)
        slots = [ops.zeros_like(flat)] * self.units
        slots[self.slot] = flat
        summed = all_reduce(ops.stack(slots), self.group)[self.slot]           # (units, n) -> (n,)
        grads, start = [], 0
        for d in douts:
            grads.append(summed[start:start + d.size].reshape(d.shape))
            start += d.size
        return tuple(grads)


# --------------------------------------------------------------------------------------------------- layers
_MATMUL_NT = ops.MatMul(transpose_b=True)                     # a (M, K) @ b (N, K)^T -> (M, N)


def _upcast(compute_dtype) -> bool:
    """CPU has no half-precision MatMul kernel: multiply in float32 there and round the product back."""
    return compute_dtype != ms.float32 and ms.get_context("device_target") == "CPU"


def _linear(x, w, b, compute_dtype, upcast: bool = False):
    """x (.., in) @ w (out, in)^T [+ b] -> (.., out) in compute_dtype; a 2-D matmul (CPU BatchMatMul does not
    broadcast)."""
    lead = x.shape[:-1]
    x2, w = x.reshape(-1, x.shape[-1]), w.astype(compute_dtype)                       # (prod(lead), in)
    if upcast:
        y = _MATMUL_NT(x2.astype(ms.float32), w.astype(ms.float32)).astype(compute_dtype)
    else:
        y = _MATMUL_NT(x2, w)                                                          # (prod(lead), out)
    if b is not None:
        y = y + b.astype(compute_dtype)
    return y.reshape(*lead, w.shape[0])


def _zeros(shape, dtype) -> Parameter:
    return Parameter(Tensor(np.zeros(shape, np.float32), dtype))


class ColumnParallelLinear(nn.Cell):
    """y_m = f(x) @ W_m^T (+ b_m), W (out, in) split on ``out`` by whole ``units`` (heads; default: rows).

    Args:
        in_features: input features (replicated over mp).
        out_features: output features of the full layer.
        group: the mp ``Group`` (size 1: a plain linear layer).
        units: heads along ``out`` (default: ``out_features``); replicated over ranks when mp > units.
        has_bias: add a bias (split like the weight).
        param_dtype, compute_dtype: storage dtype of the weights and dtype of the matmul.

    Weights start at zero (the model initialises them, see ``shard_array``).  Input (.., in); output
    (.., out_local), out_local = local_units(units, mp) * out / units.  Several layers reading the same input
    go through one ``SharedInputColumns`` (one f, one replica sum) instead of their own ``construct``.
    """

    def __init__(self, in_features: int, out_features: int, *, group, units: Optional[int] = None,
                 has_bias: bool = False, param_dtype=ms.float32, compute_dtype=ms.float32):
        super().__init__()
        mp = group.size
        self.units = out_features if units is None else units
        self.spec = ShardSpec(SPLIT, 0, units)
        self.out_local = local_units(self.units, mp) * (out_features // self.units)
        self.compute_dtype, self.upcast = compute_dtype, _upcast(compute_dtype)
        self.weight = _zeros((self.out_local, in_features), param_dtype)
        self.bias = _zeros((self.out_local,), param_dtype) if has_bias else None
        self.replicas = mp // self.units if mp > self.units else 1      # ranks holding the same units
        self.shared = SharedInputColumns([self], group=group)

    def local(self, x):
        """x @ W_m^T (+ b_m) on this rank's weights, no communication."""
        return _linear(x, self.weight, self.bias, self.compute_dtype, self.upcast)

    def construct(self, x):
        return self.shared(x)[0]


class SharedInputColumns(nn.Cell):
    """Column-parallel layers that read the same input x (q/k/v; gate/up), with exactly one collective each way.

    Forward: x -> f -> each layer's ``local``.  Backward: the gradients of replicated layers' outputs (kv heads
    when mp > K: every replica saw only its own query heads) are summed over the replicas in one ``ReplicaSum``,
    so their weight gradients are the full ones and the replicas stay equal; their input gradient is scaled by
    1 / replicas (``GradScale``) because f then adds every replica's copy; f all-reduces the input gradient once.

    Why one Cell: PyNative may run independent backward branches in a different order on different ranks, so
    each collective must sit on the single path every rank's backward takes in the same order.

    The layers stay attributes of their owner (parameter names unchanged); this Cell only references them.

    Returns the tuple of the layers' outputs.
    """

    def __init__(self, layers, *, group):
        super().__init__()
        self.layers = list(layers)                       # a plain list: not children, names unchanged
        self.copy = CopyToMP(group)
        replicated = [layer.replicas for layer in self.layers if layer.replicas > 1]
        if len(set(replicated)) > 1:
            raise ValueError(f"layers sharing an input replicate their units over different rank counts "
                             f"{replicated}: give them the same number of units")
        self.scale = GradScale(1.0 / replicated[0]) if replicated else None
        units = [layer.units for layer in self.layers if layer.replicas > 1]
        self.replica_sum = ReplicaSum(group, units[0]) if units else None

    def construct(self, x):
        x = self.copy(x)
        scaled = self.scale(x) if self.scale is not None else x
        outs = [layer.local(scaled if layer.replicas > 1 else x) for layer in self.layers]
        if self.replica_sum is None:
            return tuple(outs)
        index = [i for i, layer in enumerate(self.layers) if layer.replicas > 1]
        summed = self.replica_sum(*[outs[i] for i in index])
        for i, y in zip(index, summed):
            outs[i] = y
        return tuple(outs)


class RowParallelLinear(nn.Cell):
    """y = g(x_m @ W_m^T) + b, W (out, in) split on ``in`` by whole ``units``; the bias is replicated.

    Input (.., in_local) (the output of a column-parallel layer); output (.., out), equal on every mp rank.
    """

    def __init__(self, in_features: int, out_features: int, *, group, units: Optional[int] = None,
                 has_bias: bool = False, param_dtype=ms.float32, compute_dtype=ms.float32):
        super().__init__()
        self.units = in_features if units is None else units
        self.spec = ShardSpec(SPLIT, 1, units)
        in_local = local_units(self.units, group.size) * (in_features // self.units)
        self.compute_dtype, self.upcast = compute_dtype, _upcast(compute_dtype)
        self.weight = _zeros((out_features, in_local), param_dtype)
        self.bias = _zeros((out_features,), param_dtype) if has_bias else None
        self.reduce = ReduceFromMP(group)

    def construct(self, x):
        y = self.reduce(_linear(x, self.weight, None, self.compute_dtype, self.upcast))
        return y + self.bias.astype(self.compute_dtype) if self.bias is not None else y


class VocabParallelEmbedding(nn.Cell):
    """Embedding table (V, H) split on V: rank m looks up the ids in [start, end), zeros elsewhere; all-reduce.

    Input ids (B, S) int; output (B, S, H) in compute_dtype, equal on every mp rank.
    """

    def __init__(self, vocab_size: int, hidden: int, *, group, param_dtype=ms.float32, compute_dtype=ms.float32):
        super().__init__()
        mp = group.size
        if vocab_size % mp:
            raise ValueError(f"vocab_size = {vocab_size} is not divisible by parallel_config.model_parallel = {mp}. "
                             "Fix: pad the vocabulary to a multiple of model_parallel")
        self.spec = ShardSpec(SPLIT, 0)
        self.part = vocab_size // mp
        self.start = group.index * self.part
        self.compute_dtype, self.upcast = compute_dtype, _upcast(compute_dtype)
        self.weight = _zeros((self.part, hidden), param_dtype)
        self.reduce = ReduceFromMP(group) if mp > 1 else None

    def construct(self, ids):
        ids = ids.astype(ms.int32)
        if self.reduce is None:
            return ops.gather(self.weight, ids, 0).astype(self.compute_dtype)
        local = ids - self.start
        owned = ops.logical_and(local >= 0, local < self.part)                  # (B, S)
        rows = ops.gather(self.weight, ops.where(owned, local, ops.zeros_like(local)), 0)      # (B, S, H)
        rows = rows.astype(self.compute_dtype) * owned.expand_dims(-1).astype(self.compute_dtype)
        return self.reduce(rows)


def shard_specs(cell) -> Dict[str, ShardSpec]:
    """Parameter name -> ``ShardSpec`` of every tensor-parallel layer inside ``cell`` (others: replicated).

    A column-parallel bias is split like its weight; a row-parallel bias is replicated.
    """
    specs = {}
    for _, sub in cell.cells_and_names():
        if isinstance(sub, (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding)):
            specs[sub.weight.name] = sub.spec
            if getattr(sub, "bias", None) is not None:
                specs[sub.bias.name] = sub.spec if isinstance(sub, ColumnParallelLinear) else ShardSpec(REPLICATED)
    return specs


def cross_entropy_parts(logits, targets, vocab_start: int, shift):
    """This rank's share of the cross entropy: (sum_v exp(l_v - shift), l_target or 0), each (B, S) float32.

    ``logits`` (B, S, V_part) covers vocabulary ids [vocab_start, vocab_start + V_part); ``shift`` (B, S, 1) must
    be the same on every mp rank.  Summing both parts over the mp ranks gives the full-vocabulary values.
    """
    part = logits.shape[-1]
    sum_exp = ops.exp(logits - shift).sum(axis=-1)                                # (B, S)
    local = targets.astype(ms.int32) - vocab_start
    owned = ops.logical_and(local >= 0, local < part)
    index = ops.where(owned, local, ops.zeros_like(local)).expand_dims(-1)       # (B, S, 1)
    target_logit = ops.gather_elements(logits, -1, index).squeeze(-1) * owned.astype(logits.dtype)
    return sum_exp, target_logit


def vocab_parallel_cross_entropy(logits, targets, *, group, vocab_start: int):
    """Per-token cross entropy from vocabulary-sharded logits, without gathering them.

    Args:
        logits: (B, S, V/mp) this rank's slice of the logits (vocabulary ids [vocab_start, vocab_start + V/mp)).
        targets: (B, S) int global token ids.
        group: the mp ``Group``.
        vocab_start: first vocabulary id of this rank's slice.

    Returns:
        (B, S) float32 cross entropy, equal on every mp rank; differentiable with respect to ``logits``.
        ce = log(sum_v exp(l_v - M)) + M - l_target, M the global max: any shift common to the ranks gives the
        same value and M only guards against overflow, so it carries no gradient.  Communication: an all-gather
        of the (B, S, 1) local maxima and two all-reduces of (B, S) tensors.
    """
    logits = logits.astype(ms.float32)
    local_max = ops.stop_gradient(logits.max(axis=-1, keepdims=True))            # (B, S, 1)
    shift = ops.stop_gradient(all_gather(local_max, group, -1).max(axis=-1, keepdims=True))   # (B, S, 1)
    sum_exp, target_logit = cross_entropy_parts(logits, targets, vocab_start, shift)
    if group.size > 1:
        reduce = ReduceFromMP(group)
        sum_exp, target_logit = reduce(sum_exp), reduce(target_logit)
    return ops.log(sum_exp) + shift.squeeze(-1) - target_logit


__all__ = ["ShardSpec", "REPLICATED", "SPLIT", "shard_array", "merge_shards", "unit_range", "local_units",
           "CopyToMP", "ReduceFromMP", "GradScale", "ReplicaSum", "ColumnParallelLinear",
           "SharedInputColumns", "RowParallelLinear",
           "VocabParallelEmbedding", "shard_specs", "cross_entropy_parts", "vocab_parallel_cross_entropy"]
