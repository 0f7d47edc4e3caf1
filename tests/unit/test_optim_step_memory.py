"""The AdamW step's memory (``train/optim.py``): in place, piece by piece, so its transient memory is the
planner's ``step_transient_bytes`` (a few piece-sized buffers) whatever the parameter count; the pieces cover
every element once; any piece size gives the same bits; the planner's step phase."""
import numpy as np
import pytest
from mindspore import Parameter, Tensor

from mf_longseq.train import optim
from mf_longseq.train.optim import AdamW, OptimSettings, plan_pieces, step_transient_bytes

MIB = 2 ** 20


def _status(key: str) -> float:
    with open("/proc/self/status", encoding="ascii") as handle:
        return next(int(line.split()[1]) * 1024 for line in handle if line.startswith(key + ":"))


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
        handle.write("5")                                               # VmHWM := VmRSS


def test_pieces_cover_every_element_once_within_the_chunk():
    shapes = [(5000, 300), (300,), (300,), (2, 3), (40, 70), (7,), (1, 3000), ()]
    decays = [0.1 if len(s) >= 2 else 0.0 for s in shapes]
    pieces = plan_pieces(shapes, decays, chunk=1000)
    assert [p.start for p in pieces] == [0] + [p.stop for p in pieces[:-1]]           # contiguous, in order
    assert pieces[-1].stop == sum(int(np.prod(s)) for s in shapes)
    for p in pieces:
        assert p.stop - p.start <= 3000                                               # the chunk, or one row
        assert len({decays[i] for i in p.params}) == 1 and p.decay == decays[p.params[0]]
    assert {p.rows for p in pieces if p.params == (0,)} == {(r, min(r + 3, 5000)) for r in range(0, 5000, 3)}


def test_update_is_the_same_bits_for_any_piece_size(monkeypatch):
    rng = np.random.default_rng(3)
    shapes = [(9, 11), (11,), (20, 7), (1, 50), ()]
    init = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    grads = [[Tensor(rng.standard_normal(s).astype(np.float32)) for s in shapes] for _ in range(3)]
    s = OptimSettings(learning_rate=0.03, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    out = []
    for chunk in (1 << 20, 30, 10):                     # one piece; groups and slabs; one-row slabs
        monkeypatch.setattr(optim, "STEP_CHUNK", chunk)
        params = [Parameter(Tensor(x.copy()), name=f"p{i}") for i, x in enumerate(init)]
        opt = AdamW(params, s)
        for g in grads:
            opt.step(g)
        out.append([p.asnumpy() for p in params] + [opt.m.asnumpy(), opt.v.asnumpy()])
    for other in out[1:]:
        for a, b in zip(out[0], other):
            np.testing.assert_array_equal(a, b)


def test_step_transient_memory_is_bounded_by_pieces():
    """8 M parameters (32 MiB a float32 vector): the step's peak above the resident memory before it is at most
    the planner's ``step_transient_bytes`` (40 MiB) plus 8 MiB; the flat update grew ~8 vectors (~250 MiB)."""
    rng = np.random.default_rng(0)
    shapes = [(2048, 1024), (2048, 1024), (4096, 1024), (1024,)]
    params = [Parameter(Tensor(rng.standard_normal(s).astype(np.float32)), name=f"w{i}")
              for i, s in enumerate(shapes)]
    opt = AdamW(params, OptimSettings(learning_rate=1e-3, weight_decay=0.1))
    total = sum(opt.sizes)
    grad = Tensor(rng.standard_normal(total).astype(np.float32))
    _reset_peak()
    before = _status("VmRSS")
    opt.step_flat(grad)
    grown = _status("VmHWM") - before
    assert grown <= step_transient_bytes(total) + 8 * MIB, (grown / MIB, step_transient_bytes(total) / MIB)


def test_planner_step_phase_when_the_step_outweighs_the_backward():
    """A short sequence: the backward phase is smaller than the flat gradient and the update's pieces, so the
    peak is the states plus the step (planner/memory.py)."""
    from mf_longseq.parallel.plan import RunPlan
    from mf_longseq.planner import Settings, memory_per_device, model_shape
    from mf_longseq.planner.memory import stage_params
    shape, layout = model_shape("qwen-7b"), RunPlan(dp=1, mp=1, cp=1, pp=1, algo="colossalai_cp")
    memory = memory_per_device(shape, layout, Settings(seq_len=256, zero=0))   # the runner: nothing sharded
    params = stage_params(shape, layout)
    assert memory.step == params * 4 + step_transient_bytes(params)
    states = memory.weights + memory.gradients + memory.optimizer
    assert memory.total(True) == states + memory.step > states + memory.activations_recompute + memory.logits
    assert memory_per_device(shape, layout, Settings(seq_len=256, zero=1)).step == 0     # MindFormers' optimizer
