"""One ShardedBatch per step: masks, sample groups and tile / FlashAttentionScore plans are built once per step
and shared by every layer and by backward (CP = 1, one process, a 2-layer model, packed documents that differ
per sample).  The outputs are checked against the float64 oracle: each document's logits equal the logits of
that document alone (``model_oracle.numpy_logits``), and the packed loss sum is the sum over documents.
"""
import re

import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor

import mf_longseq.attention.flash as flash_mod
import mf_longseq.attention.mask as mask_mod
from flash_emulator import NumpyFlashPrimitives
from mf_longseq.attention.flash import FlashKernel
from mf_longseq.attention.mask import AttentionMask, DenseMask
from mf_longseq.batch import ShardedBatch
from mf_longseq.config import LongSeqConfig
from mf_longseq.models import LlamaLongSeqConfig, build_model
from mf_longseq.parallel import Mesh
from model_oracle import numpy_logits, numpy_loss

S, LAYERS = 32, 2
DOC_ENDS = [[5, 19, 20, 32, 32], [11, 32, 32, 32, 32]]          # two samples, different documents


def model_of(compression: bool):
    cfg = LlamaLongSeqConfig.from_preset("tiny", seq_length=S, num_layers=LAYERS, initializer_range=0.2,
                                         use_eod_reset=True, use_attn_mask_compression=compression)
    long_seq = LongSeqConfig(block_size=8)
    return build_model(cfg, mesh=Mesh(rank=0), long_seq_config=long_seq)


def inputs(vocab):
    rng = np.random.default_rng(3)
    tokens = rng.integers(3, vocab, (2, S + 1))
    mask = (rng.random((2, S)) > 0.2).astype(np.float32)
    return tokens[:, :-1].astype(np.int32), tokens[:, 1:].astype(np.int32), mask, np.array(DOC_ENDS)


class Counts:
    """Counts what is built: mask objects, tile plans (tile_bounds runs twice per plan: query and key tiles)
    and FlashAttentionScore call plans."""

    def __init__(self, monkeypatch):
        self.masks = self.tile_bounds = self.flash_plans = 0
        for cls in (AttentionMask, DenseMask):
            init = cls.__init__

            def counted(mask, *a, _init=init, **k):
                self.masks += 1
                _init(mask, *a, **k)
            monkeypatch.setattr(cls, "__init__", counted)
        bounds, flash_plan = mask_mod.tile_bounds, flash_mod.plan_flash_calls

        def tiles(*a):
            self.tile_bounds += 1
            return bounds(*a)

        def calls(*a):
            self.flash_plans += 1
            return flash_plan(*a)
        monkeypatch.setattr(mask_mod, "tile_bounds", tiles)
        monkeypatch.setattr(flash_mod, "plan_flash_calls", calls)


def train_step(model, ids, labels, mask, ends):
    """Forward + backward of one step: (loss_sum, grads)."""
    fn = ms.value_and_grad(lambda a, b, c: model(a, b, c, ends)[0], None, model.trainable_params())
    loss, grads = fn(Tensor(ids), Tensor(labels), Tensor(mask))
    return float(loss.asnumpy()), [g.asnumpy() for g in grads]


def oracle_loss(model, ids, labels, mask):
    weights = {p.name: p.asnumpy().copy() for p in model.get_parameters()}   # copy: asnumpy() is a view
    total = 0.0
    for b, row in enumerate(DOC_ENDS):
        starts = [0] + row[:-1]
        for a, e in zip(starts, row):
            if e > a:
                logits = numpy_logits(weights, model.config, ids[b:b + 1, a:e])       # the document alone
                total += numpy_loss(logits, labels[b:b + 1, a:e], mask[b:b + 1, a:e])[0]
    return total


@pytest.mark.parametrize("kernel", ["default", "flash"])
@pytest.mark.parametrize("compression", [True, False])
def test_masks_and_plans_are_built_once_per_step(monkeypatch, compression, kernel):
    model = model_of(compression)
    if kernel == "flash":                      # FlashAttentionScore's documented op in NumPy (tests/flash_emulator.py)
        flash = FlashKernel(primitives=NumpyFlashPrimitives(), compute_dtype=ms.float32)
        for layer in model.model.layers:
            layer.self_attn.core.kernel = flash
    ids, labels, mask, ends = inputs(model.config.vocab_size)
    counts = Counts(monkeypatch)
    loss, grads = train_step(model, ids, labels, mask, ends)
    groups = 2                                 # the two samples hold different documents: one group each
    assert counts.masks == groups              # CP = 1: one ring mask per group, for both layers and backward
    tiled = kernel == "default" and not compression         # DenseMask: tiles read by the blockwise kernel
    assert counts.tile_bounds == (2 * groups if tiled else 0)
    assert counts.flash_plans == (groups if kernel == "flash" else 0)
    want = oracle_loss(model, ids, labels, mask)
    assert abs(loss - want) <= 1e-5 * want, (loss, want)
    assert all(np.isfinite(g).all() for g in grads) and any(np.abs(g).max() > 0 for g in grads)


