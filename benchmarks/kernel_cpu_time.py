"""CPU time of the fused kernel's library called directly (no MindSpore executor) against torch SDPA, one thread.

    python benchmarks/kernel_cpu_time.py --seq 4096 --kv-heads 8

Calls the AOT entry points of the cached library (``cpu_build.library_path()``) through ctypes on NumPy arrays,
with the same parameter layout MindSpore passes, and times them with the process CPU clock (the kernel works on
its own thread); torch's ``F.scaled_dot_product_attention`` (causal, GQA) runs on one thread in the same process.
On a shared machine CPU time is the figure that does not move with the load.  B = 1, 8 query heads, D = 64, float32.
GFLOP/s: forward 4 * D * N * S(S+1)/2, backward 2.5x that (5 matmuls against 2).
"""
import argparse
import ctypes
import time

import numpy as np


def _call(fn, arrays):
    """fn(nparam, params, ndims, shapes, dtypes, stream, extra) as MindSpore's AOT CPU kernel calls it."""
    n = len(arrays)
    params = (ctypes.c_void_p * n)(*[a.ctypes.data for a in arrays])
    ndims = (ctypes.c_int * n)(*[a.ndim for a in arrays])
    dims = [(ctypes.c_int64 * a.ndim)(*a.shape) for a in arrays]
    shapes = (ctypes.POINTER(ctypes.c_int64) * n)(*[ctypes.cast(x, ctypes.POINTER(ctypes.c_int64)) for x in dims])
    start = time.process_time()
    if fn(n, params, ndims, shapes, None, None, None) != 0:
        raise RuntimeError("kernel returned an error")
    return time.process_time() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--block-q", type=int, default=128, help="query rows per head of a tile")
    parser.add_argument("--block-k", type=int, default=512)
    args = parser.parse_args()
    from mf_longseq.attention.cpu_build import library_path
    lib = ctypes.CDLL(str(library_path()))
    s, n, kv, d = args.seq, 8, args.kv_heads, 64
    rng = np.random.default_rng(0)
    q, dout = (rng.standard_normal((1, n, s, d), dtype=np.float32) for _ in range(2))
    k, v = (rng.standard_normal((1, kv, s, d), dtype=np.float32) for _ in range(2))
    pos, none = np.arange(s, dtype=np.int32), np.zeros(1, np.int32)
    cfg = np.array([d ** -0.5, 1, 0, 1, args.block_q, args.block_k], np.float32)  # scale causal docs threads bq bk
    out, lse = np.empty_like(q), np.empty((1, n, s), np.float32)
    fwd = _call(lib.FusedAttentionForward, [q, k, v, pos, pos, none, none, cfg, out, lse])
    delta = (out * dout).sum(-1)
    dq, dk, dv = np.empty_like(q), np.empty_like(k), np.empty_like(v)
    bwd = _call(lib.FusedAttentionBackward, [q, k, v, dout, lse, delta, pos, pos, none, none, cfg, dq, dk, dv])
    flops = 4 * d * n * s * (s + 1) / 2
    print(f"fused  fwd {fwd:.3f} s ({flops / fwd / 1e9:.1f} GF/s)  bwd {bwd:.3f} s "
          f"({2.5 * flops / bwd / 1e9:.1f} GF/s)  total {fwd + bwd:.3f} CPU-s")
    import torch
    torch.set_num_threads(1)
    tq, tk, tv = (torch.from_numpy(a).requires_grad_() for a in (q, k, v))
    for _ in range(2):                                         # the second pass is reported (first: set-up)
        start = time.process_time()
        o = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=True, enable_gqa=kv != n)
        t_fwd = time.process_time() - start
        start = time.process_time()
        o.backward(torch.from_numpy(dout))
        t_bwd = time.process_time() - start
    print(f"torch  fwd {t_fwd:.3f} s ({flops / t_fwd / 1e9:.1f} GF/s)  bwd {t_bwd:.3f} s  total {t_fwd + t_bwd:.3f} CPU-s")


if __name__ == "__main__":
    main()
