"""Tiled LM head + cross entropy and tiled MLP (``models/tiled_loss.py``, ``models/tiled_mlp.py``) on one process.

Each Cell against a float64 NumPy oracle written from the formulas (loss, d hidden, d weight; MLP output and
every gradient), for tiles that divide the tokens, tiles that do not, one-token tiles and tiles larger than
the input.  The whole model: ``long_seq.loss_tile`` / ``mlp_tile`` on and off give the same loss and the same
gradient of every weight, with a loss mask and packed documents.  The keys' validation and the default rule.
Under model_parallel = 2: ``tests/dist/test_tiles_dist.py``.
"""
import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor

from mf_longseq.config import ConfigError, LongSeqConfig
from mf_longseq.models import LlamaLongSeqConfig, QwenLongSeqConfig, build_model
from mf_longseq.models.tiled_loss import TiledHeadLoss, default_loss_tile, resolve_loss_tile
from mf_longseq.models.tiled_mlp import TiledMLP
from mf_longseq.parallel import Mesh
from tile_oracle import oracle_loss, oracle_mlp, rel_err

RTOL = 1e-5


def head_inputs(n=13, h=8, v=37, seed=0):
    rng = np.random.default_rng(seed)
    hidden = rng.normal(0, 1, (n, h)).astype(np.float32)
    weight = rng.normal(0, 0.7, (v, h)).astype(np.float32)
    labels = rng.integers(0, v, n).astype(np.int32)
    mask = (rng.random(n) > 0.3).astype(np.float32)
    return hidden, weight, labels, mask


@pytest.mark.parametrize("tile", [1, 4, 13, 100])
def test_tiled_head_loss_matches_float64_oracle(tile):
    hidden, weight, labels, mask = head_inputs()
    cell = TiledHeadLoss(tile, Mesh(rank=0).group("mp"), vocab_start=0)

    def loss_fn(h, w):
        return cell(h, w, Tensor(labels), Tensor(mask))[0]

    loss, (d_h, d_w) = ms.value_and_grad(loss_fn, grad_position=(0, 1))(Tensor(hidden), Tensor(weight))
    want_loss, want_dh, want_dw = oracle_loss(hidden.astype(np.float64), weight.astype(np.float64), labels,
                                              mask.astype(np.float64))
    assert rel_err(loss.asnumpy(), want_loss) <= RTOL
    assert rel_err(d_h.asnumpy(), want_dh) <= RTOL
    assert rel_err(d_w.asnumpy(), want_dw) <= RTOL


@pytest.mark.parametrize("tile", [1, 5, 12, 64])
def test_tiled_mlp_matches_float64_oracle(tile):
    rng = np.random.default_rng(1)
    b, s, h, f = 2, 6, 8, 20
    x = rng.normal(0, 1, (b, s, h)).astype(np.float32)
    wg, wu = (rng.normal(0, 0.5, (f, h)).astype(np.float32) for _ in range(2))
    wd = rng.normal(0, 0.5, (h, f)).astype(np.float32)
    dy = rng.normal(0, 1, (b, s, h)).astype(np.float32)
    cell = TiledMLP(tile)
    out = cell(*(Tensor(a) for a in (x, wg, wu, wd)))

    def objective(*args):
        return (cell(*args) * Tensor(dy)).sum()

    grads = ms.grad(objective, grad_position=(0, 1, 2, 3))(*(Tensor(a) for a in (x, wg, wu, wd)))
    f64 = [a.astype(np.float64) for a in (x.reshape(-1, h), wg, wu, wd, dy.reshape(-1, h))]
    want_y, want_dx, want_dg, want_du, want_dd = oracle_mlp(*f64)
    assert rel_err(out.asnumpy().reshape(-1, h), want_y) <= RTOL
    for got, want in zip(grads, (want_dx.reshape(x.shape), want_dg, want_du, want_dd)):
        assert rel_err(got.asnumpy(), want) <= RTOL


def model_grads(cfg, ids, labels, mask, actual_seq_len=None, **long_seq):
    """(loss_sum, {name: gradient}) of a one-rank model with the given long_seq tiles."""
    model = build_model(cfg, mesh=Mesh(rank=0), long_seq_config=LongSeqConfig(block_size=8, **long_seq))
    params = model.trainable_params()
    extra = () if actual_seq_len is None else (Tensor(actual_seq_len),)

    def loss_fn(*_):
        return model(Tensor(ids), Tensor(labels), Tensor(mask), *extra)[0]

    loss, grads = ms.value_and_grad(loss_fn, grad_position=None, weights=params)()
    return float(loss.asnumpy()), {p.name: g.asnumpy() for p, g in zip(params, grads)}


