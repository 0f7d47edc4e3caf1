"""AdamW against a NumPy AdamW written from the formula and against MindFormers' AdamW; the learning rate is
MindFormers' registered schedule; reading MindFormers sections."""

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
    s = OptimSettings(learning_rate=0.05, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.1,
                      lr_schedule={"type": "LinearWithWarmUpLR", "learning_rate": 0.05, "warmup_steps": 2,
                                   "total_steps": 4})
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


def test_schedule_is_mindformers_own():
    from mindformers.core.lr import CosineWithWarmUpLR
    section = {"type": "CosineWithWarmUpLR", "learning_rate": 1.0, "warmup_steps": 4, "lr_end": 0.1,
               "total_steps": 14}
    s = OptimSettings(learning_rate=1.0, lr_schedule=section, total_steps=14)
    theirs = CosineWithWarmUpLR(learning_rate=1.0, warmup_steps=4, lr_end=0.1, total_steps=14)
    for step in range(20):
        assert s.lr_at(step) == pytest.approx(float(theirs(Tensor(np.array(step, np.int32))).asnumpy()), rel=1e-6)
    assert s.lr_at(2) < s.lr_at(4) and s.lr_at(14) == pytest.approx(0.1, rel=1e-5)
    assert OptimSettings(learning_rate=0.3).lr_at(50) == 0.3


def test_adamw_equals_mindformers_adamw():
    """Same weights, gradients and schedule: our flat AdamW and MindFormers' AdamW (with its no-decay groups)."""
    from mindformers.core.optim import AdamW as MFAdamW
    rng = np.random.default_rng(1)
    w0, b0 = rng.standard_normal((3, 4)).astype(np.float32), rng.standard_normal(4).astype(np.float32)
    ours = [Parameter(Tensor(w0), name="w"), Parameter(Tensor(b0), name="b")]
    theirs = [Parameter(Tensor(w0), name="w2"), Parameter(Tensor(b0), name="b2")]
    section = {"type": "ConstantWarmUpLR", "learning_rate": 0.01, "warmup_steps": 2, "total_steps": 5}
    s = OptimSettings(learning_rate=0.01, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, lr_schedule=section)
    opt = AdamW(ours, s)
    from mf_longseq.train.optim import build_schedule
    mf = MFAdamW([{"params": [theirs[0]], "weight_decay": 0.1}, {"params": [theirs[1]], "weight_decay": 0.0}],
                 learning_rate=build_schedule(section), betas=(0.9, 0.95), eps=1e-8)
    for _ in range(4):
        g = [Tensor(rng.standard_normal((3, 4)).astype(np.float32)), Tensor(rng.standard_normal(4).astype(np.float32))]
        opt.step(g)
        mf(tuple(g))
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(a.asnumpy(), b.asnumpy(), rtol=1e-5, atol=1e-6)


def test_registered_longseq_adamw_equals_mindformers_adamw():
    """``optimizer.type: LongSeqAdamW`` built by MindFormers' ``build_optim`` from the Trainer's parameter groups
    and LR schedule cell: the same weights as MindFormers' AdamW after 4 updates (no decay on the 1-D group), and
    the step counter MindFormers' callbacks read."""
    from mindformers.core.optim import AdamW as MFAdamW
    from mindformers.core.optim import build_optim
    import mf_longseq  # noqa: F401  (registers LongSeqAdamW)
    from mf_longseq.train.optim import build_schedule
    rng = np.random.default_rng(2)
    w0, v0, b0 = (rng.standard_normal(s).astype(np.float32) for s in ((3, 4), (2, 3), (4,)))
    ours = [Parameter(Tensor(x), name=n) for x, n in ((w0, "w"), (v0, "v"), (b0, "b"))]
    theirs = [Parameter(Tensor(x), name=n) for x, n in ((w0, "w2"), (v0, "v2"), (b0, "b2"))]
    section = {"type": "CosineWithWarmUpLR", "learning_rate": 0.02, "warmup_steps": 1, "total_steps": 6}

    def groups(params):
        return [{"params": params[:2], "weight_decay": 0.1}, {"params": params[2:], "weight_decay": 0.0}]

    opt = build_optim({"type": "LongSeqAdamW", "betas": [0.8, 0.95], "eps": 1e-8, "weight_decay": 0.1},
                      default_args={"params": groups(ours), "learning_rate": build_schedule(section)})
    mf = MFAdamW(groups(theirs), learning_rate=build_schedule(section), betas=(0.8, 0.95), eps=1e-8)
    assert type(opt).__name__ == "LongSeqAdamW" and [p.name for p in opt.parameters] == ["w", "v", "b"]
    for _ in range(4):
        g = tuple(Tensor(rng.standard_normal(p.shape).astype(np.float32)) for p in ours)
        opt(g)
        mf(g)
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(a.asnumpy(), b.asnumpy(), rtol=1e-5, atol=1e-6)
    assert int(opt.global_step.asnumpy()[0]) == int(mf.global_step.asnumpy()[0]) == 4


def test_read_from_mindformers_sections():
    tree = {"optimizer": {"type": "AdamW", "betas": [0.9, 0.99], "eps": 1e-7, "weight_decay": 0.01},
            "lr_schedule": {"type": "CosineWithWarmUpLR", "learning_rate": 2e-4, "warmup_ratio": 0.1,
                            "lr_end": 1e-6, "total_steps": -1}}
    s = OptimSettings.from_mindformers(tree, steps=50)
    assert (s.learning_rate, s.betas, s.eps, s.weight_decay) == (2e-4, (0.9, 0.99), 1e-7, 0.01)
    assert s.total_steps == 50 and s.lr_schedule["total_steps"] == 50
    assert s.lr_at(0) < s.lr_at(5) == pytest.approx(2e-4, rel=1e-4)      # warmup_ratio 0.1 of 50: 5 steps
    assert OptimSettings.from_mindformers({}, steps=3) == OptimSettings(total_steps=3)


@pytest.mark.parametrize("tree, match", [
    ({"optimizer": {"type": "SGD"}}, r"optimizer\.type = 'SGD': the mf_longseq runner implements AdamW only\. "
                                     r"Fix: set optimizer\.type: AdamW"),
    ({"optimizer": {"betas": [0.9]}}, r"optimizer\.betas = \[0\.9\]: need two numbers in \[0, 1\)"),
    ({"lr_schedule": {"type": "Nonsense", "learning_rate": 0.1}},
     r"lr_schedule\.type = 'Nonsense': not a MindFormers learning-rate schedule\. Fix: use one of .*CosineWithWarmUpLR"),
])
def test_optimizer_errors(tree, match):
    with pytest.raises(ValueError, match=match):
        OptimSettings.from_mindformers(tree, steps=10)
