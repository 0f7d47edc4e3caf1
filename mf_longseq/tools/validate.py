"""``mf-longseq validate CONFIG [--route mindformers|train]``: check a MindFormers YAML against every rule a run on
that route reads, without devices, and report every broken rule at once.

The rules live in ``mf_longseq.train.validation.check_run`` (the same check ``mf-longseq train`` and the launchers run)
and in the classes it builds; this module reads the file, applies ``--set`` overrides and ``--devices``, and
reports the outcome::

    mf-longseq validate yaml_templates/llama2/7b_32k_cp4_colossalai_cp.yaml
    mf-longseq validate run.yaml --devices 64 --set parallel_config.context_parallel=8 --json
    mf-longseq validate run.yaml --route train          # as mf-longseq train runs it

The route: ``mindformers`` (MindFormers' Trainer, ``run_mindformer.py``) or ``train`` (``mf-longseq train``); by
default the one the YAML names (``mindformers`` when it has a ``trainer.type``, ``train_validation.route_of``).

Exit status: 0 when every configuration is valid, 1 when one is not (a refusal naming key, value and fix), 2 on
a usage or I/O error (a file that cannot be read, a malformed ``--set``).  ``--json`` prints the same as one
strict JSON object per file (non-finite numbers are written as strings)::

    {"config": ..., "valid": false, "io_error": false,
     "route": "mindformers" | "train",
     "error": {"key": ..., "value": ..., "problem": ..., "fix": ..., "message": ...},   (the first of "errors")
     "errors": [{"key": ..., ...}, ...],
     "warnings": [...], "notes": [...], "settings": {key path: value}, "derived": {...}, "model": {...}}
"""
import contextlib
import json
import logging
import math
import sys
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Dict, List, Optional, Sequence

from mf_longseq.config import MODEL_FACTS, ConfigError, key_path
from mf_longseq.train.validation import InputError


