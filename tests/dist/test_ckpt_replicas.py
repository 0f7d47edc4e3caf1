"""A resume checks that the dp x cp replicas loaded the same state (issue 20 item 1), on 2 real CPU ranks.

One msrun launch (``ckpt_worker.py``): a checkpoint whose rank files come from two different saves is refused
on both ranks, naming its step directory; an untouched one resumes.  Today's main resumed the torn one with
rc 0 and the two replicas trained with different weights.
"""
import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.dist
HERE = Path(__file__).resolve().parent


def test_a_torn_checkpoint_is_refused_and_a_clean_one_resumes(msrun, tmp_path):
    msrun(HERE / "ckpt_worker.py", [tmp_path], workers=2, timeout=600)
    step = tmp_path / "a" / "checkpoints" / "step_000002"
    for rank in range(2):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["torn"] is not None, f"rank {rank} resumed a checkpoint mixing two saves"
        assert result["torn"].startswith(f"--resume {step}: the dp x cp replicas loaded different weights "
                                         "(ranks 1 differ from rank 0)")
        assert result["clean_steps"] == [3]
