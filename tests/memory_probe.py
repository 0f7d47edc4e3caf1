"""Run one attention forward+backward at sequence length S in this process and print peak-RSS figures as JSON.

Usage: python memory_probe.py S [HEADS] [HEAD_DIM] [BLOCK]
Prints {"seq_len", "baseline_mib", "peak_mib", "delta_mib", "seconds"}: delta = peak RSS during attention minus
RSS after inputs were made (peak = VmHWM, see ``train.monitor.peak_rss_mib``).  Run it in a fresh process.
"""
import json
import sys
import time

import numpy as np

from mf_longseq.train.monitor import peak_rss_mib, rss_mib


def main():
    s = int(sys.argv[1])
    heads = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    head_dim = int(sys.argv[3]) if len(sys.argv) > 3 else 16
    block = int(sys.argv[4]) if len(sys.argv) > 4 else 2048
    import mindspore as ms
    from mindspore import Tensor
    from mf_longseq.attention import BlockwiseKernel, LocalAttention, AttentionMask
    ms.set_device("CPU")
    rng = np.random.default_rng(0)
    q, k, v, dout = (Tensor(rng.standard_normal((1, heads, s, head_dim)).astype(np.float32)) for _ in range(4))
    pos = np.arange(s)
    cell = LocalAttention(BlockwiseKernel(block), AttentionMask(pos, pos, causal=True), head_dim ** -0.5)
    grad = ms.grad(lambda a, b, c: (cell(a, b, c)[0] * dout).sum(), grad_position=(0, 1, 2))
    baseline = rss_mib()
    start = time.time()
    grads = grad(q, k, v)
    total = float(sum(g.sum().asnumpy() for g in grads))
    peak = peak_rss_mib()
    print(json.dumps({"seq_len": s, "baseline_mib": round(baseline, 1), "peak_mib": round(peak, 1),
                      "delta_mib": round(peak - baseline, 1), "seconds": round(time.time() - start, 1),
                      "finite": bool(np.isfinite(total))}))


if __name__ == "__main__":
    main()
