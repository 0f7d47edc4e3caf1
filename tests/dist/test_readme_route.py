"""Issue 22, Done-when: the README's main-route command (MindFormers' run_mindformer.py under msrun, CPU, 2 ranks,
CP = 2), pasted verbatim into bash, trains from the repository root and from another directory.

``run_mindformer.py`` is tests/mindformers_standin/run_mindformer.py, copied into a temporary "MindFormers
checkout": like the real script it joins a relative ``--config`` / ``--register_path`` onto its own folder, so a
README that printed a relative template path fails here as it fails for a user.  Only the placeholders
``<MindFormers>`` and ``/data/wiki.mindrecord`` are replaced.  The template's CheckpointMonitor writes every rank's
checkpoint at the end of training.
"""
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from mf_route import SEQ, VOCAB, write_tokens

ROOT = Path(__file__).resolve().parents[2]
STANDIN = ROOT / "tests" / "mindformers_standin" / "run_mindformer.py"

pytestmark = pytest.mark.dist


def readme_main_route() -> str:
    """The first bash block of the README's "Train with MindFormers' own run_mindformer.py" section."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## Train with MindFormers' own `run_mindformer.py`"):]
    return re.search(r"```bash\n(.*?)```", section, re.S).group(1)


def test_readme_block_is_the_main_route_with_placeholders():
    block = readme_main_route()
    assert "<MindFormers>/run_mindformer.py" in block and "/data/wiki.mindrecord" in block
    assert "msrun" in block and "--register_path" in block


@pytest.mark.parametrize("where", ["repository root", "another directory"])
def test_readme_main_route_runs_verbatim(where, tmp_path):
    checkout = tmp_path / "mindformers"
    checkout.mkdir()
    shutil.copy(STANDIN, checkout / "run_mindformer.py")
    data = tmp_path / "wiki.mindrecord"
    write_tokens(data, np.random.default_rng(0).integers(1, VOCAB, (2, 257)))     # the template's seq_length 256
    from mf_longseq.tools.msrun import free_port
    script = readme_main_route().replace("<MindFormers>", str(checkout)).replace("/data/wiki.mindrecord", str(data))
    # the one change beyond the placeholders: a free scheduler port (8118, msrun's default, may be in use by
    # another job on a shared machine)
    script = script.replace("msrun --worker_num", f"msrun --master_port {free_port()} --worker_num", 1)
    cwd = ROOT if where == "repository root" else tmp_path / "elsewhere"
    cwd.mkdir(exist_ok=True)
    before, started = set(os.listdir(cwd)), time.time()
    venv_bin = os.path.dirname(sys.executable)
    env = dict(os.environ, PATH=f"{venv_bin}{os.pathsep}{os.environ['PATH']}",
               PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               LOCAL_DEFAULT_PATH=str(tmp_path / "mf_logs"))
    try:
        proc = subprocess.run(["bash", "-ec", script], cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=1500)
        logs = {p.name: p.read_text(errors="replace") for p in Path(cwd).glob("worker_*.log")}
        saved = sorted(p.name for p in Path(cwd, "output", "checkpoint").rglob("*.ckpt")
                       if p.stat().st_mtime >= started)                  # this run's (output/ may exist already)
    finally:
        if cwd == ROOT:                                   # leave the checkout as it was
            for name in set(os.listdir(cwd)) - before:
                path = cwd / name
                shutil.rmtree(path) if path.is_dir() else path.unlink()
    tails = "\n".join(f"--- {k}\n" + "\n".join(v.splitlines()[-30:]) for k, v in logs.items())
    assert proc.returncode == 0, proc.stderr[-3000:] + tails
    assert sorted(logs) == ["worker_0.log", "worker_1.log"]                # msrun exits 0 only if both did
    assert any(re.search(r"loss:\[\d", log) for log in logs.values()), tails   # MFLossMonitor's step lines
    assert len(saved) == 2, saved                                          # one checkpoint per rank, at the end
