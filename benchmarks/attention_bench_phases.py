"""Where the memory of ``attention_bench.py``'s ring step is: RSS and peak RSS (VmHWM) above the RSS once the inputs
exist, and glibc's malloc totals (``mallinfo2``: in use, free, mmapped chunks), at every phase of the measured
step of one CP = 2 ring rank - each kernel call, each transfer started and waited for - plus the anonymous
mappings of 4 MiB and more (Rss per mapping, ``/proc/self/smaps``) at the baseline, after the warm-up and at the
end.  The step is the benchmark's own (``attention_bench.run_case``: the same inputs, cell, kernel, dispatch,
warm-up and peak reset); only probes are added.

    python benchmarks/attention_bench_phases.py 16384 8          # S, kv heads: msrun 2 ranks, print both logs

Findings (S = 16384, 8 kv heads, main b16ab38) are in docs/design.md ("Against the peers").
"""
import ctypes
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
LOG, BASE, MEASURED = [], [0.0], [False]


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]


def _status_mib(key: str) -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(key)) / 1024


def mark(tag: str, always: bool = False) -> None:
    """One line: RSS and VmHWM above the baseline, malloc in use / free / mmapped, MiB (measured step only)."""
    if not (MEASURED[0] or always):
        return
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2
    m = libc.mallinfo2()
    LOG.append(f"{tag:30s} rss+{_status_mib('VmRSS') - BASE[0]:7.1f} hwm+{_status_mib('VmHWM') - BASE[0]:7.1f}  "
               f"malloc used {m.uordblks / 2**20:7.1f} free {m.fordblks / 2**20:6.1f} mmapped {m.hblkhd / 2**20:7.1f}")


def mappings(tag: str) -> None:
    """Anonymous mappings (and the heap) of >= 4 MiB resident: size and Rss, MiB."""
    rows, name = [], None
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            parts = line.split()
            if not parts[0].endswith(":"):
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                name, size = (parts[5] if len(parts) > 5 else "[anon]"), (hi - lo) >> 20
            elif parts[0] == "Rss:" and name in ("[anon]", "[heap]") and int(parts[1]) >= 4096:
                rows.append(f"    {name} size {size} MiB, rss {int(parts[1]) >> 10} MiB")
    LOG.append(f"mappings at {tag}:\n" + "\n".join(rows))


def install() -> None:
    """Probes around the ring's kernel calls and transfers, the warm-up and the peak reset."""
    import attention_oracle
    import mf_longseq.attention.ring as ring
    import mf_longseq.train.monitor as monitor
    from mf_longseq.attention.cpu_fused import FusedCpuKernel
    shift = ring.ring_shift_start

    def probed_shift(x, group, *args):
        mark(f"  transfer start {tuple(x.shape)}")
        pending = shift(x, group, *args)
        wait = pending.wait
        pending.wait = lambda: (wait(), mark("  transfer waited"))[0]
        return pending
    ring.ring_shift_start = probed_shift
    for name in ("forward", "forward_into", "backward", "backward_into"):
        def probed(self, *args, _call=getattr(FusedCpuKernel, name), _name=name):
            mark(f"  kernel {_name} in")
            result = _call(self, *args)
            mark(f"  kernel {_name} out")
            return result
        setattr(FusedCpuKernel, name, probed)
    rss, reset = monitor.rss_mib, attention_oracle.reset_peak

    def baseline():
        BASE[0] = rss()
        mark("baseline (inputs exist)", always=True)
        mappings("baseline")
        return BASE[0]

    def measured():
        reset()
        MEASURED[0] = True
        mark("measured step (peak reset)")
        mappings("the measured step's start (after the warm-up)")
    monitor.rss_mib, attention_oracle.reset_peak = baseline, measured


def launch(seq: str, kv: str) -> None:
    """msrun 2 ring ranks of this script (the benchmark's worker arguments) and print their probe logs."""
    sys.path.insert(0, str(HERE.parent))
    from mf_longseq.tools.msrun import free_port, msrun_command, msrun_env
    log = f"/tmp/attention_bench_phases_{seq}_{kv}"
    os.makedirs(log + "_rows", exist_ok=True)
    env = msrun_env(dict(os.environ, LOCAL_DEFAULT_PATH=log + "_out", GLOG_v="3", OMP_NUM_THREADS="1"),
                    root=str(HERE.parent))
    args = [__file__, "--seq", seq, "--kv", kv, "--algo", "colossalai_cp", "--cp", "2", "--threads", "1",
            "--steps", "1", "--warmup", "1", "--rows-dir", log + "_rows", "--as-worker"]
    subprocess.run(msrun_command(args, worker_num=2, master_port=free_port(), log_dir=log, guard=False), env=env,
                   capture_output=True)
    for worker in sorted(Path(log).glob("worker_*.log")):
        text = worker.read_text()
        print(worker.name, text[text.find("PHASES"):] if "PHASES" in text else text[-3000:], sep="\n")


if __name__ == "__main__":
    if "--as-worker" not in sys.argv:
        launch(*sys.argv[1:3])
        sys.exit(0)
    import attention_bench
    install()
    attention_bench.worker_main(attention_bench.parse_args())
    mark("after the step and the oracle's forward")
    mappings("the end")
    print("PHASES\n" + "\n".join(LOG), flush=True)
