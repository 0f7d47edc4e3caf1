"""model.model_config.use_attn_mask_compression end to end.

On: visibility from positions (and document ids), the 2048 x 2048 compressed mask for FlashAttentionScore,
nothing S x S.  Off: MindFormers' dense (B, 1, S, S) uint8 mask, built and read tile by tile.  Both must give
the oracle's attention, also below 2048 tokens; the memory test measures that the S x S exists only when off.
"""
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor

from oracle import causal_allowed, reference_attention
import mf_longseq.attention.attention_plan as plan_mod
from mf_longseq.attention.attention_plan import ring_masks
from mf_longseq.attention.cpu_fused import FusedCpuKernel
from mf_longseq.attention.layer import ContextParallelAttention
from mf_longseq.attention.mask import (COMPRESSED_MASK_SIZE, AttentionMask, DenseMask, compressed_causal_mask,
                                       dense_attention_mask)
from mf_longseq.config import LongSeqConfig
from mf_longseq.parallel import Mesh

ROOT = Path(__file__).resolve().parents[2]


def test_compressed_mask_is_the_documented_upper_triangle():
    mask = compressed_causal_mask()
    assert mask.shape == (COMPRESSED_MASK_SIZE, COMPRESSED_MASK_SIZE) == (2048, 2048) and mask.dtype == np.uint8
    i, j = np.indices(mask.shape)
    assert np.array_equal(mask == 1, j > i)                                   # 1 = masked, above the diagonal
    assert not mask.flags.writeable and compressed_causal_mask() is mask


def test_dense_mask_equals_mindformers_lower_triangular_mask():
    from mindformers.modules.transformer.transformer import LowerTriangularMaskWithDynamic
    tokens = np.array([[3, 4, 5, 6, 7, 8, 9], [3, 4, 5, 6, 0, 0, 0]], np.int32)  # pad_token_id 0
    theirs = LowerTriangularMaskWithDynamic(seq_length=7, batch_size=2, use_flash_attention=True)(Tensor(tokens))
    ours = dense_attention_mask(2, 7, pad_mask=tokens != 0)
    assert ours.dtype == np.uint8 and ours.shape == (2, 1, 7, 7)
    assert np.array_equal(ours, theirs.asnumpy())


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
def test_dense_tiles_equal_position_tiles(layout):
    seq_len = 96
    ids = np.searchsorted([10, 40, 51, 96], np.arange(seq_len), side="right")
    for docs in (None, ids):
        grid = dense_attention_mask(1, seq_len, docs)
        for rank in range(4):
            mesh = Mesh(cp=4, ulysses=2 if rank % 2 else 1, rank=rank)
            for pos_mask, dense in zip(ring_masks(seq_len, mesh, layout, True, docs),
                                       ring_masks(seq_len, mesh, layout, True, docs, dense_mask=grid)):
                assert isinstance(dense, DenseMask) and not isinstance(pos_mask, DenseMask)
                assert np.array_equal(dense.dense(), pos_mask.dense())
                assert dense.plan(16) == pos_mask.plan(16)


class MaskSpy:
    """Records which mask classes reach the kernel (blockwise or fused) and whether a dense mask is built."""

    def __init__(self, monkeypatch):
        self.dense_calls, self.kinds = [], set()
        real = plan_mod.dense_attention_mask

        def build(*args, **kwargs):
            self.dense_calls.append(args[:2])
            return real(*args, **kwargs)
        monkeypatch.setattr(plan_mod, "dense_attention_mask", build)
        original = AttentionMask.plan

        def plan(mask, block):
            self.kinds.add(type(mask).__name__)
            return original(mask, block)
        monkeypatch.setattr(AttentionMask, "plan", plan)
        mask_args = FusedCpuKernel._mask_args                 # the fused CPU kernel takes masks here (no plan)

        def fused(kernel, mask, *args):
            self.kinds.add(type(mask).__name__)
            return mask_args(kernel, mask, *args)
        monkeypatch.setattr(FusedCpuKernel, "_mask_args", fused)


