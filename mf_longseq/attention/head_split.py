"""How Ulysses splits the heads of one model-parallel rank over the U ranks of a Ulysses group, for any counts.

Plain index arithmetic (no MindSpore): the engine (``ulysses.py``) and the planner (``planner/comm.py``) both
read it, and unit tests simulate every rank of a group in one process.

Query heads: N heads over U ranks, contiguous, the first N mod U ranks one more::

    rank u holds query heads [start_u, start_u + n_u),  n_u = ceil(N/U) for u < N mod U, else floor(N/U)

kv heads (GQA, G = N / K query heads per kv head; query head h reads kv head h // G): rank u receives exactly
the kv heads its query heads read, the contiguous range [start_u // G, (start_u + n_u - 1) // G].  Two ranks
receive the same kv head only when its G query heads straddle their boundary; nothing is repeated to N.
Examples (N, K, U -> query heads per rank / kv heads per rank)::

    6, 3, 2   -> [3, 3] / [0..1], [1..2]        kv head 1 goes to both ranks
    10, 2, 4  -> [3, 3, 2, 2] / [0], [0..1], [1], [1]
    8, 2, 4   -> [2, 2, 2, 2] / [0], [0], [1], [1]  (K < U: each kv head to U / K ranks)

On a rank the query heads of one kv head need not be G (the first and last group may be cut), so the local
heads split into at most three *segments* with a uniform group size, each an ordinary GQA attention call.
"""
from dataclasses import dataclass
from typing import List, Tuple

Range = Tuple[int, int]                    # [start, stop)


@dataclass(frozen=True)
class HeadSplit:
    """The Ulysses head layout of one group.

    Attributes:
        num_heads: query heads entering Ulysses (on this model-parallel rank), N.
        num_kv_heads: kv heads entering Ulysses, K (must divide N).
        degree: Ulysses degree U.

    Raises:
        ValueError: K does not divide N, or a count is not positive.
    """

    num_heads: int
    num_kv_heads: int
    degree: int

    def __post_init__(self):
        n, k, u = self.num_heads, self.num_kv_heads, self.degree
        if min(n, k, u) < 1:
            raise ValueError(f"HeadSplit(num_heads={n}, num_kv_heads={k}, degree={u}): counts must be positive")
        if n % k:
            raise ValueError(f"HeadSplit: {k} kv heads do not divide {n} query heads (GQA needs K | N)")

    @property
    def group_size(self) -> int:
        """G: query heads per kv head."""
        return self.num_heads // self.num_kv_heads

    def q_range(self, u: int) -> Range:
        """Query heads [start, stop) of Ulysses rank ``u``."""
        base, extra = divmod(self.num_heads, self.degree)
        start = u * base + min(u, extra)
        return start, start + base + (1 if u < extra else 0)

    def kv_range(self, u: int) -> Range:
        """kv heads [start, stop) read by the query heads of rank ``u`` (empty when it has no query head)."""
        start, stop = self.q_range(u)
        if stop == start:
            return start // self.group_size, start // self.group_size
        return start // self.group_size, (stop - 1) // self.group_size + 1

    def q_count(self, u: int) -> int:
        start, stop = self.q_range(u)
        return stop - start

    def kv_count(self, u: int) -> int:
        start, stop = self.kv_range(u)
        return stop - start

    # ----------------------------------------------------------------------------------------------- layout
    def packed_index(self, u: int) -> List[int]:
        """Indices into the packed head axis [q (N) | k (K) | v (K)] of what rank ``u`` receives, in order
        [its query heads | its k heads | its v heads]."""
        n, k = self.num_heads, self.num_kv_heads
        q0, q1 = self.q_range(u)
        k0, k1 = self.kv_range(u)
        return list(range(q0, q1)) + [n + h for h in range(k0, k1)] + [n + k + h for h in range(k0, k1)]

    def segments(self, u: int) -> List[Tuple[Range, Range]]:
        """Rank ``u``'s local heads cut into uniform GQA calls: [((q_start, q_stop), (kv_start, kv_stop)), ..],
        local indices; within one segment every kv head has the same number of query heads."""
        q0, q1 = self.q_range(u)
        g, segs = self.group_size, []                          # [q_start, q_stop, kv_start, kv_stop, width]
        h = q0
        while h < q1:
            kv = h // g
            width = min((kv + 1) * g, q1) - h                      # query heads of kv head `kv` on this rank
            if segs and segs[-1][4] == width:
                segs[-1][1] += width
                segs[-1][3] += 1
            else:
                segs.append([h - q0, h - q0 + width, kv - q0 // g, kv - q0 // g + 1, width])
            h += width
        return [((a, b), (c, d)) for a, b, c, d, _ in segs]

    # ----------------------------------------------------------------------------------------------- figures
    @property
    def busiest(self) -> int:
        """Query heads of the busiest rank, ceil(N / U)."""
        return -(-self.num_heads // self.degree)

    @property
    def imbalance(self) -> float:
        """Busiest rank's heads over the mean, ceil(N/U) / (N/U): 1.0 is an even split."""
        return self.busiest * self.degree / self.num_heads

    @property
    def kv_heads_received(self) -> int:
        """kv heads summed over the group's ranks (K when nothing is replicated)."""
        return sum(self.kv_count(u) for u in range(self.degree))

    @property
    def replicated_kv_heads(self) -> int:
        """kv heads received beyond one copy of each: kv_heads_received - K."""
        return self.kv_heads_received - self.num_kv_heads

    def describe(self) -> str:
        """One line, e.g. '10 query heads over Ulysses 4: 3,3,2,2 (busiest 3 = 1.20x the mean); 2 kv heads: 6
        received, 4 replicated'."""
        counts = ",".join(str(self.q_count(u)) for u in range(self.degree))
        return (f"{self.num_heads} query heads over Ulysses {self.degree}: {counts} (busiest {self.busiest} = "
                f"{self.imbalance:.2f}x the mean); {self.num_kv_heads} kv heads: {self.kv_heads_received} received, "
                f"{self.replicated_kv_heads} replicated")
