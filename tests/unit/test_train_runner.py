"""The step logic on one rank, with a stand-in model: loss and updated weights against a NumPy oracle;
checkpoints every N steps and an exact resume; the job's outputs (metrics.jsonl, config.yaml, meta.json)."""
import json
import os

import mindspore as ms
import numpy as np
import pytest
from mindspore import Parameter, Tensor, nn, ops

from mf_longseq.parallel import Mesh
from mf_longseq.parallel.plan import RunPlan
from mf_longseq.train import checkpoint as ckpt
from mf_longseq.train.data import SyntheticTokens, batch_for_step
from mf_longseq.train.job import JobOptions, run_job
from mf_longseq.train.monitor import read_metrics
from mf_longseq.train.optim import AdamW, OptimSettings
from mf_longseq.train.runner import Trainer

VOCAB, HIDDEN, SEQ = 24, 8, 16


class Bigram(nn.Cell):
    """Stand-in with the model contract: (ids, labels, mask) -> (sum of CE * mask, sum of mask)."""

    def __init__(self, seed=0):
        super().__init__()
        rng = np.random.default_rng(seed)
        self.emb = Parameter(Tensor(rng.standard_normal((VOCAB, HIDDEN)).astype(np.float32)), name="emb")
        self.head = Parameter(Tensor(0.3 * rng.standard_normal((HIDDEN, VOCAB)).astype(np.float32)), name="head")

    def construct(self, ids, labels, mask):
        h = ops.gather(self.emb, ids.reshape(-1), 0)                        # (B*S, H)
        logp = ops.log_softmax(ops.matmul(h, self.head), -1)                # (B*S, V)
        nll = -ops.gather_elements(logp, 1, labels.reshape(-1, 1)).reshape(-1)
        m = mask.reshape(-1)
        return (nll * m).sum(), m.sum()


def oracle_loss_and_grads(emb, head, batch):
    """Mean CE of the bigram model and its gradients, float64."""
    ids, labels, mask = (x.reshape(-1) for x in (batch.input_ids, batch.labels, batch.loss_mask))
    h = emb[ids]                                                            # (T, H)
    logits = h @ head
    logits -= logits.max(-1, keepdims=True)
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    count = mask.sum()
    loss = -(np.log(p[np.arange(len(ids)), labels]) * mask).sum() / count
    dlogits = p.copy()
    dlogits[np.arange(len(ids)), labels] -= 1
    dlogits *= (mask / count)[:, None]
    dhead = h.T @ dlogits
    demb = np.zeros_like(emb)
    np.add.at(demb, ids, dlogits @ head.T)
    return loss, demb, dhead


