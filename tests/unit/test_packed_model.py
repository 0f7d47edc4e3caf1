"""Packed documents through the model and the trainer on one process (CP = 1).

The oracle: a packed sample is the same computation as its documents run one by one.  With block-diagonal
causal attention and (use_eod_reset) RoPE positions restarting per document, every document's logits equal
the logits of that document alone, and the packed loss sum is the sum of the per-document loss sums.
Multi-rank parity (ring, Ulysses, hybrid against CP = 1) is in tests/dist/test_packed_docs.py.
"""
import numpy as np
import pytest
from mindspore import Tensor

from mf_longseq.config import LongSeqConfig
from mf_longseq.models import LlamaLongSeqConfig, Qwen2LongSeqConfig, build_model
from mf_longseq.rope import rope_tables
from mf_longseq.parallel import Mesh, shard_sequence
from mf_longseq.train.data import SyntheticTokens, batch_for_step
from mf_longseq.train.optim import AdamW, OptimSettings
from mf_longseq.documents import position_ids_from_actual_seq_len
from mf_longseq.train.packing import EOD_PAD_KEY, PackingSettings, actual_seq_len_from_tokens
from mf_longseq.train.runner import Trainer

S, EOD = 32, 2
# Sample 0: documents [0, 5), [5, 19), [19, 20), [20, 32); sample 1: [0, 11), [11, 32).
DOC_ENDS = [[5, 19, 20, 32, 32], [11, 32, 32, 32, 32]]


def model_of(cls=LlamaLongSeqConfig, mesh=None, **kw):
    cfg = cls.from_preset("tiny", **{"seq_length": S, "initializer_range": 0.2, "use_eod_reset": True, **kw})
    cp = 1 if mesh is None else mesh.cp
    long_seq = LongSeqConfig(block_size=8, context_parallel=cp)
    return build_model(cfg, mesh=mesh or Mesh(rank=0), long_seq_config=long_seq)


def packed_batch(vocab):
    """(B, S) ids with an EOD closing every document, labels, a loss mask, and the (B, 5) document ends."""
    rng = np.random.default_rng(5)
    tokens = rng.integers(3, vocab, (2, S + 1))
    for b, ends in enumerate(DOC_ENDS):
        tokens[b, [e - 1 for e in ends[:-1] if e < S]] = EOD
    ids, labels = tokens[:, :-1].astype(np.int32), tokens[:, 1:].astype(np.int32)
    mask = (rng.random((2, S)) > 0.2).astype(np.float32)
    ends = actual_seq_len_from_tokens(ids, EOD, 5)
    assert ends.tolist() == DOC_ENDS                               # the EODs give the documents above
    return ids, labels, mask, ends


def documents(ends_row):
    starts = [0] + [e for e in ends_row[:-1]]
    return [(a, e) for a, e in zip(starts, ends_row) if e > a]


@pytest.mark.parametrize("cls", [LlamaLongSeqConfig, Qwen2LongSeqConfig])
def test_packed_sample_equals_its_documents_run_alone(cls):
    model = model_of(cls)
    ids, labels, mask, ends = packed_batch(model.config.vocab_size)
    packed = model.logits(Tensor(ids), Tensor(ends.astype(np.int32))).asnumpy()          # (B, S, V)
    loss_sum, count = model(Tensor(ids), Tensor(labels), Tensor(mask), ends)
    want_sum, scale = 0.0, np.abs(packed).max()
    for b in range(2):
        for a, e in documents(DOC_ENDS[b]):
            alone = model.logits(Tensor(ids[b:b + 1, a:e])).asnumpy()                     # no packing at all
            np.testing.assert_allclose(packed[b:b + 1, a:e], alone, rtol=0, atol=2e-5 * scale)
            part, _ = model(Tensor(ids[b:b + 1, a:e]), Tensor(labels[b:b + 1, a:e]), Tensor(mask[b:b + 1, a:e]))
            want_sum += float(part.asnumpy())
    assert abs(float(loss_sum.asnumpy()) - want_sum) <= 1e-5 * want_sum
    assert float(count.asnumpy()) == mask.sum()
    # without the document ids the same sample attends across documents: clearly different logits
    plain = model.logits(Tensor(ids)).asnumpy()
    assert np.abs(plain[0, 5:19] - packed[0, 5:19]).max() > 100 * 2e-5 * scale


