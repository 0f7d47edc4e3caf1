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
        loss_tile: ``long_seq.loss_tile``, tokens per tile of the LM head + cross entropy (0 = off).
        mlp_tile: ``long_seq.mlp_tile``, tokens per tile of the MLP (0 = off).
        seq_parallel: ``parallel_config.use_seq_parallel`` (Megatron sequence parallelism over the mp ranks; it
            changes nothing when mp = 1).
        offload_layer_inputs: ``long_seq.offload_layer_inputs`` (layer inputs kept on the host, with recompute).
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
    loss_tile: int = 0
    mlp_tile: int = 0
    seq_parallel: bool = False
    offload_layer_inputs: bool = False

    def bytes_of(self, which: str) -> int:
        return DTYPE_BYTES[getattr(self, f"{which}_dtype")]

    def features(self) -> str:
        """The memory features in force, e.g. 'loss_tile 2048, mlp_tile 1024, seq_parallel, offload' ('none')."""
        parts = [f"loss_tile {self.loss_tile}"] if self.loss_tile else []
        parts += [f"mlp_tile {self.mlp_tile}"] if self.mlp_tile else []
        parts += [name for name, on in (("seq_parallel", self.seq_parallel), ("offload", self.offload_layer_inputs))
                  if on]
        return ", ".join(parts) or "none"
