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
import functools
from dataclasses import dataclass
from typing import List, Optional, Tuple

import numpy as np

SKIP, FULL, PARTIAL = "skip", "full", "partial"


def tile_bounds(positions: np.ndarray, block_size: Optional[int]) -> List[Tuple[int, int]]:
    """[start, end) index ranges of at most ``block_size`` tokens with consecutive positions (None: each run of
    consecutive positions whole, a kernel's ``block_size`` of None)."""
    block_size = block_size or max(1, len(positions))
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

    def __post_init__(self):
        object.__setattr__(self, "_memo", {})     # host plans derived from this mask (frozen: set once here)

    def cached(self, key, build):
        """``build()`` once per ``key`` for this mask object: the tile plan and the kernels' call plans.

        A mask is immutable, so what is derived from it is too; the step's masks (``AttentionPlan``) are shared
        by every layer and by backward, so each plan is computed once per step.
        """
        memo = self._memo
        if key not in memo:
            memo[key] = build()
        return memo[key]

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

    def plan(self, block_size: Optional[int]):
        """For each query tile: (qs, qe, [(ks, ke, kind), ...]) with SKIP tiles left out (computed once per
        block size, ``cached``; None: whole runs of consecutive positions, ``tile_bounds``)."""
        return self.cached(("tiles", block_size), lambda: self._tile_plan(block_size))

    def _tile_plan(self, block_size: int):
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


# ----------------------------------------------------------------------------------------------------------------
# FlashAttentionScore masks (model.model_config.use_attn_mask_compression) and the dense mask MindFormers builds.
# Convention of both (MindSpore's FlashAttentionScore): uint8, 1 = masked (discarded), 0 = kept.

SPARSE_DEFAULT = 0          # no mask: every key kept; or a full (Sq, Sk) / (B, 1, Sq, Sk) mask
SPARSE_ALL_MASK = 1         # a full mask, pre/next tokens ignored
SPARSE_LEFT_UP_CAUSAL = 2   # keep key j for query i when j <= i; needs the compressed 2048 x 2048 mask
SPARSE_RIGHT_DOWN_CAUSAL = 3  # keep j <= i + (Sk - Sq) (queries are a suffix of keys); compressed mask
COMPRESSED_MASK_SIZE = 2048
MAX_TOKENS = 2147483647     # FlashAttentionScore's "no limit" for pre_tokens / next_tokens


@functools.lru_cache(maxsize=1)
def compressed_causal_mask() -> np.ndarray:
    """The (2048, 2048) uint8 upper triangle (1 above the diagonal = masked) of sparse_mode 2 and 3.

    Its size does not depend on the sequence length: FlashAttentionScore derives every causal tile from it.
    Built once (4 MiB) and read-only.
    """
    mask = np.triu(np.ones((COMPRESSED_MASK_SIZE, COMPRESSED_MASK_SIZE), dtype=np.uint8), k=1)
    mask.flags.writeable = False
    return mask


def dense_attention_mask(batch: int, seq_len: int, segment_ids: Optional[np.ndarray] = None,
                         pad_mask: Optional[np.ndarray] = None, causal: bool = True) -> np.ndarray:
    """The (B, 1, S, S) uint8 mask MindFormers builds when use_attn_mask_compression is False (1 = masked).

    MindFormers: ``1 - input_mask[:, None, :] * tril(ones(S, S))`` expanded to (B, 1, S, S).  B * S^2 bytes:
    the memory that compression removes (filled in row chunks, so no second S x S temporary).
    ``segment_ids`` (S,) or (B, S) adds the packed-document block diagonal; ``pad_mask`` (B, S), 1 for real
    tokens, masks pad keys as MindFormers does.
    """
    mask = np.empty((batch, 1, seq_len, seq_len), dtype=np.uint8)              # (B, 1, S, S)
    cols = np.arange(seq_len)
    docs = None if segment_ids is None else np.asarray(segment_ids)
    for b in range(batch):
        doc = None if docs is None else (docs[b] if docs.ndim == 2 else docs)
        for r0 in range(0, seq_len, COMPRESSED_MASK_SIZE):
            rows = cols[r0:r0 + COMPRESSED_MASK_SIZE, None]                     # (rows, 1)
            keep = cols[None, :] <= rows if causal else np.ones((len(rows), seq_len), dtype=bool)
            if doc is not None:
                keep &= doc[None, :] == doc[rows]
            if pad_mask is not None:
                keep &= np.asarray(pad_mask[b], dtype=bool)[None, :]
            mask[b, 0, r0:r0 + len(rows)] = ~keep
    return mask


def _consecutive(pos: np.ndarray) -> bool:
    return len(pos) > 0 and int(pos[-1]) - int(pos[0]) + 1 == len(pos) and bool(np.all(np.diff(pos) == 1))


def same_sample_mask(a: np.ndarray, b: np.ndarray, rows: int = COMPRESSED_MASK_SIZE) -> bool:
    """a == b for two (.., S, S) masks of one sample, compared in row chunks (no S x S temporary)."""
    a, b = a.reshape(a.shape[-2:]), b.reshape(b.shape[-2:])
    return a.shape == b.shape and all(np.array_equal(a[r:r + rows], b[r:r + rows]) for r in range(0, len(a), rows))


@dataclass(frozen=True)
class DenseMask(AttentionMask):
    """An ``AttentionMask`` whose visibility is read from a dense uint8 mask (1 = masked) at global positions.

    This is the use_attn_mask_compression = False path: the S x S array exists and every tile is sliced out
    of it.  ``grid`` is (S, S), or (B, 1, S, S) whose B samples are one mask: one kernel call serves samples
    with one mask (``context_parallel_attention`` splits a per-sample (B, 1, S, S) mask by sample).

    Raises:
        ValueError: ``grid`` is missing, of another shape, or holds samples with different masks.
    """

    grid: Optional[np.ndarray] = None

    def __post_init__(self):
        super().__post_init__()
        grid = self.grid
        if grid is None or not (grid.ndim == 2 or (grid.ndim == 4 and grid.shape[1] == 1)):
            raise ValueError(f"DenseMask grid shape {None if grid is None else grid.shape}: expected (S, S) or "
                             "(B, 1, S, S). Fix: pass the uint8 mask of the whole sequence (1 = masked).")
        if grid.ndim == 4 and any(not same_sample_mask(grid[0], grid[b]) for b in range(1, grid.shape[0])):
            raise ValueError(f"DenseMask grid {grid.shape}: its samples have different masks and one kernel call "
                             "would use sample 0's for all. Fix: split the batch by mask (context_parallel_attention "
                             "does) and pass each group its (S, S) mask.")

    def _grid(self) -> np.ndarray:
        return self.grid[0, 0] if self.grid.ndim == 4 else self.grid

    def allowed(self, qs: int, qe: int, ks: int, ke: int) -> np.ndarray:
        """Visible where the grid says 0 AND the causal / document rules of ``AttentionMask`` allow it."""
        q, k = self.q_pos[qs:qe], self.k_pos[ks:ke]
        if _consecutive(q) and _consecutive(k):                                   # a tile: slice a view
            ok = self._grid()[q[0]:q[-1] + 1, k[0]:k[-1] + 1] == 0                # (qe-qs, ke-ks)
        else:
            ok = self._grid()[np.ix_(q, k)] == 0
        if self.causal or self.has_docs:
            ok &= AttentionMask.allowed(self, qs, qe, ks, ke)
        return ok

    def classify(self, qs: int, qe: int, ks: int, ke: int) -> str:
        ok = self.allowed(qs, qe, ks, ke)
        return SKIP if not ok.any() else (FULL if ok.all() else PARTIAL)
