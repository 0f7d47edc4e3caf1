"""One validation for everything a run reads, before any device work: ``check_run(tree)``.

``mf-longseq validate``, ``mf-longseq train`` (``run_job``) and the msrun launcher (through ``validate``) call it;
on MindFormers' builder route the same rules run inside the classes it builds (``LongSeqModelConfig.validate``,
``LongSeqConfig.__post_init__`` and ``LongSeqConfig.check_model``, called by the model).  It lives in ``train/``
because it also checks the keys the training runtime honours (``train/support.py``, ``train/packing.py``).  What it
checks, for the route given (``train``: ``mf-longseq train``; ``mindformers``: MindFormers' Trainer), every broken
rule collected (``collect_run``; ``check_run`` raises them together as ``ConfigErrors``):

1. the file: a mapping of sections, each section a mapping (``load_tree`` refuses anything else);
2. the parallel rules (``LongSeqConfig``: degrees, algorithm names; ``check_model``: heads, sequence, layers per
   stage against the degrees);
3. the model: the registered ``model.model_config.type`` / ``model.arch.type`` classes, every key of
   ``model.model_config`` (aliases resolved once, unknown keys refused with a did-you-mean), the shape rules, and
   the vocabulary / FFN width against ``model_parallel``;
4. the run keys (``run_key_refusals``: batch size, epochs, seed, steps, recompute, optimizer and
   schedule types registered in MindFormers, packing; on the train route ``train/support.py``'s refusals; on the
   mindformers route ``mf_route/trainer.py``'s: context.mode, parallel_mode, trainer, wrapper, dataset task,
   sink_mode, input columns);
5. MindFormers' own config classes on the file (``TransformerRecomputeConfig``, ``TransformerSwapConfig``,
   ``TransformerOpParallelConfig``, as ``build_parallel_config`` calls them), so what passes here passes there.

Every refusal is a ``ConfigError`` naming the key, the value and the fix; an unreadable file is an
``InputError`` (a ``ConfigError`` that ``mf-longseq validate`` reports with exit status 2).
"""
import difflib
import functools
import inspect
import math
import re
from typing import TYPE_CHECKING, Any, List, Mapping, Optional, Sequence, Tuple

from mf_longseq.config import (MAX_COUNT, MODEL_KEY_ALIASES, PARALLEL_CONFIG_KEYS, ConfigError, LongSeqConfig,
                               _check_sections, canonical_model_keys, check_offload, model_config_section, node_at,
                               raise_all)

if TYPE_CHECKING:
    from mf_longseq.train.settings import RunSettings

# Sections a run reads besides those LongSeqConfig reads (config._SECTIONS): each must be a mapping when present.
RUN_SECTIONS = ("runner_config", "optimizer", "lr_schedule", "recompute_config", "swap_config", "train_dataset",
                "train_dataset.data_loader", "train_dataset_task", "runner_wrapper", "model.arch")
_PARALLEL_BOOLS = ("use_seq_parallel", "vocab_emb_dp")
_PARALLEL_INTS = ("expert_parallel", "seq_split_num", "gradient_aggregation_group")


class InputError(ConfigError):
    """Not a broken rule: the file cannot be read (missing, a directory, no permission) or the command line is
    malformed (``--set``).  ``mf-longseq validate`` exits 2 on it (1 on a refusal)."""


