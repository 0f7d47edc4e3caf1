"""AdamW against a NumPy AdamW written from the formula; learning-rate schedule; reading MindFormers sections."""
import math

import numpy as np
import pytest
from mindspore import Parameter, Tensor

from mf_longseq.train.optim import AdamW, OptimSettings


def numpy_adamw(p, grads, s: OptimSettings):
    p, m, v = p.astype(np.float64), np.zeros_like(p, np.float64), np.zeros_like(p, np.float64)
    b1, b2 = s.betas
    for t, g in enumerate(grads, start=1):
        lr = s.lr_at(t - 1)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        if p.ndim >= 2:
            p = p * (1 - lr * s.weight_decay)
        p = p - lr * (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + s.eps)
    return p


def test_adamw_matches_numpy_formula():
    rng = np.random.default_rng(0)
    s = OptimSettings(learning_rate=0.05, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.1, warmup_steps=2)
    w0, b0 = rng.standard_normal((3, 4)).astype(np.float32), rng.standard_normal(4).astype(np.float32)
    w, b = Parameter(Tensor(w0), name="w"), Parameter(Tensor(b0), name="b")
    opt = AdamW([w, b], s)
    gw = [rng.standard_normal((3, 4)).astype(np.float32) for _ in range(4)]
    gb = [rng.standard_normal(4).astype(np.float32) for _ in range(4)]
    for g1, g2 in zip(gw, gb):
        opt.step([Tensor(g1), Tensor(g2)])
    np.testing.assert_allclose(w.asnumpy(), numpy_adamw(w0, gw, s), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(b.asnumpy(), numpy_adamw(b0, gb, s), rtol=1e-5, atol=1e-6)   # no decay on 1-D
    assert opt.step_count == 4
    assert [p.name for p in opt.state_parameters()] == ["adam_m.w", "adam_m.b", "adam_v.w", "adam_v.b"]


def test_schedule_warmup_then_cosine():
    s = OptimSettings(learning_rate=1.0, warmup_steps=4, decay="cosine", lr_end=0.1, total_steps=14)
    assert [s.lr_at(i) for i in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert s.lr_at(4) == pytest.approx(1.0)
    assert s.lr_at(9) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))
    assert s.lr_at(14) == pytest.approx(0.1) and s.lr_at(100) == pytest.approx(0.1)
    assert OptimSettings(learning_rate=0.3).lr_at(50) == 0.3


def test_read_from_mindformers_sections():
    tree = {"optimizer": {"type": "AdamW", "betas": [0.9, 0.99], "eps": 1e-7, "weight_decay": 0.01},
            "lr_schedule": {"type": "CosineWithWarmUpLR", "learning_rate": 2e-4, "warmup_ratio": 0.1,
                            "lr_end": 1e-6, "total_steps": -1}}
    s = OptimSettings.from_mindformers(tree, steps=50)
    assert (s.learning_rate, s.betas, s.eps, s.weight_decay) == (2e-4, (0.9, 0.99), 1e-7, 0.01)
    assert (s.warmup_steps, s.decay, s.total_steps, s.lr_end) == (5, "cosine", 50, 1e-6)
    assert OptimSettings.from_mindformers({}, steps=3) == OptimSettings(total_steps=3)


@pytest.mark.parametrize("tree, match", [
    ({"optimizer": {"type": "SGD"}}, r"optimizer\.type = 'SGD': the mf_longseq runner implements AdamW only\. "
                                     r"Fix: set optimizer\.type: AdamW"),
    ({"optimizer": {"betas": [0.9]}}, r"optimizer\.betas = \[0\.9\]: need two numbers in \[0, 1\)"),
])
def test_optimizer_errors(tree, match):
    with pytest.raises(ValueError, match=match):
        OptimSettings.from_mindformers(tree, steps=10)
