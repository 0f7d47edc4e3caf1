"""One candidate layout (degrees and algorithm) and the run settings the planner evaluates it under."""
from dataclasses import dataclass

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class Layout:
    """dp x mp x cp x pp ranks; CP = ulysses x ring.  Names as in ``parallel_config``."""

    dp: int = 1
    mp: int = 1
    cp: int = 1
    pp: int = 1
    algo: str = "colossalai_cp"
    ulysses: int = 1

    @property
    def ring(self) -> int:
        return self.cp // self.ulysses

    @property
    def devices(self) -> int:
        return self.dp * self.mp * self.cp * self.pp

    def label(self) -> str:
        algo = self.algo if self.cp > 1 else "cp off"
        inner = f" u{self.ulysses}xr{self.ring}" if self.algo == "hybrid_cp" and self.cp > 1 else ""
        return f"dp{self.dp} mp{self.mp} cp{self.cp} pp{self.pp} {algo}{inner}"


@dataclass(frozen=True)
class Settings:
    """How the run trains (everything the memory and time models need besides the layout).

    Attributes:
        seq_len: tokens per sequence.
        micro_batch: sequences per micro-batch on one dp rank (b).
        micro_batch_num: micro-batches per step (>= pp for 1F1B).
        param_dtype, grad_dtype, compute_dtype: float32, bfloat16 or float16.
        zero: what is split over the dp x cp ranks (which hold the same weights): 0 nothing (mf_longseq's own
            runner today), 1 the optimizer states, 2 also the gradients, 3 also the weights (MindFormers' parallel
            optimizer, ``parallel.enable_parallel_optimizer``, shards states and weights).
        recompute: full recomputation of every decoder layer (only its input is kept).
        mask_compression: model.model_config.use_attn_mask_compression (2048 x 2048 mask instead of S x S).
        use_alltoall: parallel.enable_alltoall (the Ulysses exchange).
        backend: "ascend" (FlashAttentionScore) or "cpu" (blockwise kernel, tiles of ``block_size``).
        block_size: tile size of the blockwise kernel.
    """

    seq_len: int
    micro_batch: int = 1
    micro_batch_num: int = 1
    param_dtype: str = "float32"
    grad_dtype: str = "float32"
    compute_dtype: str = "bfloat16"
    zero: int = 1
    recompute: bool = False
    mask_compression: bool = True
    use_alltoall: bool = True
    backend: str = "ascend"
    block_size: int = 2048

    def bytes_of(self, which: str) -> int:
        return DTYPE_BYTES[getattr(self, f"{which}_dtype")]
