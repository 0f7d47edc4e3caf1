"""Tiled LM head + cross entropy and tiled MLP (``long_seq.loss_tile``, ``long_seq.mlp_tile``) on 2 CPU ranks
(context_parallel = 2, ring): peak memory and step time against the untiled model (issue 19).

    python benchmarks/tiled_loss_bench.py                                   # every part below
    python benchmarks/tiled_loss_bench.py --parts time --time-seq 2048 --rounds 5

The model: a tiny Qwen1.5 shape (hidden 32, 2 layers, 4 heads, 2 kv heads, FFN 64) with Qwen's vocabulary,
151936; batch 1; AdamW.  Parts, each one msrun launch of 2 fresh workers (peak RSS, VmHWM, is per process):

* ``train16k``: ``mf-longseq train``'s ``run_job`` at S = ``--seq`` (16384) with ``--loss-tile`` (64; 0: the
  default rule, 441 tokens here) for ``--steps`` steps: the peak RSS per rank (must stay <= 3 GiB) and the step
  time.  The untiled run at this length needs ~27 GB per rank and is NOT run.  Why 64 on CPU: MindSpore's CPU
  memory pool holds about 10.7 (tile, V) float32 blocks per tile at its peak in a forward + backward (measured:
  a 2048-token TiledHeadLoss step over V = 151936 peaks 437 / 845 / 1663 MiB above its start for tiles of
  64 / 128 / 256 tokens), against the 2 this code keeps alive; with the default 441-token tile that is ~2.8 GiB
  for the head alone.
* ``time``: at S = ``--time-seq`` (1024; use 512 on a shared 24 GiB host: the untiled head at 1024 was killed
  out of memory), where the untiled model fits, two trainers in one process (untiled; loss tile ``--loss-tile``)
  step in turn, ``--rounds`` rounds after one warm-up round: the median step time of each and its ratio to the
  untiled one, measured side by side (the same host load); their losses must agree.
* ``mlp_off`` / ``mlp_on``: a model where the MLP's intermediates matter (hidden ``--mlp-hidden`` 128, FFN
  ``--mlp-ffn`` 4096, vocabulary ``--mlp-vocab`` 4096, loss tile ``--mlp-loss-tile`` 1024) at S = ``--mlp-seq``
  (8192), MLP untiled / tiled (``--mlp-tile``): peak RSS per rank of each (two launches, so each peak is its
  own) and step time, run one after the other in one invocation.

Measured (2026-12-07, this shared 2-core host, load average ~35): ``--parts train16k`` (S = 16384, loss tile 64)
trains, losses 11.93894 -> 11.93613, peak RSS 2175 / 2287 MiB on ranks 0 / 1 (753 MiB before the model was
built), ~500 s per step.  ``--parts time --time-seq 512 --rounds 2 --mlp-tile 128`` (load 12.9 -> 11.4):
median step untiled 13.53 s, loss tile (default) 7.96 s (0.59x), MLP tile 8.91 s (0.66x), both 7.00 s (0.52x);
the four loss sequences identical.  Only 2 rounds on a host whose load fell during the run: read the ratios as
"not slower", not as a speed-up.  At S = 1024 the four trainers in one process were killed (out of memory on the
shared host); ``mlp_off`` / ``mlp_on`` were not run.
Measured (2026-12-08 00:00 UTC, load 43.8 -> 30.9): ``--parts time --time-seq 256 --rounds 3 --loss-tile 64``:
median step untiled 21.95 / 21.98 s, loss tile 64 18.65 / 18.61 s (ranks 0 / 1): 0.85x; losses equal to 1e-7
relative.  At ``--time-seq 512`` the two trainers reached 3.0 GiB per worker with the shared host out of memory
and the run was stopped.  ``--parts mlp_off,mlp_on --mlp-tile 512 --steps 2`` (load 30.9 -> 52.0 -> 32.6): peak
RSS per rank 2148 / 2148 MiB untiled, 1397 / 1406 MiB tiled (753 MiB before the model), steps 143.2, 115.3 s
untiled and 74.0, 51.0 s tiled (two launches under different loads: "not slower"); losses equal.

Prints one JSON line per part and a summary table, with ``uptime``'s load averages before and after each part
(timings on a shared host move with its load; memory figures do not).
"""
import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
VOCAB = 151936


