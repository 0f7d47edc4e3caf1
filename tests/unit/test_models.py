"""The shared decoder on one process (CP = 1) against a float64 NumPy forward of the same weights; sizes, errors.

Multi-rank parity (CP = 2, 4 against CP = 1) lives with the training runner's msrun tests.
"""
import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor

from mf_longseq.config import LongSeqConfig
from mf_longseq.models import (LLAMA2_PRESETS, QWEN1_5_PRESETS, QWEN_PRESETS, LlamaLongSeqConfig,
                               Qwen2LongSeqConfig, QwenLongSeqConfig, build_model, count_parameters,
                               parameter_shapes)
from mf_longseq.rope import rope_tables
from mf_longseq.parallel import Mesh, global_positions
from model_oracle import numpy_logits, numpy_loss

S = 24

# Published totals: the "Model size" of each Hugging Face model card (the count HF reads from the safetensors
# files): meta-llama/Llama-2-{7b,13b,70b}-hf, Qwen/Qwen-{7B,14B,72B}, Qwen/Qwen1.5-{7B,14B,72B}.
# (Meta's paper gives only the nominal 7B/13B/70B; 70B is 68.98e9 exactly.)
PUBLISHED = [
    (LlamaLongSeqConfig, "7b", 6.74e9), (LlamaLongSeqConfig, "13b", 13.0e9), (LlamaLongSeqConfig, "70b", 69.0e9),
    (QwenLongSeqConfig, "7b", 7.72e9), (QwenLongSeqConfig, "14b", 14.2e9), (QwenLongSeqConfig, "72b", 72.3e9),
    (Qwen2LongSeqConfig, "7b", 7.72e9), (Qwen2LongSeqConfig, "14b", 14.2e9), (Qwen2LongSeqConfig, "72b", 72.3e9),
]

FAMILIES = [(LlamaLongSeqConfig, {}), (Qwen2LongSeqConfig, {}), (QwenLongSeqConfig, {}),
            (LlamaLongSeqConfig, {"tie_word_embeddings": True, "n_kv_heads": 1})]


@pytest.mark.parametrize("cls, size, published", PUBLISHED)
def test_parameter_count_within_one_percent_of_published(cls, size, published):
    total = count_parameters(cls.from_preset(size))
    assert abs(total - published) / published < 0.01, (cls.__name__, size, total)


def test_published_shapes():
    assert LlamaLongSeqConfig.from_preset("70b").n_kv_heads == 8
    assert LlamaLongSeqConfig.from_preset("70b").ffn_hidden_size == 28672
    # without intermediate_size the MindFormers LLaMA rule gives the published widths
    assert LlamaLongSeqConfig(hidden_size=4096).ffn_hidden_size == 11008
    assert LlamaLongSeqConfig(hidden_size=8192, multiple_of=4096, ffn_dim_multiplier=1.3).ffn_hidden_size == 28672
    assert QwenLongSeqConfig.from_preset("7b").ffn_hidden_size == 11008          # v1: 22016 // 2
    q15 = Qwen2LongSeqConfig.from_preset("72b")
    assert (q15.theta, q15.qkv_has_bias, q15.tie_word_embeddings) == (1e6, True, False)
    assert set(LLAMA2_PRESETS) >= {"7b", "13b", "70b"}
    assert set(QWEN_PRESETS) >= {"7b", "14b", "72b"} and set(QWEN1_5_PRESETS) >= {"7b", "14b", "72b"}


def tiny(cls, **kw):
    return cls.from_preset("tiny", **{"seq_length": S, **kw})


def single(cfg, **ls):
    long_seq = LongSeqConfig(block_size=8, **ls)
    return build_model(cfg, mesh=Mesh(rank=0), long_seq_config=long_seq)


def batch(vocab, b=2, s=S, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (b, s + 1))
    mask = (rng.random((b, s)) > 0.25).astype(np.float32)
    return tokens[:, :-1].astype(np.int32), tokens[:, 1:].astype(np.int32), mask


def weights(model):
    return {p.name: np.array(p.asnumpy()) for p in model.get_parameters()}


@pytest.mark.parametrize("cls, kw", FAMILIES)
def test_loss_and_logits_match_numpy_float64(cls, kw):
    cfg = tiny(cls, initializer_range=0.2, **kw)        # larger weights: logits far from uniform
    model = single(cfg)
    assert sorted(weights(model)) == sorted(parameter_shapes(cfg))
    for name, shape in parameter_shapes(cfg).items():
        assert weights(model)[name].shape == shape
    ids, labels, mask = batch(cfg.vocab_size)
    want = numpy_logits(weights(model), cfg, ids)
    got = np.array(model.logits(Tensor(ids)).asnumpy())
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * np.abs(want).max())
    loss_sum, count = model(Tensor(ids), Tensor(labels), Tensor(mask))
    want_sum, want_count = numpy_loss(want, labels, mask)
    assert abs(float(loss_sum.asnumpy()) - want_sum) < 1e-5 * want_sum
    assert float(count.asnumpy()) == want_count


