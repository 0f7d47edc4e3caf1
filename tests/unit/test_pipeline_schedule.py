"""Pipeline schedules, every stage simulated in one process.

The simulator executes all stages' actions with the semantics of the transfers we use (a blocking two-rank
collective: a transfer completes only when both stages reach it, and the k-th transfer of a stage pair must be
the same transfer on both sides).  It fails on a deadlock, on mismatched transfers, on a forward without its
input, or on a backward without its gradient.
"""
import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor

from mf_longseq.parallel import Mesh
from mf_longseq.models.stage import DecoderStage
from mf_longseq.parallel.pipeline import ACT, SCHEDULES, PipelineRunner, build_schedule
from mf_longseq.parallel.plan import decoder_stage_of, stage_layers


def simulate(kind, num_stages, num_micro):
    """Run every stage's schedule; return (per-stage executed compute order, peak stage inputs kept)."""
    plans = [build_schedule(kind, s, num_stages, num_micro) for s in range(num_stages)]
    pos = [0] * num_stages
    have_act = [set() if s else set(range(num_micro)) for s in range(num_stages)]
    have_grad = [set() for _ in range(num_stages)]
    done_f = [set() for _ in range(num_stages)]
    done_b = [set() for _ in range(num_stages)]
    kept = [0] * num_stages
    peak = [0] * num_stages
    order = [[] for _ in range(num_stages)]
    while any(pos[s] < len(plans[s]) for s in range(num_stages)):
        progressed = False
        for s in range(num_stages):
            if pos[s] >= len(plans[s]):
                continue
            a = plans[s][pos[s]]
            if a.kind == "F":
                assert a.micro in have_act[s], f"stage {s} forward {a.micro} without its input"
                done_f[s].add(a.micro)
                kept[s] += 1
                peak[s] = max(peak[s], kept[s])
            elif a.kind == "B":
                assert a.micro in done_f[s], f"stage {s} backward {a.micro} before its forward"
                assert s == num_stages - 1 or a.micro in have_grad[s], f"stage {s} backward {a.micro} w/o grad"
                done_b[s].add(a.micro)
                kept[s] -= 1
            else:
                other = s + a.peer
                assert 0 <= other < num_stages, f"stage {s} talks to missing stage {other}"
                if pos[other] >= len(plans[other]):
                    continue
                b = plans[other][pos[other]]
                if b.kind != "comm" or b.peer != -a.peer:
                    continue                                   # partner not there yet: wait
                assert (a.send, a.recv) == (b.recv, b.send), f"mismatched transfer {a} vs {b}"
                for x, y in ((a, other), (b, s)):
                    if x.send is not None:
                        what, micro = x.send
                        source = (done_f if what == ACT else done_b)[s if x is a else other]
                        assert micro in source, f"sending {x.send} before computing it"
                        (have_act if what == ACT else have_grad)[y].add(micro)
                pos[other] += 1
            order[s].append((a.kind, a.micro))
            pos[s] += 1
            progressed = True
        assert progressed, f"deadlock at positions {pos}"
    for s in range(num_stages):
        assert done_f[s] == done_b[s] == set(range(num_micro))
    return order, peak


@pytest.mark.parametrize("kind", ["gpipe", "1f1b"])
@pytest.mark.parametrize("stages, micro", [(1, 1), (1, 3), (2, 2), (2, 5), (3, 3), (4, 4), (4, 7), (8, 8), (8, 13)])
def test_schedule_completes_without_deadlock(kind, stages, micro):
    simulate(kind, stages, micro)


@pytest.mark.parametrize("stages, micro", [(2, 4), (4, 4), (4, 9), (8, 16)])
def test_1f1b_keeps_at_most_p_minus_s_inputs(stages, micro):
    _, peak = simulate("1f1b", stages, micro)
    assert peak == [min(stages - s, micro) for s in range(stages)]
    _, peak_gpipe = simulate("gpipe", stages, micro)
    assert peak_gpipe == [micro] * stages


