"""Where a planner-sweep case's memory goes: resident memory per phase of one ``mf-longseq train`` step.

    python benchmarks/memory_phases.py qwen_vocab_cp1            # any single-rank case of the sweep
    python benchmarks/memory_phases.py llama_cp1 --reuse-probe 4
    python benchmarks/memory_phases.py llama_ring_cp2_wide_ffn --layers     # every rank of a CP 2 case


Runs the case of ``tests/dist/planner_sweep_worker.py`` (``CASES``) on its CPU ranks under msrun, through
``run_job``, and prints, at each phase boundary (model built; trainer built; forward + backward; gradient sum;
AdamW step), the resident memory (VmRSS) and the peak since the previous boundary (VmHWM, reset at each
boundary through ``/proc/self/clear_refs``), in MiB above the resident memory just before the model was built,
the baseline of ``memory_measured_mib`` (``train/monitor.py``).  ``--reuse-probe K``: after the backward, K
float32 buffers of the parameter count are allocated one by one (and freed) before the gradient sum, to show
how many MindSpore's CPU memory pool serves from what the backward freed (the RSS does not grow for those).
``--layers``: also marks inside the forward + backward, in the forward before each decoder layer, between its
attention and MLP blocks and before the head + loss, and in the backward when the gradient reaches each of those
points (identity Cells with a custom bprop), so each layer's MLP and attention backward and the loss's backward
get their own peak.

Memory figures are not affected by the host's load.  The figures of docs/planner_memory.md come from this.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests" / "dist"))


def _status() -> dict:
    with open("/proc/self/status", encoding="ascii") as handle:
        return {line.split(":")[0]: int(line.split()[1]) / 1024 for line in handle
                if line.startswith(("VmRSS:", "VmHWM:"))}


class Phases:
    """Marks: (name, RSS, peak since the last mark), MiB above ``base``; each mark resets the peak."""

    def __init__(self):
        self.base, self.rows = 0.0, []

    def mark(self, name: str) -> None:
        now = _status()
        self.rows.append((name, round(now["VmRSS"] - self.base, 1), round(now["VmHWM"] - self.base, 1)))
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")                                       # VmHWM := VmRSS

    def around(self, owner, attr: str, name: str) -> None:
        inner = getattr(owner, attr)

        def wrapped(*args, **kwargs):
            out = inner(*args, **kwargs)
            self.mark(name)
            return out
        setattr(owner, attr, wrapped)


def _mark_cell(phases: Phases, name: str):
    """An identity Cell that marks ``fwd <name>`` when the forward passes it, ``bwd <name>`` when the gradient
    does (the peak of the bwd mark is the backward since the previous mark)."""
    from mindspore import nn

    class Mark(nn.Cell):
        def construct(self, x):
            phases.mark(f"fwd {name}")
            return x

        def bprop(self, x, out, dout):
            phases.mark(f"bwd {name} (grad reached)")
            return (dout,)
    return Mark()


def probe_layers(phases: Phases) -> None:
    """Marks before each decoder layer, between its attention and MLP, and before the head + loss."""
    from mf_longseq.models import decoder
    marks = {}

    def mark(name, x):
        if name not in marks:
            marks[name] = _mark_cell(phases, name)
        return marks[name](x)

    def layer_construct(self, x, cos, sin, plan=None):
        i = self._probe_index
        x = mark(f"layer {i} input (bwd: its attention done)", x)
        x = x + self.sp.scatter(self.self_attn(self.sp.norm(self.input_layernorm, x), cos, sin, plan))
        x = mark(f"layer {i} attention out (bwd: its MLP done)", x)
        return x + self.sp.scatter(self.mlp(self.sp.norm(self.post_attention_layernorm, x)))
    decoder.DecoderLayer.construct = layer_construct
    model_construct = decoder.DecoderModel.construct

    def numbered(self, batch):
        for i, layer in enumerate(self.layers):
            layer._probe_index = i
        return model_construct(self, batch)
    decoder.DecoderModel.construct = numbered
    head_loss = decoder.LongSeqForCausalLM.head_loss
    decoder.LongSeqForCausalLM.head_loss = lambda self, hidden, labels, loss_mask: head_loss(
        self, mark("head + loss input (bwd: loss done)", hidden), labels, loss_mask)


def worker(case_name: str, reuse_probe: int, layers: bool) -> None:
    import mindspore as ms
    from mindspore import ops
    from worker_main import join_launch
    from planner_sweep_worker import CASES, case_tree
    from mf_longseq.train import executor, job, optim, runner
    case = next(c for c in CASES if c.name == case_name)
    rank = join_launch(case.world)[0]
    phases = Phases()
    if layers:
        probe_layers(phases)
    phases.around(executor.PlainStep, "__call__", "forward + backward")
    phases.around(runner.Trainer, "sync_gradients", "gradient sum (flat)")
    phases.around(optim.AdamW, "step_flat", "AdamW step")
    sync = runner.Trainer.sync_gradients

    def probed_sync(self, grads):
        held = []
        for k in range(reuse_probe):
            held.append(ops.zeros((sum(self.optimizer.sizes),), ms.float32) + 1)
            phases.mark(f"probe buffer {k + 1} (parameter count, float32)")
        del held
        return sync(self, grads)
    runner.Trainer.sync_gradients = probed_sync

    def factory(settings, mesh):
        phases.base = _status()["VmRSS"]
        phases.mark("start")
        model = job.build_default_model(settings, mesh)
        phases.mark("model built")
        return model
    orig_trainer = job.build_trainer

    def trainer_factory(**kwargs):
        trainer = orig_trainer(**kwargs)
        phases.mark("trainer built (AdamW m, v)")
        return trainer
    job.build_trainer = trainer_factory
    record = job.run_job(job.JobOptions(config=case_tree(case), steps=1, output_dir=None), model_factory=factory)[-1]
    print("RESULT " + json.dumps({"case": case.name, "rank": rank,
                                  "planned_mib": round(record.memory_planned_mib[rank], 1),
                                  "phases": phases.rows}), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("case", help="a one-rank case of tests/dist/planner_sweep_worker.py")
    parser.add_argument("--reuse-probe", type=int, default=0)
    parser.add_argument("--layers", action="store_true", help="marks per decoder layer, forward and backward")
    parser.add_argument("--as-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.as_worker:
        worker(args.case, args.reuse_probe, args.layers)
        return 0
    from planner_sweep_worker import CASES
    world = next(c for c in CASES if c.name == args.case).world
    from mf_longseq.tools.msrun import free_port, msrun_command, msrun_env
    workdir = tempfile.mkdtemp(prefix="memory_phases_")
    env = msrun_env(dict(os.environ, LOCAL_DEFAULT_PATH=os.path.join(workdir, "mfout"), GLOG_v="3"),
                    root=HERE.parent)
    cmd = msrun_command([__file__, args.case, "--reuse-probe", str(args.reuse_probe), "--as-worker"]
                        + (["--layers"] if args.layers else []), worker_num=world,
                        master_port=free_port(), log_dir=os.path.join(workdir, "log"), guard=False)
    proc = subprocess.run(cmd, env=env, cwd=workdir, capture_output=True, text=True)
    logs = [Path(workdir, "log", f"worker_{r}.log").read_text(errors="replace") for r in range(world)]
    rows = [json.loads(line[len("RESULT "):]) for log in logs for line in log.splitlines()
            if line.startswith("RESULT ")]
    if proc.returncode != 0 or len(rows) != world:
        raise SystemExit(f"{args.case} failed (exit {proc.returncode}); log in {workdir}/log")
    for result in rows:
        print(f"{result['case']} rank {result['rank']}: planned {result['planned_mib']} MiB; "
              "MiB above the RSS before the model was built")
        print(f"{'after':<56} {'RSS':>8} {'peak since previous':>20}")
        for name, rss, peak in result["phases"]:
            print(f"{name:<56} {rss:>8} {peak:>20}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