# ----------------------------------------------------------------------------------------------- reading
def load_tree(source: Any) -> dict:
    """The configuration as a dict: a YAML path is read once (``base_config`` merged by ``MindFormerConfig``).

    Raises:
        InputError: the path cannot be read (missing, a directory, no permission).
        ConfigError: not valid YAML, or not a mapping of sections (a file holding only ``other.yaml`` is a string,
            never another path).
    """
    if isinstance(source, str):
        tree = _read_yaml(source)
        if isinstance(tree, dict) and "base_config" in tree:
            import yaml
            from mindformers import MindFormerConfig
            try:
                tree = MindFormerConfig(source)
            except OSError as err:
                raise InputError("base_config", tree["base_config"], f"cannot be read ({err.strerror or err})",
                                 "point base_config at an existing YAML (relative to this file)") from None
            except (ValueError, TypeError, KeyError, AttributeError) as err:
                raise ConfigError("base_config", tree["base_config"], f"MindFormers cannot merge it ({err})",
                                  "point base_config at a MindFormers YAML mapping") from None
            except yaml.YAMLError as err:           # e.g. a !!python/... tag: safe_load refuses it, we name it
                raise _base_config_yaml_error(tree["base_config"], err) from None
    else:
        import copy
        tree = copy.deepcopy(source)
    if hasattr(tree, "to_dict"):
        tree = tree.to_dict()
    if not isinstance(tree, dict):
        raise ConfigError("<top level>", tree if isinstance(tree, (str, int, float, bool)) else type(tree).__name__,
                          "a MindFormers config must be a mapping of sections",
                          "start the YAML with sections such as model:, parallel_config:, long_seq:")
    return tree


def _base_config_yaml_error(base_config, err) -> ConfigError:
    """A YAML error of a ``base_config`` file (MindFormers reads it with a safe loader) as a ConfigError naming the
    file, the line and the tag or problem."""
    mark = getattr(err, "problem_mark", None)
    where = f"{mark.name} line {mark.line + 1}" if mark is not None else "the file"
    problem = getattr(err, "problem", None) or str(err)
    tag = re.search(r"tag '([^']+)'", problem)
    if tag:
        return ConfigError("base_config", base_config, f"{where}: the tag {tag.group(1)!r} is not plain YAML (a "
                           "Python object tag; configs are read with a safe loader)",
                           "remove the tag and write a plain value")
    return ConfigError("base_config", base_config, f"{where} is not valid YAML ({problem})", "fix the YAML syntax")


def _read_yaml(path: str) -> Any:
    import yaml
    try:
        with open(path, encoding="utf-8") as handle:
            tree = yaml.safe_load(handle)
    except OSError as err:
        raise InputError("CONFIG", path, f"cannot be read ({err.strerror or err})",
                               "pass the path of a MindFormers YAML file") from None
    except UnicodeDecodeError:
        raise ConfigError("CONFIG", path, "is not UTF-8 text", "save the YAML as UTF-8") from None
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        raise ConfigError("CONFIG", path, f"is not valid YAML{line} ({getattr(err, 'problem', None) or err})",
                          "fix the YAML syntax") from None
    except ValueError as err:           # e.g. an integer of more than 4300 digits (Python's int() limit)
        raise ConfigError("CONFIG", path, f"holds a value YAML cannot read ({err})", "fix that value") from None
    return {} if tree is None else tree


# ----------------------------------------------------------------------------------------------- entry point
ROUTES = ("train", "mindformers")


def route_of(tree: Mapping) -> str:
    """The route a YAML names: ``mindformers`` when it has a ``trainer.type`` (what ``run_mindformer.py``
    builds), else ``train`` (``mf-longseq train``)."""
    return "mindformers" if node_at(tree, "trainer.type") else "train"


def check_run(source: Any, *, devices: Optional[int] = None, steps: Optional[int] = None,
              route: str = "train", built_by_mindformers: bool = False) -> "RunSettings":
    """Check everything a run on ``route`` reads from ``source`` (YAML path, dict or MindFormerConfig); no device work.

    Args:
        source: the configuration.
        devices: ranks the run will get (checked as ``long_seq.device_num``).
        steps: ``--steps`` of ``mf-longseq train`` (positive), when known.  (``--data`` is checked where it is
            read, ``train.data.read_token_file``.)
        route: ``train`` (``mf-longseq train``: its refusals, ``train/support.py``) or ``mindformers``
            (MindFormers' Trainer, ``run_mindformer.py``: ``mf_route/trainer.py route_refusals``).
        built_by_mindformers: ``source`` is the config MindFormers' Trainer already built (``LongSeqTrainer``):
            MindFormers' own constructors are not run on it again.

    Returns:
        The run's ``RunSettings`` (``train/settings.py``): every value the run reads, parsed here once.

    Raises:
        ConfigError: the broken rule; ``ConfigErrors`` listing every one when several are broken
            (``InputError`` when the file cannot be read).
    """
    check, errors = collect_run(source, devices=devices, steps=steps, route=route,
                                built_by_mindformers=built_by_mindformers)
    raise_all(errors)
    return check