@pytest.mark.parametrize("cls, kw", [(LlamaLongSeqConfig, {}), (QwenLongSeqConfig, {}),
                                     (LlamaLongSeqConfig, {"tie_word_embeddings": True})])
def test_model_with_tiles_equals_untiled_with_mask_and_packed_documents(cls, kw):
    s = 24
    cfg = cls.from_preset("tiny", seq_length=s, initializer_range=0.2, **kw)
    rng = np.random.default_rng(2)
    tokens = rng.integers(0, cfg.vocab_size, (2, s + 1))
    ids, labels = tokens[:, :-1].astype(np.int32), tokens[:, 1:].astype(np.int32)
    mask = (rng.random((2, s)) > 0.25).astype(np.float32)
    docs = np.array([[7, 15, 24], [10, 24, 24]], np.int32)                      # packed: cumulative ends
    want_loss, want = model_grads(cfg, ids, labels, mask, docs, loss_tile=0, mlp_tile=0)
    for tiles in ({"loss_tile": 5, "mlp_tile": 7}, {"loss_tile": 1, "mlp_tile": 48}, {}):
        loss, got = model_grads(cfg, ids, labels, mask, docs, **tiles)
        assert rel_err(loss, want_loss) <= RTOL, tiles
        worst = max((rel_err(got[k], want[k]), k) for k in want)
        assert worst[0] <= RTOL, f"{tiles}: gradient of {worst[1]} differs by {worst[0]:.2e} relative"


def test_model_reads_the_tiles_from_long_seq():
    cfg = LlamaLongSeqConfig.from_preset("tiny", seq_length=16)
    model = build_model(cfg, mesh=Mesh(rank=0), long_seq_config=LongSeqConfig(loss_tile=3, mlp_tile=4))
    assert model.loss_tile == 3 and model.tiled_loss.tile == 3
    assert all(layer.mlp.tiled.tile == 4 for layer in model.model.layers)
    off = build_model(cfg, mesh=Mesh(rank=0), long_seq_config=LongSeqConfig(loss_tile=0))
    assert off.tiled_loss is None and all(layer.mlp.tiled is None for layer in off.model.layers)
    default = build_model(cfg, mesh=Mesh(rank=0), long_seq_config=LongSeqConfig())
    assert default.loss_tile == default_loss_tile(cfg.vocab_size)


def test_default_loss_tile_keeps_one_tile_of_float32_logits_under_the_budget():
    assert default_loss_tile(151936) == 441                  # Qwen vocabulary, mp 1: 441 x 151936 x 4 < 256 MiB
    assert default_loss_tile(151936 // 4) == 1766
    for vocab in (32000, 151936, 37, 2 ** 40):
        tile = default_loss_tile(vocab)
        assert tile >= 1 and (tile == 1 or tile * vocab * 4 <= 256 * 2 ** 20 < (tile + 1) * vocab * 4)
    assert default_loss_tile(1000, budget_bytes=4000 * 7) == 7
    assert resolve_loss_tile(None, 151936) == 441 and resolve_loss_tile(0, 151936) == 0
    assert resolve_loss_tile(64, 151936) == 64


@pytest.mark.parametrize("key", ["loss_tile", "mlp_tile"])
@pytest.mark.parametrize("value", [-1, 1.5, "512", True, 2 ** 31])
def test_tile_keys_refuse_bad_values_naming_key_value_and_fix(key, value):
    with pytest.raises(ConfigError) as err:
        LongSeqConfig.from_mindformers({"long_seq": {key: value}, "model": {"model_config": {
            "seq_length": 16, "num_heads": 2}}})
    msg = str(err.value)
    assert msg.startswith(f"long_seq.{key} = {value!r}: must be a whole number of tokens per tile") and "Fix:" in msg
    assert err.value.key == f"long_seq.{key}"


def test_tile_keys_are_read_from_the_long_seq_section():
    tree = {"long_seq": {"loss_tile": 0, "mlp_tile": 256}, "model": {"model_config": {"seq_length": 16,
                                                                                     "num_heads": 2}}}
    config = LongSeqConfig.from_mindformers(tree)
    assert (config.loss_tile, config.mlp_tile) == (0, 256)
    assert LongSeqConfig.from_mindformers({"model": {"model_config": {"seq_length": 16, "num_heads": 2}}}) \
        .loss_tile is None
    assert LongSeqConfig(mlp_tile=0).mlp_tile == 0
    with pytest.raises(ConfigError, match="long_seq.mlp_tile = None"):
        LongSeqConfig(mlp_tile=None)