@dataclass
class Report:
    """Outcome of one validation.

    Attributes:
        config: the file (or "<dict>") that was checked.
        valid: True when every rule holds.
        io_error: True when the file could not be read or a ``--set`` is malformed (exit status 2).
        error: the first broken rule (key, value, problem, fix, message), or None.
        errors: every broken rule, in that form.
        route: the route checked (``mindformers`` or ``train``; None when the file could not be read).
        warnings: keys MindFormers reads but mf_longseq ignores, and warnings logged while reading.
        notes: advice that does not make the run fail (``LongSeqConfig.notes()``).
        settings: every setting by YAML key path (valid configs only).
        derived: Ulysses degree, ring degree and world size (valid configs only).
        model: the model the run builds: classes and shape (valid configs only).
    """

    config: str
    valid: bool
    error: Optional[Dict[str, Any]] = None
    warnings: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    settings: Dict[str, Any] = field(default_factory=dict)
    derived: Dict[str, int] = field(default_factory=dict)
    model: Dict[str, Any] = field(default_factory=dict)
    io_error: bool = False
    errors: List[Dict[str, Any]] = field(default_factory=list)
    route: Optional[str] = None


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: List[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def parse_override(text: str):
    """``'parallel_config.context_parallel=4'`` -> (["parallel_config", "context_parallel"], 4)."""
    import yaml
    path, sep, raw = text.partition("=")
    if not sep or not path.strip():
        raise InputError("--set", text, "is not KEY.PATH=VALUE", "write e.g. --set parallel_config.context_parallel=4")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    return path.strip().split("."), value


def _apply(tree: Any, parts: Sequence[str], value: Any) -> None:
    node = tree
    for i, part in enumerate(parts[:-1]):
        if not isinstance(node, dict):
            raise InputError(".".join(parts[:i]), node, "is not a section", "check the --set key path")
        node = node.setdefault(part, {})
    if not isinstance(node, dict):
        raise InputError(".".join(parts[:-1]), node, "is not a section", "check the --set key path")
    node[parts[-1]] = value


def validate(source, *, devices: Optional[int] = None, overrides: Sequence[str] = (),
             route: Optional[str] = None) -> Report:
    """Check ``source`` (YAML path, dict or MindFormerConfig) with ``collect_run``; never raises for bad input.

    Args:
        source: the configuration.
        devices: number of devices the run will get; checked as ``long_seq.device_num``.
        overrides: ``KEY.PATH=VALUE`` strings applied to the tree first (values parsed as YAML).
        route: ``mindformers`` or ``train``; None: the route the YAML names (``route_of``).

    Returns:
        A ``Report`` (every broken rule in ``errors``).
    """
    from mf_longseq.train.validation import collect_run, load_tree, route_of
    name = source if isinstance(source, str) else "<dict>"
    collect = _Collect()
    config_logger = logging.getLogger("mf_longseq")
    config_logger.addHandler(collect)
    try:
        tree = load_tree(source)
        for text in overrides:
            _apply(tree, *parse_override(text))
        route = route or route_of(tree)
        check, errors = collect_run(tree, devices=devices, route=route)
    except ConfigError as err:
        io_error = isinstance(err, InputError)
        return Report(name, False, error=_error_dict(err), errors=[_error_dict(err)], warnings=collect.messages,
                      io_error=io_error, route=None if io_error else route)
    finally:
        config_logger.removeHandler(collect)
    if errors:
        found = [_error_dict(e) for e in errors]
        return Report(name, False, error=found[0], errors=found, warnings=collect.messages, route=route)
    config = check.long_seq
    settings = {key_path(f.name): getattr(config, f.name) for f in fields(config)}
    settings.update({key_path(name): getattr(check.model, name)
                     for name in (*MODEL_FACTS, "use_attn_mask_compression")})
    derived = {"ulysses_degree": config.ulysses_degree, "ring_degree": config.ring_degree,
               "world_size": config.world_size}
    return Report(name, True, warnings=[*check.warnings, *collect.messages], notes=list(config.notes(check.model)),
                  settings=settings, derived=derived, model=_model_summary(check), route=route)


def _model_summary(check) -> Dict[str, Any]:
    m = check.model
    return {"config_class": type(m).__name__, "model_class": check.model_class.__name__, "family": m.family,
            "num_layers": m.num_layers, "hidden_size": m.hidden_size, "num_heads": m.num_heads,
            "n_kv_heads": m.n_kv_heads, "head_dim": m.head_dim, "ffn_hidden_size": m.ffn_hidden_size,
            "vocab_size": m.vocab_size, "compute_dtype": m.compute_dtype}


def _error_dict(err: ConfigError) -> Dict[str, Any]:
    value = err.value if isinstance(err.value, (int, float, str, bool, type(None))) else repr(err.value)
    return {"key": err.key, "value": value, "problem": err.problem, "fix": err.fix, "message": str(err)}


def _strict(node):
    """A copy that strict JSON parsers accept: nan / inf as strings, anything unknown as its repr."""
    if isinstance(node, dict):
        return {str(k): _strict(v) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return [_strict(v) for v in node]
    if isinstance(node, float) and not math.isfinite(node):
        return repr(node)
    if node is None or isinstance(node, (bool, int, float, str)):
        return node
    return repr(node)


def format_report(report: Report) -> str:
    """The human-readable report."""
    where = f" (route {report.route})" if report.route else ""
    lines = [f"{report.config}: {'OK' if report.valid else 'INVALID'}{where}"]
    lines += [f"  error: {e['message']}" for e in (report.errors or ([report.error] if report.error else []))]
    if report.valid:
        s, d = report.settings, report.derived
        cp = s["parallel_config.context_parallel"]
        algo = (s["long_seq.cp_algo"] or s["parallel_config.context_parallel_algo"]) if cp > 1 else "off"
        lines.append(f"  context parallel: {algo}, CP={cp} (ulysses {d['ulysses_degree']} x ring "
                     f"{d['ring_degree']}), layout {s['long_seq.layout']}, seq_length "
                     f"{s['model.model_config.seq_length']}")
        lines.append(f"  devices: {d['world_size']} = data_parallel {s['parallel_config.data_parallel']} x "
                     f"model_parallel {s['parallel_config.model_parallel']} x context_parallel {cp} x "
                     f"pipeline_stage {s['parallel_config.pipeline_stage']}")
        m = report.model
        lines.append(f"  model: {m['model_class']} ({m['config_class']}), {m['num_layers']} layers, hidden "
                     f"{m['hidden_size']}, heads {m['num_heads']} (kv {m['n_kv_heads']}, head_dim {m['head_dim']}), "
                     f"FFN {m['ffn_hidden_size']}, vocab {m['vocab_size']}, {m['compute_dtype']}")
    if report.io_error:
        lines[0] = f"{report.config}: ERROR"
    lines += [f"  warning: {w}" for w in report.warnings]
    lines += [f"  note: {n}" for n in report.notes]
    return "\n".join(lines)


def exit_status(reports: Sequence[Report]) -> int:
    """0 all valid, 2 any usage / I/O error, else 1 (some configuration refused)."""
    if any(r.io_error for r in reports):
        return 2
    return 0 if all(r.valid for r in reports) else 1


def run(args) -> int:
    with contextlib.redirect_stdout(sys.stderr):          # MindFormers' logs never reach the --json stdout
        reports = [validate(path, devices=args.devices, overrides=args.set or (), route=args.route)
                   for path in args.config]
    if args.json:
        payload = [_strict(asdict(r)) for r in reports]
        print(json.dumps(payload[0] if len(payload) == 1 else payload, indent=2, allow_nan=False))
    else:
        print("\n".join(format_report(r) for r in reports))
    return exit_status(reports)


def register(subparsers) -> None:
    """Add the ``validate`` verb."""
    parser = subparsers.add_parser(
        "validate", help="check a MindFormers YAML against every rule of the plugin (no devices needed)",
        description="Check CONFIG for one route (--route) without devices and report every broken rule: "
                    "device_num product, algorithm names, heads vs model_parallel x Ulysses degree, sequence length "
                    "vs CP layout, flash attention on Ascend, use_seq_parallel, pipeline limits, unknown keys, model "
                    "shapes and classes, run keys, MindFormers' own parallel config classes; on the mindformers "
                    "route context.mode, parallel_mode, trainer, runner wrapper, dataset task, sink_mode and input "
                    "columns; on the train route the keys mf-longseq train refuses. Exit 0 if valid, 1 if not, 2 on "
                    "a usage or I/O error.")
    parser.add_argument("config", nargs="+", help="MindFormers YAML file(s)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per file (for tools)")
    parser.add_argument("--devices", type=int, default=None,
                        help="devices the run will get (checked against the product of the parallel degrees)")
    parser.add_argument("--route", choices=("mindformers", "train"), default=None,
                        help="the route to check: mindformers (MindFormers' Trainer, run_mindformer.py) or train "
                             "(mf-longseq train); default: mindformers when the YAML names a trainer.type, else train")
    parser.add_argument("--set", action="append", metavar="KEY.PATH=VALUE",
                        help="override a key before checking, e.g. --set parallel_config.context_parallel=8")
    parser.set_defaults(func=run)