def tree(seq, loss_tile, mlp_tile, hidden=32, ffn=64, vocab=VOCAB):
    """The benchmark model as a MindFormers-style config; ``loss_tile`` None: the default rule."""
    tiles = {"mlp_tile": mlp_tile, **({} if loss_tile is None else {"loss_tile": loss_tile})}
    return {
        "seed": 0, "runner_config": {"batch_size": 1},
        "optimizer": {"type": "AdamW", "betas": [0.9, 0.95], "eps": 1.0e-8, "weight_decay": 0.0},
        "lr_schedule": {"type": "ConstantWarmUpLR", "learning_rate": 1.0e-3, "warmup_steps": 0},
        "parallel_config": {"data_parallel": 1, "model_parallel": 1, "context_parallel": 2, "pipeline_stage": 1,
                            "micro_batch_num": 1, "context_parallel_algo": "colossalai_cp"},
        "context": {"device_target": "CPU"},
        "model": {"model_config": {"type": "Qwen2LongSeqConfig", "vocab_size": vocab, "hidden_size": hidden,
                                   "num_layers": 2, "num_heads": 4, "n_kv_heads": 2, "intermediate_size": ffn,
                                   "seq_length": seq, "init_seed": 11},
                  "arch": {"type": "Qwen2LongSeqForCausalLM"}},
        "long_seq": {"layout": "zigzag", "block_size": 1024, **tiles},
    }


def emit(rank, part, **values):
    print("RESULT " + json.dumps({"rank": rank, "part": part, **values}), flush=True)


def run_train(rank, part, config, steps, workdir):
    """``run_job`` for ``steps`` steps: per-step seconds and this rank's peak RSS."""
    from mf_longseq.train.job import JobOptions, run_job
    from mf_longseq.train.monitor import rss_mib
    before = rss_mib()
    records = run_job(JobOptions(config=config, steps=steps, output_dir=os.path.join(workdir, f"run_{part}")),
                      stream=io.StringIO())
    emit(rank, part, rss_before_mib=round(before, 1), peak_rss_mib=round(records[-1].peak_rss_mib[rank], 1),
         step_seconds=[round(r.seconds, 3) for r in records], losses=[r.loss for r in records])


def run_time(rank, args):
    """Two trainers (untiled, loss tile) stepping in turn; median seconds per case."""
    from mindspore.communication import get_rank
    from mf_longseq.config import LongSeqConfig
    from mf_longseq.models import build_model
    from mf_longseq.parallel import Mesh
    from mf_longseq.train.data import SyntheticTokens
    from mf_longseq.train.job import build_trainer
    from mf_longseq.train.optim import OptimSettings
    tile = args.loss_tile or None                          # 0: the default rule
    cases = {"untiled": (0, 0), "loss_tile": (tile, 0)}   # the MLP: mlp_off / mlp_on (this FFN is 64 wide)
    trainers, mesh = {}, None
    for name, (loss_tile, mlp_tile) in cases.items():
        config_tree = tree(args.time_seq, loss_tile, mlp_tile)
        config = LongSeqConfig.from_mindformers(config_tree)
        if mesh is None:
            mesh = Mesh.from_config(config, rank=get_rank()).create_groups()
        trainers[name] = build_trainer(model=build_model(config_tree, mesh=mesh), mesh=mesh, config=config,
                                       settings=OptimSettings.from_mindformers(config_tree, args.rounds + 2),
                                       source=SyntheticTokens(VOCAB, args.time_seq, seed=3), batch_size=1,
                                       pad_token_id=None)
    seconds = {name: [] for name in cases}
    losses = {name: [] for name in cases}
    for step in range(args.rounds + 1):
        for name, trainer in trainers.items():
            start = time.perf_counter()
            result = trainer.step(step)                   # returns host floats: the step has finished
            if step > 0:                                   # round 0 warms up
                seconds[name].append(time.perf_counter() - start)
            losses[name].append(result.loss)
    median = {name: statistics.median(v) for name, v in seconds.items()}
    emit(rank, "time", seq=args.time_seq, median_seconds={k: round(v, 3) for k, v in median.items()},
         ratio_to_untiled={k: round(v / median["untiled"], 3) for k, v in median.items()}, losses=losses)


