"""ContextParallelAttention: the Cell a decoder calls; it picks the algorithm from the config.

    attn = ContextParallelAttention(config=long_seq_config, mesh=mesh)
    out_BSND = attn(q_BSND, k_BSND, v_BSND, plan=batch.attention)   # the step's AttentionPlan (a decoder)
    out_BSND = attn(q_BSND, k_BSND, v_BSND, segment_ids)            # alone: (S,) or (B, S) global ids, or None

It owns nothing but settings: the kernel (FlashAttentionScore on Ascend, blockwise elsewhere), the algorithm,
the layout, the Ulysses exchange, the mask.  All the work is ``context_parallel_attention``.

The mask follows ``model.model_config.use_attn_mask_compression``:

* True: visibility comes from global positions and document ids (``AttentionMask``); FlashAttentionScore gets
  the fixed 2048 x 2048 compressed mask.  Nothing of size S x S exists, at any sequence length.
* False: like MindFormers, the (B, 1, S, S) uint8 mask (1 = masked) is built for the whole sequence and every
  tile is read from it (``DenseMask``): B * S^2 bytes, 1 GiB at S = 32k.  Kept to measure the difference.

A decoder passes the step's ``AttentionPlan`` (``ShardedBatch.attention``): masks, sample groups and the dense
mask are built once per step and shared by every layer.  Without a plan the layer builds one for its call.
"""
from typing import Optional

import numpy as np
from mindspore import nn

from mf_longseq.attention.api import context_parallel_attention
from mf_longseq.attention.attention_plan import AttentionPlan
from mf_longseq.attention.select import select_kernel


class ContextParallelAttention(nn.Cell):
    """Attention over a sequence split across CP ranks (colossalai_cp, ulysses_cp or hybrid_cp).

    Args:
        config: a ``LongSeqConfig``: block size, enable_alltoall, device target (the kernel and the exchange).
        mesh: the ``Mesh`` of this rank, groups created; its plan gives the algorithm (the dispatch key) and the
            sequence layout, and must be the config's (``Mesh.check_settings``).
        causal: causal attention (decoders); False for bidirectional.
        scale: softmax scale; default 1/sqrt(head_dim).
        use_flash_attention, use_attn_mask_compression: the model's ``model.model_config`` keys (FlashAttentionScore
            on Ascend; the compressed 2048 x 2048 mask instead of the dense (B, 1, S, S) one).
    """

    def __init__(self, *, config, mesh, causal: bool = True, scale: Optional[float] = None,
                 use_flash_attention: bool = True, use_attn_mask_compression: bool = False):
        super().__init__()
        mesh.check_settings(config)
        self.config, self.mesh, self.causal, self.scale = config, mesh, causal, scale
        self.kernel = select_kernel(config.device_target, config.block_size, use_flash_attention)
        self.use_attn_mask_compression = use_attn_mask_compression

    def plan_for(self, batch: int, seq_len: int, segment_ids: Optional[np.ndarray] = None) -> AttentionPlan:
        """The ``AttentionPlan`` of a (B = batch, S = seq_len global tokens) step under this layer's settings."""
        return AttentionPlan.for_model(batch=batch, seq_len=seq_len, mesh=self.mesh, layout=self.mesh.plan.seq_layout,
                                       causal=self.causal, segment_ids=segment_ids,
                                       use_attn_mask_compression=self.use_attn_mask_compression)

    def construct(self, q, k, v, segment_ids: Optional[np.ndarray] = None, plan: Optional[AttentionPlan] = None):
        """q (B, S/CP, N, D), k/v (B, S/CP, K, D) -> (B, S/CP, N, D).

        ``plan``: the step's ``AttentionPlan`` (a decoder's layers share it).  Without it, one is built for this
        call from ``segment_ids`` ((S,) or (B, S) global document ids, or None).
        """
        if plan is None:
            plan = self.plan_for(q.shape[0], q.shape[1] * self.mesh.cp, segment_ids)
        elif segment_ids is not None:
            raise ValueError("ContextParallelAttention got both segment_ids and an attention plan. Fix: pass the "
                             "document ids when building the plan (ShardedBatch) and only the plan here.")
        return context_parallel_attention(
            q, k, v, mesh=self.mesh, algo=self.mesh.plan.algo, causal=self.causal,
            layout=self.mesh.plan.seq_layout, scale=self.scale, kernel=self.kernel,
            use_alltoall=self.config.enable_alltoall, attention_plan=plan)
