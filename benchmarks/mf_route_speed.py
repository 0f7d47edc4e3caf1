"""Per-step time of MindFormers' Trainer route against ``mf-longseq train``, side by side on the same template,
data and ranks (issue 22: target <= 1.15x at CP = 1 and CP = 2, tiny and S = 8192).

    python benchmarks/mf_route_speed.py                          # S 256 and 8192 x CP 1 and 2, 5 steps, 2 rounds
    python benchmarks/mf_route_speed.py --seq 256 --cp 2 --steps 6 --rounds 3 --optimizer AdamW

Every case runs in one process per rank (CP = 1: one plain process; CP = 2: one msrun launch of 2 CPU workers):
``--rounds`` times in turn, the Trainer route (``MindFormerConfig`` -> ``build_context`` -> ``Trainer.train()``,
what ``run_mindformer.py`` runs, with ``optimizer.type`` = ``--optimizer``) and ``mf-longseq train``
(``run_job``) on the tiny LLaMA2 template of that sequence length, the same MindRecord of ``--steps`` samples
(batch 1).  A step is measured from its start to its end: MindSpore's ``on_train_step_begin`` /
``on_train_step_end`` on the route, the interval of ``StepRecord.seconds`` (``Trainer.step``) in ours; per step:
wall time (``*_ms``), CPU time of the whole process, every thread (``*_cpu_ms``: less sensitive to the host's
load than wall time, and it counts threads spinning beside the kernels) and of the Python thread
(``*_thread_cpu_ms``).  The figure is the median over the rounds of steps 2..N (step 1 compiles and builds
caches), the slowest rank; ratio = route / ours; ``*_by_round`` the same per round.  Peak RSS per rank (MiB,
ru_maxrss): ``route_peak_rss_mib`` after the first route run, ``process_peak_rss_mib`` at the end.  The load
average (``/proc/loadavg``) is printed before and after each case: on a shared host only the ratios of one run
count.  Writes benchmarks/results/mf_route_speed.csv.

``MF_ROUTE_SPEED_PROFILE=DIR``: every rank also writes a cProfile of steps 2..N of each run
(``DIR/<route|ours><round>_rank<r>.prof``) and ``DIR/result_rank<r>.json`` with the CPU seconds of each thread by
name and allowed CPUs (e.g. ``ActorThread_0 cpus=0,1``: an unbound MindSpore thread pool).
"""
import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TEMPLATES = {256: "llama2_tiny_s256_cp{cp}_colossalai_cp.yaml", 8192: "llama2_tiny_s8192_cp2_colossalai_cp.yaml"}
TEMPLATES[4096] = TEMPLATES[2048] = TEMPLATES[8192]           # seq_length set from --seq


def load() -> str:
    """The 1, 5 and 15 minute load averages of the host, as one string."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


# --------------------------------------------------------------------------------------------------- worker side
def route_config(args, data: str, out: str):
    from mindformers import MindFormerConfig
    name = TEMPLATES[args.seq].format(cp=args.cp)
    cfg = MindFormerConfig(str(ROOT / "yaml_templates" / "tiny" / name))
    cfg.use_parallel, cfg.output_dir = args.cp > 1, out
    cfg.train_dataset.data_loader.dataset_dir, cfg.train_dataset.data_loader.shuffle = data, False
    cfg.parallel_config.context_parallel, cfg.long_seq.device_num = args.cp, args.cp
    cfg.model.model_config.seq_length = args.seq
    cfg.optimizer.type = args.optimizer
    return cfg


class StepMeter:
    """Per-step wall time, CPU time of the whole process (every thread: kernels, MindData, the ring's transport)
    and of the Python thread, in seconds; with ``profile`` set, a cProfile of the steps after the first."""

    def __init__(self, profile: bool = False):
        import cProfile
        self.seconds, self.cpu, self.thread_cpu = [], [], []
        self.profiler = cProfile.Profile() if profile else None
        self._start = (0.0, 0.0, 0.0)
        self.threads, self._threads = {}, {}          # with profile: CPU seconds per thread name, steps 2..N

    def begin(self) -> None:
        if self.profiler is not None and self.seconds:
            self._threads = thread_cpu()
            self.profiler.enable()
        self._start = (time.perf_counter(), time.process_time(), time.thread_time())

    def end(self) -> None:
        now = (time.perf_counter(), time.process_time(), time.thread_time())
        if self.profiler is not None and self.seconds:
            self.profiler.disable()
            for tid, (name, cpu, cores) in thread_cpu().items():
                key = f"{name} cpus={cores}"
                self.threads[key] = self.threads.get(key, 0.0) + cpu - self._threads.get(tid, (name, 0.0, ""))[1]
        for out, a, b in zip((self.seconds, self.cpu, self.thread_cpu), self._start, now):
            out.append(b - a)

    def result(self, profile_path: Optional[str]) -> dict:
        if self.profiler is not None and profile_path:
            self.profiler.dump_stats(profile_path)
        out = {"seconds": self.seconds, "cpu": self.cpu, "thread_cpu": self.thread_cpu, "peak_rss_mib": peak_mib()}
        if self.profiler is not None:
            out["threads"] = {k: round(v, 3) for k, v in sorted(self.threads.items(), key=lambda kv: -kv[1])}
        return out


def thread_cpu() -> dict:
    """{thread id: (name, CPU seconds so far, allowed CPUs)} of this process's threads (/proc/self/task)."""
    tick, out = os.sysconf("SC_CLK_TCK"), {}
    for tid in os.listdir("/proc/self/task"):
        try:
            stat = Path(f"/proc/self/task/{tid}/stat").read_text()
            cores = ",".join(map(str, sorted(os.sched_getaffinity(int(tid)))))
        except (OSError, ValueError):
            continue
        name, fields = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2:].split()
        out[tid] = (name, (int(fields[11]) + int(fields[12])) / tick, cores)
    return out