def collect_run(source: Any, *, devices: Optional[int] = None, steps: Optional[int] = None,
                route: str = "train", built_by_mindformers: bool = False
                ) -> Tuple[Optional["RunSettings"], List[ConfigError]]:
    """(the settings, []) when ``source`` is valid on ``route``, else (None, every broken rule found).

    A rule that needs an earlier one to hold (the model needs the parallel settings) is skipped when that one
    is broken; everything else is checked.

    Raises:
        InputError / ConfigError: the file cannot be read, is not a mapping of sections, or ``route`` is unknown.
    """
    if route not in ROUTES:
        raise InputError("--route", route, "unknown route", f"use one of {', '.join(ROUTES)}")
    from mf_longseq.train.settings import read_settings
    tree = load_tree(source)
    _check_sections(tree)
    nodes = {path: node_at(tree, path) for path in RUN_SECTIONS}
    errors = [ConfigError(path, node, "must be a section (a mapping of keys)", f"write {path}: followed by indented keys")
              for path, node in nodes.items() if node is not None and not isinstance(node, Mapping)]
    if errors:
        return None, errors
    long_seq = model = model_class = None
    warnings: List[str] = []
    try:
        long_seq = LongSeqConfig.from_mindformers(tree, **({} if devices is None else {"device_num": devices}))
        model, model_class, warnings = check_model(tree, long_seq)
    except ConfigError as err:
        errors.append(err)
    parsed, refusals = _run_keys(tree, steps=steps, route=route)
    errors += refusals
    if route == "mindformers" and long_seq is not None:
        from mf_longseq.train.mf_route_rules import route_refusals
        errors += route_refusals(tree, long_seq)
    # MindFormers' own classes repeat the parallel rules above: checked once they hold; not when MindFormers' Trainer
    # already built them (``built_by_mindformers``: its swap_config and the rest are in MindFormers' internal form,
    # which its constructors do not take back).
    if not errors and not built_by_mindformers:
        try:
            check_mindformers(tree)
        except ConfigError as err:
            errors.append(err)
    if errors:
        return None, errors
    return read_settings(tree, long_seq=long_seq, model=model, model_class=model_class, warnings=warnings,
                         steps=steps, **parsed), []


# ----------------------------------------------------------------------------------------------- model
def check_model(tree: Mapping, long_seq: LongSeqConfig):
    """(model config, model class, warnings): the registered classes built from ``model`` as the run builds them."""
    from mf_longseq.models.build import model_class_from, model_config_from
    from mf_longseq.models.model_config import check_model_parallel
    warnings = _check_model_keys(model_config_section(tree))
    model = model_config_from(tree)
    model_class = model_class_from(tree, model)
    check_model_parallel(model, long_seq.model_parallel)
    for key in ("compute_dtype", "param_init_type"):
        if long_seq.device_target == "CPU" and getattr(model, key) == "bfloat16":
            raise ConfigError(f"model.model_config.{key}", "bfloat16", "MindSpore 2.9's CPU kernels lack bfloat16 for "
                              "ops of the training step (ReduceSum, Gather)",
                              f"use {key}: float32 (or float16) on CPU; bfloat16 is for Ascend")
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(model, key, None)
        ids = value if key == "eos_token_id" and isinstance(value, list) and value else [value]
        if value is not None and not all(_is_int(i) and 0 <= i < model.vocab_size for i in ids):
            raise ConfigError(f"model.model_config.{key}", value,
                              f"must be a token id in [0, vocab_size = {model.vocab_size})",
                              f"set {key} to a token of the vocabulary, or remove it")
    return model, model_class, warnings