def test_gradient_matches_finite_differences_of_numpy():
    cfg = tiny(Qwen2LongSeqConfig, initializer_range=0.2)
    model = single(cfg)
    ids, labels, mask = batch(cfg.vocab_size, b=1, seed=3)
    names = ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.bias",
             "model.layers.0.mlp.gate_proj.weight", "model.embed_tokens.weight", "model.norm.weight"]
    params = [p for p in model.trainable_params() if p.name in names]
    grad_fn = ms.grad(lambda i, l, m: model(i, l, m)[0], None, params)
    # np.array copies: asnumpy() of a freed Tensor may alias memory MindSpore reuses
    grads = grad_fn(Tensor(ids), Tensor(labels), Tensor(mask))
    grads = {p.name: np.array(g.asnumpy()) for p, g in zip(params, grads)}
    base = weights(model)
    rng = np.random.default_rng(0)
    for name in names:
        for _ in range(3):
            idx = tuple(int(rng.integers(0, n)) for n in base[name].shape)
            if name == "model.embed_tokens.weight":
                idx = (int(ids[0, 5]),) + idx[1:]                      # a row that is looked up
            eps = 1e-4
            plus, minus = dict(base), dict(base)
            plus[name] = base[name].astype(np.float64).copy()
            minus[name] = plus[name].copy()
            plus[name][idx] += eps
            minus[name][idx] -= eps
            fd = (numpy_loss(numpy_logits(plus, cfg, ids), labels, mask)[0]
                  - numpy_loss(numpy_logits(minus, cfg, ids), labels, mask)[0]) / (2 * eps)
            assert abs(grads[name][idx] - fd) < 1e-3 * max(1.0, abs(fd)), (name, idx, grads[name][idx], fd)


def test_bfloat16_compute_stays_close_to_float64():
    cfg = tiny(LlamaLongSeqConfig, compute_dtype="bfloat16")
    model = single(cfg)
    ids, labels, mask = batch(cfg.vocab_size)
    loss_sum, count = model(Tensor(ids), Tensor(labels), Tensor(mask))
    want_sum, _ = numpy_loss(numpy_logits(weights(model), cfg, ids), labels, mask)
    assert loss_sum.dtype == ms.float32
    assert abs(float(loss_sum.asnumpy()) - want_sum) < 2e-2 * want_sum


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
def test_rope_uses_global_positions_of_the_shard(layout):
    cfg = tiny(LlamaLongSeqConfig, seq_length=32)
    long_seq = LongSeqConfig(context_parallel=2, layout=layout)
    mesh = Mesh.from_config(long_seq, rank=1)                 # rank 1 of 2, no communication needed to build
    model = build_model(cfg, mesh=mesh, long_seq_config=long_seq)
    step = model.make_batch(Tensor(np.zeros((1, 16), np.int32)))
    pos = step.positions
    assert step.seq_len == 32
    np.testing.assert_array_equal(pos, global_positions(32, mesh, layout))
    cos, sin = step.cos, step.sin
    want_cos, want_sin = rope_tables(pos, cfg.head_dim, cfg.theta)
    np.testing.assert_allclose(cos.asnumpy()[0, :, 0], want_cos)
    np.testing.assert_allclose(sin.asnumpy()[0, :, 0], want_sin)


def test_shifted_positions_match_oracle_rope():
    """A CP=1 forward at positions p..p+S equals the oracle at the same positions (RoPE is relative)."""
    cfg = tiny(LlamaLongSeqConfig, initializer_range=0.2)
    model = single(cfg)
    ids, _, _ = batch(cfg.vocab_size)
    np.testing.assert_allclose(numpy_logits(weights(model), cfg, ids, positions=np.arange(S) + 1000),
                               numpy_logits(weights(model), cfg, ids), atol=1e-9)


def test_same_seed_same_weights_other_seed_other_weights():
    a, b = single(tiny(LlamaLongSeqConfig)), single(tiny(LlamaLongSeqConfig))
    c = single(tiny(LlamaLongSeqConfig, init_seed=7))
    wa, wb, wc = weights(a), weights(b), weights(c)
    assert all(np.array_equal(wa[k], wb[k]) for k in wa)
    assert not np.array_equal(wa["model.embed_tokens.weight"], wc["model.embed_tokens.weight"])


@pytest.mark.parametrize("kw, match", [
    (dict(hidden_size=62), r"model.model_config.hidden_size = 62: must be divisible by num_heads = 4"),
    (dict(hidden_size=60), r"model.model_config.hidden_size = 60: gives an odd head_dim 15"),
    (dict(n_kv_heads=3), r"model.model_config.n_kv_heads = 3: must divide num_heads = 4"),
    (dict(compute_dtype="int8"), r"model.model_config.compute_dtype = 'int8'"),
    (dict(num_layers=0), r"model.model_config.num_layers = 0: must be a positive integer"),
])
def test_shape_errors_name_the_key(kw, match):
    with pytest.raises(ValueError, match=match):
        LlamaLongSeqConfig.from_preset("tiny", **kw)


def test_qwen_v1_intermediate_size_must_be_even():
    with pytest.raises(ValueError, match=r"intermediate_size = 255: Qwen v1 counts both SwiGLU halves"):
        QwenLongSeqConfig.from_preset("tiny", intermediate_size=255)


def test_unknown_preset():
    with pytest.raises(ValueError, match=r"size = '8b': no LLaMA2 preset. Fix: use one of 7b, 13b, 70b"):
        LlamaLongSeqConfig.from_preset("8b")


def test_parallel_settings_the_model_does_not_fit_are_refused():
    """The model's facts live only in its config, so the parallel settings cannot hold a second seq_length that
    disagrees (the old version of this test built one and expected the drift to be caught).  What can still be
    wrong is a parallel config the model does not fit; it is refused when the model is built."""
    cfg = tiny(LlamaLongSeqConfig)
    with pytest.raises(ValueError, match=r"^parallel_config\.model_parallel = 3: must divide "
                                         r"model\.model_config\.num_heads = 4\. Fix: use one of \[1, 2, 4\]\.$"):
        build_model(cfg, mesh=Mesh(rank=0), long_seq_config=LongSeqConfig(model_parallel=3))
