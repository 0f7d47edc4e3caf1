"""Which keys each query may see, decided from global token positions (and document ids), tile by tile.

A query at global position p sees a key at position t when

    causal:  t <= p
    packed documents (EOD): additionally doc(t) == doc(p)

``AttentionMask`` holds the positions (and document ids) of the queries and keys of one kernel call, as host
NumPy arrays, and classifies each (query tile, key tile) pair before any device work:

    SKIP     no query sees any key: nothing is computed
    FULL     every query sees every key: no mask is applied
    PARTIAL  a (tile_q x tile_k) boolean mask is built and applied

Tiles never straddle a break in positions (a zigzag chunk boundary), so a tile holds consecutive tokens and the
min/max tests below are exact. Nothing here builds an S x S array except ``dense()``, which is for tests.
"""
from dataclasses import dataclass
from typing import List, Optional, Tuple

import numpy as np

SKIP, FULL, PARTIAL = "skip", "full", "partial"


def tile_bounds(positions: np.ndarray, block_size: int) -> List[Tuple[int, int]]:
    """[start, end) index ranges of at most ``block_size`` tokens with consecutive positions."""
    breaks = np.flatnonzero(np.diff(positions) != 1) + 1
    runs = np.split(np.arange(len(positions)), breaks)
    bounds = []
    for run in runs:
        if len(run) == 0:
            continue
        for start in range(run[0], run[-1] + 1, block_size):
            bounds.append((int(start), int(min(start + block_size, run[-1] + 1))))
    return bounds


@dataclass(frozen=True)
class AttentionMask:
    """Visibility rule of one kernel call.

    Attributes:
        q_pos, k_pos: global positions of the call's queries and keys (int64, host).
        causal: apply ``k_pos <= q_pos``.
        q_doc, k_doc: document id of each query/key (packed sequences), or None for one document.
    """

    q_pos: np.ndarray
    k_pos: np.ndarray
    causal: bool = True
    q_doc: Optional[np.ndarray] = None
    k_doc: Optional[np.ndarray] = None

    @property
    def has_docs(self) -> bool:
        return self.q_doc is not None

    def allowed(self, qs: int, qe: int, ks: int, ke: int) -> np.ndarray:
        """Boolean (qe-qs, ke-ks) visibility of one tile."""
        ok = np.ones((qe - qs, ke - ks), dtype=bool)
        if self.causal:
            ok &= self.k_pos[None, ks:ke] <= self.q_pos[qs:qe, None]
        if self.has_docs:
            ok &= self.k_doc[None, ks:ke] == self.q_doc[qs:qe, None]
        return ok

    def classify(self, qs: int, qe: int, ks: int, ke: int) -> str:
        """SKIP, FULL or PARTIAL for the tile of queries [qs, qe) and keys [ks, ke)."""
        if self.causal:
            q_lo, q_hi = self.q_pos[qs:qe].min(), self.q_pos[qs:qe].max()
            k_lo, k_hi = self.k_pos[ks:ke].min(), self.k_pos[ks:ke].max()
            if k_lo > q_hi:
                return SKIP
            causal_full = k_hi <= q_lo
        else:
            causal_full = True
        if self.has_docs:
            qd, kd = self.q_doc[qs:qe], self.k_doc[ks:ke]
            if kd.max() < qd.min() or kd.min() > qd.max():
                return SKIP
            if not (qd.min() == qd.max() == kd.min() == kd.max()):
                ok = self.allowed(qs, qe, ks, ke)
                return SKIP if not ok.any() else (FULL if ok.all() else PARTIAL)
        return FULL if causal_full else PARTIAL

    def plan(self, block_size: int):
        """For each query tile: (qs, qe, [(ks, ke, kind), ...]) with SKIP tiles left out."""
        q_tiles, k_tiles = tile_bounds(self.q_pos, block_size), tile_bounds(self.k_pos, block_size)
        out = []
        for qs, qe in q_tiles:
            row = [(ks, ke, kind) for ks, ke in k_tiles
                   if (kind := self.classify(qs, qe, ks, ke)) != SKIP]
            out.append((qs, qe, row))
        return out

    def dense(self) -> np.ndarray:
        """The whole (Sq, Sk) visibility matrix. For tests and oracles only: O(S^2)."""
        return self.allowed(0, len(self.q_pos), 0, len(self.k_pos))

    def visible_pairs(self) -> int:
        """Number of (query, key) pairs that are not masked, computed tile by tile (FLOP accounting)."""
        total = 0
        for qs, qe, row in self.plan(2048):
            for ks, ke, kind in row:
                total += (qe - qs) * (ke - ks) if kind == FULL else int(self.allowed(qs, qe, ks, ke).sum())
        return total
