"""LongSeqConfig: the validated, frozen parallel settings of one long-sequence run.

It is read from a MindFormers config (``MindFormerConfig``, a dict or a YAML path).  The standard keys are read
where MindFormers keeps them; the plugin's own knobs live in a top-level ``long_seq:`` section, because
MindFormers rejects unknown keys under ``parallel_config``::

    parallel_config: {data_parallel, model_parallel, context_parallel, pipeline_stage, micro_batch_num,
                      context_parallel_algo, ulysses_degree_in_cp, use_seq_parallel}
    parallel: {enable_alltoall}
    context: {device_target}
    long_seq: {cp_algo, layout, block_size, device_num, loss_tile, mlp_tile, offload_layer_inputs}

The model's facts (``model.model_config``: seq_length, num_heads, n_kv_heads, num_layers, use_flash_attention,
use_attn_mask_compression) have one home, the model config (``LongSeqModelConfig``); ``LongSeqConfig.check_model``
checks them against the degrees.  Every rule raises ``ValueError`` (``ConfigError``) naming the key, the value and
a fix.
"""
import difflib
import logging
from dataclasses import dataclass, fields
from typing import Any, Mapping, Optional

from mf_longseq.parallel.algorithms import ALGORITHMS, MINDFORMERS_ALGOS
from mf_longseq.parallel.plan import (CP_ALGOS, LAYOUTS, LEGACY_ALGO_SPELLINGS, RunPlan, ulysses_degree_of,
                                     world_size_of)

logger = logging.getLogger(__name__)

DEVICE_TARGETS = ("CPU", "Ascend", "GPU")

# Keys a user may put in the plugin's own ``long_seq:`` section.
LONG_SEQ_KEYS = ("cp_algo", "layout", "block_size", "device_num", "loss_tile", "mlp_tile", "offload_layer_inputs")


class ConfigError(ValueError):
    """A broken rule. ``str()`` is the one-line message; ``key`` (YAML key path), ``value``, ``problem`` and
    ``fix`` are kept apart for tools (``mf-longseq validate --json``)."""

    def __init__(self, key: str, value: Any = None, problem: Optional[str] = None, fix: Optional[str] = None):
        if problem is None:     # one argument: a whole message (MindFormers' builder re-raises ``type(e)(msg)``)
            super().__init__(key)
        else:
            super().__init__(f"{key} = {value!r}: {problem}. Fix: {fix}.")
        self.key, self.value, self.problem, self.fix = key, value, problem, fix


class ConfigErrors(ConfigError):
    """Several broken rules reported at once (``errors``, in the order found).  ``key``, ``value``, ``problem``
    and ``fix`` are the first one's; ``str()`` lists every message, one per line."""

    def __init__(self, errors):
        self.errors = list(errors)
        first = self.errors[0]
        super().__init__(first.key, first.value, first.problem, first.fix)
        self.args = (f"{len(self.errors)} settings must change:\n" + "\n".join(f"  - {e}" for e in self.errors),)


def raise_all(errors) -> None:
    """Raise nothing for no errors, the error itself for one, ``ConfigErrors`` for several."""
    if len(errors) == 1:
        raise errors[0]
    if errors:
        raise ConfigErrors(errors)


def _fail(key: str, value: Any, problem: str, fix: str) -> None:
    raise ConfigError(key, value, problem, fix)


# Largest count any setting may hold: MindSpore shapes and token ids are int32 on device.
MAX_COUNT = 2 ** 31 - 1
# Divisor lists in messages stop here, so a message takes bounded time whatever number the user wrote.
_DIVISOR_SCAN = 4096


def _divisors(n: int) -> list:
    """Divisors of ``n`` in increasing order: all of them when n <= 4096, else those <= 4096 and n itself."""
    small = [d for d in range(1, min(n, _DIVISOR_SCAN) + 1) if n % d == 0]
    return small if n <= _DIVISOR_SCAN else small + [n]


# Spellings of a model.model_config key: the canonical (MindFormers LLaMA) name, then the names that mean the
# same (Hugging Face / MindFormers mcore).  Resolved once, by ``canonical_model_keys``.
MODEL_KEY_ALIASES = {
    "num_heads": ("num_attention_heads",),
    "n_kv_heads": ("num_key_value_heads",),
    "num_layers": ("num_hidden_layers",),
    "theta": ("rope_theta",),
}
# Decoder layers a model config builds when model.model_config.num_layers is absent (LongSeqModelConfig's default).
DEFAULT_NUM_LAYERS = 32


