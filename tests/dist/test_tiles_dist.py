"""Tiled LM head + loss and tiled MLP on 2 msrun CPU ranks (``tiles_worker.py``, one launch).

* model_parallel = 2: each rank's loss, hidden / input gradient, vocabulary / FFN slice of the weight gradients
  and the MLP output equal a float64 NumPy oracle of the full layer (1e-5 relative).
* The tiny Qwen-vocabulary run (vocabulary 151936, S = 1024, context_parallel = 2, ``mf-longseq train``'s
  ``run_job``) trains with the tiles on with the same losses as with them off (1e-5 relative): issue 19's
  Done-when check.
"""
import json
from pathlib import Path

import numpy as np
import pytest

import tiles_worker as tw
from tile_oracle import oracle_loss, oracle_mlp, rel_err

WORKER = Path(__file__).with_name("tiles_worker.py")
RTOL = 1e-5


@pytest.fixture(scope="module")
def launch(msrun, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("tiles")
    msrun(WORKER, [out_dir], workers=tw.WORLD, timeout=1800)
    return out_dir


@pytest.mark.dist
def test_tiled_cells_under_model_parallel_match_float64_oracle(launch):
    a = tw.cell_inputs()
    loss, d_hidden, d_weight = oracle_loss(a["hidden"], a["weight"], a["labels"], a["mask"])
    n, h = a["x"].shape[1:]
    y, d_x, d_gate, d_up, d_down = oracle_mlp(a["x"].reshape(n, h), a["w_gate"], a["w_up"], a["w_down"],
                                              a["dy"].reshape(n, h))
    vp, fp = tw.V // 2, tw.F // 2
    for rank in range(tw.WORLD):
        got = np.load(launch / "cells_mp2" / f"rank{rank}.npz")
        rows, cols = slice(rank * vp, (rank + 1) * vp), slice(rank * fp, (rank + 1) * fp)
        assert rel_err(got["loss"], loss) <= RTOL
        assert rel_err(got["d_hidden"], d_hidden) <= RTOL, "d hidden must be summed over mp (CopyToMP)"
        assert rel_err(got["d_weight"], d_weight[rows]) <= RTOL
        assert rel_err(got["y"].reshape(n, h), y) <= RTOL
        for i, want in enumerate((d_x.reshape(a["x"].shape), d_gate[cols], d_up[cols], d_down[:, cols])):
            assert rel_err(got[f"mlp_{i}"], want) <= RTOL, f"MLP gradient {i}"


@pytest.mark.dist
def test_qwen_vocabulary_cp2_trains_tiled_like_untiled(launch):
    for rank in range(tw.WORLD):
        losses = json.loads((launch / "qwen_vocab_cp2" / f"rank{rank}.json").read_text())
        assert len(losses["tiled"]) == tw.STEPS == len(losses["untiled"])
        worst = max(abs(a - b) / abs(b) for a, b in zip(losses["tiled"], losses["untiled"]))
        assert worst <= RTOL, f"rank {rank}: tiled {losses['tiled']} vs untiled {losses['untiled']}"
        assert abs(losses["tiled"][-1] - losses["tiled"][0]) > 1e-4, "the run must train (losses move)"
