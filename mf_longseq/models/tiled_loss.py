"""Tiled LM head + cross entropy: logits and loss tile by tile, recomputed in the backward.

``long_seq.loss_tile`` (tokens per tile; 0 = off; None = ``default_loss_tile``) makes the last stage compute
the logits of this rank's tokens ``tile`` tokens at a time, never the whole (N, V/MP) matrix.  The forward keeps
only the per-token log-sum-exp (N float32); the backward recomputes each tile's logits from the hidden state and
the LM head weight, so at most one tile of float32 logits exists at a time.  The loss and the gradients with
respect to the hidden state and the weight are those of the untiled head (``vocab_parallel_cross_entropy``);
under model_parallel each rank handles its vocabulary slice and the per-token pieces are combined over mp as
there (the same formula, one tile at a time).  Same idea as the chunked / tiled losses of Liger-Kernel, torchtitan
and DeepSpeed ALST (Arctic Long Sequence Training); this is our own implementation.

Shapes: N tokens of this rank (batch x S/CP, flattened), T tokens of a tile, H hidden, Vp = V / MP the vocabulary
slice of this rank, e the compute dtype's bytes.

Memory model (bytes alive at once for one tile; every figure is what this file allocates, the planner's
formulas use ``loss_tile_bytes``):

* forward: at most two (T, Vp) float32 tensors, 8 T Vp (the logits and their shifted copy, then the shifted
  copy and its exp; a half-precision product is cast to float32 before, T Vp (e + 4) <= 8 T Vp).
  Kept for the backward: the log-sum-exp, 4 N.
* backward: the same 8 T Vp (logits -> shifted -> softmax -> minus one-hot -> times the token's gradient, each
  step freeing its input), plus the weight gradient: a float32 accumulator Vp H 4 for the whole backward and
  one tile's product Vp H e (+ its float32 cast, Vp H 4, when e < 4); the hidden gradient, N H e, is
  concatenated from the tiles at the end (2 N H e during the concatenation).
* CPU only: half-precision matmuls run on float32 copies (``tiling.upcast_matmul``), which adds the weight's
  float32 copy (Vp H 4) and a (T, Vp) float32 product per tile.  MindSpore's CPU memory pool does not hand a
  freed block back at once: measured, the resident peak of one forward + backward grows by about 43 T Vp bytes
  (10.7 float32 tiles; N = 2048, Vp = 151936: +437 / 845 / 1663 MiB for T = 64 / 128 / 256), still bounded by
  the tile, not by N (``benchmarks/tiled_loss_bench.py``).
"""
from typing import Optional

import mindspore as ms
from mindspore import nn, ops

from mf_longseq.config import LOSS_TILE_BUDGET_BYTES, default_loss_tile, resolve_loss_tile
from mf_longseq.models.tiling import matmul, tile_ranges
from mf_longseq.parallel.comm import all_gather, all_reduce

def loss_tile_bytes(tile: int, vocab_per_rank: int, hidden: int, compute_bytes: int) -> dict:
    """Peak bytes this file allocates for one tile (see the module docstring; Ascend / float32 matmuls).

    Returns ``{"forward": 8 T Vp, "backward": 8 T Vp + Vp H 4 + Vp H e (+ Vp H 4 when e < 4)}``; the tensors
    kept from forward to backward (the log-sum-exp, 4 N) and the hidden gradient (N H e) are per token, not per
    tile.
    """
    logits = 8 * tile * vocab_per_rank
    weight_grad = vocab_per_rank * hidden * (4 + compute_bytes + (4 if compute_bytes < 4 else 0))
    return {"forward": logits, "backward": logits + weight_grad}


def _float32(x):
    return x if x.dtype == ms.float32 else x.astype(ms.float32)


