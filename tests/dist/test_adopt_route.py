"""``mf-longseq adopt`` turns MindFormers' own shipped YAMLs (v1.5.0's configs/llama2 pretrain, research/qwen1_5
pretrain; the 1.9 line's research/llama3_1 finetune with --pretraining-columns, whose AdamW becomes LongSeqAdamW:
the flat path of the runner wrapper) into ones that train through MindFormers' Trainer route with CP = 2 on 2 CPU ranks: every rank logs the
loss sequence of the same adopted file at CP = 1 (1e-5), and the loss line carries the learning rate and the
gradient norm (``use_clip_grad: True`` in the shipped files).  One process runs the CP = 1 cases, one msrun launch
of 2 ranks the CP = 2 cases."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mf_route import SEQ, VOCAB, write_tokens

WORKER = Path(__file__).with_name("adopt_worker.py")
RTOL = 1e-5
CASES = {"v1.5.0_pretrain_llama2_7b:2:colossalai_cp": "v1.5.0_pretrain_llama2_7b:1:colossalai_cp",
         "v1.5.0_pretrain_qwen1_5_7b:2:ulysses_cp": "v1.5.0_pretrain_qwen1_5_7b:1:colossalai_cp",
         "head_finetune_llama3_1_8b:2:colossalai_cp:pretraining_columns":
             "head_finetune_llama3_1_8b:1:colossalai_cp:pretraining_columns"}

pytestmark = pytest.mark.dist


@pytest.fixture(scope="module")
def results(msrun, tmp_path_factory):
    from mf_longseq.train.data import SyntheticTokens
    data_dir = tmp_path_factory.mktemp("adopt_data")
    source = SyntheticTokens(VOCAB, SEQ, seed=5)
    data = write_tokens(data_dir / "tokens3.mindrecord", np.stack([source.sample(i) for i in range(3)]))
    out = tmp_path_factory.mktemp("adopt_out")
    env = dict(os.environ, PYTHONPATH=f"{WORKER.parents[2]}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    proc = subprocess.run([sys.executable, str(WORKER), str(out), data, ",".join(CASES.values())],
                          capture_output=True, text=True, timeout=1500, env=env, cwd=out)
    assert proc.returncode == 0, proc.stderr[-4000:]
    msrun(WORKER, [out, data, ",".join(CASES)], workers=2, timeout=1800)
    return out


def _read(out: Path, case: str, rank: int) -> dict:
    return json.loads((out / case.replace(":", "_") / f"rank{rank}.json").read_text())


@pytest.mark.parametrize("case", sorted(CASES))
def test_adopted_shipped_yaml_trains_with_cp2_as_with_cp1(results, case):
    ref = _read(results, CASES[case], 0)
    assert len(ref["losses"]) == 3 and all(np.isfinite(ref["losses"]))
    for rank in range(2):
        got = _read(results, case, rank)
        assert np.allclose(got["losses"], ref["losses"], rtol=RTOL, atol=0), (rank, got, ref)
        assert got["global_norm"] is not None and got["global_norm"] > 0          # use_clip_grad: True
        assert abs(got["global_norm"] - ref["global_norm"]) <= 1e-4 * ref["global_norm"]
        assert got["lr"] == pytest.approx(ref["lr"]) and got["lr"] > 0
