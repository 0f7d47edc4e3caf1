"""Tiled SwiGLU MLP: down(silu(gate(x)) * up(x)) tile by tile over the tokens, intermediates recomputed in the
backward.

``long_seq.mlp_tile`` (tokens per tile; 0 = off) runs the MLP ``tile`` tokens at a time: the forward keeps none
of gate, up, silu or their product (only the layer input, which the layer keeps anyway); the backward recomputes
them one tile at a time.  Outputs and gradients are those of ``decoder.MLP``.  Under model_parallel this Cell is
the local part between the column-parallel input conjugate (``CopyToMP``, which sums the input gradient over mp)
and the row-parallel output all-reduce (``ReduceFromMP``); each rank tiles its own F/MP slice, so the tiling
composes with tensor parallelism unchanged.  Same idea as DeepSpeed ALST's TiledMLP; our own implementation.

Shapes: N tokens of this rank (batch x S/CP), T tokens of one tile, H hidden, Fp = F / MP the FFN slice of
this rank, e the compute dtype's bytes.

Memory model (bytes this file allocates at once for one tile; ``mlp_tile_bytes``):

* forward: T Fp (2e + 8): gate and up (e each), the float32 gate and its silu (4 each) before the product
  (T Fp e) is formed; the tiles' outputs (N H e) are concatenated at the end (2 N H e during that).
* backward: T Fp (e + 20) at most (the float32 gate, sigmoid, d act, silu-derivative temporaries and d up),
  plus the weight gradients: three float32 accumulators (3 Fp H 4) for the whole backward and one tile's
  product Fp H e (+ its float32 cast, Fp H 4, when e < 4); the input gradient (N H e) is concatenated at the end.
* Untiled for comparison (``decoder.MLP`` under autograd): gate, its float32 copy, silu, up and their product
  for all N tokens, N Fp (4e + 4) kept for the backward (``planner/memory.py``).
"""
import mindspore as ms
from mindspore import nn, ops

from mf_longseq.models.tiling import matmul, tile_ranges


def mlp_tile_bytes(tile: int, ffn_per_rank: int, hidden: int, compute_bytes: int) -> dict:
    """Peak bytes this file allocates for one tile (module docstring; Ascend / float32 matmuls).

    Returns ``{"forward": T Fp (2e + 8), "backward": T Fp (e + 20) + 3 Fp H 4 + Fp H e (+ Fp H 4 when e < 4),
    "kept_per_token": 0}``: nothing per token is kept from forward to backward besides the layer input.
    """
    e = compute_bytes
    weight_grads = 3 * ffn_per_rank * hidden * 4 + ffn_per_rank * hidden * (e + (4 if e < 4 else 0))
    return {"forward": tile * ffn_per_rank * (2 * e + 8),
            "backward": tile * ffn_per_rank * (e + 20) + weight_grads, "kept_per_token": 0}


def _float32(x):
    return x if x.dtype == ms.float32 else x.astype(ms.float32)


class TiledMLP(nn.Cell):
    """This rank's SwiGLU slice, tile by tile: x (B, S, H) -> partial output (B, S, H) (sum it over mp).

    Args:
        tile: tokens per tile (>= 1).
        compute_dtype: dtype of the matmuls and of gate / up / their product (silu in float32, as ``MLP``).
        device_target: the mesh's (``tiling.upcast_matmul``: half-precision matmuls in float32 on CPU).

    ``construct(x, w_gate, w_up, w_down)``: x (B, S, H); w_gate, w_up (Fp, H); w_down (H, Fp), in compute dtype.
    """

    def __init__(self, tile: int, compute_dtype=ms.float32, device_target: str = "CPU"):
        super().__init__()
        if tile < 1:
            raise ValueError(f"TiledMLP needs tile >= 1 tokens, got {tile}")
        self.tile, self.compute_dtype, self.device_target = tile, compute_dtype, device_target

    def _mm(self, a, b, **transpose):
        return matmul(a, b, compute_dtype=self.compute_dtype, device_target=self.device_target, **transpose)

    def _tile_forward(self, x, w_gate, w_up, w_down):
        gate = self._mm(x, w_gate, transpose_b=True)                                        # (T, Fp)
        up = self._mm(x, w_up, transpose_b=True)
        act = ops.silu(_float32(gate)).astype(gate.dtype)                                  # float32, as MLP
        del gate
        return self._mm(act * up, w_down, transpose_b=True)                                 # (T, H)

    def construct(self, x, w_gate, w_up, w_down):
        lead, flat = x.shape[:-1], x.reshape(-1, x.shape[-1])                               # (N, H)
        outs = [self._tile_forward(flat[s:e], w_gate, w_up, w_down) for s, e in tile_ranges(flat.shape[0], self.tile)]
        out = ops.cat(outs) if len(outs) > 1 else outs[0]
        return out.reshape(*lead, out.shape[-1])

    def _tile_backward(self, x, dy, w_gate, w_up, w_down, grads):
        """d x (T, H) of one tile; adds the tile's weight gradients into ``grads`` (gate, up, down; float32)."""
        cd = self.compute_dtype
        up = self._mm(x, w_up, transpose_b=True)                                            # (T, Fp)
        gate = _float32(self._mm(x, w_gate, transpose_b=True))                              # float32
        sig = ops.sigmoid(gate)
        act = (gate * sig).astype(cd)                                                       # silu, as forward
        ops.assign_add(grads[2], _float32(self._mm(dy, act * up, transpose_a=True)))         # (H, Fp)
        d_prod = self._mm(dy, w_down)                                                       # (T, Fp)
        d_up = d_prod * act
        del act
        d_act = _float32(d_prod * up)
        del d_prod, up
        slope = 1 - sig                                                                     # silu'(g) =
        slope = gate * slope                                                                # sig (1 + g (1 - sig))
        slope = slope + 1
        slope = slope * sig
        del gate, sig
        d_gate = (d_act * slope).astype(cd)
        del d_act, slope
        ops.assign_add(grads[0], _float32(self._mm(d_gate, x, transpose_a=True)))           # (Fp, H)
        ops.assign_add(grads[1], _float32(self._mm(d_up, x, transpose_a=True)))
        return self._mm(d_gate, w_gate) + self._mm(d_up, w_up)                              # (T, H)

    def bprop(self, x, w_gate, w_up, w_down, out, dout):
        flat, d_flat = x.reshape(-1, x.shape[-1]), dout.reshape(-1, dout.shape[-1]).astype(self.compute_dtype)
        grads = [ops.zeros(w.shape, ms.float32) for w in (w_gate, w_up, w_down)]
        d_x = [self._tile_backward(flat[s:e], d_flat[s:e], w_gate, w_up, w_down, grads)
               for s, e in tile_ranges(flat.shape[0], self.tile)]
        d_x = (ops.cat(d_x) if len(d_x) > 1 else d_x[0]).reshape(x.shape).astype(x.dtype)
        return (d_x, grads[0].astype(w_gate.dtype), grads[1].astype(w_up.dtype), grads[2].astype(w_down.dtype))


__all__ = ["TiledMLP", "mlp_tile_bytes"]
