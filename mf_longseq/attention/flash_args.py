"""FlashAttentionScore arguments for one AttentionMask: which calls, with which arguments (pure host code).

The device side (``FlashKernel``) is in ``flash.py``; everything here runs and is tested on CPU.

Legend: B batch, N query heads, K kv heads, S_q / S_k the kernel call's query / key tokens, D head dim,
T tokens of a TND call (batch folded in), 8 the trailing dim of FlashAttentionScore's softmax statistics.

The engine gives the kernel an ``AttentionMask`` (global positions and document ids of its queries and keys).
``plan_flash_calls`` turns it into a few rectangles (rows x cols of the call), each selecting its (query, key)
pairs through FlashAttentionScore's own arguments, never through an S x S array:

    engine case                                  FlashAttentionScore call(s)
    diagonal ring step, Ulysses local call,      all rows x all cols, BNSD, sparse_mode 2 + compressed mask
      zigzag diagonal (q_pos == k_pos)
    earlier ring step (every key before)         all rows x all cols, sparse_mode 0, no mask
    zigzag step from an earlier rank             all rows x the first key chunk, sparse_mode 0
    zigzag step from a later rank                the second query chunk x all cols, sparse_mode 0
    later ring step                              no call (out 0, lse -inf)
    queries a suffix of the keys                 sparse_mode 3 + compressed mask
    packed documents (EOD)                       TND, actual_seq_qlen/kvlen = one segment per document piece,
                                                 sparse_mode 3 + compressed mask; plus a sparse_mode 0 rectangle
                                                 for each document that crosses a chunk boundary
    dense mask (use_attn_mask_compression off)   rows that see a key x all cols, sparse_mode 0, the (S_q, S_k)
                                                 slice of the dense mask (MindFormers' uncompressed path)

Every row of every call sees at least one key (rows that see none are left out: out 0, lse -inf), so the
kernel never meets a fully masked row.  Partial results of the calls merge by log-sum-exp (``kernel.merge``).

Statistics: lse = softmax_max + log(softmax_sum).  Backward runs FlashAttentionScoreGrad per call with
softmax_max = the *final* lse and softmax_sum = 1 (so its recomputed p = exp(s - lse) is the final
probability), and attention_in chosen so that its rowsum(dy * attention_in) equals the engine's
delta = rowsum(dout * out) - dlse (see ``_attention_in``).

Argument facts (MindSpore 2.9, ``mindspore.ops.operations.nn_ops.FlashAttentionScore`` docstring): attn_mask
uint8, 1 = discard; sparse_mode 2 keeps j <= i, 3 keeps j <= i + S_k - S_q, both with the 2048 x 2048
compressed mask; when attn_mask is None the mask, sparse_mode and tokens are ignored (full attention); TND needs
actual_seq_qlen/kvlen (cumulative), sparse_mode 2 or 3, next_tokens 0, pre_tokens >= max segment length, no
empty key segment, S_q <= S_k per segment in mode 3, at most 1024 segments.  Outputs: (softmax_max,
softmax_sum, softmax_out, attention_out); FlashAttentionScoreGrad returns (dq, dk, dv, dpse).
"""
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np

from mf_longseq.attention.mask import (MAX_TOKENS, SPARSE_ALL_MASK, SPARSE_DEFAULT, SPARSE_LEFT_UP_CAUSAL,
                                       SPARSE_RIGHT_DOWN_CAUSAL, AttentionMask, DenseMask,
                                       compressed_causal_mask)

MAX_TND_SEGMENTS = 1024     # FlashAttentionScore: "size of list is batch ... less than or equal to 1024"
NO_MASK, COMPRESSED, DENSE = "none", "compressed", "dense"


@dataclass(frozen=True)
class FlashCall:
    """One FlashAttentionScore call of a kernel call, independent of batch and heads.

    Attributes:
        q_index, k_index: int64 indices of the call's queries / keys into the kernel call's S_q / S_k.
        input_layout: FlashAttentionScore's input_layout, "BNSD" or "TND".
        sparse_mode: 0, 2 or 3 (mask.SPARSE_*).
        mask: "none", "compressed" (2048 x 2048) or "dense" (``dense_mask``).
        dense_mask: (len(q_index), len(k_index)) uint8 slice, 1 = masked (mask == "dense" only).
        seq_qlen, seq_kvlen: TND segment lengths of one sample (not cumulative).
    """

    q_index: np.ndarray
    k_index: np.ndarray
    input_layout: str = "BNSD"
    sparse_mode: int = SPARSE_DEFAULT
    mask: str = NO_MASK
    dense_mask: Optional[np.ndarray] = field(default=None, repr=False)
    seq_qlen: Tuple[int, ...] = ()
    seq_kvlen: Tuple[int, ...] = ()