def canonical_model_keys(section: Mapping) -> dict:
    """A copy of a ``model.model_config`` section with every alias renamed to its canonical key.

    A key written under two spellings must hold the same value (None counts as absent).

    Raises:
        ConfigError: two spellings of one key disagree (names the alias key and both values).
    """
    out = dict(section)
    for name, others in MODEL_KEY_ALIASES.items():
        for other in others:
            if other not in out:
                continue
            value = out.pop(other)
            if value is None:
                continue
            mine = out.get(name)
            if mine is not None and not (type(mine) is type(value) and mine == value):
                _fail(f"model.model_config.{other}", value, f"is another spelling of model.model_config.{name}, "
                      f"which is {mine!r}", f"keep only model.model_config.{name} (or make both equal)")
            out[name] = value
    return out


@dataclass(frozen=True, kw_only=True)
class LongSeqConfig:
    """The parallel settings of a run: ``parallel_config``, ``parallel``, ``context`` and ``long_seq`` keys.

    The model's own facts (seq_length, heads, kv heads, layers, the flash and mask-compression flags) are not kept
    here: their one home is ``model.model_config`` (``LongSeqModelConfig``).  ``check_model`` checks a model
    against these degrees (heads per Ulysses / model-parallel rank, sequence split, layers per stage, FlashAttention
    on Ascend); ``from_mindformers`` runs it on the YAML's model section.
    """

    data_parallel: int = 1
    """parallel_config.data_parallel: model replicas, each training on its own samples."""
    model_parallel: int = 1
    """parallel_config.model_parallel: tensor parallel degree (heads split across it)."""
    context_parallel: int = 1
    """parallel_config.context_parallel: ranks that share one sequence; 1 means CP is off."""
    pipeline_stage: int = 1
    """parallel_config.pipeline_stage: pipeline stages (the layers split across them)."""
    micro_batch_num: int = 1
    """parallel_config.micro_batch_num: must be >= pipeline_stage."""
    context_parallel_algo: str = "colossalai_cp"
    """parallel_config.context_parallel_algo: colossalai_cp (ring), ulysses_cp or hybrid_cp (MindFormers'
    ContextParallelAlgo values; the plugin's other algorithms are named by long_seq.cp_algo)."""
    ulysses_degree_in_cp: int = 1
    """parallel_config.ulysses_degree_in_cp: Ulysses part of CP for hybrid_cp (ring part = CP / this)."""
    use_seq_parallel: bool = False
    """parallel_config.use_seq_parallel: Megatron sequence parallelism: norms, residual adds and each layer's saved
    input split over the model_parallel ranks along this rank's S/CP tokens (layer checkpoints cost
    (S/CP)*H/MP per rank); works with every CP algorithm; no effect when model_parallel = 1."""
    enable_alltoall: bool = False
    """parallel.enable_alltoall: Ulysses uses AlltoAll if True, an AllGather-based exchange if False."""
    device_target: str = "CPU"
    """context.device_target: CPU, Ascend or GPU."""
    cp_algo: Optional[str] = None
    """long_seq.cp_algo: the CP algorithm by any name of the plugin's table (parallel/algorithms.py), e.g.
    kvallgather_cp, which MindFormers' ContextParallelAlgo enum does not take; None: context_parallel_algo.  Given
    together with parallel_config.context_parallel_algo, the two must name the same algorithm."""
    device_num: Optional[int] = None
    """long_seq.device_num: total ranks; None means the product of the parallel degrees."""
    layout: str = "zigzag"
    """long_seq.layout: how a sequence is split across CP ranks, contiguous or zigzag (causal load balance)."""
    block_size: int = 2048
    """long_seq.block_size: tile size of the blockwise attention kernel (CPU/GPU)."""
    loss_tile: Optional[int] = None
    """long_seq.loss_tile: tokens per tile of the LM head + cross entropy; 0 = off; None = logits tile <= 256 MiB."""
    mlp_tile: int = 0
    """long_seq.mlp_tile: tokens per tile of the MLP, its intermediates recomputed in the backward; 0 = off."""
    offload_layer_inputs: bool = False
    """long_seq.offload_layer_inputs: with recompute_config.recompute, each layer's saved input moves to host memory
    after its forward and is copied back one layer ahead of its backward (host memory per node: ranks per node x
    layers per stage x B x S/CP/SP x H x bytes of compute_dtype)."""

    def __post_init__(self):
        self._check_types()
        self._check_degrees()
        if self.pipeline_stage > 1 and self.micro_batch_num < self.pipeline_stage:
            _fail(_KEY_PATHS["micro_batch_num"], self.micro_batch_num,
                  f"must be >= parallel_config.pipeline_stage = {self.pipeline_stage}",
                  f"set micro_batch_num to {self.pipeline_stage} or more")

    def check_model(self, model: Any) -> None:
        """Check a model's facts against these degrees.

        Args:
            model: a ``LongSeqModelConfig`` (or anything with its attribute names) or a ``model.model_config``
                mapping (canonical keys): ``seq_length`` and ``num_heads`` (required), ``n_kv_heads`` (default:
                num_heads), ``num_layers`` (default ``DEFAULT_NUM_LAYERS``), ``use_flash_attention`` (default
                True); other keys are ignored.

        Raises:
            ConfigError: a missing or non-positive count, kv heads not dividing the heads, heads that do not split
                over model_parallel / the Ulysses degree, a sequence that does not split into the layout's parts,
                more pipeline stages than layers, or CP on Ascend without FlashAttention (names key, value, fix).
        """
        facts = model_facts(model)
        self._check_model_types(facts)
        if self.context_parallel > 1 and self.device_target == "Ascend" and not facts["use_flash_attention"]:
            _fail(_KEY_PATHS["use_flash_attention"], False, "context parallelism on Ascend runs on FlashAttention",
                  "set model.model_config.use_flash_attention: True")
        self._check_heads(facts["num_heads"], facts["n_kv_heads"])
        self._check_sequence(facts["seq_length"])
        layers = facts["num_layers"]
        if layers < self.pipeline_stage:
            _fail(_KEY_PATHS["pipeline_stage"], self.pipeline_stage,
                  f"more stages than model.model_config.num_layers = {layers}",
                  f"use at most {layers} stages")

    # ----------------------------------------------------------------------------------------------- derived
    @property
    def algo(self) -> str:
        """The run's CP algorithm: long_seq.cp_algo when given, else parallel_config.context_parallel_algo."""
        return self.context_parallel_algo if self.cp_algo is None else self.cp_algo

    @property
    def plan(self) -> RunPlan:
        """The run's degrees, rank order, algorithm and sequence layout (``parallel/plan.py``)."""
        return RunPlan.from_config(self)

    # ulysses_degree and world_size call the plan's functions rather than build the plan: the rules read them
    # before they have checked that the degrees fit together (which building a RunPlan asserts).
    @property
    def ulysses_degree(self) -> int:
        """Ranks of one Ulysses (all-to-all) group inside CP."""
        return ulysses_degree_of(self.algo, self.context_parallel, self.ulysses_degree_in_cp)

    @property
    def ring_degree(self) -> int:
        """Ranks of one ring inside CP."""
        return self.plan.ring

    @property
    def world_size(self) -> int:
        return world_size_of(self.data_parallel, self.model_parallel, self.context_parallel, self.pipeline_stage)

    # ----------------------------------------------------------------------------------------------- checks
    def _check_types(self):
        settings = {f.name: getattr(self, f.name) for f in fields(self)}
        _check_counts(settings)                                  # those of COUNT_KEYS and FLAG_KEYS it holds
        num = self.device_num
        if num is not None and (isinstance(num, bool) or not isinstance(num, int) or not 1 <= num <= MAX_COUNT):
            _fail(_KEY_PATHS["device_num"], num, "must be a positive integer", "set it to the number of devices "
                  "or remove it (default: the product of the parallel degrees)")
        _check_bools(settings)
        _check_tiles(settings)
        if isinstance(self.context_parallel_algo, str) and self.context_parallel_algo in LEGACY_ALGO_SPELLINGS:
            _fail(_KEY_PATHS["context_parallel_algo"], self.context_parallel_algo,
                  "is the old spelling, which MindFormers 1.9 refuses ('hybird_cp' is not a valid ContextParallelAlgo)",
                  f"write parallel_config.context_parallel_algo: {LEGACY_ALGO_SPELLINGS[self.context_parallel_algo]}")
        self._check_algo_names()
        if not isinstance(self.layout, str) or self.layout not in LAYOUTS:
            _fail(_KEY_PATHS["layout"], self.layout, "unknown sequence layout", f"use one of {', '.join(LAYOUTS)}")
        if not isinstance(self.device_target, str) or self.device_target not in DEVICE_TARGETS:
            _fail(_KEY_PATHS["device_target"], self.device_target, "unknown device target",
                  f"use one of {', '.join(DEVICE_TARGETS)}")

    def _check_algo_names(self):
        """context_parallel_algo one of MindFormers' names, cp_algo one of the table's, the two not disagreeing."""
        algo, own = self.context_parallel_algo, self.cp_algo
        if isinstance(algo, str) and algo in ALGORITHMS and algo not in MINDFORMERS_ALGOS:
            _fail(_KEY_PATHS["context_parallel_algo"], algo, "is not one of MindFormers' ContextParallelAlgo values "
                  f"({', '.join(MINDFORMERS_ALGOS)}), which MindFormers checks this key against",
                  f"remove it and write long_seq.cp_algo: {algo}")
        if not isinstance(algo, str) or algo not in MINDFORMERS_ALGOS:
            close = difflib.get_close_matches(str(algo), CP_ALGOS, n=1, cutoff=0.8)
            hint = f"did you mean {close[0]!r}? " if close else ""
            _fail(_KEY_PATHS["context_parallel_algo"], algo, "unknown algorithm",
                  f"{hint}use one of {', '.join(MINDFORMERS_ALGOS)} (others: long_seq.cp_algo)")
        if own is None:
            return
        if not isinstance(own, str) or own not in ALGORITHMS:
            close = difflib.get_close_matches(str(own), CP_ALGOS, n=1, cutoff=0.8)
            hint = f"did you mean {close[0]!r}? " if close else ""
            _fail(_KEY_PATHS["cp_algo"], own, "unknown algorithm", f"{hint}use one of {', '.join(CP_ALGOS)}")
        if algo != LongSeqConfig.context_parallel_algo and algo != own:
            check_algo_keys(algo, own)

    def _check_degrees(self):
        cp = self.context_parallel
        if self.device_num is not None and self.device_num != self.world_size:
            _fail(_KEY_PATHS["device_num"], self.device_num,
                  f"device_num must equal data_parallel x model_parallel x context_parallel x pipeline_stage = "
                  f"{self.data_parallel} x {self.model_parallel} x {cp} x {self.pipeline_stage} = {self.world_size}",
                  "change the parallel degrees so that their product is the number of devices")
        if self.algo == "hybrid_cp" and cp > 1:
            u = self.ulysses_degree_in_cp
            if cp % u != 0:
                _fail(_KEY_PATHS["ulysses_degree_in_cp"], u,
                      f"must divide parallel_config.context_parallel = {cp}",
                      f"use one of {_divisors(cp)}")

    @staticmethod
    def _check_model_types(facts: dict) -> None:
        _check_counts(facts)
        _check_bools(facts)

    def _check_heads(self, heads: int, kv: int) -> None:
        mp, u = self.model_parallel, self.ulysses_degree
        if heads % kv != 0:
            _fail(_KEY_PATHS["n_kv_heads"], kv, f"must divide model.model_config.num_heads = {heads}",
                  f"use one of {_divisors(heads)}")
        if heads % mp != 0:
            _fail(_KEY_PATHS["model_parallel"], mp, f"must divide model.model_config.num_heads = {heads}",
                  f"use one of {_divisors(heads)}")
        if kv % mp != 0 and mp % kv != 0:
            _fail(_KEY_PATHS["model_parallel"], mp,
                  f"must divide, or be a multiple of, model.model_config.n_kv_heads = {kv}",
                  f"use one of {_divisors(kv)} or a multiple of {kv} that divides {heads}")
        # Ulysses splits the heads of one mp rank over U ranks, unevenly if need be (attention/head_split.py):
        # every rank needs at least one query head; kv heads go wherever their query heads go.
        heads_per_mp = heads // mp
        if u > heads_per_mp:
            key = "ulysses_degree_in_cp" if self.algo == "hybrid_cp" else "context_parallel"
            _fail(_KEY_PATHS[key], getattr(self, key),
                  f"the Ulysses degree {u} exceeds the query heads per model-parallel rank, num_heads / "
                  f"model_parallel = {heads} / {mp} = {heads_per_mp}, so some Ulysses ranks would hold no head",
                  f"use a Ulysses degree of at most {heads_per_mp} (hybrid_cp puts the rest of the context "
                  f"parallelism in the ring), or a smaller model_parallel")

    def _check_sequence(self, s: int) -> None:
        cp, mp = self.context_parallel, self.model_parallel
        if self.use_seq_parallel and mp > 1 and s % (cp * mp) != 0:
            _fail(_KEY_PATHS["seq_length"], s,
                  f"parallel_config.use_seq_parallel splits each rank's seq_length / context_parallel tokens over "
                  f"model_parallel = {mp} ranks, so seq_length must be divisible by context_parallel x "
                  f"model_parallel = {cp * mp}",
                  f"use a seq_length divisible by {cp * mp}, or set parallel_config.use_seq_parallel: False")
        if cp == 1:
            return
        # zigzag cuts the sequence into 2 x ring_degree chunks, each rank's pair then into Ulysses pieces;
        # with no ring (pure Ulysses) zigzag is the contiguous layout.
        zigzag = self.layout == "zigzag" and self.ring_degree > 1
        parts = 2 * cp if zigzag else cp
        if s % parts != 0:
            _fail(_KEY_PATHS["seq_length"], s,
                  f"the {self.layout} layout with context_parallel = {cp} splits the sequence into {parts} equal "
                  f"parts", f"use a seq_length divisible by {parts} (e.g. {(s // parts + 1) * parts})")

    # ----------------------------------------------------------------------------------------------- reading
    @classmethod
    def from_mindformers(cls, config: Any, **overrides) -> "LongSeqConfig":
        """Build from a ``MindFormerConfig``, a nested dict, or a YAML path. ``overrides`` win over the file."""
        tree = _as_dict(config)
        _check_sections(tree)
        own = tree.get("long_seq") or {}
        for key in own:
            if key not in LONG_SEQ_KEYS:
                close = difflib.get_close_matches(str(key), LONG_SEQ_KEYS, n=1)
                hint = f"did you mean long_seq.{close[0]}?" if close else f"known keys: {', '.join(LONG_SEQ_KEYS)}"
                _fail(f"long_seq.{key}", own[key], "unknown key", hint)
        model_section = canonical_model_keys(model_config_section(tree))
        check_algo_keys(node_at(tree, _KEY_PATHS["context_parallel_algo"]), own.get("cp_algo"))
        values = {}
        for name in (f.name for f in fields(cls)):
            found, value = _lookup(tree, _KEY_PATHS[name])
            if found and value is not None:
                values[name] = value
        values.update(overrides)
        config = cls(**values)
        config.check_model(model_section)
        check_offload(config.offload_layer_inputs, node_at(tree, "recompute_config.recompute", False))
        return config

    def describe(self) -> str:
        """One line per parallel setting, for logs and ``mf-longseq validate``."""
        lines = [f"{_KEY_PATHS[f.name]}: {getattr(self, f.name)!r}" for f in fields(self)]
        lines.append(f"(derived) ulysses degree: {self.ulysses_degree}, ring degree: {self.ring_degree}, "
                     f"world size: {self.world_size}")
        return "\n".join(lines)

    def notes(self, model: Any) -> list:
        """Advice that does not make the run fail (shown by ``mf-longseq validate``), one string per note.

        ``model``: the model config (``seq_length``, ``use_attn_mask_compression``), as ``check_model`` takes it.
        """
        cp, s, out = self.context_parallel, model_facts(model)["seq_length"], []
        compression = bool(_get(model, "use_attn_mask_compression", False))
        if compression and s < 2048:
            out.append(f"{_KEY_PATHS['use_attn_mask_compression']}: the compressed mask is 2048 x 2048 and "
                       f"seq_length = {s} is shorter, so compression saves no memory here (results are the same)")
        if not compression and s >= 8192 and self.device_target != "CPU":
            out.append(f"{_KEY_PATHS['use_attn_mask_compression']} is False: the dense S x S uint8 mask takes "
                       f"{s * s / 2 ** 30:.2f} GiB per device; set it True to use the 2048 x 2048 compressed mask")
        if cp == 1:
            out.append(f"{_KEY_PATHS['context_parallel']} = 1: context parallelism is off")
        if self.use_seq_parallel and self.model_parallel == 1:
            out.append(f"{_KEY_PATHS['use_seq_parallel']} = True with {_KEY_PATHS['model_parallel']} = 1: there are "
                       "no model-parallel ranks to split the tokens over, so it has no effect")
        if cp > 1 and self.layout == "contiguous" and self.ring_degree > 1:
            out.append(f"{_KEY_PATHS['layout']} = 'contiguous': with causal attention the last ring rank does about "
                       f"{2 * self.ring_degree - 1}x the work of the first; 'zigzag' balances it")
        if cp > 1 and self.algo == "hybrid_cp" and self.ulysses_degree_in_cp in (1, cp):
            same = "colossalai_cp (pure ring)" if self.ulysses_degree_in_cp == 1 else "ulysses_cp (pure Ulysses)"
            out.append(f"{_KEY_PATHS['ulysses_degree_in_cp']} = {self.ulysses_degree_in_cp}: hybrid_cp runs as {same}")
        if self.ulysses_degree > 1 and not self.enable_alltoall and self.device_target != "CPU":
            out.append(f"{_KEY_PATHS['enable_alltoall']} is False: Ulysses uses the AllGather-based exchange, which "
                       f"moves about {self.ulysses_degree}x the bytes of AlltoAll; set it True on {self.device_target}")
        return out


