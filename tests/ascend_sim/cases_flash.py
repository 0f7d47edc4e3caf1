"""FlashKernel cases: forward and ``ms.grad`` backward through FlashAttentionScore / FlashAttentionScoreGrad on
the simulated Ascend, for every kind of call ``flash_args`` plans (BNSD sparse_mode 0 without mask, 0 with the
dense mask, 2 and 3 with the 2048 x 2048 compressed mask; TND sparse_mode 3 with actual_seq_qlen/kvlen).

Each case checks: out (B, N, S_q, D) in q's dtype, lse (B, N, S_q) float32, dq/dk/dv of q/k/v's shapes and
dtypes, and that the plan really contains the kind of call the case is about.  Batches: ``flash`` (single
calls) and ``flash_ring`` (every ring-step mask of chosen ranks of CP in {2, 4, 8}, zigzag and contiguous).
"""
import numpy as np
import mindspore as ms
from mindspore import ops

from asim_worker import batch, case

B, N, K, D = 2, 8, 2, 128                  # GQA by default: 4 query heads per kv head
FLASH = batch("flash")                          # one process: single calls and ring steps


def _tensor(shape, dtype=ms.bfloat16):
    return ops.ones(shape, ms.float32).astype(dtype) * 0.01


def calls_of(plan):
    """(input_layout, sparse_mode, mask kind) of each planned call, and its rows x cols."""
    return [{"input_layout": c.input_layout, "sparse_mode": int(c.sparse_mode), "mask": c.mask, "rows": len(c.q_index),
             "cols": len(c.k_index), "segments": len(c.seq_qlen)} for c in plan]


def run_kernel(mask, *, batch=B, heads=N, kv_heads=K, dim=D, dtype=ms.bfloat16, expect=None, scale=None):
    """Forward + backward of ``LocalAttention(FlashKernel(), mask)``; shape/dtype checks; returns the info.

    ``expect``: (input_layout, sparse_mode, mask) kinds that must all be in the plan.
    """
    from mf_longseq.attention.flash import FlashKernel
    from mf_longseq.attention.kernel import LocalAttention, default_scale
    s_q, s_k = len(mask.q_pos), len(mask.k_pos)
    q = _tensor((batch, heads, s_q, dim), dtype)
    k, v = _tensor((batch, kv_heads, s_k, dim), dtype), _tensor((batch, kv_heads, s_k, dim), dtype)
    kernel = FlashKernel()
    calls = calls_of(kernel.plan(mask, batch))
    kinds = {(c["input_layout"], c["sparse_mode"], c["mask"]) for c in calls}
    missing = set(expect or ()) - kinds
    assert not missing, f"the plan has no call of kind {sorted(missing)}: {calls}"
    attn = LocalAttention(kernel, mask, default_scale(dim) if scale is None else scale)
    out, lse = attn(q, k, v)
    assert out.shape == q.shape and out.dtype == q.dtype, f"out {out.shape} {out.dtype}, q {q.shape} {q.dtype}"
    assert lse.shape == q.shape[:3] and lse.dtype == ms.float32, f"lse {lse.shape} {lse.dtype}"
    weight = _tensor(q.shape, ms.float32)

    def loss(a, b, c):
        return (attn(a, b, c)[0].astype(ms.float32) * weight).sum()
    grads = ms.grad(loss, grad_position=(0, 1, 2))(q, k, v)
    for name, g, x in zip("qkv", grads, (q, k, v)):
        assert g.shape == x.shape and g.dtype == x.dtype, f"d{name} {g.shape} {g.dtype} vs {x.shape} {x.dtype}"
    grads[0].asnumpy()                                   # the whole backward has run
    return {"calls": calls, "kinds": sorted(kinds), "out": list(out.shape), "lse": list(lse.shape)}


