"""``mf-longseq plan``: memory and communication of a long-sequence run, and the layouts that fit.

    mf-longseq plan --model llama2-70b --seq-len 131072 --devices 64 --device-memory 64GiB
    mf-longseq plan --model qwen1_5-72b --seq-len 32768 --devices 32 --emit-yaml run.yaml --json

Prints the model, the per-device memory of the best layout item by item (with and without recompute, with and
without the memory features, the attention buffers of every CP algorithm), the bytes each CP algorithm moves
per step at that layout (every algorithm of ``parallel/algorithms.py``), and the ranked layouts that fit (over
MindFormers' three algorithms, or the one ``--algo`` names, e.g. the plugin's kvallgather_cp).  ``--emit-yaml``
writes the best one as a MindFormers YAML (checked by ``mf-longseq validate`` rules before it is written).

The memory features (``long_seq.loss_tile``, ``long_seq.mlp_tile``, ``parallel_config.use_seq_parallel``,
``long_seq.offload_layer_inputs``): each flag is ``auto`` (the planner picks, the default), or a value that
fixes it; a ``--model`` YAML that sets one of those keys fixes it too (a flag other than ``auto`` wins).
``--no-features`` turns all four off (the planner as it was before them).
"""
import contextlib
import json
import re
import sys
from dataclasses import asdict, replace
from typing import Optional

from mf_longseq.planner import comm
from mf_longseq.parallel.algorithms import ALGORITHMS
from mf_longseq.parallel.plan import CP_ALGOS, MINDFORMERS_ALGOS, RunPlan
from mf_longseq.planner.run_settings import Settings
from mf_longseq.planner.memory import Memory, memory_per_device
from mf_longseq.planner.recommend import (Choices, Hardware, check, closest, recommend, step_traffic,
                                          ulysses_split)
from mf_longseq.planner.shapes import model_shape
from mf_longseq.planner.template import emit_yaml

_UNITS = {"": 1, "b": 1, "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40, "kb": 10 ** 3,
          "mb": 10 ** 6, "gb": 10 ** 9, "tb": 10 ** 12, "k": 2 ** 10, "m": 2 ** 20, "g": 2 ** 30}
_DTYPES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16",
           "float16": "float16"}


def parse_size(text: str) -> int:
    """'64GiB' -> 68719476736; '80GB' -> 80e9; a plain number is bytes."""
    found = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", str(text))
    if not found or found.group(2).lower() not in _UNITS:
        raise ValueError(f"--device-memory = {text!r}: not a size. Fix: write e.g. 64GiB, 32GB or 65536MiB")
    return int(float(found.group(1)) * _UNITS[found.group(2).lower()])


def gib(n: int) -> str:
    return f"{n / 2 ** 30:8.2f} GiB"


def _settings(args) -> Settings:
    for name in ("dtype", "param_dtype"):
        if getattr(args, name) not in _DTYPES:
            raise ValueError(f"--{name.replace('_', '-')} = {getattr(args, name)!r}: unknown. Fix: use one of "
                             "fp32, bf16, fp16")
    param = _DTYPES[args.param_dtype]
    return Settings(seq_len=args.seq_len, micro_batch=args.micro_batch, micro_batch_num=args.micro_batch_num,
                    param_dtype=param, grad_dtype=param, compute_dtype=_DTYPES[args.dtype],
                    zero=args.zero, mask_compression=not args.no_mask_compression,
                    use_alltoall=not args.allgather, backend=args.backend, block_size=args.block_size)


_SWITCH = {"auto": None, "on": True, "off": False}
# CLI flag -> (Choices field, the YAML key that can fix it)
FEATURE_KEYS = {"loss_tile": "long_seq.loss_tile", "mlp_tile": "long_seq.mlp_tile",
                "seq_parallel": "parallel_config.use_seq_parallel",
                "offload_layer_inputs": "long_seq.offload_layer_inputs"}


def _tile(flag: str, text) -> Optional[int]:
    if text is None or str(text) == "auto":
        return None
    if str(text).isdigit():
        return int(text)
    raise ValueError(f"--{flag.replace('_', '-')} = {text!r}: not a tile. Fix: write auto, 0 (off) or a number of "
                     "tokens, e.g. 4096")


