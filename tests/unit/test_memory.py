"""No S x S buffer, ever: attention forward+backward at S = 32768 in a fresh process keeps its peak-RSS growth
far below the S^2 * 4 bytes (4 GiB) that one fp32 score matrix would take."""
import json
import os
import subprocess
import sys
from pathlib import Path

PROBE = Path(__file__).resolve().parents[1] / "memory_probe.py"


def test_no_s_by_s_buffer_at_32k(tmp_path):
    s = 32768
    proc = subprocess.run([sys.executable, str(PROBE), str(s)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=1500, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr[-3000:]
    figures = json.loads(proc.stdout.strip().splitlines()[-1])
    assert figures["finite"]
    budget_mib = s * s * 4 / 8 / 2**20                     # an eighth of one fp32 S x S matrix: 512 MiB
    assert figures["delta_mib"] < budget_mib, figures
