"""ContextParallelAttention: the Cell a decoder calls; it picks the algorithm from the config.

    attn = ContextParallelAttention(config=long_seq_config, mesh=mesh)
    out_BSND = attn(q_BSND, k_BSND, v_BSND)                # this rank's shards, config.layout

It owns nothing but settings: the kernel (FlashAttentionScore on Ascend, blockwise elsewhere), the algorithm,
the layout, the Ulysses exchange.  All the work is ``context_parallel_attention``.
"""
from typing import Optional

import numpy as np
from mindspore import nn

from mf_longseq.attention.api import context_parallel_attention
from mf_longseq.attention.kernel import select_kernel


class ContextParallelAttention(nn.Cell):
    """Attention over a sequence split across CP ranks (colossalai_cp, ulysses_cp or hybrid_cp).

    Args:
        config: a ``LongSeqConfig`` (algorithm, layout, block size, enable_alltoall, device target).
        mesh: the ``Mesh`` of this rank, groups created.
        causal: causal attention (decoders); False for bidirectional.
        scale: softmax scale; default 1/sqrt(head_dim).
    """

    def __init__(self, *, config, mesh, causal: bool = True, scale: Optional[float] = None):
        super().__init__()
        self.config, self.mesh, self.causal, self.scale = config, mesh, causal, scale
        self.kernel = select_kernel(config.device_target, config.block_size, config.use_flash_attention)

    def construct(self, q, k, v, segment_ids: Optional[np.ndarray] = None):
        return context_parallel_attention(
            q, k, v, mesh=self.mesh, algo=self.config.context_parallel_algo, causal=self.causal,
            layout=self.config.layout, scale=self.scale, kernel=self.kernel,
            use_alltoall=self.config.enable_alltoall, segment_ids=segment_ids)
