"""Every local attention kernel of the package declares the contract of ``attention/kernel.py``'s
``AttentionKernel`` (tile size, tensor formats) explicitly, and the algorithms read the declared attributes,
not ``getattr`` hooks with fallbacks."""
import importlib
import inspect
import pkgutil
import re
from pathlib import Path

import pytest

import mf_longseq.attention as attention_pkg
from mf_longseq.attention.kernel import HEAD_MAJOR, TOKEN_MAJOR, AttentionKernel

ROOT = Path(__file__).resolve().parents[2]


def kernel_classes():
    """Every class of mf_longseq.attention named ``*Kernel`` with a forward and a backward (the local kernels)."""
    found = {}
    for info in pkgutil.iter_modules(attention_pkg.__path__):
        module = importlib.import_module(f"mf_longseq.attention.{info.name}")
        for name, cls in vars(module).items():
            if (inspect.isclass(cls) and cls.__module__ == module.__name__ and name.endswith("Kernel")
                    and cls is not AttentionKernel and hasattr(cls, "forward") and hasattr(cls, "backward")):
                found[name] = cls
    return found


def make(name):
    """An instance of each kernel class (a new kernel class must be added here)."""
    from mf_longseq.attention.cpu_build import FusedKernelUnavailable
    if name == "FusedCpuKernel":
        from mf_longseq.attention.cpu_fused import FusedCpuKernel
        try:
            return FusedCpuKernel(64)
        except FusedKernelUnavailable as err:
            pytest.skip(f"fused CPU kernel unavailable: {err}")
    if name == "FlashKernel":
        from mf_longseq.attention.flash import FlashKernel
        return FlashKernel(primitives=object())
    if name == "BlockwiseKernel":
        from mf_longseq.attention.kernel import BlockwiseKernel
        return BlockwiseKernel(64)
    raise AssertionError(f"{name}: a kernel class this test does not know; add it to make()")


def test_the_package_has_the_three_kernels():
    assert {"BlockwiseKernel", "FusedCpuKernel", "FlashKernel"} <= set(kernel_classes())


@pytest.mark.parametrize("name", sorted(kernel_classes()))
def test_every_kernel_class_declares_the_protocol(name):
    cls = kernel_classes()[name]
    assert issubclass(cls, AttentionKernel), f"{name} does not subclass attention.kernel.AttentionKernel"
    for attr in ("name", "input_layouts"):
        assert attr in vars(cls), f"{name} does not declare {attr} in its class body"
    assert cls.forward is not AttentionKernel.forward and cls.backward is not AttentionKernel.backward
    kernel = make(name)
    assert "block_size" in vars(cls) or "block_size" in vars(kernel), f"{name} does not set block_size"
    assert kernel.block_size is None or (isinstance(kernel.block_size, int) and kernel.block_size >= 1)
    assert kernel.name and HEAD_MAJOR in kernel.input_layouts and kernel.input_layout == HEAD_MAJOR
    assert set(kernel.input_layouts) <= {HEAD_MAJOR, TOKEN_MAJOR}
    for fmt in kernel.input_layouts:
        twin = kernel.with_input_layout(fmt)
        assert twin.input_layout == fmt and type(twin) is cls and kernel.input_layout == HEAD_MAJOR
    with pytest.raises(ValueError, match=r"input_layout = 'TND': the .* kernel takes"):
        kernel.with_input_layout("TND")


def test_the_algorithms_read_the_declared_attributes():
    """No ``getattr(kernel, ...)`` fallbacks: ring, kvallgather and api read ``block_size`` / ``input_layouts``."""
    for path in ("ring.py", "kvallgather.py", "api.py"):
        text = (ROOT / "mf_longseq" / "attention" / path).read_text(encoding="utf-8")
        assert not re.search(r"getattr\((self\.)?kernel", text), f"attention/{path} reads a kernel through getattr"
        assert "1 << 30" not in text, f"attention/{path} fakes a tile size"