def run_layer(seq_len, compression, segment_ids=None, block=16, b=2, n=4, kv=2, d=8, seed=0):
    cfg = LongSeqConfig(block_size=block)
    layer = ContextParallelAttention(config=cfg, mesh=Mesh(rank=0), use_attn_mask_compression=compression)
    rng = np.random.default_rng(seed)
    q, dout = (rng.standard_normal((b, seq_len, n, d)).astype(np.float32) for _ in range(2))
    k, v = (rng.standard_normal((b, seq_len, kv, d)).astype(np.float32) for _ in range(2))

    def loss(q_, k_, v_):
        out = layer(q_, k_, v_, segment_ids)
        return (out * Tensor(dout)).sum(), out
    (_, out), grads = ms.value_and_grad(loss, grad_position=(0, 1, 2), has_aux=True)(Tensor(q), Tensor(k), Tensor(v))
    errors = []
    pos = np.arange(seq_len)
    ids = None if segment_ids is None else np.broadcast_to(segment_ids, (b, seq_len))
    for i in range(b):
        doc = None if ids is None else ids[i]
        ref_out, _, ref = reference_attention(q[i:i + 1], k[i:i + 1], v[i:i + 1], causal_allowed(pos, pos, doc, doc),
                                              d ** -0.5, dout[i:i + 1])
        errors.append(np.abs(out.asnumpy()[i:i + 1] - ref_out).max())
        errors += [np.abs(g.asnumpy()[i:i + 1] - r).max() for g, r in zip(grads, ref)]
    return max(errors)


@pytest.mark.parametrize("seq_len,block", [(40, 16), (1000, 512), (2048 + 64, 1056)])
@pytest.mark.parametrize("docs", [False, True])
def test_both_paths_match_the_oracle_also_below_2048(monkeypatch, seq_len, block, docs):
    ids = None
    if docs:
        ends = [seq_len // 3, seq_len // 3 + 5, seq_len]
        ids = np.stack([np.searchsorted(ends, np.arange(seq_len), side="right"),
                        np.zeros(seq_len, np.int64)])                             # per sample: docs / one doc
    for compression in (True, False):
        spy = MaskSpy(monkeypatch)
        assert run_layer(seq_len, compression, ids, block=block, n=2, kv=1) <= 1e-5
        if compression:
            assert spy.dense_calls == [] and spy.kinds == {"AttentionMask"}
        else:
            assert spy.dense_calls == [(2, seq_len)] and spy.kinds == {"DenseMask"}


def test_compression_off_shares_one_dense_mask_between_layers(monkeypatch):
    """The step's batch builds one (B, 1, S, S) mask, every layer reads that one, and nothing keeps it after the
    step (it lives in the batch, not in a module cache)."""
    import gc
    import weakref
    from mf_longseq.models import LlamaLongSeqConfig, build_model
    cfg = LlamaLongSeqConfig.from_preset("tiny", seq_length=64, use_attn_mask_compression=False)
    long_seq = LongSeqConfig(block_size=16)
    model = build_model(cfg, mesh=Mesh(rank=0), long_seq_config=long_seq)
    spy, grids = MaskSpy(monkeypatch), []
    planned = AttentionMask.plan

    def plan(mask, block):
        grids.append(mask.grid)
        return planned(mask, block)
    monkeypatch.setattr(AttentionMask, "plan", plan)
    ids = Tensor(np.zeros((1, 64), np.int32))
    batch = model.make_batch(ids, actual_seq_len=np.array([[20, 64]]))
    first = batch.dense_mask
    model.head_logits(model.model(batch))
    assert spy.dense_calls == [(1, 64)] and len(grids) == cfg.num_layers and all(g is first for g in grids)
    other = model.make_batch(ids).dense_mask
    assert other is not first and not np.array_equal(other, first) and other.nbytes == 64 * 64
    gone = weakref.ref(first)
    grids.clear()
    del batch, first
    gc.collect()
    assert gone() is None


def _probe(seq_len, compression):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from mask_memory import run_probe
    return run_probe(seq_len, compression, block=2048, timeout=1800)


def test_memory_no_s_by_s_with_compression():
    """Tiny model forward+backward at S = 32768 (MF_LONGSEQ_MASK_MEMORY_S to change) in a fresh process."""
    seq_len = int(os.environ.get("MF_LONGSEQ_MASK_MEMORY_S", "32768"))
    s2 = seq_len * seq_len
    on, off = _probe(seq_len, True), _probe(seq_len, False)
    assert on["peak_delta"] < s2 / 2, on                                     # far below S^2 bytes
    assert off["peak_delta"] >= s2, off                                      # the dense (1, 1, S, S) mask
    assert off["peak_delta"] - on["peak_delta"] >= 0.9 * s2, (on, off)