def test_1f1b_order_on_last_stage_alternates():
    order, _ = simulate("1f1b", 4, 6)
    computes = [op for op in order[3] if op[0] in "FB"]
    assert computes == [(k, i) for i in range(6) for k in "FB"]


def test_micro_batch_num_below_stages_is_rejected():
    with pytest.raises(ValueError, match=r"parallel_config.micro_batch_num = 2: must be >= "
                                         r"parallel_config.pipeline_stage = 4. Fix: set micro_batch_num to 4"):
        build_schedule("1f1b", 0, 4, 2)
    with pytest.raises(ValueError, match=r"pipeline schedule = 'pipedream': unknown"):
        build_schedule("pipedream", 0, 2, 2)


@pytest.mark.parametrize("layers, stages", [(2, 2), (5, 2), (7, 3), (8, 4), (3, 3)])
def test_stage_layers_partition(layers, stages):
    parts = [stage_layers(layers, stages, s) for s in range(stages)]
    assert [i for p in parts for i in p] == list(range(layers))
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1


def test_stage_layers_rejects_more_stages_than_layers():
    with pytest.raises(ValueError, match=r"parallel_config.pipeline_stage = 3: more stages than "
                                         r"model.model_config.num_layers = 2. Fix: use at most 2 stages"):
        stage_layers(2, 3, 0)


# ------------------------------------------------------------------------------ execution on one stage (one process)
def tiny_model(num_layers=2):
    from mf_longseq.models import LlamaLongSeqConfig, build_model
    cfg = LlamaLongSeqConfig(vocab_size=32, hidden_size=16, num_layers=num_layers, num_heads=4, n_kv_heads=2,
                             intermediate_size=24, seq_length=8, init_seed=3)
    return build_model(cfg, mesh=Mesh(rank=0))


def tiny_batch(b=4, s=8, vocab=32):
    rng = np.random.default_rng(0)
    ids = rng.integers(0, vocab, (b, s + 1)).astype(np.int32)
    return Tensor(ids[:, :-1]), Tensor(ids[:, 1:]), Tensor(np.ones((b, s), np.float32))


def test_one_stage_runner_equals_whole_batch_gradient():
    """Micro-batches through the runner (forward, then backward with sens) sum to the whole batch's gradient."""
    model = tiny_model()
    stage = DecoderStage(model, 0, 1)
    assert [p.name for p in stage.trainable_params()] == [p.name for p in model.trainable_params()]
    ids, labels, mask = tiny_batch()
    inv = Tensor(np.float32(1.0 / mask.size))
    runner = PipelineRunner(stage, group=Mesh(rank=0).group("pp"), act_shape=(2, 8, 16))
    micro = [(model.make_batch(ids[i:i + 2], labels[i:i + 2], mask[i:i + 2]), inv) for i in (0, 2)]   # (batch, inv)
    for schedule in SCHEDULES:
        outputs, grads = runner.run(micro, schedule)
        want_loss, want = ms.value_and_grad(lambda a, b, c: model(a, b, c)[0] * inv, None,
                                            model.trainable_params())(ids, labels, mask)
        got_loss = sum(float(o[0].asnumpy()) for o in outputs)
        assert abs(got_loss - float(want_loss.asnumpy())) <= 1e-6 * abs(got_loss)
        for g, w, p in zip(grads, want, model.trainable_params()):
            np.testing.assert_allclose(g.asnumpy(), w.asnumpy(), rtol=1e-5, atol=1e-7, err_msg=p.name)


def test_decoder_stage_of_follows_stage_layers():
    assert decoder_stage_of("model.embed_tokens.weight", 2, 3) == 0
    assert [decoder_stage_of(f"model.layers.{i}.mlp.up_proj.weight", 2, 3) for i in range(3)] == [0, 0, 1]
    assert decoder_stage_of("adam_m.model.layers.2.self_attn.q_proj.weight", 2, 3) == 1
    assert decoder_stage_of("model.norm.weight", 2, 3) == decoder_stage_of("lm_head.weight", 2, 3) == 1


