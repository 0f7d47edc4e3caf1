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


def merge_into(out, lse, block):
    """``merge`` for a running result that owns its buffers: ``block`` is a list [block_out, block_lse] that
    this function empties (so the block's output is freed as soon as it is scaled), and the scaled block is added
    into the scaled running output in place (``ops.assign_add``).  Returns (out, lse) float32.

    Working set: out, the block's output, one scaled copy of each (3 (B, N, S, D) float32 at the high-water
    mark, against 5 for ``merge``).
    """
    block_out, block_lse = block.pop(0), block.pop(0)
    high = ops.maximum(lse, block_lse)
    high_safe = ops.where(ops.isinf(high), ops.zeros_like(high), high)
    new_lse = ops.log(ops.exp(lse - high_safe) + ops.exp(block_lse - high_safe)) + high_safe
    new_lse_safe = ops.where(ops.isinf(new_lse), ops.zeros_like(new_lse), new_lse)
    scaled = block_out * ops.exp(block_lse - new_lse_safe).expand_dims(-1)
    del block_out
    out = out * ops.exp(lse - new_lse_safe).expand_dims(-1)
    ops.assign_add(out, scaled)
    return out, new_lse