def peak_mib() -> float:
    """This process's peak resident memory so far, MiB (ru_maxrss: cumulative over the runs of the process)."""
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def step_callback(meter: StepMeter):
    """A MindSpore Callback feeding ``meter`` from ``on_train_step_begin`` / ``on_train_step_end``."""
    from mindspore.train import Callback

    class Timer(Callback):
        def on_train_step_begin(self, run_context):
            meter.begin()

        def on_train_step_end(self, run_context):
            meter.end()

    return Timer()


def run_route(args, data: str, out: str, meter: StepMeter) -> None:
    from mindformers import Trainer, build_context
    cfg = route_config(args, data, out)
    build_context(cfg)
    Trainer(cfg, callbacks=[step_callback(meter)]).train()


def run_ours(args, data: str, out: str, meter: StepMeter) -> None:
    from mf_longseq.train import runner
    from mf_longseq.train.job import JobOptions, load_tree, run_job
    tree = load_tree(route_config(args, data, out))
    step = runner.Trainer.step

    def measured_step(trainer, index):              # the interval of StepRecord.seconds (train_loop)
        meter.begin()
        try:
            return step(trainer, index)
        finally:
            meter.end()

    runner.Trainer.step = measured_step
    try:
        run_job(JobOptions(config=tree, steps=args.steps, output_dir=out), stream=open(os.devnull, "w"))
    finally:
        runner.Trainer.step = step


def worker(args) -> None:
    import mindspore as ms
    ms.set_device("CPU")
    os.environ.setdefault("REGISTER_PATH", str(ROOT / "mf_longseq"))
    import mf_longseq  # noqa: F401  (registers the plugin's classes)
    profile_dir = os.environ.get("MF_ROUTE_SPEED_PROFILE")
    rank = os.environ.get("RANK_ID", "0")
    rows = {"route": [], "ours": []}
    for r in range(args.rounds):
        for kind, fn in (("route", run_route), ("ours", run_ours)):
            meter = StepMeter(profile=bool(profile_dir))
            fn(args, args.data, os.path.join(args.workdir, f"{kind}{r}"), meter)
            path = os.path.join(profile_dir, f"{kind}{r}_rank{rank}.prof") if profile_dir else None
            rows[kind].append(meter.result(path))
    if profile_dir:
        Path(profile_dir, f"result_rank{rank}.json").write_text(json.dumps(rows, indent=1))
    print("RESULT " + json.dumps(rows), flush=True)


# --------------------------------------------------------------------------------------------------- driver side
def write_data(path: str, seq: int, n: int) -> str:
    from mindspore.mindrecord import FileWriter
    rng = np.random.default_rng(0)
    writer = FileWriter(path, 1, overwrite=True)
    writer.add_schema({"input_ids": {"type": "int32", "shape": [-1]}}, "tokens")
    writer.write_raw_data([{"input_ids": rng.integers(3, 256, seq + 1).astype(np.int32)} for _ in range(n)])
    writer.commit()
    return path


