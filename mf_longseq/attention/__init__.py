"""Context-parallel attention: local kernels, masks, and the ring / Ulysses / hybrid algorithms."""
from mf_longseq.attention.api import context_parallel_attention
from mf_longseq.attention.attention_plan import AttentionPlan, ring_masks
from mf_longseq.attention.kernel import BlockwiseKernel, LocalAttention
from mf_longseq.attention.select import select_kernel
from mf_longseq.attention.merge import merge
from mf_longseq.attention.mask import AttentionMask

__all__ = ["context_parallel_attention", "AttentionPlan", "ring_masks", "BlockwiseKernel", "LocalAttention", "merge",
           "select_kernel", "AttentionMask"]