# Where each field lives in a MindFormers YAML, and the model keys the rules name (their home: model.model_config).
_KEY_PATHS = {
    "seq_length": "model.model_config.seq_length",
    "num_heads": "model.model_config.num_heads",
    "n_kv_heads": "model.model_config.n_kv_heads",
    "num_layers": "model.model_config.num_layers",
    "data_parallel": "parallel_config.data_parallel",
    "model_parallel": "parallel_config.model_parallel",
    "context_parallel": "parallel_config.context_parallel",
    "pipeline_stage": "parallel_config.pipeline_stage",
    "micro_batch_num": "parallel_config.micro_batch_num",
    "context_parallel_algo": "parallel_config.context_parallel_algo",
    "ulysses_degree_in_cp": "parallel_config.ulysses_degree_in_cp",
    "use_seq_parallel": "parallel_config.use_seq_parallel",
    "use_flash_attention": "model.model_config.use_flash_attention",
    "use_attn_mask_compression": "model.model_config.use_attn_mask_compression",
    "enable_alltoall": "parallel.enable_alltoall",
    "device_target": "context.device_target",
    "cp_algo": "long_seq.cp_algo",
    "device_num": "long_seq.device_num",
    "layout": "long_seq.layout",
    "block_size": "long_seq.block_size",
    "loss_tile": "long_seq.loss_tile",
    "mlp_tile": "long_seq.mlp_tile",
    "offload_layer_inputs": "long_seq.offload_layer_inputs",
}


