"""The benchmark's shared inputs and its float64 oracle, on sampled rows (every implementation is checked the same).

Inputs: B = 1, q and dout (S, N, D), k and v (S, K, D), float32 standard normal from ``seed``; every process of
every implementation makes the same full tensors and takes its own shard.  Causal attention, scale 1/sqrt(D),
query head h reads kv head h // (N / K).

Checked rows: ``SAMPLES`` query positions (out and dq there) and ``SAMPLES`` key positions (dk and dv there),
fixed by the seed.  The oracle computes them in float64 from the full inputs: out and dq of a query need its
scores against every key; dk and dv of a key need lse and delta = rowsum(dout * out) of every query, so the oracle
runs the whole forward once (blocks of query rows, nothing S x S at once).  Formulas: FlashAttention-2
(Dao, 2023), P = exp(s - lse), dV = P^T dO, dS = P * (dO V^T - delta), dQ = scale dS K, dK = scale dS^T Q.

The error of a result is max |x - oracle| / max |oracle| over the sampled rows of each of out, dq, dk, dv.
"""
import os
from pathlib import Path

import numpy as np

SAMPLES = 64
ROWS = 512                     # query rows per block of the oracle's forward


def inputs(seq: int, heads: int, kv_heads: int, head_dim: int, seed: int = 0):
    """Full (S, H, D) float32 q, k, v, dout (B = 1 implied)."""
    rng = np.random.default_rng(seed)
    shape_q, shape_kv = (seq, heads, head_dim), (seq, kv_heads, head_dim)
    return tuple(rng.standard_normal(shape).astype(np.float32) for shape in (shape_q, shape_kv, shape_kv, shape_q))


def sample_positions(seq: int, seed: int = 0):
    """(query positions, key positions), sorted, each ``SAMPLES`` long (the last query and the first key included:
    the longest and the most-read rows)."""
    rng = np.random.default_rng(seed + 1)
    queries = np.unique(np.concatenate([rng.choice(seq, SAMPLES - 1, replace=False), [seq - 1]]))[:SAMPLES]
    keys = np.unique(np.concatenate([rng.choice(seq, SAMPLES - 1, replace=False), [0]]))[:SAMPLES]
    return queries, keys


def _rows_forward(q, k, v, rows, scale, g):
    """out, lse (float64) of query positions ``rows`` (causal), q (S, N, D), k/v (S, K, D); keys after the last
    row are never visible, so they are not read."""
    out = np.empty((len(rows), q.shape[1], q.shape[2]))
    lse = np.empty((len(rows), q.shape[1]))
    k, v = k[:int(np.max(rows)) + 1], v[:int(np.max(rows)) + 1]
    for h in range(q.shape[1]):
        s = (q[rows, h].astype(np.float64) @ k[:, h // g].astype(np.float64).T) * scale       # (R, keys)
        s = np.where(np.arange(k.shape[0])[None, :] <= np.asarray(rows)[:, None], s, -np.inf)
        m = s.max(axis=1, keepdims=True)
        p = np.exp(s - m)
        total = p.sum(axis=1, keepdims=True)
        out[:, h] = (p / total) @ v[:, h // g].astype(np.float64)
        lse[:, h] = (np.log(total) + m)[:, 0]
    return out, lse


def oracle(seq: int, heads: int, kv_heads: int, head_dim: int, seed: int = 0, cache_dir=None):
    """float64 {out, dq} at the sampled queries and {dk, dv} at the sampled keys, each (SAMPLES, H, D); cached as
    ``cache_dir``/oracle_<S>_<N>_<K>_<D>_<seed>.npz."""
    path = Path(cache_dir) / f"oracle_{seq}_{heads}_{kv_heads}_{head_dim}_{seed}.npz" if cache_dir else None
    if path is not None and path.exists():
        return dict(np.load(path))
    q, k, v, dout = inputs(seq, heads, kv_heads, head_dim, seed)
    queries, keys = sample_positions(seq, seed)
    scale, g = head_dim ** -0.5, heads // kv_heads
    lse, delta = np.empty((seq, heads)), np.empty((seq, heads))
    for start in range(0, seq, ROWS):
        rows = np.arange(start, min(seq, start + ROWS))
        out_rows, lse[rows] = _rows_forward(q, k, v, rows, scale, g)
        delta[rows] = (out_rows * dout[rows]).sum(-1)
    out_q, _ = _rows_forward(q, k, v, queries, scale, g)
    result = {"out": out_q, "dq": np.empty_like(out_q), "dk": np.zeros((len(keys), kv_heads, head_dim)),
              "dv": np.zeros((len(keys), kv_heads, head_dim))}
    positions = np.arange(seq)
    for h in range(heads):
        kh, vh, qh, doh = (x[:, i].astype(np.float64) for x, i in ((k, h // g), (v, h // g), (q, h), (dout, h)))
        # dq at the sampled queries: dS row = P * (dO V^T - delta).
        s = np.where(positions[None, :] <= queries[:, None], (qh[queries] @ kh.T) * scale, -np.inf)
        p = np.exp(s - lse[queries, h][:, None])
        result["dq"][:, h] = scale * (p * (doh[queries] @ vh.T - delta[queries, h][:, None])) @ kh
        # dk, dv at the sampled keys: columns of P over every query.
        s = np.where(positions[:, None] >= keys[None, :], (qh @ kh[keys].T) * scale, -np.inf)    # (S, keys)
        p = np.exp(s - lse[:, h][:, None])
        result["dv"][:, h // g] += p.T @ doh
        result["dk"][:, h // g] += scale * (p * (doh @ vh[keys].T - delta[:, h][:, None])).T @ qh
    if path is not None:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)          # --oracle-cache may name a new folder
        np.savez(path, **result)
    return result


def pick(shard, positions, wanted):
    """Rows of ``shard`` (rows in ``positions`` order) at the global positions of ``wanted`` it holds:
    ({index into wanted: row}) as two arrays (indices, rows)."""
    where = {int(p): i for i, p in enumerate(positions)}
    held = [(j, where[int(p)]) for j, p in enumerate(wanted) if int(p) in where]
    idx = np.array([j for j, _ in held], np.int64)
    return idx, np.asarray(shard)[[r for _, r in held]] if held else np.zeros((0,) + np.asarray(shard).shape[1:])


def reset_peak() -> None:
    """Set this process's peak RSS (VmHWM) to its current RSS: the peak of the steps that follow (both sides)."""
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")


def save_rows(path, positions, out, dq, dk, dv, seq: int, seed: int = 0):
    """Write this rank's sampled rows (token-major (S_loc, H, D) arrays, ``positions`` their global positions)."""
    queries, keys = sample_positions(seq, seed)
    arrays = {}
    for name, x, wanted in (("out", out, queries), ("dq", dq, queries), ("dk", dk, keys), ("dv", dv, keys)):
        arrays[name + "_idx"], arrays[name] = pick(x, positions, wanted)
    np.savez(path, **arrays)


def error(paths, reference) -> float:
    """Worst relative error over out, dq, dk, dv of the ranks' saved rows against the oracle.

    Raises:
        ValueError: a sampled row that no rank returned.
    """
    worst = 0.0
    for name in ("out", "dq", "dk", "dv"):
        got = np.full(reference[name].shape, np.nan)
        for path in paths:
            saved = np.load(path)
            got[saved[name + "_idx"]] = saved[name]
        if np.isnan(got).any():
            raise ValueError(f"{name}: sampled rows missing from the ranks' results {paths}")
        worst = max(worst, float(np.abs(got - reference[name]).max() / np.abs(reference[name]).max()))
    return worst
