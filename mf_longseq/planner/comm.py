"""Bytes each rank sends per attention layer, per CP algorithm: what *our* engine moves, exchange by exchange.

Counted as ``CommStats.logical_bytes`` counts them (``parallel/comm.py``): a ring shift of x sends nbytes(x); an
all-to-all over n ranks sends nbytes(x)(n-1)/n; the AllGather-based Ulysses exchange (``enable_alltoall:
False``) sends nbytes(x)(n-1).  Per rank and per micro-batch of b sequences of S tokens, with CP = U x R,
Nt query and Kt kv heads on this model-parallel rank, head dim D, e bytes per element:

* ring (``attention/ring.py``): K and V travel stacked, kv = 2 b Kt (S/R) D e bytes.
  forward R-1 shifts of kv; backward R-1 shifts of kv again plus R shifts of the float32 dK/dV buffer
  (dkv = 2 b Kt (S/R) D 4): 2(R-1) kv + R dkv.
* Ulysses (``attention/ulysses.py``): q, k, v go sequence -> heads in one packed exchange, the output heads ->
  sequence, and each runs again (reversed) in backward.  Ulysses rank j holds n_j query and k_j kv heads
  (``attention/head_split.py``: n_j = ceil or floor of Nt/U; k_j the kv heads they read, a kv head straddling
  two ranks sent to both), t_j = n_j + 2 k_j, T = sum of t_j, s = b S/CP, in units of D e bytes:
  AlltoAll    forward s (T - t_j) + (U-1) s n_j;       backward s (Nt - n_j) + (U-1) s t_j
  AllGather   forward (U-1) s (T + U max n);           backward (U-1) s (Nt + U max t)
  (the AllGather-based exchange pads every rank's parts to the longest).  Ranks send different amounts when
  the split is uneven: ``attention_bytes`` gives one Ulysses index, by default the busiest.
* hybrid: the Ulysses exchanges in the Ulysses group, then the ring over R with k_j kv heads per rank.

Forward only, in elements per rank, with h = Nt D and r = Nt / Kt (no kv repeat, AlltoAll), this is the
textbook form: Ulysses (U-1)/U^2 S h (2 + 2/r); ring 2 (R-1)/R S h / r.
"""
from dataclasses import dataclass
from typing import Dict, Optional

from mf_longseq.attention.head_split import HeadSplit
from mf_longseq.parallel.algorithms import ALGORITHMS, algo_of, resolve


@dataclass(frozen=True)
class AttentionCall:
    """One attention layer on one rank.

    Attributes:
        batch: sequences in the micro-batch (b).
        seq_len: tokens of a whole sequence (S).
        heads, kv_heads: query and kv heads on this model-parallel rank (Nt, Kt).
        head_dim: D.
        itemsize: bytes per element of q, k, v (2 for bf16/fp16, 4 for fp32).
        cp: context-parallel degree; ulysses: its Ulysses part (U); ring degree R = cp / ulysses.
        use_alltoall: Ulysses exchange by AlltoAll (True) or the AllGather-based one (False).
        algo: the CP algorithm (a name of ``ALGORITHMS``, whose ``bytes_sent`` counts the call); None: the
            MindFormers algorithm the degrees imply (``algo_of``).
    """

    batch: int
    seq_len: int
    heads: int
    kv_heads: int
    head_dim: int
    itemsize: int
    cp: int
    ulysses: int = 1
    use_alltoall: bool = True
    algo: Optional[str] = None

    @property
    def algorithm(self) -> str:
        """The algorithm's name (``algo``, or the one the degrees imply)."""
        return self.algo or algo_of(self.cp, self.ulysses)

    @property
    def ring(self) -> int:
        return self.cp // self.ulysses

    @property
    def split(self) -> HeadSplit:
        """How the Ulysses ranks share this rank's heads."""
        return HeadSplit(self.heads, self.kv_heads, self.ulysses)

    @property
    def kv_heads_exchanged(self) -> int:
        """kv heads the Ulysses ranks receive in all (K, plus the copies of kv heads two ranks need)."""
        return self.split.kv_heads_received if self.ulysses > 1 else self.kv_heads