def test_tied_embeddings_are_refused_with_pipeline_stages():
    from mf_longseq.models import LlamaLongSeqConfig, build_model
    cfg = LlamaLongSeqConfig(vocab_size=32, hidden_size=16, num_layers=2, num_heads=4, n_kv_heads=2,
                             intermediate_size=24, seq_length=8, tie_word_embeddings=True)
    with pytest.raises(ValueError, match=r"tie_word_embeddings = True with parallel_config.pipeline_stage = 2"):
        DecoderStage(build_model(cfg, mesh=Mesh(rank=0)), 0, 2)


# ------------------------------------------------------------------------ one Trainer, two step executors (one process)
def trainer_with(executor_kind, batch_size=4, micro=2, packing=None):
    from mf_longseq.train.data import SyntheticTokens
    from mf_longseq.train.executor import PipelinedStep, PlainStep
    from mf_longseq.train.optim import AdamW, OptimSettings
    from mf_longseq.train.runner import Trainer
    model, mesh = tiny_model(), Mesh(rank=0)
    executor = (PlainStep(model) if executor_kind == "plain"
                else PipelinedStep(model, mesh=mesh, micro_batch_num=micro, schedule=executor_kind))
    eod = None if packing is None else dict(eod_token_id=packing.eod_token_id, mean_document_length=3)
    return Trainer(model=model, mesh=mesh, optimizer=AdamW(executor.params, OptimSettings(learning_rate=0.01)),
                   source=SyntheticTokens(32, 8, seed=2, **(eod or {})), batch_size=batch_size, layout="zigzag",
                   executor=executor, packing=packing)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_pipelined_executor_steps_like_the_plain_one(schedule):
    """The same Trainer step through PipelinedStep (one stage, 2 micro-batches) and PlainStep: same losses,
    same weights after 2 AdamW steps, same checkpoint entries."""
    plain, piped = trainer_with("plain"), trainer_with(schedule)
    for step in range(2):
        a, b = plain.step(step), piped.step(step)
        assert b.loss == pytest.approx(a.loss, rel=1e-6) and (b.tokens, b.lr) == (a.tokens, a.lr)
    for p, q in zip(plain.params, piped.params):
        assert p.name == q.name
        np.testing.assert_allclose(q.asnumpy(), p.asnumpy(), rtol=1e-5, atol=1e-6, err_msg=p.name)
    assert [p.name for p in piped.state_parameters()] == [p.name for p in plain.state_parameters()]


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_pipelined_executor_passes_packed_documents_to_its_stage(schedule):
    """Packed samples through PipelinedStep: every micro-batch's stage gets its document ids (ShardedBatch), so the
    losses and weights equal PlainStep's on the same packed samples, and differ from the same run unpacked (the
    documents do change the loss)."""
    from mf_longseq.train.packing import PackingSettings
    packing = PackingSettings(eod_token_id=1, eod_pad_length=8)
    plain, piped = trainer_with("plain", packing=packing), trainer_with(schedule, packing=packing)
    unpacked = trainer_with("plain", packing=None)
    unpacked.source = plain.source                                         # the same tokens, one document each
    ids, _, _, ends = plain.local_batch(0)
    assert (ends.asnumpy() < 8).any()                                      # several documents in a sample
    for step in range(2):
        a, b = plain.step(step), piped.step(step)
        assert b.loss == pytest.approx(a.loss, rel=1e-6), f"{schedule} step {step}: pipelined {b.loss} vs plain {a.loss}"
        if step == 0:
            assert abs(unpacked.step(0).loss - a.loss) > 1e-4 * abs(a.loss)
    for p, q in zip(plain.params, piped.params):
        np.testing.assert_allclose(q.asnumpy(), p.asnumpy(), rtol=1e-5, atol=1e-6, err_msg=p.name)


def test_batch_size_must_split_into_micro_batches():
    with pytest.raises(ValueError, match=r"runner_config.batch_size = 3: must be divisible by parallel_config."
                                         r"micro_batch_num = 2. Fix: use a batch size that is a multiple of 2"):
        trainer_with("1f1b", batch_size=3)