def test_steps_match_numpy_oracle():
    settings = OptimSettings(learning_rate=0.05, weight_decay=0.1)
    model = Bigram()
    emb, head = (p.asnumpy().astype(np.float64) for p in (model.emb, model.head))
    source = SyntheticTokens(VOCAB, SEQ, seed=1)
    trainer = Trainer(model=model, mesh=Mesh(rank=0), optimizer=AdamW([model.emb, model.head], settings),
                      source=source, batch_size=3, layout="zigzag")
    m = [np.zeros_like(emb), np.zeros_like(head)]
    v = [np.zeros_like(emb), np.zeros_like(head)]
    b1, b2 = settings.betas
    for step in range(3):
        loss, demb, dhead = oracle_loss_and_grads(emb, head, batch_for_step(source, step, batch_size=3))
        result = trainer.step(step)
        assert result.loss == pytest.approx(loss, rel=1e-6)
        assert result.tokens == 3 * SEQ
        params = [emb, head]
        for i, g in enumerate((demb, dhead)):
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            params[i] = params[i] * (1 - 0.05 * 0.1) - 0.05 * (m[i] / (1 - b1 ** (step + 1))) / (
                np.sqrt(v[i] / (1 - b2 ** (step + 1))) + settings.eps)
        emb, head = params
        np.testing.assert_allclose(model.emb.asnumpy(), emb, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(model.head.asnumpy(), head, rtol=1e-4, atol=1e-5)


def job_tree(**over):
    tree = {"seed": 5, "runner_config": {"batch_size": 2},
            "model": {"model_config": {"seq_length": SEQ, "num_heads": 2, "vocab_size": VOCAB}},
            "optimizer": {"type": "AdamW", "weight_decay": 0.01},
            "lr_schedule": {"type": "CosineWithWarmUpLR", "learning_rate": 0.02, "warmup_steps": 2},
            "parallel": {"parallel_mode": 1, "enable_alltoall": False}}
    tree.update(over)
    return tree


def bigram_factory(settings, mesh):
    return Bigram(seed=settings.data.seed)


def test_save_at_step_5_and_resume_gives_the_same_steps_6_to_10(tmp_path):
    full = run_job(JobOptions(config=job_tree(), steps=10, save_every=5, output_dir=str(tmp_path / "a")),
                   model_factory=bigram_factory)
    step5 = ckpt.step_dir(str(tmp_path / "a"), 5)
    assert sorted(os.listdir(step5)) == ["config.yaml", "meta.json", "rank_0.ckpt"]
    meta = json.load(open(os.path.join(step5, "meta.json")))
    assert meta["step"] == 5 and meta["run_plan"]["world_size"] == 1 and meta["optimizer"]["step_count"] == 5
    assert meta["losses"] == [r.loss for r in full[:5]] and meta["data"]["kind"] == "synthetic"
    assert os.path.isfile(os.path.join(ckpt.step_dir(str(tmp_path / "a"), 10), "meta.json"))

    resumed = run_job(JobOptions(config=job_tree(), steps=10, resume=step5, output_dir=str(tmp_path / "b")),
                      model_factory=bigram_factory)
    assert [r.step for r in resumed] == [6, 7, 8, 9, 10]
    assert [r.loss for r in resumed] == [r.loss for r in full[5:]]          # exactly
    assert [r.lr for r in resumed] == [r.lr for r in full[5:]]
    assert [r["step"] for r in read_metrics(str(tmp_path / "a"))] == list(range(1, 11))


def test_resume_from_the_run_dir_picks_the_latest_complete_step(tmp_path):
    run_job(JobOptions(config=job_tree(), steps=4, save_every=2, output_dir=str(tmp_path)),
            model_factory=bigram_factory)
    os.makedirs(ckpt.step_dir(str(tmp_path), 6))                            # incomplete: no meta.json
    assert ckpt.find_resume_dir(str(tmp_path)) == ckpt.step_dir(str(tmp_path), 4)
    more = run_job(JobOptions(config=job_tree(), steps=6, resume=str(tmp_path)), model_factory=bigram_factory)
    assert [r.step for r in more] == [5, 6]
    assert [r["step"] for r in read_metrics(str(tmp_path))] == [1, 2, 3, 4, 5, 6]


def test_loss_falls_on_synthetic_tokens(tmp_path):
    records = run_job(JobOptions(config=job_tree(lr_schedule={"learning_rate": 0.1}), steps=15),
                      model_factory=bigram_factory)
    assert records[-1].loss < records[0].loss - 0.3
    assert all(r.peak_rss_mib[0] > 0 and r.tokens == 2 * SEQ for r in records)


@pytest.mark.parametrize("opts, match", [
    (dict(steps=4, save_every=2), r"--save-every needs --output-dir"),
    (dict(steps=3, resume="RESUME"), r"--steps 3: the checkpoint is already at step 4\. Fix: pass --steps larger"),
])
def test_job_errors(tmp_path, opts, match):
    run_job(JobOptions(config=job_tree(), steps=4, save_every=4, output_dir=str(tmp_path)),
            model_factory=bigram_factory)
    if opts.get("resume"):
        opts["resume"] = str(tmp_path)
    with pytest.raises(ValueError, match=match):
        run_job(JobOptions(config=job_tree(), **opts), model_factory=bigram_factory)


def test_resume_errors(tmp_path):
    with pytest.raises(ValueError, match=r"--resume .*: no complete checkpoint"):
        ckpt.find_resume_dir(str(tmp_path))
    run_job(JobOptions(config=job_tree(), steps=2, save_every=2, output_dir=str(tmp_path)),
            model_factory=bigram_factory)
    directory = ckpt.step_dir(str(tmp_path), 2)
    meta = ckpt.read_meta(directory)
    pp2 = RunPlan(dp=1, cp=2, mp=1, pp=2, ulysses=1, seq_layout="zigzag", algo="colossalai_cp")
    with pytest.raises(ValueError, match=r"written with model_parallel = 1, pipeline_stage = 1; this run has 1, 2, "
                                         r"and its meta.json has no num_layers to reshard with\. Fix: resume with "
                                         r"parallel_config.model_parallel: 1 and pipeline_stage: 1\."):
        ckpt.state_for_rank(directory, meta, 0, pp2)
    cp2 = RunPlan(dp=1, cp=2, mp=1, pp=1, ulysses=1, seq_layout="zigzag", algo="colossalai_cp")
    assert ckpt.file_for_rank(directory, meta, 1, cp2).endswith("rank_0.ckpt")    # replicated weights
    small = [Parameter(Tensor(np.zeros((2, 2), np.float32)), name="emb")]
    with pytest.raises(ValueError, match=r"emb has shape \(24, 8\) in .*, the model has \(2, 2\)"):
        ckpt.load_into(ckpt.rank_file(directory, 0), small)
    with pytest.raises(ValueError, match=r"lacks 1 parameters of this model \(first: nope\)"):
        ckpt.load_into(ckpt.rank_file(directory, 0), [Parameter(Tensor(np.zeros(1, np.float32)), name="nope")])


def _layout(dp, cp, mp, pp):
    return RunPlan(dp=dp, cp=cp, mp=mp, pp=pp, ulysses=1, seq_layout="zigzag", algo="colossalai_cp")


@pytest.mark.parametrize("saved, now, rank, source", [
    (_layout(1, 2, 2, 1), _layout(1, 2, 2, 1), 3, 3),          # same layout: its own file
    (_layout(1, 2, 2, 1), _layout(2, 1, 2, 1), 3, 1),          # dp / cp changed: the replica with mp_id 1
    (_layout(1, 2, 1, 2), _layout(2, 2, 1, 2), 5, 2),          # stage 1 of 8 ranks: stage 1's first file
])
def test_file_for_rank_keeps_stage_and_mp_index(tmp_path, saved, now, rank, source):
    files = {str(r): f"rank_{r}.ckpt" for r in range(saved.world_size)}
    for name in files.values():
        (tmp_path / name).write_bytes(b"")
    meta = {"layout": saved.as_dict(), "rank_files": files}
    assert ckpt.file_for_rank(str(tmp_path), meta, rank, now) == str(tmp_path / f"rank_{source}.ckpt")
