"""Build the fused CPU attention kernel (``csrc/fused_attention.cc``) once per machine and cache the library.

The library is compiled with the system C++ compiler at first use and linked against the oneDNN that MindSpore's
wheel ships (``mindspore/lib/libdnnl.so.3``, for ``dnnl_sgemm``): no new dependency.  It is cached as

    $MF_LONGSEQ_CACHE (default ~/.cache/mf_longseq)/fused_attention-<key>.so

where ``key`` hashes the source, the compiler's version banner, the flags, the oneDNN path and the CPU's
feature flags (``-march=native`` code is only valid on this kind of CPU).  Concurrent builds (several ranks
starting at once) are safe: each writes a private temporary and renames it into place atomically.

Errors: ``FusedKernelUnavailable`` names what is missing (compiler, oneDNN library, or the compiler's output).
"""
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

SOURCE = Path(__file__).resolve().parent / "csrc" / "fused_attention.cc"
FLAGS = ("-O3", "-march=native", "-std=c++20", "-fPIC", "-shared", "-fopenmp-simd", "-pthread")


class FusedKernelUnavailable(RuntimeError):
    """The fused CPU kernel cannot be built or loaded here; the message says what is missing and the fix."""


def find_compiler() -> str:
    """Path of the C++ compiler: $CXX, else g++, c++ or clang++ on PATH.

    Raises:
        FusedKernelUnavailable: none found.
    """
    candidates = [os.environ["CXX"]] if os.environ.get("CXX") else ["g++", "c++", "clang++"]
    for name in candidates:
        path = shutil.which(name)
        if path:
            return path
    raise FusedKernelUnavailable(
        f"no C++ compiler found (looked for {', '.join(candidates)} on PATH). Fix: install one "
        "(e.g. `apt-get install g++`) or set CXX to its path.")


def dnnl_library() -> Path:
    """MindSpore's bundled oneDNN, ``<mindspore>/lib/libdnnl.so.3``.

    Raises:
        FusedKernelUnavailable: the wheel does not ship it.
    """
    import mindspore
    path = Path(mindspore.__file__).resolve().parent / "lib" / "libdnnl.so.3"
    if not path.is_file():
        raise FusedKernelUnavailable(f"oneDNN library not found at {path} (expected in the MindSpore wheel); "
                                     "the fused CPU kernel needs its dnnl_sgemm.")
    return path


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return os.uname().machine


def cache_dir() -> Path:
    return Path(os.environ.get("MF_LONGSEQ_CACHE") or Path.home() / ".cache" / "mf_longseq")


_FOUND = {}                # (source, cache dir, $CXX) -> library already located by this process


def library_path() -> Path:
    """The cached kernel library, built now if this machine has none yet for this source and compiler.

    Raises:
        FusedKernelUnavailable: no compiler, no oneDNN, or the compilation failed (its output is included).
    """
    where = (str(SOURCE), str(cache_dir()), os.environ.get("CXX"))
    if where not in _FOUND or not _FOUND[where].is_file():
        _FOUND[where] = _build()
    return _FOUND[where]


def _build() -> Path:
    """Compile SOURCE into the cache unless the library for its key is there; returns its path."""
    compiler, dnnl = find_compiler(), dnnl_library()
    try:
        banner = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as err:
        raise FusedKernelUnavailable(f"the C++ compiler {compiler} does not run: {err}") from err
    key = hashlib.sha256("\0".join([SOURCE.read_text(), banner, " ".join(FLAGS), str(dnnl), _cpu_flags()])
                         .encode()).hexdigest()[:16]
    target = cache_dir() / f"fused_attention-{key}.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    cmd = [compiler, *FLAGS, str(SOURCE), str(dnnl), f"-Wl,-rpath,{dnnl.parent}", "-o", tmp]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        os.unlink(tmp)
        raise FusedKernelUnavailable(f"building the fused CPU kernel failed: {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    os.replace(tmp, target)
    return target