class TiledHeadLoss(nn.Cell):
    """Sum over tokens of mask x cross entropy of hidden @ weight^T, tile by tile, with a recomputing backward.

    Args:
        tile: tokens per tile (>= 1).
        group: the mp ``Group`` (size 1: the whole vocabulary on this rank).
        vocab_start: first vocabulary id of this rank's weight slice.
        compute_dtype: dtype of the logits matmul (logits and cross entropy are float32).
        device_target: the mesh's (``tiling.upcast_matmul``: half-precision matmuls in float32 on CPU).

    ``construct(hidden, weight, labels, mask)``: hidden (N, H) (equal on the mp ranks; put it behind ``CopyToMP``,
    whose backward sums this rank's partial hidden gradient over mp), weight (Vp, H), labels (N,) int global ids
    (any id where mask is 0), mask (N,) float32.  Returns (loss_sum float32 scalar, equal on the mp ranks;
    lse (N,) float32, the full-vocabulary log-sum-exp, no gradient).  Communication per tile under mp: an
    all-gather of the (T, 1) local maxima and one all-reduce of a (2, T) buffer, forward only.
    """

    def __init__(self, tile: int, group, vocab_start: int, compute_dtype=ms.float32, device_target: str = "CPU"):
        super().__init__()
        if tile < 1:
            raise ValueError(f"TiledHeadLoss needs tile >= 1 tokens, got {tile}")
        self.tile, self.group, self.vocab_start, self.compute_dtype = tile, group, vocab_start, compute_dtype
        self.device_target = device_target

    def _logits(self, hidden, weight):
        return _float32(self._matmul(hidden, weight, transpose_b=True))                # (T, Vp)

    def _matmul(self, a, b, **transpose):
        return matmul(a, b, compute_dtype=self.compute_dtype, device_target=self.device_target, **transpose)

    def _target_index(self, labels, part: int):
        """(index (T, 1) into this slice, owned (T,) float32: 1 where the label is in this rank's slice)."""
        local = labels.astype(ms.int32) - self.vocab_start
        owned = ops.logical_and(local >= 0, local < part)
        return ops.where(owned, local, ops.zeros_like(local)).expand_dims(-1), owned.astype(ms.float32)

    def _tile_forward(self, hidden, weight, labels):
        """(cross entropy (T,), lse (T,)) of one tile; the pieces are combined over mp."""
        logits = self._logits(hidden, weight)
        index, owned = self._target_index(labels, logits.shape[-1])
        target = ops.gather_elements(logits, -1, index).squeeze(-1) * owned                 # (T,)
        shift = ops.stop_gradient(logits.max(axis=-1, keepdims=True))                       # (T, 1)
        if self.group.size > 1:
            shift = all_gather(shift, self.group, -1).max(axis=-1, keepdims=True)           # (T, mp) -> (T, 1)
        logits = logits - shift
        logits = ops.exp(logits)
        sum_exp = logits.sum(axis=-1)                                                       # (T,)
        del logits
        if self.group.size > 1:
            sum_exp, target = all_reduce(ops.stack([sum_exp, target]), self.group)          # (2, T)
        lse = ops.log(sum_exp) + shift.squeeze(-1)
        return lse - target, lse

    def construct(self, hidden, weight, labels, mask):
        total, lses = None, []
        for start, end in tile_ranges(hidden.shape[0], self.tile):
            ce, lse = self._tile_forward(hidden[start:end], weight, labels[start:end])
            part = (ce * mask[start:end]).sum()
            total = part if total is None else total + part
            lses.append(lse)
        return total, ops.cat(lses) if len(lses) > 1 else lses[0]

    def bprop(self, hidden, weight, labels, mask, out, dout):
        """d hidden (N, H) (this rank's vocabulary part; CopyToMP sums it over mp) and d weight (Vp, H):
        d logits = dout x mask x (softmax - one_hot(label)), recomputed tile by tile from ``out``'s lse."""
        lse, scale = out[1], mask.astype(ms.float32) * dout[0]                              # (N,), (N,)
        d_weight = ops.zeros(weight.shape, ms.float32)                                      # accumulator
        d_hidden = []
        for start, end in tile_ranges(hidden.shape[0], self.tile):
            h = hidden[start:end]
            grad = self._logits(h, weight)                                                  # (T, Vp)
            index, owned = self._target_index(labels[start:end], grad.shape[-1])
            grad = grad - lse[start:end].expand_dims(-1)
            grad = ops.exp(grad)                                                            # softmax slice
            grad = ops.tensor_scatter_elements(grad, index, -owned.expand_dims(-1), axis=1, reduction="add")
            grad = grad * scale[start:end].expand_dims(-1)
            grad = grad.astype(self.compute_dtype) if self.compute_dtype != ms.float32 else grad
            d_hidden.append(self._matmul(grad, weight))                                     # (T, H)
            ops.assign_add(d_weight, _float32(self._matmul(grad, h, transpose_a=True)))
            del grad
        d_hidden = ops.cat(d_hidden) if len(d_hidden) > 1 else d_hidden[0]
        return (d_hidden.astype(hidden.dtype), d_weight.astype(weight.dtype), ops.zeros_like(labels),
                ops.zeros_like(mask))


__all__ = ["LOSS_TILE_BUDGET_BYTES", "default_loss_tile", "resolve_loss_tile", "loss_tile_bytes",
           "TiledHeadLoss"]