@functools.lru_cache(maxsize=1)
def _known_model_keys():
    """(keys mf_longseq reads, keys only MindFormers' LlamaConfig reads) of ``model.model_config``."""
    from mindformers.models.configuration_utils import PretrainedConfig
    from mindformers.models.llama import LlamaConfig
    from mf_longseq.models.model_config import LongSeqModelConfig
    ours = set(inspect.signature(LongSeqModelConfig.__init__).parameters) - {"self", "kwargs"}
    ours |= {k for k in vars(PretrainedConfig()) if not k.startswith("_")} | {"type", "auto_register"}
    ours |= {a for others in MODEL_KEY_ALIASES.values() for a in others}
    theirs = set(inspect.signature(LlamaConfig.__init__).parameters) - ours - {"self", "kwargs"}
    return ours, theirs


def _check_model_keys(section: Mapping) -> List[str]:
    """Refuse keys nobody reads (with a did-you-mean); warn about MindFormers LlamaConfig keys we ignore."""
    canonical_model_keys(section)                               # two spellings that disagree: refused here
    ours, theirs = _known_model_keys()
    warnings = []
    for key in section:
        if key in ours:
            continue
        path = f"model.model_config.{key}"
        if key in theirs:
            warnings.append(f"{path} is read by MindFormers' LlamaConfig but not by mf_longseq: it changes "
                            "nothing in this run")
            continue
        close = difflib.get_close_matches(str(key), sorted(ours), n=1, cutoff=0.75)
        raise ConfigError(path, section[key], "unknown key",
                          f"did you mean model.model_config.{close[0]}? Rename the key" if close
                          else "remove it (see LongSeqModelConfig for the keys of the model)")
    return warnings


# ----------------------------------------------------------------------------------------------- run keys
def run_key_refusals(tree: Mapping, long_seq: Optional[LongSeqConfig], *, steps: Optional[int] = None,
                     route: str = "train") -> List[ConfigError]:
    """Every run key the run cannot honour, as ConfigErrors (empty: all fine).  The keys only ``mf-longseq train``
    refuses (``train/support.py``) are checked on the ``train`` route only.

    This is the one place where refusals of run keys are collected: add new sources of refusals here.
    """
    return _run_keys(tree, steps=steps, route=route)[1]


def _run_keys(tree: Mapping, *, steps: Optional[int], route: str) -> Tuple[dict, List[ConfigError]]:
    """(the sections parsed while checking: ``packing`` and on the train route ``optimizer``, for
    ``read_settings``; the refusals)."""
    parsed: dict = {}
    refusals: List[ConfigError] = []
    refusals += _positive_ints(tree, ("runner_config.batch_size", "runner_config.epochs"))
    seed = node_at(tree, "seed")
    if seed is not None and (not _is_int(seed) or not 0 <= seed < 2 ** 32):
        refusals.append(ConfigError("seed", seed, "must be an integer in [0, 2**32)", "set seed: 0"))
    if steps is not None and (not _is_int(steps) or not 1 <= steps <= MAX_COUNT):
        refusals.append(ConfigError("--steps", steps, "must be a positive integer", "pass --steps 1 or more"))
    refusals += _recompute_refusals(tree)
    refusals += _registered_types(tree)
    refusals += _optimizer_refusals(tree)
    refusals += _packing_refusals(tree, parsed)
    if not refusals and route == "train":   # the list below reads sections whose types the checks above passed
        refusals += _train_refusals(tree, 1 if steps is None else steps, parsed)
    return parsed, refusals


def _train_refusals(tree: Mapping, steps: int, parsed: dict) -> List[ConfigError]:
    """MindFormers keys ``mf-longseq train`` cannot honour (``train/support.py`` keeps the one list); its AdamW
    settings, parsed there once, go into ``parsed``."""
    from mf_longseq.train.support import refusals
    return refusals(dict(tree), steps=steps, parsed=parsed)


