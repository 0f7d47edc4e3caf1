"""Bytes each rank sends per attention layer, per CP algorithm: what *our* engine moves, exchange by exchange.

Counted as ``CommStats.logical_bytes`` counts them (``parallel/comm.py``): a ring shift of x sends nbytes(x); an
all-to-all over n ranks sends nbytes(x)(n-1)/n; the AllGather-based Ulysses exchange (``enable_alltoall:
False``) sends nbytes(x)(n-1).  Per rank and per micro-batch of b sequences of S tokens, with CP = U x R,
Nt query and Kt kv heads on this model-parallel rank, head dim D, e bytes per element:

* ring (``attention/ring.py``): K and V travel stacked, kv = 2 b Kt (S/R) D e bytes.
  forward R-1 shifts of kv; backward R-1 shifts of kv again plus R shifts of the float32 dK/dV buffer
  (dkv = 2 b Kt (S/R) D 4): 2(R-1) kv + R dkv.
* Ulysses (``attention/ulysses.py``): q, k, v go sequence -> heads, the output heads -> sequence, and each
  exchange runs again (reversed) in backward.  kv heads fewer than U are first repeated to U (``kv_repeats``).
  4 exchanges x 2 directions of q-sized (b (S/CP) Nt D e) and kv-sized (b (S/CP) Kr D e) tensors.
* hybrid: the Ulysses exchanges in the Ulysses group, then the ring over R with Kr/U kv heads per rank.

Forward only, in elements per rank, with h = Nt D and r = Nt / Kt (no kv repeat, AlltoAll), this is the
textbook form: Ulysses (U-1)/U^2 S h (2 + 2/r); ring 2 (R-1)/R S h / r.
"""
from dataclasses import dataclass
from typing import Dict

ALGOS = ("colossalai_cp", "ulysses_cp", "hybrid_cp")


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

    @property
    def ring(self) -> int:
        return self.cp // self.ulysses

    @property
    def kv_heads_exchanged(self) -> int:
        """kv heads entering the Ulysses exchange: repeated up to U when fewer (``ulysses.kv_repeats``)."""
        u, k = self.ulysses, self.kv_heads
        return k * (u // k) if k < u else k


def ulysses_degree_for(algo: str, cp: int, ulysses_degree_in_cp: int) -> int:
    """The Ulysses part of CP for an algorithm (``LongSeqConfig.ulysses_degree``)."""
    if cp == 1 or algo == "colossalai_cp":
        return 1
    return cp if algo == "ulysses_cp" else ulysses_degree_in_cp


def attention_bytes(call: AttentionCall, direction: str = "both") -> Dict[str, int]:
    """Logical bytes this rank sends for one attention layer, by exchange kind.

    Args:
        call: the layer's shapes and degrees.
        direction: "forward", "backward" or "both".

    Returns:
        {"ring_shift": .., "all_to_all": .., "all_gather": ..} (kinds with 0 bytes left out).
    """
    if direction not in ("forward", "backward", "both"):
        raise ValueError(f"direction = {direction!r}: use forward, backward or both")
    out: Dict[str, int] = {}
    passes = 2 if direction == "both" else 1
    b, d, e, u, r = call.batch, call.head_dim, call.itemsize, call.ulysses, call.ring
    s_loc = call.seq_len // call.cp
    if u > 1:
        q_bytes = b * s_loc * call.heads * d * e                        # q, and the output (same size)
        kv_bytes = b * s_loc * call.kv_heads_exchanged * d * e          # k, and v
        per_tensor = (lambda n: n * (u - 1) // u) if call.use_alltoall else (lambda n: n * (u - 1))
        kind = "all_to_all" if call.use_alltoall else "all_gather"
        out[kind] = passes * (2 * per_tensor(q_bytes) + 2 * per_tensor(kv_bytes))
    if r > 1:
        kv_heads = call.kv_heads_exchanged // u if u > 1 else call.kv_heads
        s_ring = call.seq_len // r
        kv = 2 * b * kv_heads * s_ring * d * e                          # (2, B, K, S/R, D), input dtype
        dkv = 2 * b * kv_heads * s_ring * d * 4                         # float32 dK/dV buffer
        forward, backward = (r - 1) * kv, (r - 1) * kv + r * dkv
        out["ring_shift"] = {"forward": forward, "backward": backward, "both": forward + backward}[direction]
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
