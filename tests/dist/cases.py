"""The multi-process attention cases: one msrun launch of 4 CPU workers runs all of them.

A case with cp=2 runs on a dp=2 x cp=2 mesh (two CP groups, each with its own inputs); cp=4 on dp=1 x cp=4.
"""
from dataclasses import asdict, dataclass

WORLD = 4


@dataclass(frozen=True)
class Case:
    name: str
    algo: str
    cp: int
    ulysses: int = 1
    layout: str = "zigzag"
    use_alltoall: bool = False
    causal: bool = True
    seq_len: int = 96
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 8
    batch: int = 2
    block: int = 16

    @property
    def dp(self) -> int:
        return WORLD // self.cp

    def as_dict(self):
        return asdict(self)


CASES = [
    Case("ring_cp2_zigzag", "colossalai_cp", 2),
    Case("ring_cp2_contiguous", "colossalai_cp", 2, layout="contiguous"),
    Case("ring_cp4_zigzag", "colossalai_cp", 4, seq_len=120),
    Case("ring_cp4_contiguous_noncausal", "colossalai_cp", 4, layout="contiguous", causal=False, seq_len=100),
    Case("ulysses_cp2_allgather", "ulysses_cp", 2, ulysses=2, use_alltoall=False),
    Case("ulysses_cp2_alltoall", "ulysses_cp", 2, ulysses=2, use_alltoall=True),
    Case("ulysses_cp4_alltoall_gqa_kv_lt_degree", "ulysses_cp", 4, ulysses=4, use_alltoall=True, heads=8,
         kv_heads=2, seq_len=100),
    Case("ulysses_cp4_allgather_gqa_kv1", "ulysses_cp", 4, ulysses=4, use_alltoall=False, heads=4, kv_heads=1),
    Case("hybrid_cp4_u2r2_zigzag", "hybrid_cp", 4, ulysses=2, seq_len=120),
    Case("hybrid_cp4_u2r2_contiguous_alltoall", "hybrid_cp", 4, ulysses=2, layout="contiguous",
         use_alltoall=True, seq_len=88),
    Case("kvallgather_cp2_zigzag", "kvallgather_cp", 2),
    Case("kvallgather_cp2_contiguous_noncausal", "kvallgather_cp", 2, layout="contiguous", causal=False),
    Case("kvallgather_cp4_zigzag_gqa_kv1", "kvallgather_cp", 4, seq_len=120, heads=4, kv_heads=1),
    Case("kvallgather_cp4_contiguous", "kvallgather_cp", 4, layout="contiguous", seq_len=100),
]
