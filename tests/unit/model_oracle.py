"""Float64 NumPy forward of the shared decoder from a dict of weights (Hugging Face LLaMA / Qwen2 names).

Written from the formulas (RMSNorm, rotate-half RoPE, causal GQA softmax attention, SwiGLU), not from the
model code: it is the oracle the MindSpore model is compared against.  Shapes: ids (B, S) -> logits (B, S, V).
"""
import numpy as np

from oracle import causal_allowed, reference_attention


def _rms(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def _rope(x_bsnd, positions, theta):
    d = x_bsnd.shape[-1]
    inv = theta ** (-np.arange(0, d, 2, dtype=np.float64) / d)
    ang = positions[:, None] * inv[None, :]                                   # (S, D/2)
    cos, sin = np.cos(ang)[None, :, None, :], np.sin(ang)[None, :, None, :]
    x1, x2 = x_bsnd[..., : d // 2], x_bsnd[..., d // 2:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def numpy_logits(weights, cfg, ids, positions=None):
    """Logits (B, S, V) float64 of ``ids`` (B, S) for the model config ``cfg`` and ``weights`` {name: array}."""
    w = {k: np.asarray(v, np.float64) for k, v in weights.items()}
    b, s = ids.shape
    n, kv, d = cfg.num_heads, cfg.n_kv_heads, cfg.hidden_size // cfg.num_heads
    pos = np.arange(s, dtype=np.float64) if positions is None else np.asarray(positions, np.float64)
    allowed = causal_allowed(pos, pos)
    x = w["model.embed_tokens.weight"][ids]                                      # (B, S, H)
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        h = _rms(x, w[p + "input_layernorm.weight"], cfg.rms_norm_eps)

        def proj(name, heads):
            y = h @ w[p + f"self_attn.{name}.weight"].T
            if cfg.qkv_has_bias:
                y = y + w[p + f"self_attn.{name}.bias"]
            return y.reshape(b, s, heads, d)

        q = _rope(proj("q_proj", n), pos, cfg.theta)
        k = _rope(proj("k_proj", kv), pos, cfg.theta)
        out, _ = reference_attention(q, k, proj("v_proj", kv), allowed, 1.0 / np.sqrt(d))
        x = x + out.reshape(b, s, n * d) @ w[p + "self_attn.o_proj.weight"].T
        h = _rms(x, w[p + "post_attention_layernorm.weight"], cfg.rms_norm_eps)
        gate = h @ w[p + "mlp.gate_proj.weight"].T
        x = x + ((gate / (1.0 + np.exp(-gate))) * (h @ w[p + "mlp.up_proj.weight"].T)) @ w[p + "mlp.down_proj.weight"].T
    x = _rms(x, w["model.norm.weight"], cfg.rms_norm_eps)
    head = w["model.embed_tokens.weight"] if cfg.tie_word_embeddings else w["lm_head.weight"]
    return x @ head.T


def numpy_loss(logits, labels, mask):
    """(sum of cross entropy x mask, sum of mask) in float64."""
    top = logits.max(-1, keepdims=True)
    lse = np.log(np.exp(logits - top).sum(-1)) + top[..., 0]
    target = np.take_along_axis(logits, labels[..., None], -1)[..., 0]
    return float(((lse - target) * mask).sum()), float(mask.sum())