def worker(args):
    import mindspore as ms
    from mindspore.communication import get_rank, init
    ms.set_device("CPU")
    init()
    ms.runtime.launch_blocking()
    rank, part = get_rank(), args.as_worker
    if part == "train16k":
        run_train(rank, part, tree(args.seq, args.loss_tile or None, 0), args.steps, args.workdir)
    elif part == "time":
        run_time(rank, args)
    else:
        mlp_tile = args.mlp_tile if part == "mlp_on" else 0
        config = tree(args.mlp_seq, args.mlp_loss_tile or None, mlp_tile, hidden=args.mlp_hidden, ffn=args.mlp_ffn,
                      vocab=args.mlp_vocab)
        run_train(rank, part, config, args.steps, args.workdir)


def load() -> str:
    """The 1, 5 and 15 minute load averages (as ``uptime`` prints them)."""
    with open("/proc/loadavg", encoding="utf-8") as handle:
        return " ".join(handle.read().split()[:3])


def launch(part, args, workdir):
    from mf_longseq.tools.msrun import free_port, msrun_command, msrun_env
    env = msrun_env(dict(os.environ, LOCAL_DEFAULT_PATH=os.path.join(workdir, "mfout"), GLOG_v="3"),
                    root=HERE.parent)
    log_dir = os.path.join(workdir, f"log_{part}")
    flags = ["--as-worker", part, "--workdir", workdir, "--seq", args.seq, "--steps", args.steps, "--time-seq",
             args.time_seq, "--rounds", args.rounds, "--mlp-seq", args.mlp_seq, "--mlp-ffn", args.mlp_ffn,
             "--mlp-tile", args.mlp_tile, "--loss-tile", args.loss_tile, "--mlp-hidden", args.mlp_hidden,
             "--mlp-vocab", args.mlp_vocab, "--mlp-loss-tile", args.mlp_loss_tile]
    cmd = msrun_command([__file__, *map(str, flags)], worker_num=2, master_port=free_port(), log_dir=log_dir,
                        guard=False)
    before = load()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=workdir)
    rows = [json.loads(line[len("RESULT "):]) for log in sorted(Path(log_dir).glob("worker_*.log"))
            for line in log.read_text(errors="replace").splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or len(rows) != 2:
        raise RuntimeError(f"part {part} failed (exit {proc.returncode}); logs in {log_dir}")
    return {"part": part, "load_before": before, "load_after": load(), "ranks": rows}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default="train16k,time,mlp_off,mlp_on")
    parser.add_argument("--seq", type=int, default=16384)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--time-seq", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--mlp-seq", type=int, default=8192)
    parser.add_argument("--mlp-ffn", type=int, default=4096)
    parser.add_argument("--mlp-hidden", type=int, default=128)
    parser.add_argument("--mlp-vocab", type=int, default=4096, help="vocabulary of mlp_off / mlp_on")
    parser.add_argument("--mlp-loss-tile", type=int, default=1024, help="loss tile of mlp_off / mlp_on; 0: default")
    parser.add_argument("--mlp-tile", type=int, default=512)
    parser.add_argument("--loss-tile", type=int, default=64, help="loss tile of train16k / time; 0: the default")
    parser.add_argument("--as-worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.as_worker:
        worker(args)
        return
    workdir = tempfile.mkdtemp(prefix="tiled_loss_bench_")
    for part in args.parts.split(","):
        print(json.dumps(launch(part, args, workdir)), flush=True)


if __name__ == "__main__":
    sys.exit(main())
