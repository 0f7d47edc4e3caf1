"""Per-step time of MindFormers' Trainer route against ``mf-longseq train``, side by side on the same template,
data and ranks (issue 22: target <= 1.15x at CP = 1 and CP = 2, tiny and S = 8192).

    python benchmarks/mf_route_speed.py                          # S 256 and 8192 x CP 1 and 2, 5 steps, 2 rounds
    python benchmarks/mf_route_speed.py --seq 256 --cp 2 --steps 6 --rounds 3 --optimizer AdamW

Every case runs in one process per rank (CP = 1: one plain process; CP = 2: one msrun launch of 2 CPU workers):
``--rounds`` times in turn, the Trainer route (``MindFormerConfig`` -> ``build_context`` -> ``Trainer.train()``,
what ``run_mindformer.py`` runs, with ``optimizer.type`` = ``--optimizer``) and ``mf-longseq train``
(``run_job``) on the tiny LLaMA2 template of that sequence length, the same MindRecord of ``--steps`` samples
(batch 1).  A step's time is wall time from the step's start to its end: MindSpore's ``on_train_step_begin`` /
``on_train_step_end`` on the route, ``StepRecord.seconds`` in ours.  The figure is the median over the rounds of
steps 2..N (step 1 compiles and builds caches), the slowest rank; ratio = route / ours.  The load average
(``/proc/loadavg``) is printed before and after each case: on a shared host only the ratio of one run counts.
Writes benchmarks/results/mf_route_speed.csv.
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

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TEMPLATES = {256: "llama2_tiny_s256_cp{cp}_colossalai_cp.yaml", 8192: "llama2_tiny_s8192_cp2_colossalai_cp.yaml"}


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


class StepTimes:
    """A MindSpore Callback recording each step's wall time (seconds)."""

    def __new__(cls):
        from mindspore.train import Callback

        class Timer(Callback):
            def __init__(self):
                super().__init__()
                self.seconds, self.start = [], 0.0

            def on_train_step_begin(self, run_context):
                self.start = time.perf_counter()

            def on_train_step_end(self, run_context):
                self.seconds.append(time.perf_counter() - self.start)

        return Timer()


def run_route(args, data: str, out: str) -> list:
    from mindformers import Trainer, build_context
    cfg = route_config(args, data, out)
    build_context(cfg)
    timer = StepTimes()
    Trainer(cfg, callbacks=[timer]).train()
    return timer.seconds


def run_ours(args, data: str, out: str) -> list:
    from mf_longseq.train.job import JobOptions, load_tree, run_job
    tree = load_tree(route_config(args, data, out))
    records = run_job(JobOptions(config=tree, steps=args.steps, output_dir=out), stream=open(os.devnull, "w"))
    return [r.seconds for r in records]


def worker(args) -> None:
    import mindspore as ms
    ms.set_device("CPU")
    os.environ.setdefault("REGISTER_PATH", str(ROOT / "mf_longseq"))
    import mf_longseq  # noqa: F401  (registers the plugin's classes)
    rows = {"route": [], "ours": []}
    for r in range(args.rounds):
        for kind, fn in (("route", run_route), ("ours", run_ours)):
            rows[kind].append(fn(args, args.data, os.path.join(args.workdir, f"{kind}{r}")))
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
    median = {k: max(float(np.median([s for rnd in rank[k] for s in rnd[1:]])) for rank in ranks)
              for k in ("route", "ours")}
    return {"seq_len": seq, "cp": cp, "optimizer": args.optimizer, "steps": args.steps, "rounds": args.rounds,
            "route_ms": round(median["route"] * 1e3, 1), "ours_ms": round(median["ours"] * 1e3, 1),
            "ratio": round(median["route"] / median["ours"], 3), "load_before": before, "load_after": load()}


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
