"""Megatron sequence parallelism (SP) over the ``mp`` group, inside each context-parallel rank's sequence part.

Korthikanti et al., "Reducing Activation Recomputation in Large Transformer Models", 2022, section 4.2.2
(https://arxiv.org/abs/2205.05198): outside the tensor-parallel blocks (norms, residual adds, the layer's
input) every mp rank holds only its 1/MP of the tokens.  Per decoder layer, on this CP rank's S tokens (S =
S_global / CP, already cut by the CP layout)::

    x (B, S/MP, H) --norm statistics--> gather (B, S, H) --x weight--> column-parallel (QKV / gate, up)
        ... attention or SwiGLU on this rank's heads / FFN slice ...
    row-parallel (o_proj / down) partial sums (B, S, H) --reduce-scatter--> (B, S/MP, H) --+ residual

The all-gather replaces the column layers' f (identity forward, all-reduce backward) and the reduce-scatter
replaces the row layers' g (all-reduce forward): the backward of the all-gather is a reduce-scatter of the
input gradient and the backward of the reduce-scatter an all-gather (``comm.AllGather`` / ``comm.ReduceScatter``),
so SP moves the same bytes as plain tensor parallelism (an all-reduce is a reduce-scatter plus an all-gather).

Norm weights.  A norm runs on this rank's S/MP tokens (statistics and weight), then its output is gathered
(``GatherScaled``).  The norm weight is replicated over mp but each rank sees only its tokens, so its gradient
is this rank's part of the token sum, summed over mp by an all-reduce of the (H,) gradient, as Megatron-LM does
for its sequence-parallel norm weights.  That all-reduce runs in the same backward function as the
reduce-scatter of the input gradient, so every rank issues the backward collectives in one order (PyNative may
order independent backward branches differently per rank).  Forward values are those of the unsplit model (same
operations in the same dtype); the norm-weight gradient is summed in another order (float32 rounding).

Embedding and head.  The vocabulary-parallel embedding reduce-scatters its partial rows (instead of all-reducing
them): the first layer receives (B, S/MP, H).  The final norm gathers like a layer's norm, so the vocabulary-
parallel LM head and cross entropy see all S tokens of the CP rank in order, with their labels (a head on
split tokens would need the whole vocabulary per rank or a second exchange of the (B, S) loss statistics);
the head's f becomes identity, the gather's backward sums the mp ranks' partial input gradients.

Saved per layer: the layer input is (B, S/MP, H) instead of (B, S, H) on each rank: with recompute that is all
a layer keeps, so layer checkpoints cost B * (S_global / CP / MP) * H * bytes(compute dtype) per rank.

Shapes: S = this CP rank's tokens; it must be divisible by MP (``LongSeqConfig`` checks seq_length).
With model_parallel = 1 there is nothing to split: every exchange here is the identity.
"""
import mindspore as ms
from mindspore import nn

from mf_longseq.parallel.comm import ReduceScatter, all_gather, all_reduce, reduce_scatter

SEQ_DIM = 1                                   # (B, S, H): the sequence axis the mp ranks split


class Identity(nn.Cell):
    """Identity forward and backward (stands in for a tensor-parallel f or g under sequence parallelism)."""

    def construct(self, x):
        return x


class GatherScaled(nn.Cell):
    """all_gather(x * weight) along the sequence: (B, S/MP, H), (H,) -> (B, S, H) in x's dtype.

    Backward (dout (B, S, H), each rank's partial sum from its column-parallel layers):
    d = reduce_scatter(dout) (B, S/MP, H), the whole gradient of this rank's tokens; dx = d * weight;
    dweight = all_reduce over mp of sum over (B, S/MP) of d * x (float32), cast to the weight's dtype.
    """

    def __init__(self, group):
        super().__init__()
        self.group = group

    def construct(self, x, weight):
        return all_gather(x * weight.astype(x.dtype), self.group, SEQ_DIM)

    def bprop(self, x, weight, out, dout):
        d = reduce_scatter(dout, self.group, SEQ_DIM)                                   # (B, S/MP, H)
        dx = d * weight.astype(d.dtype)
        partial = (d.astype(ms.float32) * x.astype(ms.float32)).reshape(-1, x.shape[-1]).sum(0)   # (H,)
        return dx, all_reduce(partial, self.group).astype(weight.dtype)


class SequenceParallel(nn.Cell):
    """The exchanges of one model under sequence parallelism over ``group`` (the mp group).

    Args:
        group: the mp ``Group``.
        enabled: ``parallel_config.use_seq_parallel``; with group.size == 1 nothing is split either way.

    ``degree`` is how many ranks split the tokens (group.size when on, else 1).  ``norm`` a norm's output
    gathered (B, S/MP, H) -> (B, S, H), ``scatter`` (B, S, H) partial sums -> (B, S/MP, H) summed over mp; the
    plain norm and the identity when SP is off.
    """

    def __init__(self, group, enabled: bool):
        super().__init__()
        self.on = bool(enabled) and group.size > 1
        self.degree = group.size if self.on else 1
        self.group = group
        self.gather_scaled = GatherScaled(group) if self.on else None
        self.scatter = ReduceScatter(group, SEQ_DIM) if self.on else Identity()

    def norm(self, norm, x):
        """``norm(x)`` of this rank's tokens (B, S/MP, H), gathered to (B, S, H) (``GatherScaled``).

        ``norm`` must offer ``normalize(x)`` (statistics only) and ``weight`` (H,), with
        ``norm(x) == norm.normalize(x) * weight`` (``models/decoder.py`` RMSNorm).
        """
        if not self.on:
            return norm(x)
        return self.gather_scaled(norm.normalize(x), norm.weight)

    def replace_tensor_parallel_exchanges(self, columns=(), rows=(), embedding=None) -> None:
        """Switch tensor-parallel layers to sequence parallelism (nothing when SP is off).

        Args:
            columns: ``SharedInputColumns`` (q/k/v, gate/up, the LM head) whose input is gathered by the caller:
                their f becomes the identity.
            rows: ``RowParallelLinear`` layers (o_proj, down) whose output the caller reduce-scatters: their g
                becomes the identity.  A row layer with a bias is refused (its bias would be added MP times).
            embedding: the ``VocabParallelEmbedding``: its all-reduce becomes the reduce-scatter.

        Raises:
            ValueError: a row-parallel layer with a bias.
        """
        if not self.on:
            return
        for shared in columns:
            shared.copy = Identity()
        for row in rows:
            if row.bias is not None:
                raise ValueError("sequence parallelism adds the row-parallel bias after the reduce-scatter; this "
                                 "row-parallel layer has a bias. Fix: set parallel_config.use_seq_parallel: False")
            row.reduce = Identity()
        if embedding is not None and embedding.reduce is not None:
            embedding.reduce = ReduceScatter(self.group, SEQ_DIM)


__all__ = ["SequenceParallel", "GatherScaled", "Identity", "SEQ_DIM"]