def choices(args) -> Choices:
    """The features the planner may pick (``Choices``): the flags, then the ``--model`` YAML's keys, else auto."""
    if args.no_features:
        return Choices.off()
    fixed = {"loss_tile": _tile("loss_tile", args.loss_tile), "mlp_tile": _tile("mlp_tile", args.mlp_tile),
             "seq_parallel": _SWITCH[args.seq_parallel], "offload_layer_inputs": _SWITCH[args.offload_layer_inputs]}
    if str(args.model).endswith((".yaml", ".yml")):
        from mf_longseq.config import LongSeqConfig, node_at
        from mf_longseq.train.validation import load_tree
        tree = load_tree(args.model)
        config = LongSeqConfig.from_mindformers(tree, use_seq_parallel=False)     # the keys, validated
        for name, path in FEATURE_KEYS.items():
            if fixed[name] is None and node_at(tree, path) is not None:
                fixed[name] = node_at(tree, path) if name == "seq_parallel" else getattr(config, name)
    return Choices(**fixed)


def _algo_rows(shape, best, settings):
    """The CP exchanges of every algorithm at the best layout's degrees: (label, bytes per layer fwd, per step)."""
    rows = []
    for algo in CP_ALGOS:
        for u in ALGORITHMS[algo].planner_degrees(best.cp):
            plan = replace(best, algo=algo, ulysses=u)
            problem = check(plan, shape, settings)
            call = comm.AttentionCall(settings.micro_batch, settings.seq_len, max(shape.heads // best.mp, 1),
                                      max(shape.kv_heads // best.mp, 1), shape.head_dim,
                                      settings.bytes_of("compute"), best.cp, u, settings.use_alltoall, algo)
            forward = sum(comm.attention_bytes(call, "forward").values())
            traffic = step_traffic(shape, plan, settings)
            cp_step = sum(v for k, v in traffic.items() if k not in ("mp_all_reduce", "grad_all_reduce"))
            attention = memory_per_device(shape, plan, settings).attention
            split = ulysses_split(shape, plan)
            rows.append((plan.label(), forward, cp_step, attention, problem, split.describe() if split else None,
                         comm.replicated_kv_bytes(call)))
    return rows


def report(args) -> dict:
    """Everything ``plan`` prints, as a dict (also the --json output)."""
    shape = model_shape(args.model)
    settings = _settings(args)
    hw = Hardware(memory=parse_size(args.device_memory), reserve=args.reserve, tflops=args.tflops,
                  devices_per_node=args.devices_per_node)
    algos = [args.algo] if args.algo else list(MINDFORMERS_ALGOS)      # the plugin's own only when named
    picks = choices(args)
    ranked = recommend(shape, args.devices, settings, hw, algos, max_mp=args.max_mp, choices=picks)
    out = {"model": asdict(shape) | {"total_params": shape.total_params}, "settings": asdict(settings),
           "choices": asdict(picks), "devices": args.devices, "usable_memory": hw.usable, "recommendations": [],
           "best": None, "closest": None}
    out["recommendations"] = [_candidate_dict(c, shape) for c in ranked[:args.top]]
    shown = ranked[0] if ranked else closest(shape, args.devices, settings, hw, algos, max_mp=args.max_mp,
                                             choices=picks)
    if shown is not None:
        out["best" if ranked else "closest"] = _candidate_dict(shown, shape)
        plain = replace(shown.settings, loss_tile=0, mlp_tile=0, seq_parallel=False, offload_layer_inputs=False)
        out["without_features"] = dict(memory_per_device(shape, shown.plan, plain).rows())
        today = recommend(shape, args.devices, settings, hw, algos, max_mp=args.max_mp, choices=Choices.off())
        out["best_without_features"] = _candidate_dict(today[0], shape) if today else None
        out["algorithms_at_best"] = [dict(zip(("label", "cp_bytes_per_layer_forward", "cp_bytes_per_step",
                                               "attention_buffers", "invalid", "ulysses_heads",
                                               "replicated_kv_bytes_per_layer_forward"), row))
                                     for row in _algo_rows(shape, shown.plan, shown.settings)]
    return out


def _candidate_dict(cand, shape) -> dict:
    split = ulysses_split(shape, cand.plan)
    return {"ulysses_heads": split.describe() if split else None, "head_imbalance": split.imbalance if split else 1.0,
            "plan": asdict(cand.plan), "label": cand.plan.label(), "settings": asdict(cand.settings),
            "features": cand.settings.features(), "recompute": cand.recompute, "memory_total": cand.memory_total, "memory": dict(cand.memory.rows()),
            "comm_bytes_per_step": cand.comm_bytes, "step_seconds_estimate": cand.step_seconds}


def _print(out: dict, args) -> None:
    m = out["model"]
    print(f"model {m['name']}: {m['total_params'] / 1e9:.2f} B parameters, hidden {m['hidden']}, {m['layers']} "
          f"layers, {m['heads']} heads ({m['kv_heads']} kv), FFN {m['ffn']}, vocab {m['vocab']}")
    print(f"sequence {args.seq_len}, {args.devices} devices of {args.device_memory} "
          f"({gib(out['usable_memory']).strip()} usable), compute {out['settings']['compute_dtype']}")
    best = out["best"] or out["closest"]
    if best is None:
        print("no valid layout: the heads, sequence length and device count admit none (see mf-longseq validate)")
        return
    if out["best"]:
        print(f"\nbest: {best['label']}{' with recompute' if best['recompute'] else ''}, features: "
              f"{best['features']}: memory per device")
    else:
        print(f"\nNO LAYOUT FITS. The one needing least memory is {best['label']} with recompute, features: "
              f"{best['features']}, {gib(best['memory_total']).strip()} per device > "
              f"{gib(out['usable_memory']).strip()} usable. Fix: more devices, more --device-memory, or a higher "
              "--zero (3 splits the weights too).")
    _print_items(out, best)
    print(f"\nCP exchanges per device at dp{best['plan']['dp']} mp{best['plan']['mp']} cp{best['plan']['cp']} "
          f"pp{best['plan']['pp']} (bytes this device sends):")
    print(f"  {'algorithm':34s}{'per layer fwd':>16s}{'per step':>16s}{'attn buffers':>14s}")
    for row in out.get("algorithms_at_best", []):
        note = "  (invalid: " + row["invalid"].split(":")[0] + ")" if row["invalid"] else ""
        print(f"  {row['label']:34s}{row['cp_bytes_per_layer_forward'] / 2 ** 20:13.1f} MiB"
              f"{row['cp_bytes_per_step'] / 2 ** 30:12.2f} GiB{row['attention_buffers'] / 2 ** 30:10.2f} GiB{note}")
        if row["ulysses_heads"]:
            print(f"      heads per mp rank: {row['ulysses_heads']} "
                  f"({row['replicated_kv_bytes_per_layer_forward'] / 2 ** 20:.1f} MiB of kv copies per layer fwd)")
    if not out["recommendations"]:
        return
    print(f"\nranked layouts that fit ({len(out['recommendations'])} shown):")
    for i, rec in enumerate(out["recommendations"], 1):
        traffic = sum(rec["comm_bytes_per_step"].values())
        print(f"  {i:2d}. {rec['label']:34s} mem {gib(rec['memory_total'])}{' (recompute)' if rec['recompute'] else '':12s}"
              f" comm {traffic / 2 ** 30:8.2f} GiB/step  ~{rec['step_seconds_estimate']:7.2f} s/step"
              + (f"  uneven heads: busiest {rec['head_imbalance']:.2f}x the mean" if rec["head_imbalance"] > 1 else ""))


def _print_items(out: dict, best: dict) -> None:
    """Each memory item at the shown layout, without and with the chosen features."""
    plain = out["without_features"]
    print(f"  {'item':24s}{'no features':>12s}{'chosen':>12s}")
    for name, value in best["memory"].items():
        note = {"host": "  (host memory, not counted)",
                "step": "  (optimizer step: the total takes it or the backward's items, the larger)"}.get(name, "")
        print(f"  {name:24s}{gib(plain[name])}{gib(value)}{note}")
    total_plain = Memory(**plain).total(best["recompute"])
    print(f"  {'total':24s}{gib(total_plain)}{gib(best['memory_total'])}")
    today = out.get("best_without_features")
    print("  without the features: " + (f"best {today['label']}{' with recompute' if today['recompute'] else ''}, "
                                        f"{gib(today['memory_total']).strip()}" if today else "no layout fits"))


def run(args) -> int:
    stdout = sys.stdout
    with contextlib.redirect_stdout(sys.stderr if args.json else stdout):   # library logs must not mix with JSON
        return _run(args, stdout)


def _run(args, stdout) -> int:
    out = report(args)
    if args.emit_yaml:
        if not out["best"]:
            raise ValueError(f"--emit-yaml {args.emit_yaml}: no layout fits, nothing to write. Fix: more devices or "
                             "more --device-memory")
        best = out["best"]
        emit_yaml(args.emit_yaml, args.model, RunPlan(**best["plan"]), Settings(**best["settings"]))
        out["emitted_yaml"] = args.emit_yaml
    if args.json:
        print(json.dumps(out, indent=2, default=str), file=stdout)
    else:
        _print(out, args)
        if args.emit_yaml:
            print(f"\nwrote {args.emit_yaml} (check it with: mf-longseq validate {args.emit_yaml})")
    return 0 if out["best"] else 1


def register(subparsers) -> None:
    """Add the ``plan`` verb."""
    p = subparsers.add_parser("plan", help="per-device memory, CP traffic, and the layouts that fit",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="llama2-7b/13b/70b, qwen-7b/14b/72b, qwen1_5-7b/14b/72b, or a YAML")
    p.add_argument("--seq-len", type=int, required=True, help="tokens per sequence")
    p.add_argument("--devices", type=int, required=True, help="devices of the run")
    p.add_argument("--device-memory", default="64GiB", help="memory per device (default 64GiB)")
    p.add_argument("--reserve", type=float, default=0.10, help="fraction kept free for the runtime (default 0.1)")
    p.add_argument("--micro-batch", type=int, default=1, help="sequences per micro-batch (default 1)")
    p.add_argument("--micro-batch-num", type=int, default=1, help="micro-batches per step (at least pp)")
    p.add_argument("--dtype", default="bf16", help="compute dtype: bf16 (default), fp16, fp32")
    p.add_argument("--param-dtype", default="fp32", help="weights and gradients: fp32 (default), bf16, fp16")
    p.add_argument("--algo", choices=CP_ALGOS, help="consider only this CP algorithm (default: MindFormers' "
                   "three; the plugin's own, e.g. kvallgather_cp, only when named; all are compared)")
    p.add_argument("--allgather", action="store_true", help="Ulysses by the AllGather exchange "
                   "(parallel.enable_alltoall: False)")
    p.add_argument("--zero", type=int, choices=(0, 1, 2, 3), default=1, help="split over dp x cp: 0 nothing, "
                   "1 optimizer states (default), 2 + gradients, 3 + weights")
    p.add_argument("--no-mask-compression", action="store_true", help="dense S x S mask")
    p.add_argument("--backend", choices=("ascend", "cpu"), default="ascend")
    p.add_argument("--block-size", type=int, default=2048, help="blockwise kernel tile (backend cpu)")
    p.add_argument("--loss-tile", default="auto", help="long_seq.loss_tile: auto (default: the planner picks), "
                   "0 (off) or tokens per tile")
    p.add_argument("--mlp-tile", default="auto", help="long_seq.mlp_tile: auto (default), 0 (off) or tokens per tile")
    p.add_argument("--seq-parallel", choices=tuple(_SWITCH), default="auto",
                   help="parallel_config.use_seq_parallel (with model_parallel > 1): auto (default), on, off")
    p.add_argument("--offload-layer-inputs", choices=tuple(_SWITCH), default="auto",
                   help="long_seq.offload_layer_inputs (with recompute): auto (default), on, off")
    p.add_argument("--no-features", action="store_true", help="all four memory features off (the planner as "
                   "before them)")
    p.add_argument("--tflops", type=float, default=280.0, help="peak TFLOP/s per device for the time estimate")
    p.add_argument("--devices-per-node", type=int, default=8)
    p.add_argument("--max-mp", type=int, default=8, help="largest model-parallel degree tried (default 8)")
    p.add_argument("--top", type=int, default=10, help="layouts shown (default 10)")
    p.add_argument("--json", action="store_true", help="print everything as JSON")
    p.add_argument("--emit-yaml", metavar="PATH", help="write the best layout as a MindFormers YAML")
    p.set_defaults(func=run)