@dataclass(frozen=True)
class FlashArgs:
    """Everything one FlashAttentionScore (and its Grad) call takes besides q, k, v (and dy, statistics).

    ``init`` holds the primitive's __init__ keywords (the same for FlashAttentionScoreGrad); attn_mask is a
    host uint8 array or None; actual_seq_qlen / kvlen are cumulative over the folded batch (TND) or None.
    """

    init: Dict[str, object]
    attn_mask: Optional[np.ndarray]
    actual_seq_qlen: Optional[Tuple[int, ...]]
    actual_seq_kvlen: Optional[Tuple[int, ...]]


# ------------------------------------------------------------------------------------------------ planning
def _segments(pos: np.ndarray, doc: Optional[np.ndarray]) -> List[Tuple[int, int]]:
    """[start, end) index ranges with consecutive positions (and one document id)."""
    brk = np.diff(pos) != 1
    if doc is not None:
        brk |= np.diff(doc) != 0
    edges = np.concatenate([[0], np.flatnonzero(brk) + 1, [len(pos)]])
    return [(int(s), int(e)) for s, e in zip(edges[:-1], edges[1:]) if e > s]


def _pair_blocks(mask: AttentionMask, qseg, kseg) -> List[Tuple[int, int, int, int, str]]:
    """Rectangles (qs, qe, ks, ke, kind) of one query segment x one key segment; kind "full" or "causal".

    "causal" blocks are end-aligned: the last query and the last key have the same position, so the rule
    k_pos <= q_pos is sparse_mode 3 (2 when the block is square).
    """
    (qs, qe), (ks, ke) = qseg, kseg
    if not mask.causal:
        return [(qs, qe, ks, ke, "full")]
    a, m = int(mask.q_pos[qs]), qe - qs                  # query positions [a, a + m)
    b, n = int(mask.k_pos[ks]), ke - ks                  # key positions [b, b + n)
    first_q = max(a, b)                                  # earlier queries see no key of this segment
    end_k = min(b + n, a + m)                            # later keys are seen by no query
    if first_q >= a + m or end_k <= b:
        return []
    q0, k1 = qs + (first_q - a), ks + (end_k - b)
    if end_k - 1 < first_q or (end_k - 1 == first_q and qe - q0 > 1):   # every query sees every key
        return [(q0, qe, ks, k1, "full")]
    split = qs + (end_k - a)                             # queries from position end_k on see every key
    blocks = [(q0, split, ks, k1, "causal")]
    if split < qe:
        blocks.append((split, qe, ks, k1, "full"))
    return blocks


def _merge_full(blocks):
    """Merge full rectangles that share their key range and touch along the queries, then the converse."""
    for axis in (0, 1):
        key = (lambda r: (r[2], r[3], r[0])) if axis == 0 else (lambda r: (r[0], r[1], r[2]))
        merged = []
        for blk in sorted(blocks, key=key):
            if merged:
                last = merged[-1]
                if axis == 0 and last[2:4] == blk[2:4] and last[1] == blk[0]:
                    merged[-1] = (last[0], blk[1], last[2], last[3])
                    continue
                if axis == 1 and last[0:2] == blk[0:2] and last[3] == blk[2]:
                    merged[-1] = (last[0], last[1], last[2], blk[3])
                    continue
            merged.append(blk)
        blocks = merged
    return blocks


def _blocks(mask: AttentionMask):
    """Disjoint rectangles covering exactly the visible pairs of ``mask``: (causal list, full list)."""
    qsegs = _segments(mask.q_pos, mask.q_doc)
    ksegs = _segments(mask.k_pos, mask.k_doc)
    by_doc: Dict[int, list] = {}
    for seg in ksegs:
        by_doc.setdefault(int(mask.k_doc[seg[0]]) if mask.has_docs else 0, []).append(seg)
    causal, full = [], []
    for qseg in qsegs:
        for kseg in by_doc.get(int(mask.q_doc[qseg[0]]) if mask.has_docs else 0, []):
            for qs, qe, ks, ke, kind in _pair_blocks(mask, qseg, kseg):
                (causal if kind == "causal" else full).append((qs, qe, ks, ke))
    return causal, _merge_full(full)


def _rng(start: int, end: int) -> np.ndarray:
    return np.arange(start, end, dtype=np.int64)


def _causal_call(qs, qe, ks, ke) -> FlashCall:
    mode = SPARSE_LEFT_UP_CAUSAL if qe - qs == ke - ks else SPARSE_RIGHT_DOWN_CAUSAL
    return FlashCall(_rng(qs, qe), _rng(ks, ke), "BNSD", mode, COMPRESSED)


