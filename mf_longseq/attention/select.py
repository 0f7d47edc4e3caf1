"""Which local attention kernel a backend runs (every kernel has the contract of ``kernel.py``).

* Ascend with ``use_flash_attention``: ``flash.FlashKernel`` (FlashAttentionScore / FlashAttentionScoreGrad);
* CPU: ``cpu_fused.FusedCpuKernel`` (C++ FlashAttention-2, built at first use), or ``kernel.BlockwiseKernel``
  with one warning when it cannot be built;
* elsewhere: ``kernel.BlockwiseKernel``.
"""
import warnings

from mf_longseq.attention.kernel import BlockwiseKernel

_FALLBACK_WARNED = []


def select_kernel(device_target: str = "CPU", block_size: int = 2048, use_flash_attention: bool = True):
    """The kernel for a backend: FlashAttentionScore on Ascend (when flash attention is on), the fused C++
    kernel (``cpu_fused.FusedCpuKernel``) on CPU, blockwise elsewhere.

    On CPU, when the fused kernel cannot be built (no C++ compiler, no oneDNN in the MindSpore wheel), this
    warns once per process, naming what is missing, and returns ``BlockwiseKernel``.
    """
    if device_target == "Ascend" and use_flash_attention:
        from mf_longseq.attention.flash import FlashKernel
        return FlashKernel()
    if device_target == "CPU":
        from mf_longseq.attention.cpu_build import FusedKernelUnavailable
        from mf_longseq.attention.cpu_fused import FusedCpuKernel
        try:
            return FusedCpuKernel(block_size)
        except FusedKernelUnavailable as err:
            if not _FALLBACK_WARNED:
                _FALLBACK_WARNED.append(True)
                warnings.warn(f"fused CPU attention kernel unavailable, using the slower blockwise kernel: {err}",
                              RuntimeWarning, stacklevel=2)
    return BlockwiseKernel(block_size)
