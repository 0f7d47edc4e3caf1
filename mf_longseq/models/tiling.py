"""Pieces the tiled algorithms share (``tiled_loss.py``, ``tiled_mlp.py``): token tiles and the matmul of a
custom backward.

Shapes: N tokens (batch x sequence of this rank, flattened), T tokens of one tile.
"""
from typing import Iterator, Tuple

import mindspore as ms
from mindspore import ops

_MM = {(ta, tb): ops.MatMul(transpose_a=ta, transpose_b=tb) for ta in (False, True) for tb in (False, True)}


def tile_ranges(num_tokens: int, tile: int) -> Iterator[Tuple[int, int]]:
    """(start, end) of consecutive tiles of ``tile`` tokens covering [0, num_tokens); the last may be shorter.

    Raises:
        ValueError: ``tile`` < 1.
    """
    if tile < 1:
        raise ValueError(f"a tile holds at least one token, got {tile}")
    for start in range(0, num_tokens, tile):
        yield start, min(start + tile, num_tokens)


def upcast_matmul(compute_dtype, device_target: str) -> bool:
    """CPU has no half-precision MatMul kernel: there half operands are multiplied in float32 and rounded back
    (half storage, float32 accumulation, as on Ascend's cube unit).  ``device_target``: the mesh's (the model
    reads no global context)."""
    return compute_dtype != ms.float32 and device_target == "CPU"


def matmul(a, b, *, transpose_a: bool = False, transpose_b: bool = False, compute_dtype=ms.float32,
           device_target: str = "CPU"):
    """op(a) @ op(b) of 2-D tensors in ``compute_dtype`` (op: transpose when asked); the product in
    ``compute_dtype``.  Operands of another dtype are cast first."""
    mm = _MM[(transpose_a, transpose_b)]
    if upcast_matmul(compute_dtype, device_target):
        return mm(a.astype(ms.float32), b.astype(ms.float32)).astype(compute_dtype)
    return mm(a.astype(compute_dtype), b.astype(compute_dtype))


__all__ = ["tile_ranges", "upcast_matmul", "matmul"]
