"""Is the GIL free while an op runs on the Python thread?  A Python thread wakes every 1 ms while the fused kernel
runs one forward (S = 8192, 8 heads, D = 64, causal, 1 thread); prints its wake-ups during the call.

    python benchmarks/dispatch_gil.py blocking     # ops on the Python thread (train.context.configure_op_dispatch)
    python benchmarks/dispatch_gil.py async        # PyNative's default asynchronous dispatch

Measured (2-core host): blocking 1.34 s call with 1082 wake-ups (~800/s), async 2.93 s to the result.
"""
import sys, threading, time
import numpy as np
import mindspore as ms
from mindspore import Tensor
ms.set_device("CPU"); ms.set_context(mode=ms.PYNATIVE_MODE, runtime_num_threads=1)
if sys.argv[1] == "blocking":
    from mf_longseq.train.context import configure_op_dispatch
    configure_op_dispatch("CPU")
from mf_longseq.attention.cpu_fused import FusedCpuKernel
from mf_longseq.attention.mask import AttentionMask
S = 8192
rng = np.random.default_rng(0)
q = Tensor(rng.standard_normal((1, 8, S, 64)).astype(np.float32))
k = Tensor(rng.standard_normal((1, 8, S, 64)).astype(np.float32))
kern = FusedCpuKernel(); pos = np.arange(S); mask = AttentionMask(pos, pos, True)
kern.forward(q, k, k, mask, 0.125)[0].asnumpy()   # warm-up (build + compile)
stop = False; count = [0]
def spin():
    while not stop:
        count[0] += 1
        time.sleep(0.001)        # a thread that needs the GIL ~1000x/s (like a socket loop)
th = threading.Thread(target=spin); th.start()
time.sleep(0.3); c0 = count[0]; t0 = time.perf_counter()
out, lse = kern.forward(q, k, k, mask, 0.125)
t_call = time.perf_counter() - t0; c_call = count[0] - c0
out.asnumpy(); t_all = time.perf_counter() - t0; c_all = count[0] - c0
stop = True; th.join()
print(f"{sys.argv[1]}: call returned after {t_call:.3f}s ({c_call} wakeups), "
      f"result after {t_all:.3f}s ({c_all} wakeups, {c_all / t_all:.0f}/s)")
