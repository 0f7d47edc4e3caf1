"""Rotary position embedding (RoPE), rotate-half convention of Hugging Face LLaMA / Qwen2.

Tables are built on the host in float64 from global positions (``ShardedBatch`` builds them once per step);
``apply_rope`` rotates q and k on the device.
"""
import numpy as np
from mindspore import ops


def rope_tables(positions: np.ndarray, head_dim: int, theta: float):
    """cos, sin (.., D) float32 of the rotate-half convention: angle[.., j] = pos[..] * theta^(-2(j mod D/2)/D).

    ``positions`` (S,) gives (S, D) tables; per-sample positions (B, S) give (B, S, D).
    """
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))   # (D/2,)
    angles = np.asarray(positions, np.float64)[..., None] * inv_freq                       # (.., D/2)
    angles = np.concatenate([angles, angles], axis=-1)                                      # (.., D)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def apply_rope(x, cos, sin):
    """x (B, S, N, D) rotated: x * cos + rotate_half(x) * sin with rotate_half([x1, x2]) = [-x2, x1].

    cos, sin: (1, S, 1, D), or (B, S, 1, D) per sample, from ``rope_tables`` (the rotate-half convention of
    Hugging Face LLaMA / Qwen2).
    """
    half = x.shape[-1] // 2
    rotated = ops.cat((-x[..., half:], x[..., :half]), -1)
    return x * cos + rotated * sin


__all__ = ["rope_tables", "apply_rope"]
