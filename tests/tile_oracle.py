"""Float64 NumPy oracles of the tiled LM head + cross entropy and the tiled SwiGLU MLP, written from the formulas
(not from ``models/tiled_loss.py`` / ``tiled_mlp.py``); used by tests/unit/test_tiles.py and
tests/dist/test_tiles_dist.py."""
import numpy as np


def rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


def oracle_loss(h, w, labels, mask):
    """float64: loss = sum_i m_i (lse_i - z_i[label_i]); d z = m (softmax - one_hot)."""
    z = h @ w.T                                                                 # (N, V)
    zmax = z.max(-1, keepdims=True)
    lse = np.log(np.exp(z - zmax).sum(-1)) + zmax[:, 0]
    loss = (mask * (lse - z[np.arange(len(labels)), labels])).sum()
    dz = np.exp(z - lse[:, None])
    dz[np.arange(len(labels)), labels] -= 1
    dz *= mask[:, None]
    return loss, dz @ w, dz.T @ h


def silu(x):
    return x / (1 + np.exp(-x))


def oracle_mlp(x, wg, wu, wd, dy):
    """float64 SwiGLU y = (silu(x Wg^T) * (x Wu^T)) Wd^T and its gradients for the output gradient dy."""
    g, u = x @ wg.T, x @ wu.T
    sig = 1 / (1 + np.exp(-g))
    a = silu(g)
    y = (a * u) @ wd.T
    dp = dy @ wd
    dg = dp * u * sig * (1 + g * (1 - sig))
    du = dp * a
    return y, dg @ wg + du @ wu, dg.T @ x, du.T @ x, dy.T @ (a * u)