def measure(args, seq: int, cp: int, workdir: str) -> dict:
    from mf_longseq.tools.msrun import free_port, msrun_command, msrun_env
    data = write_data(os.path.join(workdir, f"s{seq}.mindrecord"), seq, args.steps)
    task = [__file__, "--as-worker", "--seq", seq, "--cp", cp, "--steps", args.steps, "--rounds", args.rounds,
            "--optimizer", args.optimizer, "--data", data, "--workdir", os.path.join(workdir, f"s{seq}_cp{cp}")]
    env = dict(os.environ, LOCAL_DEFAULT_PATH=os.path.join(workdir, "mfout"), GLOG_v="3",
               PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    before = load()
    if cp == 1:
        proc = subprocess.run([sys.executable, *map(str, task)], capture_output=True, text=True, env=env, cwd=workdir)
        outputs = [proc.stdout]
    else:
        log_dir = os.path.join(workdir, f"log_s{seq}")
        cmd = msrun_command(task, worker_num=cp, master_port=free_port(), log_dir=log_dir, guard=False)
        proc = subprocess.run(cmd, capture_output=True, text=True, env=msrun_env(env, root=ROOT), cwd=workdir)
        outputs = [log.read_text() for log in sorted(Path(log_dir).glob("worker_*.log"))]
    if proc.returncode:
        raise RuntimeError(f"S={seq} CP={cp} failed:\n{proc.stderr[-3000:]}\n{outputs[-1][-3000:]}")
    ranks = [json.loads(line.split("RESULT ", 1)[1]) for text in outputs for line in text.splitlines()
             if "RESULT " in line]

    def slowest(kind: str, field: str) -> float:         # median of steps 2..N over the rounds, slowest rank
        return max(float(np.median([s for rnd in rank[kind] for s in rnd[field][1:]])) for rank in ranks)

    row = {"seq_len": seq, "cp": cp, "optimizer": args.optimizer, "steps": args.steps, "rounds": args.rounds}
    for field, suffix in (("seconds", ""), ("cpu", "_cpu"), ("thread_cpu", "_thread_cpu")):
        route, ours = slowest("route", field), slowest("ours", field)
        row.update({f"route{suffix}_ms": round(route * 1e3, 1), f"ours{suffix}_ms": round(ours * 1e3, 1),
                    f"ratio{suffix}": round(route / ours, 3)})
    for kind in ("route", "ours"):                        # per round (slowest rank): order effects show here
        for field, suffix in (("seconds", ""), ("cpu", "_cpu")):
            row[f"{kind}{suffix}_ms_by_round"] = " ".join(
                f"{max(float(np.median(rank[kind][r][field][1:])) for rank in ranks) * 1e3:.0f}"
                for r in range(args.rounds))
    # ru_maxrss only grows: after the first route run it is the route's own peak, at the end the process's
    row["route_peak_rss_mib"] = " ".join(f"{rank['route'][0]['peak_rss_mib']:.0f}" for rank in ranks)
    row["process_peak_rss_mib"] = " ".join(f"{rank['ours'][-1]['peak_rss_mib']:.0f}" for rank in ranks)
    row.update(load_before=before, load_after=load())
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, nargs="+", default=[256, 8192], choices=sorted(TEMPLATES))
    parser.add_argument("--cp", type=int, nargs="+", default=[1, 2], choices=[1, 2])
    parser.add_argument("--steps", type=int, default=5, help="steps per run (the median skips the first)")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each route, in turn")
    parser.add_argument("--optimizer", default="LongSeqAdamW", help="optimizer.type on the Trainer route "
                        "(LongSeqAdamW, or MindFormers' AdamW to see what the flat buffer saves)")
    parser.add_argument("--as-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.as_worker:
        args.seq, args.cp = args.seq[0], args.cp[0]
        worker(args)
        return 0
    rows = []
    with tempfile.TemporaryDirectory(prefix="mf_route_speed_") as workdir:
        for seq in args.seq:
            for cp in args.cp:
                rows.append(measure(args, seq, cp, workdir))
                print(json.dumps(rows[-1]), flush=True)
    out = HERE / "results" / "mf_route_speed.csv"
    out.parent.mkdir(exist_ok=True)
    with open(out, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
