"""hybrid_cp: Ulysses inside, ring across.  CP = U x R, Ulysses ranks contiguous (see ``parallel/mesh.py``).

    q (B, S/CP, N, D) --Ulysses all-to-all--> (B, S/R, n_u, D)   [this ring rank's part, its n_u heads]
                      --ring attention over the R ring ranks (zigzag parts, per-step masks)-->
                      --Ulysses all-to-all back--> (B, S/CP, N, D)

Any head counts (``head_split.py``): n_u is ceil(N/U) or floor(N/U), and only the kv heads those read enter the
ring.  The ranks of one ring share a Ulysses index, hence the same heads and the same ring calls.  Under model
parallelism N and K are the heads of one mp rank, so the head split is over mp x U.

The all-to-all moves the most bytes, so it stays inside the Ulysses group (neighbouring ranks, in practice one
node); only K/V blocks cross the ring.  This file only composes the two: ``ulysses.py`` and ``ring.py``.
"""
from mf_longseq.attention.ring import RingAttention
from mf_longseq.attention.ulysses import ulysses_attention


def hybrid_attention(q, k, v, *, ulysses_group, ring_group, kernel, masks, scale, use_alltoall: bool = True,
                     token_major: bool = False):
    """Args: q (B, S_loc, N, D), k/v (B, S_loc, K, D); ``masks[j]``: this ring rank's part vs ring rank j's part;
    ``token_major``: ``kernel`` takes (B, S, N, D) (see ``ulysses_attention``).

    Returns (B, S_loc, N, D).
    """
    ring = RingAttention(ring_group, kernel, masks, scale)
    return ulysses_attention(q, k, v, ulysses_group, ring, use_alltoall, token_major=token_major)
