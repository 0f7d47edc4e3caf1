"""The ``train`` and ``demo`` verbs of ``mf-longseq``.

    mf-longseq train --config X.yaml [--steps N] [--workers N] [--data F | --dataset-dir D] [--save-every N]
                     [--output-dir D] [--resume D | --load-checkpoint F]
    mf-longseq demo  [--steps 20] [--seq-len 8192] [--workers 2] [--output-dir D] [--dry-run]

``train`` runs on this process (one rank, or one of several when started by msrun); ``--workers N`` (N > 1)
starts msrun with N CPU workers itself and watches them.  ``demo`` trains a tiny LLaMA2 at S = 8192 with
CP = 2 (ring, zigzag) on 2 CPU ranks and prints the loss curve and the memory per rank.
"""
import argparse
import os
import sys
import time

DEFAULT_OUTPUT = os.path.join("output", "mf_longseq")


def register(subparsers) -> None:
    train = subparsers.add_parser("train", help="train a model from a MindFormers YAML (one rank, or msrun ranks)",
                                  description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    train.add_argument("--config", help="MindFormers YAML (default with --resume: the checkpoint's config.yaml)")
    _common(train)
    train.add_argument("--steps", type=int, default=10, help="the run ends after this update number (default 10)")
    train.add_argument("--data", help="token file: .npy, .bin (raw ints) or .mindrecord (default: synthetic)")
    train.add_argument("--dataset-dir", help="MindRecord file or directory: overrides the YAML's train_dataset."
                       "data_loader.dataset_dir (read by MindFormers' dataset builder, as run_mindformer.py does)")
    train.add_argument("--data-dtype", help="integer type of a .bin file (default uint16, int32 if vocab > 65536)")
    train.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps and at the end")
    train.add_argument("--resume", help="continue from a run's output dir or one of its checkpoints/step_NNNNNN")
    train.add_argument("--load-checkpoint", help="start from these weights (a new run: fresh optimizer, step 1): "
                       ".ckpt / .safetensors with our names or MindFormers' LLaMA2 / Qwen / Qwen1.5 names, or a "
                       "checkpoints/step_NNNNNN folder; overrides the YAML's load_checkpoint")
    train.add_argument("--seed", type=int, help="overrides the YAML's seed")
    train.set_defaults(func=run_train)

    demo = subparsers.add_parser("demo", help="tiny LLaMA2, S=8192, CP=2 ring zigzag on 2 CPU ranks, 20 steps")
    _common(demo)
    demo.add_argument("--steps", type=int, default=20, help="training steps (default 20)")
    demo.add_argument("--seq-len", type=int, default=8192, help="sequence length (default 8192)")
    demo.add_argument("--dry-run", action="store_true", help="print the config and the msrun command, run nothing")
    demo.set_defaults(func=run_demo, workers=2)


def _common(parser) -> None:
    parser.add_argument("--workers", type=int, default=1, help="start msrun with N CPU workers (default 1: this "
                        "process)")
    parser.add_argument("--output-dir", help=f"checkpoints, metrics.jsonl, logs (default ./{DEFAULT_OUTPUT})")
    parser.add_argument("--port", type=int, help="msrun master port (default: a free one)")
    parser.add_argument("--timeout", type=float, help="end a --workers launch after this many seconds")


def _abs(path):
    return os.path.abspath(path) if path else path


def _worker_args(args) -> list:
    """The same ``train`` command for the workers, with absolute paths (workers run in the output dir)."""
    out = ["train", "--config", _abs(args.config), "--steps", str(args.steps), "--output-dir", _abs(args.output_dir)]
    for flag, value in (("--data", _abs(args.data)), ("--dataset-dir", _abs(args.dataset_dir)),
                        ("--data-dtype", args.data_dtype),
                        ("--resume", _abs(args.resume)), ("--seed", args.seed),
                        ("--load-checkpoint", _abs(getattr(args, "load_checkpoint", None)))):
        if value is not None:
            out += [flag, str(value)]
    if args.save_every:
        out += ["--save-every", str(args.save_every)]
    return out


def run_train(args) -> int:
    from mf_longseq.train.context import under_msrun
    if args.workers < 1:
        raise ValueError(f"--workers {args.workers}: need at least 1. Fix: pass --workers 1 or more.")
    if args.config is None:
        if not args.resume:
            raise ValueError("--config is missing. Fix: pass --config X.yaml (or --resume DIR to continue a run).")
        from mf_longseq.train.checkpoint import config_of
        args.config = config_of(args.resume)
    if args.output_dir is None:
        from mf_longseq.train.checkpoint import run_dir_of
        args.output_dir = run_dir_of(args.resume) if args.resume else DEFAULT_OUTPUT
    if args.data and args.dataset_dir:
        raise ValueError(f"--data {args.data} and --dataset-dir {args.dataset_dir}: two data sources. Fix: pass "
                         "one of them.")
    if args.workers > 1 and not under_msrun():
        from mf_longseq.train.job import load_tree, with_dataset_dir
        from mf_longseq.tools.workers import launch
        from mf_longseq.train.validation import check_run
        config = with_dataset_dir(load_tree(args.config), args.dataset_dir) if args.dataset_dir else args.config
        settings = check_run(config, steps=args.steps, devices=args.workers)   # refused here, before msrun starts
        start = settings.loop.load_checkpoint
        if not args.load_checkpoint and not args.resume and start:
            args.load_checkpoint = start                  # workers run in the output dir: pass it on absolute
        started = time.time()
        code = launch(_worker_args(args), workers=args.workers, run_dir=args.output_dir, port=args.port,
                      timeout=args.timeout)
        if code == 0:
            print_summary(args.output_dir, time.time() - started)
        return code
    from mf_longseq.train.job import JobOptions, run_job
    run_job(JobOptions(config=args.config, steps=args.steps, data=args.data, dataset_dir=args.dataset_dir,
                       data_dtype=args.data_dtype, load_checkpoint=args.load_checkpoint,
                       save_every=args.save_every, output_dir=args.output_dir, resume=args.resume, seed=args.seed))
    return 0


def print_summary(output_dir: str, seconds: float, out=None) -> None:
    """Loss first -> last, mean tokens/s and the peak memory of every rank, from metrics.jsonl."""
    from mf_longseq.train.monitor import read_metrics
    out = out or sys.stdout                     # looked up now: the CLI redirects stdout while importing verbs
    records = read_metrics(output_dir)
    if not records:
        return
    first, last = records[0], records[-1]
    peak = [max(r["peak_rss_mib"][i] for r in records) for i in range(len(last["peak_rss_mib"]))]
    rate = sum(r["tokens"] for r in records) / max(1e-9, sum(r["seconds"] for r in records))
    print(f"\nsummary: loss {first['loss']:.4f} (step {first['step']}) -> {last['loss']:.4f} (step {last['step']}); "
          f"{rate:,.0f} tok/s; peak RSS per rank (MiB): "
          + ", ".join(f"rank {i} {m:.0f}" for i, m in enumerate(peak)) + f"; wall time {seconds:.0f} s", file=out)
    if last.get("memory_planned_mib") and last.get("memory_measured_mib"):
        measured = [max(r["memory_measured_mib"][i] for r in records if r.get("memory_measured_mib"))
                    for i in range(len(last["memory_measured_mib"]))]
        print("model memory per rank, measured (peak RSS - RSS before the model) / planned (mf-longseq plan), "
              "MiB: " + ", ".join(f"rank {i} {m:.0f} / {p:.0f} ({m / p - 1:+.0%})" for i, (m, p) in
                                  enumerate(zip(measured, last["memory_planned_mib"]))), file=out)


def run_demo(args) -> int:
    from mf_longseq.train.demo import demo_tree, write_demo_config
    if args.workers < 2:
        raise ValueError(f"--workers {args.workers}: the demo runs CP = 2 on 2 ranks. Fix: pass --workers 2.")
    output_dir = args.output_dir or os.path.join("output", "mf_longseq_demo")
    tree = demo_tree(seq_length=args.seq_len, context_parallel=args.workers)
    config = write_demo_config(tree, output_dir)
    train_args = argparse.Namespace(config=config, steps=args.steps, data=None, dataset_dir=None, data_dtype=None,
                                    save_every=0,
                                    output_dir=output_dir, resume=None, seed=None, workers=args.workers,
                                    load_checkpoint=None,
                                    port=args.port, timeout=args.timeout)
    if args.dry_run:
        from mf_longseq.tools.workers import entry_path, workers_command
        print(open(config, encoding="utf-8").read())
        print(" ".join(workers_command(entry_path(_abs(output_dir)), _worker_args(train_args), workers=args.workers,
                                       port=args.port or 8118, log_dir=os.path.join(_abs(output_dir), "logs"))))
        return 0
    if os.path.exists(os.path.join(output_dir, "metrics.jsonl")):
        os.remove(os.path.join(output_dir, "metrics.jsonl"))
    return run_train(train_args)
