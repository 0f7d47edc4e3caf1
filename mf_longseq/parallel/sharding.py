"""Split a sequence across the CP ranks, merge it back, and say which global token positions each rank holds.

Layouts (ring degree R, Ulysses degree U, CP = R x U, cp_id = ring_id * U + ulysses_id):

* ``contiguous``: ring rank i holds tokens [i*S/R, (i+1)*S/R).
* ``zigzag``: the sequence is cut into 2R equal chunks; ring rank i holds chunks i and 2R-1-i, so every rank
  gets the same amount of causal work.  With R = 1 (pure Ulysses) it is the contiguous layout.

Inside a ring rank's part, the U Ulysses ranks hold consecutive equal pieces.  So after the Ulysses all-to-all
(which concatenates the group's pieces in order) every rank of a Ulysses group sees its ring rank's part.

Positions are host-side NumPy int64 arrays: they decide masks and skipped blocks before any device work.
"""
from typing import Optional

import numpy as np
from mindspore import Tensor, ops

from mf_longseq.parallel.plan import LAYOUTS


def ring_part_positions(seq_len: int, ring_size: int, ring_index: int, layout: str) -> np.ndarray:
    """Global positions of the tokens of one ring rank (before the Ulysses split)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout = {layout!r}: unknown; use one of {', '.join(LAYOUTS)}")
    if layout == "contiguous" or ring_size == 1:
        if seq_len % ring_size:
            raise ValueError(f"seq_len {seq_len} is not divisible by the ring degree {ring_size}")
        part = seq_len // ring_size
        return np.arange(ring_index * part, (ring_index + 1) * part, dtype=np.int64)
    if seq_len % (2 * ring_size):
        raise ValueError(f"seq_len {seq_len}: the zigzag layout needs a multiple of 2 x ring degree = {2 * ring_size}")
    chunk = seq_len // (2 * ring_size)
    first, second = ring_index, 2 * ring_size - 1 - ring_index
    return np.concatenate([np.arange(first * chunk, (first + 1) * chunk),
                           np.arange(second * chunk, (second + 1) * chunk)]).astype(np.int64)


def positions_for(seq_len: int, *, ring_size: int = 1, ring_index: int = 0, ulysses_size: int = 1,
                  ulysses_index: int = 0, layout: str = "zigzag") -> np.ndarray:
    """Global positions of the tokens one CP rank holds, given its ring and Ulysses coordinates."""
    part = ring_part_positions(seq_len, ring_size, ring_index, layout)
    if len(part) % ulysses_size:
        raise ValueError(f"seq_len {seq_len}: a ring part of {len(part)} tokens does not split into "
                         f"{ulysses_size} Ulysses pieces")
    piece = len(part) // ulysses_size
    return part[ulysses_index * piece:(ulysses_index + 1) * piece]


def global_positions(seq_len: int, mesh, layout: str = "zigzag", cp_index: Optional[int] = None) -> np.ndarray:
    """Global positions (for RoPE, masks, labels) of this rank's tokens, or of CP rank ``cp_index``."""
    cp_id = mesh.coords()["cp_id"] if cp_index is None else cp_index
    return positions_for(seq_len, ring_size=mesh.ring, ring_index=cp_id // mesh.ulysses,
                         ulysses_size=mesh.ulysses, ulysses_index=cp_id % mesh.ulysses, layout=layout)


def cp_order(seq_len: int, mesh, layout: str = "zigzag") -> np.ndarray:
    """Positions of the concatenation of all CP ranks' shards (in CP-rank order)."""
    return np.concatenate([global_positions(seq_len, mesh, layout, cp_index=i) for i in range(mesh.cp)])


def shard_sequence(x, mesh, layout: str = "zigzag", seq_dim: int = 1):
    """This rank's part of a full sequence ``x`` (Tensor or ndarray): (.., S, ..) -> (.., S/CP, ..)."""
    positions = global_positions(x.shape[seq_dim], mesh, layout)
    if isinstance(x, np.ndarray):
        return np.take(x, positions, axis=seq_dim)
    return ops.gather(x, Tensor(positions), seq_dim)


def gather_sequence(x_local, mesh, layout: str = "zigzag", seq_dim: int = 1):
    """Inverse of ``shard_sequence`` on every rank: all-gather the CP shards and put tokens back in order.

    Differentiable (backward: reduce-scatter), so it can sit inside a loss.
    """
    from mf_longseq.parallel.comm import AllGather
    if mesh.cp == 1:
        return x_local
    gathered = AllGather(mesh.group("cp"), seq_dim)(x_local)                      # (.., S, ..) in CP-rank order
    order = cp_order(x_local.shape[seq_dim] * mesh.cp, mesh, layout)
    return ops.gather(gathered, Tensor(np.argsort(order)), seq_dim)