# The model facts the parallel rules read (``LongSeqConfig.check_model``); MindFormers' model_config names.
MODEL_FACTS = ("seq_length", "num_heads", "n_kv_heads", "num_layers", "use_flash_attention")


def _get(model: Any, key: str, default: Any = None) -> Any:
    return model.get(key, default) if isinstance(model, Mapping) else getattr(model, key, default)


def model_facts(model: Any) -> dict:
    """``MODEL_FACTS`` of a model config object or a canonical ``model.model_config`` mapping, with the defaults of
    ``LongSeqModelConfig`` (n_kv_heads: num_heads, num_layers: ``DEFAULT_NUM_LAYERS``, use_flash_attention: True).

    Raises:
        ConfigError: seq_length or num_heads missing, or ``num_layers: null`` (the model config refuses it too).
    """
    facts = {key: _get(model, key) for key in MODEL_FACTS}
    for key in ("seq_length", "num_heads"):
        if facts[key] is None:
            _fail(_KEY_PATHS[key], None, "is required", f"set {_KEY_PATHS[key]} in the YAML")
    if facts["num_layers"] is None:
        if isinstance(model, Mapping) and "num_layers" in model:
            _fail(_KEY_PATHS["num_layers"], None, "must be a positive integer", f"set {_KEY_PATHS['num_layers']} to "
                  "the number of decoder layers, or remove the key for the model's default")
        facts["num_layers"] = DEFAULT_NUM_LAYERS
    if facts["n_kv_heads"] is None:
        facts["n_kv_heads"] = facts["num_heads"]
    if facts["use_flash_attention"] is None:
        facts["use_flash_attention"] = True
    return facts


