"""``mf-longseq validate CONFIG``: check a MindFormers YAML against every rule of the plugin, without devices.

The rules live in ``mf_longseq.config`` (``LongSeqConfig``) and nowhere else: this module reads the file, applies
``--set`` overrides and ``--devices``, builds the config, and reports the outcome::

    mf-longseq validate yaml_templates/llama2/7b_32k_cp4_colossalai_cp.yaml
    mf-longseq validate run.yaml --devices 64 --set parallel_config.context_parallel=8 --json

Exit status 0 when the configuration is valid, 1 when it is not (or cannot be read).  The human report names the
broken key, its value and the fix; ``--json`` prints the same as one JSON object for tools::

    {"config": ..., "valid": false,
     "error": {"key": ..., "value": ..., "problem": ..., "fix": ..., "message": ...},
     "warnings": [...], "notes": [...], "settings": {key path: value}, "derived": {...}}
"""
import copy
import json
import logging
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Dict, List, Optional, Sequence

from mf_longseq.config import ConfigError, LongSeqConfig, key_path


@dataclass
class Report:
    """Outcome of one validation.

    Attributes:
        config: the file (or "<dict>") that was checked.
        valid: True when every rule holds.
        error: the broken rule (key, value, problem, fix, message), or None.
        warnings: warnings the config logged while reading (e.g. the old spelling ``hybird_cp``).
        notes: advice that does not make the run fail (``LongSeqConfig.notes()``).
        settings: every setting by YAML key path (valid configs only).
        derived: Ulysses degree, ring degree and world size (valid configs only).
    """

    config: str
    valid: bool
    error: Optional[Dict[str, Any]] = None
    warnings: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    settings: Dict[str, Any] = field(default_factory=dict)
    derived: Dict[str, int] = field(default_factory=dict)


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: List[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _load(source) -> Any:
    if not isinstance(source, str):
        return copy.deepcopy(source)
    import yaml
    try:
        with open(source, encoding="utf-8") as handle:
            return yaml.safe_load(handle) or {}
    except OSError as err:
        raise ConfigError("CONFIG", source, f"cannot be read ({err.strerror})",
                          "pass the path of a MindFormers YAML file") from None
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        raise ConfigError("CONFIG", source, f"is not valid YAML{line}", "fix the YAML syntax") from None


def parse_override(text: str):
    """``'parallel_config.context_parallel=4'`` -> (["parallel_config", "context_parallel"], 4)."""
    import yaml
    path, sep, raw = text.partition("=")
    if not sep or not path.strip():
        raise ConfigError("--set", text, "is not KEY.PATH=VALUE", "write e.g. --set parallel_config.context_parallel=4")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    return path.strip().split("."), value


def _apply(tree: Any, parts: Sequence[str], value: Any) -> None:
    node = tree
    for i, part in enumerate(parts[:-1]):
        if not isinstance(node, dict):
            raise ConfigError(".".join(parts[:i]), node, "is not a section", "check the --set key path")
        node = node.setdefault(part, {})
    if not isinstance(node, dict):
        raise ConfigError(".".join(parts[:-1]), node, "is not a section", "check the --set key path")
    node[parts[-1]] = value


def validate(source, *, devices: Optional[int] = None, overrides: Sequence[str] = ()) -> Report:
    """Check ``source`` (YAML path, dict or MindFormerConfig) with ``LongSeqConfig``; never raises for bad input.

    Args:
        source: the configuration.
        devices: number of devices the run will get; checked as ``long_seq.device_num``.
        overrides: ``KEY.PATH=VALUE`` strings applied to the tree first (values parsed as YAML).

    Returns:
        A ``Report``.
    """
    name = source if isinstance(source, str) else "<dict>"
    collect = _Collect()
    config_logger = logging.getLogger("mf_longseq.config")
    config_logger.addHandler(collect)
    try:
        tree = _load(source)
        if hasattr(tree, "to_dict"):
            tree = tree.to_dict()
        for text in overrides:
            if not isinstance(tree, dict):
                break                          # from_mindformers reports a tree that is not a mapping
            _apply(tree, *parse_override(text))
        extra = {} if devices is None else {"device_num": devices}
        config = LongSeqConfig.from_mindformers(tree, **extra)
    except ConfigError as err:
        return Report(name, False, error=_error_dict(err), warnings=collect.messages)
    except ValueError as err:                  # a rule raised without ConfigError: keep its message
        return Report(name, False, error={"key": None, "value": None, "problem": str(err), "fix": None,
                                          "message": str(err)}, warnings=collect.messages)
    finally:
        config_logger.removeHandler(collect)
    settings = {key_path(f.name): getattr(config, f.name) for f in fields(config)}
    derived = {"ulysses_degree": config.ulysses_degree, "ring_degree": config.ring_degree,
               "world_size": config.world_size}
    return Report(name, True, warnings=collect.messages, notes=list(config.notes()), settings=settings,
                  derived=derived)


def _error_dict(err: ConfigError) -> Dict[str, Any]:
    value = err.value if isinstance(err.value, (int, float, str, bool, type(None))) else repr(err.value)
    return {"key": err.key, "value": value, "problem": err.problem, "fix": err.fix, "message": str(err)}


def format_report(report: Report) -> str:
    """The human-readable report."""
    lines = [f"{report.config}: {'OK' if report.valid else 'INVALID'}"]
    if report.error:
        lines.append(f"  error: {report.error['message']}")
    if report.valid:
        s, d = report.settings, report.derived
        cp = s["parallel_config.context_parallel"]
        algo = s["parallel_config.context_parallel_algo"] if cp > 1 else "off"
        lines.append(f"  context parallel: {algo}, CP={cp} (ulysses {d['ulysses_degree']} x ring "
                     f"{d['ring_degree']}), layout {s['long_seq.layout']}, seq_length "
                     f"{s['model.model_config.seq_length']}")
        lines.append(f"  devices: {d['world_size']} = data_parallel {s['parallel_config.data_parallel']} x "
                     f"model_parallel {s['parallel_config.model_parallel']} x context_parallel {cp} x "
                     f"pipeline_stage {s['parallel_config.pipeline_stage']}")
    lines += [f"  warning: {w}" for w in report.warnings]
    lines += [f"  note: {n}" for n in report.notes]
    return "\n".join(lines)


def run(args) -> int:
    reports = [validate(path, devices=args.devices, overrides=args.set or ()) for path in args.config]
    if args.json:
        payload = [asdict(r) for r in reports]
        print(json.dumps(payload[0] if len(payload) == 1 else payload, indent=2, default=repr))
    else:
        print("\n".join(format_report(r) for r in reports))
    return 0 if all(r.valid for r in reports) else 1


def register(subparsers) -> None:
    """Add the ``validate`` verb."""
    parser = subparsers.add_parser(
        "validate", help="check a MindFormers YAML against every rule of the plugin (no devices needed)",
        description="Check CONFIG without devices: device_num product, algorithm names, heads vs "
                    "model_parallel x Ulysses degree, sequence length vs CP layout, flash attention on Ascend, "
                    "use_seq_parallel, pipeline limits, unknown keys. Exit 0 if valid, 1 if not.")
    parser.add_argument("config", nargs="+", help="MindFormers YAML file(s)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per file (for tools)")
    parser.add_argument("--devices", type=int, default=None,
                        help="devices the run will get (checked against the product of the parallel degrees)")
    parser.add_argument("--set", action="append", metavar="KEY.PATH=VALUE",
                        help="override a key before checking, e.g. --set parallel_config.context_parallel=8")
    parser.set_defaults(func=run)