def _recompute_refusals(tree: Mapping) -> List[ConfigError]:
    from mf_longseq.models.build import check_recompute
    recompute = (node_at(tree, "recompute_config") or {}).get("recompute", False)
    try:
        check_recompute(recompute)                                                     # null refused, as build
        check_offload(node_at(tree, "long_seq.offload_layer_inputs", False), recompute)
    except ConfigError as err:
        return [err]
    return []


def _registered_types(tree: Mapping) -> List[ConfigError]:
    """``optimizer.type``, ``lr_schedule.type`` and ``train_dataset.data_loader.type`` name MindFormers classes."""
    from mindformers.tools.register import MindFormerModuleType, MindFormerRegister
    out = []
    for path, kind in (("optimizer.type", MindFormerModuleType.OPTIMIZER), ("lr_schedule.type", MindFormerModuleType.LR),
                       ("train_dataset.data_loader.type", MindFormerModuleType.DATASET_LOADER)):
        name = node_at(tree, path)
        if name is None:
            continue
        if not isinstance(name, str) or not MindFormerRegister.is_exist(kind, name):
            known = sorted(MindFormerRegister.registry.get(kind, {}))
            close = difflib.get_close_matches(str(name), known, n=1) if isinstance(name, str) else []
            hint = f"did you mean {close[0]!r}? " if close else ""
            out.append(ConfigError(path, name, "not registered in MindFormers", f"{hint}use a registered class, "
                                   f"e.g. one of {', '.join(known[:8])}"))
    return out


def _optimizer_refusals(tree: Mapping) -> List[ConfigError]:
    out = []
    for path in ("optimizer.learning_rate", "optimizer.eps", "optimizer.weight_decay", "lr_schedule.learning_rate",
                 "lr_schedule.lr_end", "lr_schedule.warmup_ratio"):
        value = node_at(tree, path)
        if value is not None and not (_is_number(value) and value >= 0):
            out.append(ConfigError(path, value, "must be a finite non-negative number", f"set {path} to e.g. 1.e-4"))
    ratio = node_at(tree, "lr_schedule.warmup_ratio")
    if _is_number(ratio) and ratio > 1:
        out.append(ConfigError("lr_schedule.warmup_ratio", ratio, "must be in [0, 1]", "set a fraction of the run"))
    for path, low in (("lr_schedule.warmup_steps", 0), ("lr_schedule.total_steps", -1)):
        value = node_at(tree, path)
        if value is not None and (not _is_int(value) or not low <= value <= MAX_COUNT):
            out.append(ConfigError(path, value, f"must be an integer >= {low}", f"set {path} to {max(low, 0)} or more"))
    betas = node_at(tree, "optimizer.betas")
    if betas is not None and not (isinstance(betas, (list, tuple)) and len(betas) == 2
                                  and all(_is_number(b) and 0 <= b < 1 for b in betas)):
        out.append(ConfigError("optimizer.betas", betas, "need two numbers in [0, 1)", "write betas: [0.9, 0.95]"))
    return out


def _packing_refusals(tree: Mapping, parsed: dict) -> List[ConfigError]:
    from mf_longseq.train.packing import PACKING_KEY, PackingSettings
    try:
        parsed["packing"] = PackingSettings.from_mindformers(tree)
    except ValueError as err:
        return [_as_config_error(err, PACKING_KEY)]
    return []