# Settings and model facts that count something (positive int32), and the flags (True / False).
COUNT_KEYS = ("data_parallel", "model_parallel", "context_parallel", "pipeline_stage", "micro_batch_num",
              "ulysses_degree_in_cp", "block_size", "seq_length", "num_heads", "n_kv_heads", "num_layers")
FLAG_KEYS = ("use_seq_parallel", "enable_alltoall", "use_flash_attention", "offload_layer_inputs")


def _check_counts(values: Mapping) -> None:
    """Each of ``COUNT_KEYS`` in ``values`` a positive int of at most ``MAX_COUNT``; ConfigError on its key."""
    for name in COUNT_KEYS:
        if name not in values:
            continue
        value = values[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            _fail(_KEY_PATHS[name], value, "must be a positive integer", f"set {_KEY_PATHS[name]} to 1 or more")
        if value > MAX_COUNT:
            _fail(_KEY_PATHS[name], value, f"is larger than {MAX_COUNT} (MindSpore shapes and ids are int32)",
                  f"set {_KEY_PATHS[name]} to at most {MAX_COUNT}")


def _check_bools(values: Mapping) -> None:
    """Each of ``FLAG_KEYS`` in ``values`` True or False; ConfigError on its key."""
    for name in FLAG_KEYS:
        if name in values and not isinstance(values[name], bool):
            value = values[name]
            _fail(_KEY_PATHS[name], value, "must be True or False", f"write {_KEY_PATHS[name]}: True or False")


def check_algo_keys(mindformers_algo: Any, cp_algo: Any) -> None:
    """Both parallel_config.context_parallel_algo and long_seq.cp_algo given: they must name the same algorithm
    (ConfigError naming both keys otherwise); either alone, or neither, is fine."""
    if mindformers_algo is not None and cp_algo is not None and mindformers_algo != cp_algo:
        _fail(_KEY_PATHS["cp_algo"], cp_algo, f"disagrees with {_KEY_PATHS['context_parallel_algo']} = "
              f"{mindformers_algo!r}: the run has one CP algorithm",
              f"keep one of the two keys (long_seq.cp_algo for a name outside MindFormers' "
              f"{', '.join(MINDFORMERS_ALGOS)}), or make them equal")


def check_offload(offload: bool, recompute: Any) -> None:
    """long_seq.offload_layer_inputs moves the one input a recomputed layer keeps: it needs
    recompute_config.recompute: True (ConfigError otherwise)."""
    if offload and recompute is not True:
        _fail(_KEY_PATHS["offload_layer_inputs"], offload,
              f"offloads the one input each recomputed layer keeps, but recompute_config.recompute is {recompute!r}",
              "set recompute_config.recompute: True, or long_seq.offload_layer_inputs: False")


# The one home of the default rule: one tile's float32 logits (tile x V/MP x 4 bytes) stay under this budget.
LOSS_TILE_BUDGET_BYTES = 256 * 2 ** 20


def default_loss_tile(vocab_per_rank: int, budget_bytes: int = LOSS_TILE_BUDGET_BYTES) -> int:
    """Tokens per loss tile so that one tile's float32 logits fit ``budget_bytes``.

    tile = max(1, floor(budget_bytes / (4 * vocab_per_rank))); e.g. Qwen's vocabulary (151936) with
    model_parallel 1 and 256 MiB: 441 tokens; with model_parallel 4: 1766.

    Args:
        vocab_per_rank: V / model_parallel, the vocabulary slice of one rank.
        budget_bytes: the budget of one tile's float32 logits (default ``LOSS_TILE_BUDGET_BYTES``, 256 MiB).

    Raises:
        ValueError: a non-positive vocabulary slice or budget.
    """
    if vocab_per_rank < 1 or budget_bytes < 1:
        raise ValueError(f"vocab_per_rank = {vocab_per_rank} and budget_bytes = {budget_bytes} must be positive")
    return max(1, budget_bytes // (4 * vocab_per_rank))


def resolve_loss_tile(setting: Optional[int], vocab_per_rank: int) -> int:
    """The tile the model uses for ``long_seq.loss_tile``: None -> ``default_loss_tile(vocab_per_rank)``;
    0 (off) or a positive count as given."""
    return default_loss_tile(vocab_per_rank) if setting is None else setting


# Token counts per tile (0 = off); loss_tile may also be None (its default rule, see the field).
TILE_KEYS = ("loss_tile", "mlp_tile")


def _check_tiles(values: Mapping) -> None:
    """Each of ``TILE_KEYS`` in ``values`` an int from 0 to ``MAX_COUNT`` (loss_tile: or None); ConfigError."""
    for name in TILE_KEYS:
        value = values.get(name)
        if value is None and name == "loss_tile":
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_COUNT:
            _fail(_KEY_PATHS[name], value, f"must be a whole number of tokens per tile from 0 (off) to {MAX_COUNT}",
                  f"set {_KEY_PATHS[name]} to 0 (off) or to a positive token count such as 1024")


def check_world_size(config: "LongSeqConfig", world_size: int) -> None:
    """Raise ValueError unless the parallel degrees multiply to the real number of ranks (msrun --worker_num)."""
    if config.world_size != world_size:
        product = (f"data_parallel x model_parallel x context_parallel x pipeline_stage = {config.data_parallel} x "
                   f"{config.model_parallel} x {config.context_parallel} x {config.pipeline_stage} = "
                   f"{config.world_size}")
        _fail(_KEY_PATHS["device_num"], config.device_num if config.device_num is not None else config.world_size,
              f"{product}, but {world_size} ranks were started",
              f"launch msrun with --worker_num {config.world_size}, or change the parallel degrees so that their "
              f"product is {world_size}")


def section_fields(section: str) -> dict:
    """``{LongSeqConfig field: key}`` of the fields read from one section, e.g. ``section_fields("long_seq")`` ->
    ``{"device_num": "device_num", "layout": "layout", "block_size": "block_size"}``."""
    return {name: path[len(section) + 1:] for name, path in _KEY_PATHS.items()
            if path.rpartition(".")[0] == section}


def key_path(field_name: str) -> str:
    """The YAML key path of a LongSeqConfig field, e.g. ``parallel_config.context_parallel``."""
    return _KEY_PATHS[field_name]


def _as_dict(config: Any) -> Mapping:
    """The config as a mapping: a YAML path is read once (its content is never taken as another path)."""
    if isinstance(config, str):
        import yaml
        with open(config, encoding="utf-8") as handle:
            tree = yaml.safe_load(handle)
        return {} if tree is None else tree       # not a mapping: _check_sections reports it
    if hasattr(config, "to_dict"):
        return config.to_dict()
    return config                                 # not a mapping: _check_sections reports it


def model_config_section(tree: Mapping) -> Mapping:
    """``tree["model"]["model_config"]`` as written (empty when absent; sections are checked by _check_sections)."""
    model = tree.get("model") if isinstance(tree, Mapping) else None
    section = model.get("model_config") if isinstance(model, Mapping) else None
    return section if isinstance(section, Mapping) else {}


def _lookup(tree: Mapping, path: str):
    node: Any = tree
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False, None
        node = node[part]
    return True, node


def node_at(tree: Mapping, path: str, default: Any = None) -> Any:
    """The value at the dotted key ``path`` of a YAML tree (``"runner_config.batch_size"``); ``default`` when a
    part is missing, is not a mapping, or the value is null."""
    found, node = _lookup(tree, path)
    return default if not found or node is None else node


# Keys MindFormers 1.9 accepts under parallel_config (TransformerOpParallelConfig's arguments): any other key
# fails there at build time, so it is reported here first, with a did-you-mean.
PARALLEL_CONFIG_KEYS = ("data_parallel", "model_parallel", "context_parallel", "expert_parallel", "pipeline_stage",
                        "micro_batch_num", "seq_split_num", "recompute", "use_seq_parallel", "optimizer_shard",
                        "gradient_aggregation_group", "vocab_emb_dp", "context_parallel_algo",
                        "ulysses_degree_in_cp", "mem_coeff", "swap")
_SECTIONS = ("long_seq", "parallel_config", "model", "model.model_config", "parallel", "context")


def _check_no_dotted_keys(tree: Mapping) -> None:
    """Keys of the sections read here are named by dotted paths (``parallel_config.context_parallel``): a key that
    holds a dot could not be told apart from a nested one.  (Other sections may hold such keys: MindFormers'
    ``swap_config.op_swap`` keys are layer-name patterns like ``.*\\.flash_attention``.)"""
    for path in ("parallel_config", "model.model_config", "long_seq"):
        found, section = _lookup(tree, path)
        for key in (section if found and isinstance(section, Mapping) else ()):
            if isinstance(key, str) and "." in key:
                _fail(path, key, "holds a key with a dot, which no key of this section has",
                      "rename the key without dots (nested keys are written as indented sections)")


def _check_sections(tree: Any) -> None:
    """Every section read here must be a mapping; parallel_config keys must be ones MindFormers knows."""
    if not isinstance(tree, Mapping):
        _fail("<top level>", type(tree).__name__, "a MindFormers config must be a mapping of sections",
              "start the YAML with sections such as model:, parallel_config:, long_seq:")
    _check_no_dotted_keys(tree)
    for path in _SECTIONS:
        found, node = _lookup(tree, path)
        if found and node is not None and not isinstance(node, Mapping):
            _fail(path, node, "must be a section (a mapping of keys)", f"write {path}: followed by indented keys")
    for key in (tree.get("parallel_config") or {}):
        if key not in PARALLEL_CONFIG_KEYS:
            close = difflib.get_close_matches(str(key), PARALLEL_CONFIG_KEYS, n=1, cutoff=0.75)
            hint = (f"did you mean parallel_config.{close[0]}? Rename the key" if close
                    else f"MindFormers accepts only {', '.join(PARALLEL_CONFIG_KEYS)}")
            _fail(f"parallel_config.{key}", tree["parallel_config"][key], "unknown key", hint)
