"""Float64 NumPy reference of full attention (causal or not, GQA, packed documents) with analytic gradients.

Shapes: q (B, S_q, N, D), k and v (B, S_k, K, D), N = K * G; query head h uses kv head h // G.
This is the truth every kernel and every CP algorithm is compared against; it builds S x S on purpose.
"""
import numpy as np


def reference_attention(q, k, v, allowed, scale, dout=None):
    """Returns (out (B,S_q,N,D), lse (B,N,S_q)) and, with ``dout``, (dq, dk, dv) in float64.

    ``allowed`` is a (S_q, S_k) boolean visibility matrix (True = the query sees the key).
    """
    q, k, v = (np.asarray(t, np.float64).transpose(0, 2, 1, 3) for t in (q, k, v))  # (B, heads, S, D)
    n, kv = q.shape[1], k.shape[1]
    g = n // kv
    k_h, v_h = np.repeat(k, g, axis=1), np.repeat(v, g, axis=1)  # (B, N, S_k, D), oracle only
    s = np.where(allowed[None, None], q @ k_h.swapaxes(-1, -2) * scale, -np.inf)  # (B, N, S_q, S_k)
    m = s.max(-1, keepdims=True)
    m_safe = np.where(np.isinf(m), 0.0, m)
    e = np.exp(s - m_safe)
    den = e.sum(-1, keepdims=True)
    seen = den > 0
    p = np.where(seen, e / np.where(seen, den, 1.0), 0.0)
    lse = np.where(seen, np.log(np.where(seen, den, 1.0)) + m_safe, -np.inf)[..., 0]  # (B, N, S_q)
    out = p @ v_h                                                   # (B, N, S_q, D)
    bsnd = lambda x: x.transpose(0, 2, 1, 3)                        # noqa: E731
    if dout is None:
        return bsnd(out), lse
    do = np.asarray(dout, np.float64).transpose(0, 2, 1, 3)
    dv_h = p.swapaxes(-1, -2) @ do
    ds = p * (do @ v_h.swapaxes(-1, -2) - (do * out).sum(-1, keepdims=True))
    dq = ds @ k_h * scale
    dk_h = ds.swapaxes(-1, -2) @ q * scale
    b, _, s_k, d = k.shape
    dk = dk_h.reshape(b, kv, g, s_k, d).sum(2)
    dv = dv_h.reshape(b, kv, g, s_k, d).sum(2)
    return bsnd(out), lse, (bsnd(dq), bsnd(dk), bsnd(dv))


def causal_allowed(q_pos, k_pos, q_doc=None, k_doc=None, causal=True):
    ok = np.ones((len(q_pos), len(k_pos)), dtype=bool)
    if causal:
        ok &= np.asarray(k_pos)[None, :] <= np.asarray(q_pos)[:, None]
    if q_doc is not None:
        ok &= np.asarray(k_doc)[None, :] == np.asarray(q_doc)[:, None]
    return ok
