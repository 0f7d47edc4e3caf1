"""MindFormers' own route trains the plugin's models: ``MindFormerConfig`` -> ``build_context`` ->
``Trainer(config).train()`` on the shipped tiny templates, 3 steps on small MindRecords made here.

* CP = 2 ring (LLaMA2), CP = 2 Ulysses (Qwen1.5) on 2 msrun ranks, dp 2 x cp 2 and cp 2 x mp 2 (LLaMA2) on 4
  ranks: every rank logs the loss sequence of one rank training on the same samples (CP = 1; batch 2 for dp 2),
  within 1e-5.
* The same configs through ``mf-longseq train`` give the same loss sequence.
* Packed samples (MindFormers' 5 columns) under CP = 2 (Qwen): the first loss equals the documents run one at a
  time, and the sequence equals CP = 1.
One process runs the 1-rank cases, one msrun launch of 2 ranks and one of 4 run the rest.
"""
import json
from pathlib import Path

import numpy as np
import pytest

from mf_route import EOD, SEQ, VOCAB, write_packed, write_tokens
from mf_trainer_worker import CASES

WORKER = Path(__file__).with_name("mf_trainer_worker.py")
RTOL = 1e-5

pytestmark = pytest.mark.dist


def _tokens(n: int, seed: int, eod=None) -> np.ndarray:
    from mf_longseq.train.data import SyntheticTokens
    source = SyntheticTokens(VOCAB, SEQ, seed=seed, eod_token_id=eod, mean_document_length=12)
    return np.stack([source.sample(i) for i in range(n)])


def _run_alone(specs, out_dir, data_dir, timeout=1500):
    import os
    import subprocess
    import sys
    env = dict(os.environ, PYTHONPATH=f"{WORKER.parents[2]}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    proc = subprocess.run([sys.executable, str(WORKER), str(out_dir), str(data_dir), ",".join(specs)],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=out_dir)
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.fixture(scope="module")
def results(msrun, tmp_path_factory):
    data = tmp_path_factory.mktemp("route_data")
    for name, n in (("tokens3", 3), ("tokens6", 6)):
        write_tokens(data / f"{name}.mindrecord", _tokens(n, seed=7))
    packed = _tokens(3, seed=11, eod=EOD)
    np.save(data / "packed3.npy", packed)
    write_packed(data / "packed3.mindrecord", packed)
    out = tmp_path_factory.mktemp("route_out")
    _run_alone(["llama2_cp1", "llama2_cp1_b2", "qwen1_5_cp1", "qwen_cp1_packed", "documents_alone:qwen_cp1_packed",
                "mf_longseq_train:llama2_cp1", "mf_longseq_train:llama2_cp1_b2"], out, data)
    msrun(WORKER, [out, data, "llama2_cp2_ring,qwen1_5_cp2_ulysses,qwen_cp2_packed"], workers=2, timeout=1500)
    msrun(WORKER, [out, data, "llama2_dp2_cp2,llama2_cp2_mp2"], workers=4, timeout=2400)
    return out


def _losses(out: Path, spec: str, ranks: int = 1):
    per_rank = [json.loads((out / spec.replace(":", "__") / f"rank{r}.json").read_text()) for r in range(ranks)]
    return per_rank


def _close(got, ref):
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    return got.shape == ref.shape and bool(np.all(np.abs(got - ref) <= RTOL * np.abs(ref)))


@pytest.mark.parametrize("case, reference", [("llama2_cp2_ring", "llama2_cp1"), ("qwen1_5_cp2_ulysses", "qwen1_5_cp1"),
                                             ("qwen_cp2_packed", "qwen_cp1_packed"),
                                             ("llama2_dp2_cp2", "llama2_cp1_b2"), ("llama2_cp2_mp2", "llama2_cp1")])
def test_cp_through_mindformers_trainer_equals_one_rank(results, case, reference):
    world = next(c.world for c in CASES if c.name == case)
    ref = _losses(results, reference)[0]
    assert len(ref) == 3 and ref[0] > 0
    for r, got in enumerate(_losses(results, case, world)):
        assert _close(got, ref), (case, r, got, ref)


def test_packed_first_loss_equals_documents_alone(results):
    alone = _losses(results, "documents_alone:qwen_cp1_packed")[0]
    packed = _losses(results, "qwen_cp2_packed", 2)[0][0]
    assert abs(packed - alone) <= RTOL * alone, (packed, alone)


@pytest.mark.parametrize("case", ["llama2_cp1", "llama2_cp1_b2"])
def test_mf_longseq_train_equals_mindformers_trainer(results, case):
    ours = _losses(results, f"mf_longseq_train:{case}")[0]
    theirs = _losses(results, case)[0]
    assert _close(ours, theirs), (ours, theirs)