def replicated_kv_bytes(call: AttentionCall) -> int:
    """Forward bytes the whole Ulysses group sends for kv-head copies beyond one per head (k and v): each copy
    brings s = b S/CP rows from each of the U-1 other ranks.  Included in ``attention_bytes``; 0 when no kv head
    is shared by two ranks."""
    if call.ulysses == 1:
        return 0
    s = call.batch * call.seq_len // call.cp
    return call.split.replicated_kv_heads * 2 * (call.ulysses - 1) * s * call.head_dim * call.itemsize


def _ulysses_units(call: AttentionCall, j: int) -> Dict[str, int]:
    """Ulysses rank j's forward and backward bytes in units of D e (module docstring)."""
    split, u, s = call.split, call.ulysses, call.batch * call.seq_len // call.cp
    t = [split.q_count(i) + 2 * split.kv_count(i) for i in range(u)]
    n_j = split.q_count(j)
    if call.use_alltoall:
        return {"forward": s * (sum(t) - t[j]) + (u - 1) * s * n_j,
                "backward": s * (call.heads - n_j) + (u - 1) * s * t[j]}
    return {"forward": (u - 1) * s * (sum(t) + u * split.busiest), "backward": (u - 1) * s * (call.heads + u * max(t))}


def _ring_bytes(call: AttentionCall, kv_heads: int) -> Dict[str, int]:
    r, b, d, e = call.ring, call.batch, call.head_dim, call.itemsize
    kv = 2 * b * kv_heads * (call.seq_len // r) * d * e                # (2, B, K, S/R, D), input dtype
    dkv = 2 * b * kv_heads * (call.seq_len // r) * d * 4               # float32 dK/dV buffer
    return {"forward": (r - 1) * kv, "backward": (r - 1) * kv + r * dkv}


def attention_bytes(call: AttentionCall, direction: str = "both",
                    ulysses_index: Optional[int] = None) -> Dict[str, int]:
    """Logical bytes a rank sends for one attention layer, by exchange kind.

    Args:
        call: the layer's shapes and degrees.
        direction: "forward", "backward" or "both".
        ulysses_index: the rank's index in its Ulysses group; None: the index that sends the most.

    Returns:
        {"ring_shift": .., "all_to_all": .., "all_gather": ..} (kinds with 0 bytes left out).
    """
    if direction not in ("forward", "backward", "both"):
        raise ValueError(f"direction = {direction!r}: use forward, backward or both")
    if ulysses_index is None:
        return max((attention_bytes(call, direction, j) for j in range(call.ulysses)), key=lambda c: sum(c.values()))
    pick = (lambda x: x["forward"] + x["backward"]) if direction == "both" else (lambda x: x[direction])
    return {kind: pick(n) for kind, n in resolve(ALGORITHMS[call.algorithm].bytes_sent)(call, ulysses_index).items()}


def ulysses_and_ring_bytes(call: AttentionCall, ulysses_index: int) -> Dict[str, Dict[str, int]]:
    """``bytes_sent`` of colossalai_cp, ulysses_cp and hybrid_cp (``ALGORITHMS``): the Ulysses exchange when U > 1,
    the ring when R > 1, {kind: {"forward": bytes, "backward": bytes}} (module docstring)."""
    out: Dict[str, Dict[str, int]] = {}
    u, unit = call.ulysses, call.head_dim * call.itemsize
    if u > 1:
        units = _ulysses_units(call, ulysses_index)
        out["all_to_all" if call.use_alltoall else "all_gather"] = {k: n * unit for k, n in units.items()}
    if call.ring > 1:
        out["ring_shift"] = _ring_bytes(call, call.split.kv_count(ulysses_index) if u > 1 else call.kv_heads)
    return out


def gradient_allreduce_bytes(params_per_rank: int, grad_itemsize: int, dp_cp: int) -> int:
    """Gradient all-reduce over the dp x cp group (weights replicated there): 2(n-1)/n of the gradients."""
    if dp_cp == 1:
        return 0
    return params_per_rank * grad_itemsize * 2 * (dp_cp - 1) // dp_cp


def tensor_parallel_bytes(tokens: int, hidden: int, itemsize: int, mp: int) -> int:
    """Megatron tensor parallelism per layer, forward + backward: 4 all-reduces of (tokens, hidden)."""
    if mp == 1:
        return 0
    return 4 * tokens * hidden * itemsize * 2 * (mp - 1) // mp