# ----------------------------------------------------------------------------------------------- MindFormers
def check_mindformers(tree: Mapping) -> None:
    """Build MindFormers' own parallel config classes from the file, as ``build_parallel_config`` does.

    Raises:
        ConfigError: a parallel_config key of the wrong type (named), or anything MindFormers refuses.
    """
    from mindformers.modules.transformer.transformer import (TransformerOpParallelConfig,
                                                             TransformerRecomputeConfig, TransformerSwapConfig)
    parallel = dict(node_at(tree, "parallel_config") or {})
    for key in _PARALLEL_BOOLS:
        if key in parallel and not isinstance(parallel[key], bool):
            raise ConfigError(f"parallel_config.{key}", parallel[key], "must be True or False",
                              f"write parallel_config.{key}: True or False")
    for key in _PARALLEL_INTS:
        if key in parallel and (not _is_int(parallel[key]) or not 1 <= parallel[key] <= MAX_COUNT):
            raise ConfigError(f"parallel_config.{key}", parallel[key], "must be a positive integer",
                              f"set parallel_config.{key} to 1 or more")
    if parallel and parallel.get("pipeline_stage") is None:      # build_parallel_config compares it with 1
        raise ConfigError("parallel_config.pipeline_stage", None, "is required by MindFormers' build_parallel_config "
                          "when parallel_config is given", "write parallel_config.pipeline_stage: 1")
    if "mem_coeff" in parallel and not (_is_number(parallel["mem_coeff"]) and parallel["mem_coeff"] >= 0):
        raise ConfigError("parallel_config.mem_coeff", parallel["mem_coeff"], "must be a finite non-negative number",
                          "write parallel_config.mem_coeff: 0.1 (MindFormers' default) or remove it")
    recompute = _mindformers("recompute_config", TransformerRecomputeConfig, node_at(tree, "recompute_config") or {})
    swap = _mindformers("swap_config", TransformerSwapConfig, node_at(tree, "swap_config") or {})
    if node_at(tree, "parallel_config.pipeline_stage", 1) != 1:
        parallel["vocab_emb_dp"] = False                      # as build_parallel_config does
    _mindformers("parallel_config", lambda **kw: TransformerOpParallelConfig(recompute=recompute, swap=swap, **kw),
                 parallel)


def _mindformers(section: str, build, values: Mapping):
    """``build(**values)``; whatever MindFormers raises becomes a ConfigError on the key its message names."""
    try:
        return build(**values)
    except Exception as err:                                  # noqa: BLE001 -- any refusal of theirs, reported
        text = str(err) or type(err).__name__
        named = [k for k in sorted(map(str, values), key=len, reverse=True) if re.search(rf"\b{re.escape(k)}\b", text)]
        if "ContextParallelAlgo" in text and "context_parallel_algo" in values:
            named = ["context_parallel_algo"]
        key = f"{section}.{named[0]}" if named else section
        value = values.get(named[0]) if named else dict(values)
        known = ", ".join(PARALLEL_CONFIG_KEYS) if section == "parallel_config" else "the keys MindFormers documents"
        raise ConfigError(key, value, f"MindFormers refuses it ({type(err).__name__}: {text})",
                          f"change {key} to a value MindFormers accepts ({known})") from None


# ----------------------------------------------------------------------------------------------- helpers
def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _positive_ints(tree: Mapping, paths: Sequence[str]) -> List[ConfigError]:
    out = []
    for path in paths:
        value = node_at(tree, path)
        if value is not None and (not _is_int(value) or not 1 <= value <= MAX_COUNT):
            out.append(ConfigError(path, value, f"must be a positive integer (at most {MAX_COUNT})",
                                   f"set {path}: 1 or more"))
    return out


_MESSAGE = re.compile(r"^(?P<key>[\w.<>\-]+)(?: = (?P<value>.*?))?: (?P<problem>.*?)(?:\. Fix: (?P<fix>.*?))?\.?$",
                      re.S)


def _as_config_error(err: ValueError, default_key: str) -> ConfigError:
    """A ValueError of the form ``key = value: problem. Fix: fix.`` as a ConfigError (keeps the key)."""
    if isinstance(err, ConfigError):
        return err
    found = _MESSAGE.match(str(err))
    out = ConfigError(default_key, None, str(err), "see the message") if not found else \
        ConfigError(found["key"], found["value"], found["problem"], found["fix"] or "see the message")
    out.args = (str(err),)                                    # the message stays word for word
    return out


__all__ = ["check_run", "collect_run", "route_of", "ROUTES", "check_model", "check_mindformers", "run_key_refusals",
           "load_tree", "InputError"]
