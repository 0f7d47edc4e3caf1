"""Sequence parallelism and layer-input offload on 4 CPU ranks (mp2 x cp2): peak memory per rank and step time,
on against off, side by side.

    python benchmarks/seq_parallel_memory.py                      # S = 4096, hidden 512, 4 layers, ring
    python benchmarks/seq_parallel_memory.py --seq 8192 --algo ulysses_cp --steps 4

Cases (every one trains the same tiny LLaMA-shaped model with AdamW, batch 1, float32):

* ``sp_off`` / ``sp_on``: ``parallel_config.use_seq_parallel`` off / on, no recompute;
* ``sp_off_rc`` / ``sp_on_rc``: the same with ``recompute_config.recompute: True`` (a layer keeps only its input);
* ``sp_on_rc_offload``: ``sp_on_rc`` with ``long_seq.offload_layer_inputs: True``.

Memory: one msrun launch per case (fresh processes: MindSpore's CPU memory pool keeps what it once held, so two
cases in one process would share a pool).  Per rank, ``peak_delta`` = the largest peak RSS (VmHWM, reset through
/proc/self/clear_refs before each step) minus the RSS just before that step, over the warm-up and timed steps: the
memory a training step adds on top of the weights and optimizer state.  MindSpore's CPU pool keeps the blocks
it once took, so the first step (which grows the pool to the step's need) gives the peak and later steps add
little; the figure includes the one-time cost of the first step (kernel set-up) in every case alike.  Not
distorted by the host's load.
On CPU the host is the device, so offload's copies stay in the same RSS: its figure shows the code path's cost,
not the device memory it saves on Ascend.

Time: one more launch holding every case's model, rounds of one step of each case in turn (``--warmup`` untimed
rounds, then ``--steps``); per case the median step time of the slowest rank.  Timings on a shared host are
noisy: compare the columns of one run; the load (``uptime``) is printed and written with the results.

Expected memory (per rank, per layer, B = 1, S = seq / CP tokens, H hidden, 4 bytes): SP saves on every kept
norm input and residual (B x S x H x 4 x (1 - 1/MP) each); with recompute the kept layer input shrinks from
B x S x H x 4 to B x S/MP x H x 4.  Writes benchmarks/results/seq_parallel_memory.json.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORLD, MP, CP = 4, 2, 2
CASES = {"sp_off": (False, False, False), "sp_on": (True, False, False), "sp_off_rc": (False, True, False),
         "sp_on_rc": (True, True, False), "sp_on_rc_offload": (True, True, True)}   # (sp, recompute, offload)


def tree(args, sp: bool, recompute: bool, offload: bool) -> dict:
    return {
        "seed": 0, "runner_config": {"batch_size": 1},
        "optimizer": {"type": "AdamW", "betas": [0.9, 0.95], "eps": 1.0e-6, "weight_decay": 0.1},
        "lr_schedule": {"type": "ConstantWarmUpLR", "learning_rate": 1.0e-4, "warmup_steps": 0},
        "parallel_config": {"data_parallel": 1, "model_parallel": MP, "context_parallel": CP, "pipeline_stage": 1,
                            "context_parallel_algo": args.algo, "use_seq_parallel": sp},
        "recompute_config": {"recompute": recompute},
        "context": {"device_target": "CPU"},
        "model": {"model_config": {"type": "LlamaLongSeqConfig", "vocab_size": 1024, "hidden_size": args.hidden,
                                   "num_layers": args.layers, "num_heads": 8, "n_kv_heads": 4,
                                   "intermediate_size": 2 * args.hidden, "seq_length": args.seq, "init_seed": 7},
                  "arch": {"type": "LlamaLongSeqForCausalLM"}},
        "long_seq": {"layout": "zigzag", "block_size": 1024, "offload_layer_inputs": offload},
    }


# --------------------------------------------------------------------------------------------------- worker side
def build(args, name, rank):
    from mf_longseq.config import LongSeqConfig
    from mf_longseq.models import build_model
    from mf_longseq.parallel import Mesh
    from mf_longseq.train.data import SyntheticTokens
    from mf_longseq.train.job import build_trainer
    from mf_longseq.train.optim import OptimSettings
    t = tree(args, *CASES[name])
    config = LongSeqConfig.from_mindformers(t)
    mesh = Mesh.from_config(config, rank=rank)
    mesh.create_groups()
    return build_trainer(model=build_model(t, mesh=mesh), mesh=mesh, config=config,
                         settings=OptimSettings.from_mindformers(t, 1000), pad_token_id=None, batch_size=1,
                         source=SyntheticTokens(1024, args.seq, seed=3))


def step_peak(trainer, step: int) -> int:
    """Bytes one training step adds at its peak: VmHWM (reset first) minus VmRSS before the step."""
    from mf_longseq.train.monitor import peak_rss_mib, rss_mib
    with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
        handle.write("5")                                               # resets VmHWM to the current RSS
    before = rss_mib()
    trainer.step(step)
    return int((peak_rss_mib() - before) * 2 ** 20)


def worker_main(args):
    import mindspore as ms
    from mindspore.communication import get_rank, init
    ms.set_device("CPU")
    init()
    ms.runtime.launch_blocking()
    rank = get_rank()
    names = args.cases.split(",")
    trainers = {name: build(args, name, rank) for name in names}
    out = {name: {"peaks": [], "seconds": []} for name in names}
    for step in range(args.warmup + args.steps):
        for name in names:
            start = time.perf_counter()
            peak = step_peak(trainers[name], step)
            if step >= args.warmup:
                out[name]["seconds"].append(time.perf_counter() - start)
            out[name]["peaks"].append(peak)                         # memory: warm-up steps count too
    with open(os.path.join(args.out, f"rank{rank}_{'_'.join(names)}.json"), "w", encoding="utf-8") as handle:
        json.dump(out, handle)


# --------------------------------------------------------------------------------------------------- launcher side
def launch(args, names, workdir: str) -> dict:
    from mf_longseq.tools.msrun import free_port, msrun_command, msrun_env
    env = msrun_env(dict(os.environ, LOCAL_DEFAULT_PATH=os.path.join(workdir, "mfout"), GLOG_v="3"))
    cmd = msrun_command([__file__, "--as-worker", "--out", workdir, "--cases", ",".join(names), "--seq", args.seq,
                         "--hidden", args.hidden, "--layers", args.layers, "--algo", args.algo, "--steps",
                         args.steps, "--warmup", args.warmup], worker_num=WORLD, master_port=free_port(),
                        log_dir=os.path.join(workdir, "logs_" + "_".join(names)), cluster_time_out=1800, guard=False)
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env, cwd=workdir, check=False)
    if proc.returncode != 0:
        tails = [f"--- {log.name} ---\n" + "\n".join(log.read_text(errors="replace").splitlines()[-30:])
                 for log in sorted(Path(workdir, "logs_" + "_".join(names)).glob("worker_*.log"))]
        raise RuntimeError(f"msrun exited with {proc.returncode}: {' '.join(map(str, cmd))}\n" + "\n".join(tails))
    key = "_".join(names)
    return {r: json.loads(Path(workdir, f"rank{r}_{key}.json").read_text(encoding="utf-8")) for r in range(WORLD)}


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--algo", default="colossalai_cp", choices=["colossalai_cp", "ulysses_cp", "hybrid_cp"])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--out", default="")
    parser.add_argument("--as-worker", action="store_true")
    args = parser.parse_args()
    if args.as_worker:
        worker_main(args)
        return
    names = args.cases.split(",")
    rows = {name: {} for name in names}
    with tempfile.TemporaryDirectory(prefix="sp_bench_") as workdir:
        load_before = uptime()
        for name in names:                                           # memory: fresh processes per case
            per_rank = launch(args, [name], workdir)
            rows[name]["peak_delta_mib"] = [round(max(per_rank[r][name]["peaks"]) / 2 ** 20, 1) for r in range(WORLD)]
        load_mid = uptime()
        timed = launch(args, names, workdir)                         # time: all cases, interleaved
        for name in names:
            rows[name]["step_s"] = round(max(statistics.median(timed[r][name]["seconds"]) for r in range(WORLD)), 3)
        load_after = uptime()
    base = rows[names[0]]
    print(f"mp{MP} x cp{CP} {args.algo}, S = {args.seq}, hidden {args.hidden}, {args.layers} layers, float32")
    print(f"{'case':18s} {'peak delta per rank (MiB)':34s} {'max':>8s} {'vs ' + names[0]:>9s} {'step s':>8s} "
          f"{'vs ' + names[0]:>9s}")
    for name in names:
        row, peak = rows[name], max(rows[name]["peak_delta_mib"])
        print(f"{name:18s} {str(row['peak_delta_mib']):34s} {peak:8.1f} {peak / max(base['peak_delta_mib']):9.3f} "
              f"{row['step_s']:8.3f} {row['step_s'] / base['step_s']:9.3f}")
    print(f"load: before {load_before}\n      between {load_mid}\n      after {load_after}")
    result = {"settings": {k: getattr(args, k) for k in ("seq", "hidden", "layers", "algo", "steps", "warmup")},
              "rows": rows, "load": [load_before, load_mid, load_after], "command": " ".join(sys.argv)}
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "seq_parallel_memory.json").write_text(json.dumps(result, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
