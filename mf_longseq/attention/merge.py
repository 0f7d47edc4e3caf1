"""Merge of two partial attention results over disjoint key sets, by log-sum-exp (every kernel and the ring).

Its own module so that kernels (``kernel.py``, ``flash.py``) and algorithms (``ring.py``) import it without
importing each other.
"""
from mindspore import ops


def merge(out, lse, block_out, block_lse):
    """Combine two partial attention results over disjoint key sets, in float32.

    lse = log(exp(lse_a) + exp(lse_b)); out = out_a * exp(lse_a - lse) + out_b * exp(lse_b - lse).
    (Derivation: https://github.com/zhuzilin/ring-flash-attention/pull/34#issuecomment-2076126795.)
    out (B, N, S, D) float32, lse (B, N, S) float32; -inf lse (no visible key) is handled.
    """
    high = ops.maximum(lse, block_lse)
    high_safe = ops.where(ops.isinf(high), ops.zeros_like(high), high)
    total = ops.exp(lse - high_safe) + ops.exp(block_lse - high_safe)
    new_lse = ops.log(total) + high_safe                                         # -inf where both are -inf
    new_lse_safe = ops.where(ops.isinf(new_lse), ops.zeros_like(new_lse), new_lse)
    w_a = ops.exp(lse - new_lse_safe).expand_dims(-1)
    w_b = ops.exp(block_lse - new_lse_safe).expand_dims(-1)
    return out * w_a + block_out * w_b, new_lse
