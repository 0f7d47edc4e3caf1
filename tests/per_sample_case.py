"""Per-sample attention inputs (dense masks with per-sample padding, per-sample document ids) and their float64
oracle, shared by the one-process test (CP=1) and the msrun worker (CP=2, asynchronous dispatch).

The model: x (B, S, H) -> q, k, v = x @ Wq, x @ Wk, x @ Wv -> context_parallel_attention -> sum(out * dout).
Gradients are taken for the weights (summed over the CP ranks, as training does) and for x.
"""
import numpy as np

from oracle import reference_attention

B, S, N, KV, D = 3, 32, 4, 2, 8
H = N * D
BLOCK = 8


def documents(seq_len: int, batch: int) -> np.ndarray:
    """(B, S) document ids, different per sample: sample b has b + 1 documents of unequal length."""
    ids = np.zeros((batch, seq_len), np.int64)
    for b in range(batch):
        cuts = np.linspace(0, seq_len, b + 2).astype(int)[1:-1] + b
        for c in cuts:
            ids[b, c:] += 1
    return ids


def pad_mask(seq_len: int, batch: int) -> np.ndarray:
    """(B, S) 1 for real tokens: sample b ends with 3 * b pad tokens (sample 0 has none)."""
    mask = np.ones((batch, seq_len), np.int64)
    for b in range(batch):
        if b:
            mask[b, seq_len - 3 * b:] = 0
    return mask


def case_inputs(name: str):
    """(segment_ids, dense_mask) of a case: per-sample padding in a dense mask, per-sample documents as ids,
    or both in a dense mask."""
    from mf_longseq.attention.mask import dense_attention_mask
    if name == "dense_padding":
        return None, dense_attention_mask(B, S, pad_mask=pad_mask(S, B))
    if name == "segment_ids":
        return documents(S, B), None
    if name == "dense_documents":
        return None, dense_attention_mask(B, S, documents(S, B), pad_mask=pad_mask(S, B))
    raise KeyError(name)


CASES = ("dense_padding", "segment_ids", "dense_documents")


def allowed_of(name: str, sample: int) -> np.ndarray:
    """(S, S) bool: which keys each query of ``sample`` sees (the truth, from the case's inputs)."""
    ids, dense = case_inputs(name)
    if dense is not None:
        return dense[sample, 0] == 0
    pos = np.arange(S)
    return (pos[None, :] <= pos[:, None]) & (ids[sample][None, :] == ids[sample][:, None])


def full_inputs(seed: int = 7) -> dict:
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((B, S, H)).astype(np.float32),
            "wq": (0.3 * rng.standard_normal((H, N * D))).astype(np.float32),
            "wk": (0.3 * rng.standard_normal((H, KV * D))).astype(np.float32),
            "wv": (0.3 * rng.standard_normal((H, KV * D))).astype(np.float32),
            "dout": rng.standard_normal((B, S, N, D)).astype(np.float32)}


def oracle(name: str, full: dict) -> dict:
    """float64 out (B, S, N, D) and the gradients of the weights and x, every sample with its own mask."""
    x = full["x"].astype(np.float64)
    q, k, v = (x @ full[w].astype(np.float64) for w in ("wq", "wk", "wv"))
    q, k, v = q.reshape(B, S, N, D), k.reshape(B, S, KV, D), v.reshape(B, S, KV, D)
    outs, dqs, dks, dvs = [], [], [], []
    for b in range(B):
        sl = slice(b, b + 1)
        out, _, (dq, dk, dv) = reference_attention(q[sl], k[sl], v[sl], allowed_of(name, b), 1 / np.sqrt(D),
                                                   full["dout"][sl])
        outs.append(out), dqs.append(dq), dks.append(dk), dvs.append(dv)
    out, dq, dk, dv = (np.concatenate(t) for t in (outs, dqs, dks, dvs))
    flat = lambda t: t.reshape(B * S, -1)                                        # noqa: E731
    xf = flat(x)
    return {"out": out, "wq": xf.T @ flat(dq), "wk": xf.T @ flat(dk), "wv": xf.T @ flat(dv),
            "x": (flat(dq) @ full["wq"].T + flat(dk) @ full["wk"].T + flat(dv) @ full["wv"].T).reshape(B, S, H)}


def run_attention(name: str, full: dict, mesh, algo: str = "colossalai_cp", layout: str = "zigzag"):
    """This rank's out and gradients (weights summed over the CP ranks; out and dx are this rank's shards)."""
    import mindspore as ms
    from mindspore import Tensor, ops
    from mf_longseq.attention import BlockwiseKernel, context_parallel_attention
    from mf_longseq.parallel import shard_sequence
    from mf_longseq.parallel.comm import all_reduce
    ids, dense = case_inputs(name)
    x = Tensor(shard_sequence(full["x"], mesh, layout, seq_dim=1))                  # (B, S/CP, H)
    dout = Tensor(shard_sequence(full["dout"], mesh, layout, seq_dim=1))
    weights = [Tensor(full[w]) for w in ("wq", "wk", "wv")]
    kernel = BlockwiseKernel(BLOCK)

    def loss(x, wq, wk, wv):
        s_loc = x.shape[1]
        q, k, v = (ops.matmul(x, w).reshape(B, s_loc, -1, D) for w in (wq, wk, wv))
        out = context_parallel_attention(q, k, v, mesh=mesh, algo=algo, layout=layout, kernel=kernel,
                                         segment_ids=ids, dense_mask=dense)
        return (out * dout).sum(), out

    (_, out), grads = ms.value_and_grad(loss, grad_position=(0, 1, 2, 3), has_aux=True)(x, *weights)
    group = mesh.group("cp")
    result = {"out": out.asnumpy(), "x": grads[0].asnumpy()}
    for w, g in zip(("wq", "wk", "wv"), grads[1:]):
        result[w] = all_reduce(g, group).asnumpy()
    return result
