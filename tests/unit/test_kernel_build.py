"""The fused CPU kernel's build and selection: cached per machine, a clear error without a compiler, one warning
and the blockwise fallback; inputs that are views or half precision."""
import warnings

import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor

from mf_longseq.attention import cpu_build, select as select_mod
from mf_longseq.attention.cpu_build import FusedKernelUnavailable, find_compiler, library_path
from mf_longseq.attention.cpu_fused import FusedCpuKernel, cpu_threads
from mf_longseq.attention.kernel import BlockwiseKernel, default_scale
from mf_longseq.attention.select import select_kernel
from mf_longseq.attention.mask import AttentionMask


def test_missing_compiler_is_named(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-g++"))
    with pytest.raises(FusedKernelUnavailable, match=r"no C\+\+ compiler found .*no-such-g\+\+.*set CXX"):
        find_compiler()


def test_select_kernel_falls_back_with_one_warning(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-g++"))
    monkeypatch.setattr(select_mod, "_FALLBACK_WARNED", [])
    with pytest.warns(RuntimeWarning, match="fused CPU attention kernel unavailable.*no C\\+\\+ compiler"):
        first = select_kernel("CPU", 64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second = select_kernel("CPU", 64)
    assert first.name == second.name == "blockwise"


def test_cpu_default_is_fused_and_library_is_cached(tmp_path, monkeypatch):
    assert select_kernel("CPU").name == "fused_cpu"
    assert select_kernel("GPU").name == "blockwise"
    monkeypatch.setenv("MF_LONGSEQ_CACHE", str(tmp_path))
    built = library_path()
    stamp = built.stat().st_mtime_ns
    assert built.parent == tmp_path and built.name.startswith("fused_attention-")
    assert library_path() == built and built.stat().st_mtime_ns == stamp          # second call: no rebuild
    assert [p.name for p in tmp_path.iterdir()] == [built.name]                    # no temporaries left


def test_build_failure_reports_compiler_output(tmp_path, monkeypatch):
    monkeypatch.setenv("MF_LONGSEQ_CACHE", str(tmp_path))
    bad = tmp_path / "bad.cc"
    bad.write_text("this is not C++\n")
    monkeypatch.setattr(cpu_build, "SOURCE", bad)
    with pytest.raises(FusedKernelUnavailable, match="building the fused CPU kernel failed"):
        library_path()


def test_threads_follow_runtime_num_threads():
    assert 1 <= cpu_threads() <= ms.get_context("runtime_num_threads")


@pytest.mark.parametrize("dtype", [ms.float32, ms.float16])
def test_views_and_half_precision_match_blockwise(dtype):
    """A transposed (non-contiguous) view and float16 inputs give what the reference kernel gives."""
    rng = np.random.default_rng(3)
    s, n, kv, d = 150, 4, 2, 16
    q_bsnd = Tensor(rng.standard_normal((1, s, n, d)).astype(np.float32)).astype(dtype)
    k, v = (Tensor(rng.standard_normal((1, kv, s, d)).astype(np.float32)).astype(dtype) for _ in range(2))
    q = q_bsnd.swapaxes(1, 2)                                                     # (B, N, S, D) view
    pos = np.arange(s)
    mask = AttentionMask(pos, pos, True)
    out, lse = FusedCpuKernel(32).forward(q, k, v, mask, default_scale(d))
    ref_out, ref_lse = BlockwiseKernel(32).forward(q, k, v, mask, default_scale(d))
    assert out.dtype == dtype and lse.dtype == ms.float32
    tol = 1e-5 if dtype == ms.float32 else 2e-3
    assert np.abs(out.astype(ms.float32).asnumpy() - ref_out.astype(ms.float32).asnumpy()).max() <= tol
    assert np.abs(lse.asnumpy() - ref_lse.asnumpy()).max() <= 1e-5
