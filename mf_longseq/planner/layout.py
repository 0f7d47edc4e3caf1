"""The run settings the planner evaluates a candidate plan (``parallel.plan.RunPlan``) under."""
from dataclasses import dataclass

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


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
