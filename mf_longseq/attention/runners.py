"""How colossalai_cp, ulysses_cp and hybrid_cp run: the ``run`` of their rows in ``parallel/algorithms.py``.

Every ``run`` takes this rank's (B, S/CP, N, D) q and (B, S/CP, K, D) k, v, the mesh (its groups), the local
kernel, the per-step masks the row's ``masks`` built (``masks[j]``: this rank's queries against part j of the
keys), the softmax scale, the Ulysses exchange (``use_alltoall``) and ``token_major`` (the kernel reads
(B, S, N, D) directly; otherwise it takes the (B, N, S, D) of the kernel contract), and returns this rank's
(B, S/CP, N, D) output.  The algorithms themselves live in ``ring.py``, ``ulysses.py`` and ``hybrid.py``.
"""
from mf_longseq.attention.hybrid import hybrid_attention
from mf_longseq.attention.kernel import LocalAttention
from mf_longseq.attention.ring import RingAttention
from mf_longseq.attention.ulysses import ulysses_attention


def sequence_major(inner, q, k, v, token_major: bool):
    """``inner(q, k, v) -> (out, lse)`` on (B, S, N, D) tensors: as they are for a token-major kernel, else
    transposed to (B, N, S, D) and back."""
    if token_major:
        return inner(q, k, v)[0]                                                # (B, S/CP, N, D)
    out, _ = inner(q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3))
    return out.transpose(0, 2, 1, 3)                                            # (B, S/CP, N, D)


def run_ring(q, k, v, *, mesh, kernel, masks, scale, use_alltoall, token_major):
    """colossalai_cp (or CP = 1): the ring over ``mesh.group("ring")`` on this rank's own part."""
    inner = (RingAttention(mesh.group("ring"), kernel, masks, scale) if mesh.ring > 1
             else LocalAttention(kernel, masks[0], scale))
    return sequence_major(inner, q, k, v, token_major)


def run_ulysses(q, k, v, *, mesh, kernel, masks, scale, use_alltoall, token_major):
    """ulysses_cp: the all-to-all over ``mesh.group("ulysses")`` around one call of the whole sequence."""
    if mesh.ulysses == 1:
        return run_ring(q, k, v, mesh=mesh, kernel=kernel, masks=masks, scale=scale, use_alltoall=use_alltoall,
                        token_major=token_major)
    return ulysses_attention(q, k, v, mesh.group("ulysses"), LocalAttention(kernel, masks[0], scale),
                             use_alltoall, token_major=token_major)


def run_hybrid(q, k, v, *, mesh, kernel, masks, scale, use_alltoall, token_major):
    """hybrid_cp: Ulysses inside, the ring across; a degree of 1 on either side runs as the other alone."""
    if mesh.ulysses == 1 or mesh.ring == 1:
        run = run_ring if mesh.ulysses == 1 else run_ulysses
        return run(q, k, v, mesh=mesh, kernel=kernel, masks=masks, scale=scale, use_alltoall=use_alltoall,
                   token_major=token_major)
    return hybrid_attention(q, k, v, ulysses_group=mesh.group("ulysses"), ring_group=mesh.group("ring"),
                            kernel=kernel, masks=masks, scale=scale, use_alltoall=use_alltoall,
                            token_major=token_major)