def _mask(s_q, s_k=None, causal=True, q_pos=None, docs=None):
    from mf_longseq.attention.mask import AttentionMask
    s_k = s_q if s_k is None else s_k
    k_pos = np.arange(s_k, dtype=np.int64)
    q_pos = np.arange(s_k - s_q, s_k, dtype=np.int64) if q_pos is None else q_pos
    q_doc = None if docs is None else np.asarray(docs)[q_pos]
    k_doc = None if docs is None else np.asarray(docs)[k_pos]
    return AttentionMask(q_pos, k_pos, causal, q_doc, k_doc)


def _docs(seq_len, ends):
    """Document id of every token for cumulative document ends."""
    return np.searchsorted(np.asarray(ends), np.arange(seq_len), side="right").astype(np.int64)


# ------------------------------------------------------------------------------------------------ single calls
@case(FLASH, "causal_bnsd_mode2")
def causal():
    return run_kernel(_mask(4096), heads=8, kv_heads=8, expect=[("BNSD", 2, "compressed")])


@case(FLASH, "not_causal_mode0_no_mask")
def not_causal():
    return run_kernel(_mask(4096, causal=False), expect=[("BNSD", 0, "none")])


@case(FLASH, "gqa_8q_2kv")
def gqa():
    return run_kernel(_mask(2048), heads=8, kv_heads=2, expect=[("BNSD", 2, "compressed")])


@case(FLASH, "gqa_kv1_float16")
def gqa_one_kv_head():
    return run_kernel(_mask(2048), heads=8, kv_heads=1, dtype=ms.float16, expect=[("BNSD", 2, "compressed")])


@case(FLASH, "float32_inputs_compute_bf16")
def float32_inputs():
    return run_kernel(_mask(1024), dtype=ms.float32, expect=[("BNSD", 2, "compressed")])


@case(FLASH, "suffix_queries_mode3")
def suffix_queries():
    return run_kernel(_mask(1024, 4096), expect=[("BNSD", 3, "compressed")])


@case(FLASH, "seq_not_multiple_of_2048")
def odd_length():
    return run_kernel(_mask(3000), expect=[("BNSD", 2, "compressed")])


@case(FLASH, "seq_shorter_than_2048_mode3")
def short_suffix():
    return run_kernel(_mask(500, 1500), expect=[("BNSD", 3, "compressed")])


@case(FLASH, "head_dim_64")
def head_dim_64():
    return run_kernel(_mask(2048), dim=64, expect=[("BNSD", 2, "compressed")])


@case(FLASH, "dense_mask_mode0")
def dense_mask():
    from mf_longseq.attention.mask import DenseMask, dense_attention_mask
    s = 2048
    docs = _docs(s, [700, 1500, s])
    grid = dense_attention_mask(1, s, docs)
    pos = np.arange(s, dtype=np.int64)
    return run_kernel(DenseMask(pos, pos, True, docs, docs, grid=grid), expect=[("BNSD", 0, "dense")])


@case(FLASH, "packed_documents_tnd")
def packed():
    s = 4096
    docs = _docs(s, [300, 1000, 2900, 3000, s])
    return run_kernel(_mask(s, docs=docs), expect=[("TND", 3, "compressed")])


@case(FLASH, "packed_documents_tnd_batch1_one_token_docs")
def packed_tiny_docs():
    s = 2048
    ends = list(range(1, 9)) + [1024, s]                  # eight one-token documents, then two long ones
    return run_kernel(_mask(s, docs=_docs(s, ends)), batch=1, expect=[("TND", 3, "compressed")])