def test_one_plan_for_a_batch_of_one_document():
    model = model_of(True)
    ids = Tensor(np.zeros((3, S), np.int32))
    batch = model.make_batch(ids)
    assert batch.seq_len == S and batch.segment_ids is None and batch.dense_mask is None
    assert len(batch.attention.groups) == 1 and batch.attention.groups[0].members == (0, 1, 2)
    assert batch.cos.shape == (1, S, 1, model.config.head_dim)


def test_whole_sequences_are_cut_like_the_shards():
    """``from_whole`` on CP rank 1 of 2 equals ``from_shards`` of the shards it cut."""
    cfg = LlamaLongSeqConfig.from_preset("tiny", seq_length=S, use_eod_reset=True)
    long_seq = LongSeqConfig(context_parallel=2)
    model = build_model(cfg, mesh=Mesh(cp=2, rank=1), long_seq_config=long_seq)
    ids, labels, mask, ends = inputs(cfg.vocab_size)
    whole = ShardedBatch.from_whole(model.batch_spec, ids, labels, mask, ends)
    pos = whole.positions
    shards = model.make_batch(Tensor(ids[:, pos]), Tensor(labels[:, pos]), Tensor(mask[:, pos]), ends)
    assert whole.seq_len == shards.seq_len == S and whole.input_ids.shape == (2, S // 2)
    for a, b in ((whole.input_ids, shards.input_ids), (whole.labels, shards.labels), (whole.cos, shards.cos)):
        np.testing.assert_array_equal(a.asnumpy(), b.asnumpy())
    np.testing.assert_array_equal(whole.segment_ids, shards.segment_ids)
    assert [g.members for g in whole.attention.groups] == [(0,), (1,)]


def test_a_plan_of_another_batch_is_refused():
    from mf_longseq.attention import context_parallel_attention
    model = model_of(True)
    plan = model.make_batch(Tensor(np.zeros((3, S), np.int32))).attention
    q = Tensor(np.zeros((2, S, 4, 8), np.float32))
    with pytest.raises(ValueError, match="attention_plan built for batch = 3, the call has 2. Fix: build the plan"):
        context_parallel_attention(q, q, q, mesh=Mesh(rank=0), attention_plan=plan)


@pytest.mark.parametrize("built, call, message", [
    (dict(seq_len=S // 2), {}, f"seq_len = {S // 2}, the call has {S}"),
    (dict(mesh=Mesh(cp=2, rank=1)), {}, "ring degree = 2, the call has 1"),
    (dict(causal=False), {}, "causal = False, the call has True"),
    (dict(layout="contiguous"), {}, "layout = 'contiguous', the call has 'zigzag'"),
    ({}, dict(segment_ids=np.zeros(S, np.int64)), "attention_plan given together with segment_ids / dense_mask"),
])
def test_a_plan_that_does_not_fit_the_call_is_refused(built, call, message):
    """A plan applies its masks by position: one built for another length, ring rank, layout or causal setting,
    or passed beside segment_ids, would give wrong attention without an error."""
    from mf_longseq.attention import context_parallel_attention
    from mf_longseq.attention.attention_plan import AttentionPlan
    spec = dict(batch=2, seq_len=S, mesh=Mesh(rank=0), layout="zigzag", causal=True)
    plan = AttentionPlan.build(**{**spec, **built})
    q = Tensor(np.zeros((2, S, 4, 8), np.float32))
    with pytest.raises(ValueError, match=re.escape(message)):
        context_parallel_attention(q, q, q, mesh=Mesh(rank=0), attention_plan=plan, **call)


def test_document_ids_of_another_length_are_refused():
    from mf_longseq.attention import context_parallel_attention
    q = Tensor(np.zeros((2, S, 4, 8), np.float32))
    with pytest.raises(ValueError, match=rf"segment_ids shape \(2, {S // 2}\): expected \(S,\) or \(B, S\) with "
                                         rf"B = 2, S = {S}. Fix"):
        context_parallel_attention(q, q, q, mesh=Mesh(rank=0), segment_ids=np.zeros((2, S // 2), np.int64))