def _tnd_calls(causal, max_segments: int) -> List[FlashCall]:
    """Causal blocks batched as TND segments (sparse_mode 3), at most ``max_segments`` per call."""
    calls = []
    causal = sorted(causal)
    for start in range(0, len(causal), max_segments):
        part = causal[start:start + max_segments]
        k_index = np.concatenate([_rng(ks, ke) for _, _, ks, ke in part])
        if len(np.unique(k_index)) != len(k_index):          # keys shared by two segments: one call each
            calls.extend(_causal_call(*blk) for blk in part)
            continue
        calls.append(FlashCall(np.concatenate([_rng(qs, qe) for qs, qe, _, _ in part]), k_index, "TND",
                               SPARSE_RIGHT_DOWN_CAUSAL, COMPRESSED,
                               seq_qlen=tuple(qe - qs for qs, qe, _, _ in part),
                               seq_kvlen=tuple(ke - ks for _, _, ks, ke in part)))
    return calls


def _dense_calls(mask: DenseMask) -> List[FlashCall]:
    """Compression off: one call over the rows that see a key, with the dense (S_q, S_k) slice as attn_mask."""
    allowed = mask.allowed(0, len(mask.q_pos), 0, len(mask.k_pos))             # (S_q, S_k) from the S x S grid
    rows = np.flatnonzero(allowed.any(axis=1)).astype(np.int64)
    if len(rows) == 0:
        return []
    return [FlashCall(rows, _rng(0, len(mask.k_pos)), "BNSD", SPARSE_DEFAULT, DENSE,
                      dense_mask=(~allowed[rows]).astype(np.uint8))]


def plan_flash_calls(mask: AttentionMask, max_tnd_segments: int = MAX_TND_SEGMENTS) -> List[FlashCall]:
    """The FlashAttentionScore calls that together select exactly ``mask``'s visible (query, key) pairs.

    Pure host arithmetic on positions (O(S) apart from the dense-mask path).  The calls' rectangles are
    disjoint, and every row of every call sees at least one key.
    """
    s_q, s_k = len(mask.q_pos), len(mask.k_pos)
    if isinstance(mask, DenseMask):
        return _dense_calls(mask)
    increasing = s_q > 0 and bool(np.all(np.diff(mask.q_pos) > 0))
    if (mask.causal and not mask.has_docs and increasing and s_q == s_k
            and np.array_equal(mask.q_pos, mask.k_pos)):
        return [FlashCall(_rng(0, s_q), _rng(0, s_k), "BNSD", SPARSE_LEFT_UP_CAUSAL, COMPRESSED)]
    causal, full = _blocks(mask)
    calls = [FlashCall(_rng(qs, qe), _rng(ks, ke)) for qs, qe, ks, ke in full]
    if mask.has_docs:
        calls += _tnd_calls(causal, max_tnd_segments)
    else:
        calls += [_causal_call(*blk) for blk in causal]
    return calls


# ------------------------------------------------------------------------------------------------ arguments
def flash_arguments(call: FlashCall, *, batch: int, head_num: int, scale: float,
                    keep_prob: float = 1.0) -> FlashArgs:
    """The FlashAttentionScore (and FlashAttentionScoreGrad) arguments of one planned call.

    Args:
        call: from ``plan_flash_calls``.
        batch: B of the call's tensors (TND folds it into T: segments repeat per sample).
        head_num: N, query heads of this rank's call.
        scale: softmax scale (scale_value).
        keep_prob: attention dropout keep probability; only 1.0 (no dropout) is supported by FlashKernel.

    Raises:
        ValueError: keep_prob outside (0, 1], TND with more than 1024 segments.
    """
    if not 0.0 < keep_prob <= 1.0:
        raise ValueError(f"keep_prob = {keep_prob}: must be in (0, 1]. Fix: set "
                         f"model.model_config.attention_dropout in [0, 1).")
    pre, nxt = MAX_TOKENS, MAX_TOKENS
    if call.sparse_mode in (SPARSE_LEFT_UP_CAUSAL, SPARSE_RIGHT_DOWN_CAUSAL):
        nxt = 0                                           # causal: nothing after the diagonal (ignored in 2/3)
    init = dict(head_num=head_num, keep_prob=float(keep_prob), scale_value=float(scale), pre_tokens=pre,
                next_tokens=nxt, inner_precise=0, input_layout=call.input_layout, sparse_mode=call.sparse_mode)
    attn_mask = {NO_MASK: None, COMPRESSED: compressed_causal_mask(), DENSE: call.dense_mask}[call.mask]
    if call.input_layout != "TND":
        return FlashArgs(init, attn_mask, None, None)
    if batch * len(call.seq_qlen) > MAX_TND_SEGMENTS:
        raise ValueError(f"TND call with {batch} samples x {len(call.seq_qlen)} document segments > "
                         f"{MAX_TND_SEGMENTS}. Fix: plan with max_tnd_segments <= {MAX_TND_SEGMENTS // batch}.")
    qlen = np.cumsum(np.tile(call.seq_qlen, batch)).astype(np.int64)
    kvlen = np.cumsum(np.tile(call.seq_kvlen, batch)).astype(np.int64)
    return FlashArgs(init, attn_mask, tuple(int(x) for x in qlen), tuple(int(x) for x in kvlen))


