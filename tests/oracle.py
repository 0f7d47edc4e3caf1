"""Float64 NumPy reference of full attention (causal or not, GQA, packed documents) with analytic gradients.

Shapes: q (B, S_q, N, D), k and v (B, S_k, K, D), N = K * G; query head h uses kv head h // G.
This is the truth every kernel and every CP algorithm is compared against; it builds S x S on purpose.
"""
import numpy as np


def reference_attention(q, k, v, allowed, scale, dout=None):
    """Returns (out (B,S_q,N,D), lse (B,N,S_q)) and, with ``dout``, (dq, dk, dv) in float64.

    ``allowed`` is a (S_q, S_k) boolean visibility matrix (True = the query sees the key).
    """
    q, k, v = (np.asarray(t, np.float64) for t in (q, k, v))
    n, kv = q.shape[2], k.shape[2]
    g = n // kv
    k_h = np.repeat(k, g, axis=2)                                   # (B, S_k, N, D), oracle only
    v_h = np.repeat(v, g, axis=2)
    s = np.einsum("bqhd,bkhd->bhqk", q, k_h) * scale
    s = np.where(allowed[None, None], s, -np.inf)
    m = s.max(-1, keepdims=True)
    m_safe = np.where(np.isinf(m), 0.0, m)
    e = np.exp(s - m_safe)
    den = e.sum(-1, keepdims=True)
    p = np.where(den > 0, e / np.where(den > 0, den, 1.0), 0.0)
    lse = np.where(den[..., 0] > 0, np.log(np.where(den[..., 0] > 0, den[..., 0], 1.0)) + m_safe[..., 0], -np.inf)
    out = np.einsum("bhqk,bkhd->bqhd", p, v_h)
    if dout is None:
        return out, lse
    do = np.asarray(dout, np.float64)
    dv_h = np.einsum("bhqk,bqhd->bkhd", p, do)
    dp = np.einsum("bqhd,bkhd->bhqk", do, v_h)
    delta = np.einsum("bqhd,bqhd->bhq", do, out)[..., None]
    ds = p * (dp - delta)
    dq = np.einsum("bhqk,bkhd->bqhd", ds, k_h) * scale
    dk_h = np.einsum("bhqk,bqhd->bkhd", ds, q) * scale
    b, s_k, _, d = k.shape
    dk = dk_h.reshape(b, s_k, kv, g, d).sum(3)
    dv = dv_h.reshape(b, s_k, kv, g, d).sum(3)
    return out, lse, (dq, dk, dv)


def causal_allowed(q_pos, k_pos, q_doc=None, k_doc=None, causal=True):
    ok = np.ones((len(q_pos), len(k_pos)), dtype=bool)
    if causal:
        ok &= np.asarray(k_pos)[None, :] <= np.asarray(q_pos)[:, None]
    if q_doc is not None:
        ok &= np.asarray(k_doc)[None, :] == np.asarray(q_doc)[:, None]
    return ok
