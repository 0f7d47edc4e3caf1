"""Resident memory of one ring rank at checkpoints of two forward + backward steps (the first connects the host
transport): RSS and peak RSS above the RSS once the inputs exist, MiB, printed as one PROBE line per rank.

    python benchmarks/ring_rss_checkpoints.py 16384 8        # S, kv heads; 8 query heads, D = 64, CP = 2 ring

Launch (2 CPU ranks): see ``run`` at the bottom (``python benchmarks/ring_rss_checkpoints.py --launch 16384 8``).
"""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def run(seq: str, kv: str) -> None:
    """msrun 2 ranks of this script and print their PROBE lines."""
    sys.path.insert(0, str(HERE.parent))
    from mf_longseq.tools.msrun import free_port, msrun_command, msrun_env
    log = f"/tmp/ring_rss_{seq}_{kv}"
    env = msrun_env(dict(os.environ, LOCAL_DEFAULT_PATH=log + "_out", GLOG_v="3", OMP_NUM_THREADS="1"),
                    root=str(HERE.parent))
    subprocess.run(msrun_command([__file__, seq, kv], worker_num=2, master_port=free_port(), log_dir=log,
                                 guard=False), env=env, capture_output=True)
    for worker in sorted(Path(log).glob("worker_*.log")):
        print(worker.name, *[line.strip() for line in worker.read_text().splitlines() if line.startswith("PROBE")])


if len(sys.argv) > 1 and sys.argv[1] == "--launch":
    run(*sys.argv[2:4])
    sys.exit(0)
import mindspore as ms
from mindspore import Tensor
ms.set_device("CPU"); ms.set_context(runtime_num_threads=1)
from mf_longseq.train.context import configure_op_dispatch, bind_rank_cores
configure_op_dispatch("CPU")
from mindspore.communication import init
init()
from mf_longseq.parallel import Mesh, global_positions
from mf_longseq.attention import context_parallel_attention, select_kernel
import mf_longseq.attention.ring as ring
from mf_longseq.train.monitor import rss_mib, peak_rss_mib
from attention_oracle import inputs
S, KV = int(sys.argv[1]), int(sys.argv[2])
mesh = Mesh(cp=2, ulysses=1).create_groups(); bind_rank_cores("CPU")
pos = global_positions(S, mesh, "zigzag")
q, k, v, dout = (Tensor(np.ascontiguousarray(x[pos])[None]) for x in inputs(S, 8, KV, 64))
kernel = select_kernel("CPU", 2048)
from mindspore import nn
class A(nn.Cell):
    def construct(self, q, k, v):
        return context_parallel_attention(q, k, v, mesh=mesh, algo="colossalai_cp", kernel=kernel, layout="zigzag")
base = rss_mib()
log = []
def mark(tag):
    log.append(f"{tag}: rss+{rss_mib()-base:.0f} hwm+{peak_rss_mib()-base:.0f}")
orig_c, orig_b = ring.RingAttention.construct, ring.RingAttention.bprop
def c(self, *a):
    mark("fwd in"); r = orig_c(self, *a); r[0].asnumpy(); mark("fwd out"); return r
def b(self, *a):
    mark("bwd in"); r = orig_b(self, *a); [x.asnumpy() for x in r]; mark("bwd out"); return r
ring.RingAttention.construct, ring.RingAttention.bprop = c, b
grad = ms.ops.GradOperation(get_all=True, sens_param=True)(A())
for i in range(2):
    with open("/proc/self/clear_refs", "w") as f: f.write("5")
    mark(f"step {i} start")
    g = grad(q, k, v, dout); [x.asnumpy() for x in g]
    mark(f"step {i} end")
    del g
    mark(f"step {i} freed")
print("PROBE " + " | ".join(log), flush=True)