@case(FLASH, "packed_documents_per_sample_ids")
def packed_per_sample():
    """(B, S) ids, samples different: context_parallel_attention groups samples (CP = 1, FlashKernel)."""
    from mf_longseq.attention.api import context_parallel_attention
    from mf_longseq.attention.flash import FlashKernel
    from mf_longseq.parallel.mesh import Mesh
    s = 2048
    ids = np.stack([_docs(s, [500, s]), _docs(s, [1200, 1900, s])])
    q, k = _tensor((2, s, N, D)), _tensor((2, s, K, D))
    mesh = Mesh(rank=0, device_target="Ascend")

    def loss(a, b, c):
        out = context_parallel_attention(a, b, c, mesh=mesh, kernel=FlashKernel(), segment_ids=ids)
        assert out.shape == a.shape and out.dtype == a.dtype, f"out {out.shape} {out.dtype}"
        return out.astype(ms.float32).sum()
    grads = ms.grad(loss, grad_position=(0, 1, 2))(q, k, k)
    assert [g.shape for g in grads] == [q.shape, k.shape, k.shape], [g.shape for g in grads]
    return {"grads": [list(g.shape) for g in grads]}


@case(FLASH, "packed_documents_tnd_over_1024_segments")
def many_segments():
    """More than 1024 document pieces: the plan splits the TND calls (the op takes at most 1024 per call)."""
    s = 2600
    docs = np.arange(s, dtype=np.int64) // 2                         # 1300 two-token documents
    info = run_kernel(_mask(s, docs=docs), batch=1, heads=2, kv_heads=1, dim=64,
                      expect=[("TND", 3, "compressed")])
    assert all(c["segments"] <= 1024 for c in info["calls"]), info["calls"]
    info["calls"] = [c for c in info["calls"] if c["input_layout"] == "TND"]
    return info


@case(FLASH, "bad_argument_kv_heads")
def bad_argument():
    """kv heads that do not divide the query heads: MindSpore's Ascend infer must refuse (error text asserted
    by the test)."""
    return run_kernel(_mask(1024), heads=8, kv_heads=3)


# ------------------------------------------------------------------------------------------------ ring steps
RING_SEQ = 16384


def ring_step_cases(cp: int, rank: int, layout: str, docs=None, seq_len=RING_SEQ, dense=None):
    """Forward + backward of every ring-step mask of ring rank ``rank`` of CP = ``cp`` (steps with work only)."""
    from mf_longseq.attention.attention_plan import ring_masks
    from mf_longseq.parallel.mesh import Mesh
    mesh = Mesh(cp=cp, rank=rank)
    steps = []
    for j, mask in enumerate(ring_masks(seq_len, mesh, layout, True, docs, dense)):
        if not mask.visible_pairs():
            steps.append({"source": j, "skipped": True})
            continue
        info = run_kernel(mask, batch=1, heads=4, kv_heads=2)
        steps.append({"source": j, "kinds": info["kinds"], "calls": len(info["calls"])})
    assert any("kinds" in s for s in steps), steps
    return {"steps": steps}


for _cp in (2, 4, 8):
    for _layout in ("zigzag", "contiguous"):
        for _rank in range(_cp):
            case(FLASH, f"ring_cp{_cp}_rank{_rank}_{_layout}")(
                lambda cp=_cp, rank=_rank, layout=_layout: ring_step_cases(cp, rank, layout))


@case(FLASH, "cp4_rank1_zigzag_packed_documents")
def ring_packed():
    docs = _docs(RING_SEQ, [1000, 5000, 5100, 12000, RING_SEQ])    # documents crossing chunk boundaries
    return ring_step_cases(4, 1, "zigzag", docs)


@case(FLASH, "ring_cp4_rank1_zigzag_seq_not_multiple_of_2048")
def ring_odd_length():
    return ring_step_cases(4, 1, "zigzag", seq_len=12008)               # zigzag chunks of 1501 tokens


@case(FLASH, "ring_cp4_rank1_zigzag_dense_mask")
def ring_dense():
    """use_attn_mask_compression off: every ring step reads its tile of MindFormers' (S, S) mask."""
    from mf_longseq.attention.mask import dense_attention_mask
    seq_len = 4096
    docs = _docs(seq_len, [1000, 2500, seq_len])
    info = ring_step_cases(4, 1, "zigzag", docs, seq_len, dense_attention_mask(1, seq_len, docs))
    assert any(("BNSD", 0, "dense") in s.get("kinds", []) for s in info["steps"]), info
    return info
