"""Done-when of issue 22: a checkpoint of MindFormers' own tiny ``LlamaForCausalLM`` (its names:
``model.layers.0.attention.wq.weight``, ...) trains on from MindFormers' own first loss through MindFormers'
Trainer route (``load_checkpoint:``, as run_mindformer.py passes it) and through ``mf-longseq train
--load-checkpoint``, on 2 msrun CPU ranks with CP = 2 (ring) - where MindFormers' own loader dies in preload_ckpt
(Barrier) or, without it, loads only ``lm_head.weight`` and trains from random weights.  One launch runs all three
cases (mf_checkpoint_worker.py)."""
import json
from pathlib import Path

import numpy as np
import pytest

from mf_route import SEQ, VOCAB, write_tokens

WORKER = Path(__file__).with_name("mf_checkpoint_worker.py")
RTOL = 1e-5

pytestmark = pytest.mark.dist


def mf_llama_checkpoint(path: Path, tokens: np.ndarray) -> float:
    """MindFormers' LlamaForCausalLM with the tiny template's shape, random weights, saved to ``path``; returns its
    loss on the first sample (what MindFormers itself would log first)."""
    import mindspore as ms
    from mindformers.models.llama import LlamaConfig, LlamaForCausalLM
    ms.set_context(mode=ms.PYNATIVE_MODE)
    cfg = LlamaConfig(batch_size=1, seq_length=SEQ, vocab_size=VOCAB, hidden_size=64, num_layers=2, num_heads=4,
                      n_kv_heads=2, intermediate_size=128, rms_norm_eps=1e-5, theta=10000.0, compute_dtype="float32",
                      param_init_type="float32", layernorm_compute_type="float32", softmax_compute_type="float32",
                      rotary_dtype="float32", use_flash_attention=False, fused_rms_norm=False, use_rope_slice=True,
                      pad_token_id=0)
    model = LlamaForCausalLM(cfg)
    rng = np.random.default_rng(3)
    for p in model.get_parameters():
        base = 1.0 if "norm" in p.name else 0.0
        p.set_data(ms.Tensor((base + 0.1 * rng.standard_normal(p.shape)).astype(np.float32)))
    ms.save_checkpoint(model, str(path))
    model.set_train(True)
    return float(model(ms.Tensor(tokens[:1].astype(np.int32))).asnumpy().reshape(-1)[0])


@pytest.fixture(scope="module")
def results(msrun, tmp_path_factory):
    data = tmp_path_factory.mktemp("ckpt_data")
    tokens = np.random.default_rng(5).integers(1, VOCAB, (3, SEQ + 1))          # no pad id: both models mask alike
    write_tokens(data / "tokens3.mindrecord", tokens)
    mf_first = mf_llama_checkpoint(data / "mf_llama.ckpt", tokens)
    out = tmp_path_factory.mktemp("ckpt_out")
    msrun(WORKER, [out, data, data / "mf_llama.ckpt"], workers=2, timeout=1500)
    return out, mf_first


def _losses(out: Path, name: str):
    return [json.loads((out / name / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.parametrize("route", ["trainer_route", "train_loop"])
def test_mindformers_checkpoint_trains_on_from_its_own_loss(results, route):
    out, mf_first = results
    for r, losses in enumerate(_losses(out, route)):
        assert len(losses) == 3, (route, r, losses)
        assert abs(losses[0] - mf_first) <= RTOL * mf_first, (route, r, losses[0], mf_first)
        assert all(np.isfinite(losses)) and losses[1] != losses[0], (route, r, losses)   # 3 updates ran


def test_routes_agree_and_random_weights_would_not_match(results):
    out, mf_first = results
    trainer, loop, fresh = (_losses(out, name)[0] for name in ("trainer_route", "train_loop", "no_checkpoint"))
    np.testing.assert_allclose(loop, trainer, rtol=RTOL)                      # the same 3 updates
    assert abs(fresh[0] - mf_first) > 1e-3 * mf_first                           # the load is what matched it
