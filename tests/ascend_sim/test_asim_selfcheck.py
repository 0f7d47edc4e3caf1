"""scripts/ascend_selfcheck.sh: starts and runs every check on the simulated Ascend (``--dry-run``); its error
measurement and verdict, on CPU with the NumPy stand-in of FlashAttentionScore (``tests/flash_emulator.py``)."""
import json
import subprocess
import sys

import mindspore as ms

from asim_harness import ROOT
from mf_longseq.attention.kernel import AttentionKernel
from mf_longseq.tools import ascend_selfcheck as selfcheck

SCRIPT = ROOT / "scripts" / "ascend_selfcheck.sh"


def test_dry_run_runs_every_check_on_the_simulation(sim, tmp_path):
    out_dir = tmp_path / "selfcheck"
    env = sim.env(rank_size=4, rank_id=0, level=1)
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--devices", "4", "--seq-len", "2048", "--python",
                           sys.executable, "--output-dir", str(out_dir)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=1800)
    tail = "\n".join(ln for ln in proc.stderr.splitlines() if "[WARNING]" not in ln)[-3000:]
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{tail}"
    assert f"+ msrun --worker_num 4 --local_worker_num 4" in proc.stdout, proc.stdout
    rows = json.loads((out_dir / "selfcheck_rank0.json").read_text())["rows"]
    want = [f"kernel: {name}" for name, _ in selfcheck.kernel_masks(2048)] + \
           [f"algorithm: {label}" for label, *_ in selfcheck.algorithms(4)]
    assert [r["check"] for r in rows] == want
    assert all("skipped" not in r and set(selfcheck.FIELDS) - {"lse"} <= set(r) for r in rows), rows
    assert "numbers are meaningless" in proc.stdout


def _args(**overrides):
    return selfcheck.parse_args(["--seq-len", "128", "--heads", "4", "--kv-heads", "2", "--head-dim", "16",
                                 "--device", "CPU"] + [x for k, v in overrides.items() for x in (f"--{k}", v)])


def _emulated_flash():
    from flash_emulator import NumpyFlashPrimitives
    from mf_longseq.attention.flash import FlashKernel
    return FlashKernel(primitives=NumpyFlashPrimitives(), compute_dtype=ms.float32)


class _OffByTenPercent(AttentionKernel):
    """A broken kernel: the emulated FlashKernel with out scaled by 1.1 (the declared kernel contract,
    ``attention/kernel.py AttentionKernel``, otherwise the inner kernel's)."""

    def __init__(self):
        self.inner = _emulated_flash()
        self.name = "off_by_ten_percent"
        self.block_size = self.inner.block_size
        self.input_layouts, self.input_layout = self.inner.input_layouts, self.inner.input_layout

    def forward(self, *args):
        out, lse = self.inner.forward(*args)
        return out * 1.1, lse

    def backward(self, *args):
        return self.inner.backward(*args)


def test_kernel_errors_measured_and_judged_on_cpu():
    args = _args()
    rows = selfcheck.judge(selfcheck.check_kernels(args, flash=_emulated_flash), args.tolerance)
    assert [r["check"] for r in rows] == [f"kernel: {n}" for n, _ in selfcheck.kernel_masks(128)]
    for row in rows:      # bf16 inputs vs float32: a few 2^-8 relative, never exactly 0
        assert row["ok"] and 0 < max(row[f] for f in selfcheck.FIELDS) <= args.tolerance, row
    broken = selfcheck.judge(selfcheck.check_kernels(args, flash=_OffByTenPercent), args.tolerance)
    assert all(not r["ok"] and r["out"] > 0.05 for r in broken), broken


def test_algorithm_errors_measured_on_cpu_single_rank():
    args = _args()
    rows = selfcheck.judge(selfcheck.check_algorithms(args, 1, 0, flash=_emulated_flash), args.tolerance)
    assert len(rows) == 3 and all(r["ok"] for r in rows), rows
    table = selfcheck.format_table(rows, args.tolerance)
    assert "colossalai_cp (ring)" in table and "FAIL" not in table