# ------------------------------------------------------------------------------------------------ semantics
def _check_compressed(attn_mask, mode):
    if attn_mask is None:
        return False
    reference = compressed_causal_mask()
    if attn_mask is not reference and (attn_mask.shape != reference.shape
                                       or not np.array_equal(attn_mask, reference)):
        raise ValueError(f"sparse_mode {mode} needs the 2048 x 2048 compressed causal mask")
    return True


def documented_keep(init: Dict[str, object], attn_mask: Optional[np.ndarray], actual_seq_qlen, actual_seq_kvlen,
                    s_q: int, s_k: int) -> np.ndarray:
    """Which (query, key) pairs FlashAttentionScore keeps, evaluated from its *documented* semantics in NumPy.

    For tests: O(s_q * s_k).  ``s_q`` / ``s_k`` are S1 / S2 (BNSD) or T1 / T2 (TND).  Returns bool (s_q, s_k).
    Raises ValueError for argument combinations the documentation forbids.
    """
    mode, pre, nxt = init["sparse_mode"], init["pre_tokens"], init["next_tokens"]
    i, j = np.arange(s_q)[:, None], np.arange(s_k)[None, :]
    if init["input_layout"] == "TND":
        return _tnd_keep(mode, pre, nxt, attn_mask, actual_seq_qlen, actual_seq_kvlen, s_q, s_k)
    if actual_seq_qlen is not None or actual_seq_kvlen is not None:
        raise ValueError("actual_seq_qlen/kvlen are only for the TND layout")
    if attn_mask is None:                                  # "sparse_mode, pre/next tokens do not take effect"
        return np.ones((s_q, s_k), dtype=bool)
    if mode in (SPARSE_DEFAULT, SPARSE_ALL_MASK):
        if attn_mask.shape[-2:] != (s_q, s_k):
            raise ValueError(f"sparse_mode {mode} needs an (S1, S2) = ({s_q}, {s_k}) mask, got {attn_mask.shape}")
        keep = attn_mask.reshape(-1, s_q, s_k)[0] == 0
        if mode == SPARSE_DEFAULT:
            keep = keep & (j >= i - pre) & (j <= i + nxt)
        return keep
    _check_compressed(attn_mask, mode)
    if mode == SPARSE_LEFT_UP_CAUSAL:
        return j <= i
    if mode == SPARSE_RIGHT_DOWN_CAUSAL:
        return j <= i + (s_k - s_q)
    raise ValueError(f"sparse_mode {mode} is not used by mf_longseq")


def _tnd_keep(mode, pre, nxt, attn_mask, qlen, kvlen, t_q, t_k) -> np.ndarray:
    if qlen is None or kvlen is None or len(qlen) != len(kvlen) or len(qlen) > MAX_TND_SEGMENTS:
        raise ValueError("TND needs actual_seq_qlen and actual_seq_kvlen of equal length <= 1024")
    cq, ck = np.concatenate([[0], qlen]), np.concatenate([[0], kvlen])
    if np.any(np.diff(cq) < 0) or np.any(np.diff(ck) < 0) or cq[-1] != t_q or ck[-1] != t_k:
        raise ValueError("actual_seq_qlen/kvlen must be non-decreasing and end at T1 / T2")
    if mode not in (SPARSE_LEFT_UP_CAUSAL, SPARSE_RIGHT_DOWN_CAUSAL) or not _check_compressed(attn_mask, mode):
        raise ValueError("TND needs sparse_mode 2 or 3 with the compressed mask")
    m, n = np.diff(cq), np.diff(ck)
    if nxt != 0 or pre < m.max() or np.any(n == 0) or (mode == SPARSE_RIGHT_DOWN_CAUSAL and np.any(m > n)):
        raise ValueError("TND: next_tokens 0, pre_tokens >= max S1, no empty key segment, S1 <= S2 in mode 3")
    keep = np.zeros((t_q, t_k), dtype=bool)
    for seg in range(len(m)):
        i, j = np.arange(m[seg])[:, None], np.arange(n[seg])[None, :]
        shift = n[seg] - m[seg] if mode == SPARSE_RIGHT_DOWN_CAUSAL else 0
        keep[cq[seg]:cq[seg + 1], ck[seg]:ck[seg + 1]] = j <= i + shift
    return keep


__all__ = ["FlashCall", "FlashArgs", "plan_flash_calls", "flash_arguments", "documented_keep", "MAX_TND_SEGMENTS"]
