"""ContextParallelAttention: the Cell a decoder calls; it picks the algorithm from the config.

    attn = ContextParallelAttention(config=long_seq_config, mesh=mesh)
    out_BSND = attn(q_BSND, k_BSND, v_BSND)                # this rank's shards, config.layout
    out_BSND = attn(q_BSND, k_BSND, v_BSND, segment_ids)   # packed documents: (S,) or (B, S) global ids

It owns nothing but settings: the kernel (FlashAttentionScore on Ascend, blockwise elsewhere), the algorithm,
the layout, the Ulysses exchange, the mask.  All the work is ``context_parallel_attention``.

The mask follows ``model.model_config.use_attn_mask_compression``:

* True: visibility comes from global positions and document ids (``AttentionMask``); FlashAttentionScore gets
  the fixed 2048 x 2048 compressed mask.  Nothing of size S x S exists, at any sequence length.
* False: like MindFormers, the (B, 1, S, S) uint8 mask (1 = masked) is built for the whole sequence and every
  tile is read from it (``DenseMask``).  One mask per (batch, sequence, documents) is kept and shared by all
  layers, as MindFormers builds one per step: B * S^2 bytes, 1 GiB at S = 32k.  Kept to measure the difference.
"""
import hashlib
from typing import Optional

import numpy as np
from mindspore import nn

from mf_longseq.attention.api import context_parallel_attention
from mf_longseq.attention.select import select_kernel
from mf_longseq.attention.mask import dense_attention_mask

_DENSE_CACHE = {}         # one entry: the dense mask of the current step, shared by every layer


def shared_dense_mask(batch: int, seq_len: int, causal: bool, segment_ids: Optional[np.ndarray]) -> np.ndarray:
    """The (B, 1, S, S) uint8 mask of compression-off, built once per distinct input and shared by the layers."""
    ids = None if segment_ids is None else np.ascontiguousarray(segment_ids)
    digest = None if ids is None else (ids.shape, hashlib.sha1(ids.tobytes()).hexdigest())
    key = (batch, seq_len, causal, digest)
    if key not in _DENSE_CACHE:
        _DENSE_CACHE.clear()                                     # free the previous S x S before the next one
        _DENSE_CACHE[key] = dense_attention_mask(batch, seq_len, ids, causal=causal)
    return _DENSE_CACHE[key]


def release_dense_mask() -> None:
    """Drop the shared dense mask (its S x S bytes)."""
    _DENSE_CACHE.clear()


class ContextParallelAttention(nn.Cell):
    """Attention over a sequence split across CP ranks (colossalai_cp, ulysses_cp or hybrid_cp).

    Args:
        config: a ``LongSeqConfig`` (algorithm, layout, block size, enable_alltoall, device target,
            use_attn_mask_compression).
        mesh: the ``Mesh`` of this rank, groups created.
        causal: causal attention (decoders); False for bidirectional.
        scale: softmax scale; default 1/sqrt(head_dim).
    """

    def __init__(self, *, config, mesh, causal: bool = True, scale: Optional[float] = None):
        super().__init__()
        self.config, self.mesh, self.causal, self.scale = config, mesh, causal, scale
        self.kernel = select_kernel(config.device_target, config.block_size, config.use_flash_attention)
        self.use_attn_mask_compression = config.use_attn_mask_compression

    def construct(self, q, k, v, segment_ids: Optional[np.ndarray] = None):
        """q (B, S/CP, N, D), k/v (B, S/CP, K, D); segment_ids (S,) or (B, S) global document ids, or None."""
        dense = None
        if not self.use_attn_mask_compression:
            dense = shared_dense_mask(q.shape[0], q.shape[1] * self.mesh.cp, self.causal, segment_ids)
        return context_parallel_attention(
            q, k, v, mesh=self.mesh, algo=self.config.context_parallel_algo, causal=self.causal,
            layout=self.config.layout, scale=self.scale, kernel=self.kernel,
            use_alltoall=self.config.enable_alltoall, segment_ids=segment_ids, dense_mask=dense)