def test_use_eod_reset_sets_the_rope_positions():
    """True: positions restart in each document; False: 0..S-1.  RoPE only sees position differences inside
    a document, so both give the same logits up to rounding; the tables the layers get are what differs."""
    reset, plain = model_of(), model_of(use_eod_reset=False)
    ends = np.array(DOC_ENDS)
    ids = Tensor(np.zeros((2, S), np.int32))
    step_reset, step_plain = reset.make_batch(ids, actual_seq_len=ends), plain.make_batch(ids, actual_seq_len=ends)
    ids_reset, cos, sin = step_reset.segment_ids, step_reset.cos, step_reset.sin
    ids_plain, cos_plain = step_plain.segment_ids, step_plain.cos
    np.testing.assert_array_equal(ids_reset, ids_plain)
    want_cos, want_sin = rope_tables(position_ids_from_actual_seq_len(ends, S), reset.config.head_dim,
                                     reset.config.theta)
    assert cos.shape == (2, S, 1, reset.config.head_dim)
    np.testing.assert_allclose(cos.asnumpy()[:, :, 0], want_cos)
    np.testing.assert_allclose(sin.asnumpy()[:, :, 0], want_sin)
    assert cos_plain.shape == (1, S, 1, reset.config.head_dim)                              # global positions
    np.testing.assert_allclose(cos_plain.asnumpy()[0, :, 0], rope_tables(np.arange(S), reset.config.head_dim,
                                                                         reset.config.theta)[0])
    assert np.abs(cos.asnumpy()[0, 5:] - cos_plain.asnumpy()[0, 5:]).max() > 0.1
    ids = packed_batch(reset.config.vocab_size)[0]
    a, b = (m.logits(Tensor(ids), ends).asnumpy() for m in (reset, plain))
    np.testing.assert_allclose(a, b, rtol=0, atol=2e-5 * np.abs(a).max())


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
def test_reset_positions_are_sharded_like_the_tokens(layout):
    cfg = LlamaLongSeqConfig.from_preset("tiny", seq_length=S, use_eod_reset=True)
    long_seq = LongSeqConfig(context_parallel=2, layout=layout)
    mesh = Mesh.from_config(long_seq, rank=1)                 # rank 1 of 2: no communication needed to build
    model = build_model(cfg, mesh=mesh, long_seq_config=long_seq)
    ends = np.array(DOC_ENDS)
    step = model.make_batch(Tensor(np.zeros((2, S // 2), np.int32)), actual_seq_len=ends)
    ids, cos = step.segment_ids, step.cos
    assert ids.shape == (2, S)                                                  # global ids for the attention
    mine = shard_sequence(position_ids_from_actual_seq_len(ends, S), mesh, layout, seq_dim=1)   # (B, S/2)
    np.testing.assert_allclose(cos.asnumpy()[:, :, 0], rope_tables(mine, cfg.head_dim, cfg.theta)[0])


def test_bad_inputs_name_the_key():
    with pytest.raises(ValueError, match=r"model\.model_config\.use_eod_reset = 'yes'.*Fix"):
        LlamaLongSeqConfig.from_preset("tiny", use_eod_reset="yes")
    model = model_of()
    ids = Tensor(np.zeros((3, S), np.int32))
    with pytest.raises(ValueError, match="actual_seq_len has 2 rows for a batch of 3"):
        model.logits(ids, np.array(DOC_ENDS))
    with pytest.raises(ValueError, match="actual_seq_len of sample 0"):
        model.logits(ids, np.array([[5, 40]]))


def test_packing_settings_from_mindformers_keys():
    loader = {"create_compressed_eod_mask": True, "eod_pad_length": 16}
    tree = {"train_dataset": {"data_loader": {"config": loader}}, "model": {"model_config": {"eos_token_id": 7}}}
    assert PackingSettings.from_mindformers(tree) == PackingSettings(7, 16, False)
    loader.update(eod=3, eod_mask_loss=True)
    assert PackingSettings.from_mindformers(tree) == PackingSettings(3, 16, True)
    loader.update(eod=-1, eod_pad_length=None)                         # MindFormers' "unset" EOD: eos_token_id
    loader.pop("eod_pad_length")
    assert PackingSettings.from_mindformers(tree) == PackingSettings(7, 128, True)
    loader["create_compressed_eod_mask"] = False
    assert PackingSettings.from_mindformers(tree) is None
    assert PackingSettings.from_mindformers({}) is None
    loader["create_compressed_eod_mask"] = True
    del tree["model"]
    with pytest.raises(ValueError, match=r"config\.eod = None \(or model\.model_config\.eos_token_id\).*Fix: set"):
        PackingSettings.from_mindformers(tree)


def test_synthetic_tokens_with_eod_are_seeded():
    plain = SyntheticTokens(64, 200, seed=3)
    packed = SyntheticTokens(64, 200, seed=3, eod_token_id=EOD, mean_document_length=20)
    a, b = packed.sample(4), packed.sample(4)
    np.testing.assert_array_equal(a, b)
    assert 3 <= int((a == EOD).sum()) <= 25
    assert not np.array_equal(a, packed.sample(5))
    np.testing.assert_array_equal(plain.sample(4), SyntheticTokens(64, 200, seed=3).sample(4))
    with pytest.raises(ValueError, match="EOD token id 64"):
        SyntheticTokens(64, 200, eod_token_id=64)


def trainer_of(model, packing, batch_size=2, mesh=None):
    source = SyntheticTokens(model.config.vocab_size, S, seed=1, eod_token_id=EOD, mean_document_length=8)
    return Trainer(model=model, mesh=mesh or Mesh(rank=0), optimizer=AdamW(model.trainable_params(),
                                                                            OptimSettings(learning_rate=0.0)),
                   source=source, batch_size=batch_size, layout="zigzag", packing=packing), source


@pytest.mark.parametrize("eod_mask_loss", [False, True])
def test_trainer_passes_document_ends_to_the_model(eod_mask_loss):
    model = model_of()
    trainer, source = trainer_of(model, PackingSettings(EOD, 16, eod_mask_loss))
    batch = batch_for_step(source, 0, batch_size=2)
    ids, labels, mask, ends = trainer.local_batch(0)
    want_ends = actual_seq_len_from_tokens(batch.input_ids, EOD, 16)
    assert (want_ends < S).sum() >= 4                                        # several documents per sample
    np.testing.assert_array_equal(ends.asnumpy(), want_ends)
    want_mask = batch.loss_mask * ((batch.input_ids != EOD) if eod_mask_loss else 1)
    np.testing.assert_array_equal(mask.asnumpy(), want_mask)
    loss_sum, count = model(ids, labels, mask, ends)
    result = trainer.step(0)                                                 # learning rate 0: weights kept
    assert result.loss == pytest.approx(float(loss_sum.asnumpy()) / float(count.asnumpy()), rel=1e-6)


def test_trainer_reports_too_many_documents():
    trainer, _ = trainer_of(model_of(), PackingSettings(EOD, 2))
    with pytest.raises(ValueError, match=rf"{EOD_PAD_KEY} = 2: sample 0 holds \d+ documents"):
        trainer.step(0)
