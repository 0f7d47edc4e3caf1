"""LongSeqModelConfig: the shape of one decoder (LLaMA2, Qwen v1, Qwen1.5), as a MindFormers ``PretrainedConfig``.

Keys follow MindFormers' ``model.model_config`` spellings (``num_heads``, ``n_kv_heads``, ``num_layers``,
``theta``, ``qkv_has_bias``, ``compute_dtype``...), so a MindFormers LLaMA YAML section reads unchanged.  The FFN
width is ``intermediate_size`` when given, else MindFormers' LLaMA rule (``multiple_of``,
``ffn_dim_multiplier``); Qwen v1 overrides ``ffn_hidden_size`` (its ``intermediate_size`` counts both halves).

``parameter_shapes(config)`` lists every weight with its shape without allocating anything; the parameter
counts, the checkpoint converter and the tests all use it.
"""
import math
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any, Dict, Optional, Tuple

import numpy as np
from mindformers.models.configuration_utils import PretrainedConfig

from mf_longseq.config import (DEFAULT_NUM_LAYERS, MAX_COUNT, MODEL_KEY_ALIASES, ConfigError, _divisors,
                               canonical_model_keys, section_fields)
from mf_longseq.families import FAMILIES as FAMILY_TABLE

DTYPES = ("float32", "bfloat16", "float16")
FAMILIES = tuple(FAMILY_TABLE)                    # the names of ``mf_longseq/families.py``'s table
_DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}

# Value rules of every key LongSeqModelConfig reads (checked before any conversion, so bad input is a ConfigError
# naming the key, never a TypeError or OverflowError from float() / int()).
_POSITIVE_INTS = ("vocab_size", "hidden_size", "num_layers", "num_heads", "n_kv_heads", "seq_length", "multiple_of")
_POSITIVE_NUMBERS = ("rms_norm_eps", "theta")
_BOOLS = ("qkv_has_bias", "tie_word_embeddings", "use_flash_attention", "use_attn_mask_compression",
          "use_eod_reset")


def _fail(key: str, value: Any, problem: str, fix: str):
    raise ConfigError(f"model.model_config.{key}", value, problem, fix)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(key: str, value, *, positive: bool) -> float:
    """``value`` as a finite float (YAML 1.1 reads ``1e-5`` as a string, so numeric strings are accepted)."""
    try:
        number = float(value) if isinstance(value, (int, float, str)) and not isinstance(value, bool) else None
    except (ValueError, OverflowError):
        number = None
    if number is None or not math.isfinite(number) or number < 0 or (positive and number == 0):
        sign = "positive" if positive else "non-negative"
        _fail(key, value, f"must be a finite {sign} number", f"set {key} to a {sign} number, e.g. 1.0e-5 or 10000.0")
    return number


def llama_ffn_size(hidden_size: int, multiple_of: int, ffn_dim_multiplier: Optional[float]) -> int:
    """MindFormers' / Meta's LLaMA FFN width: 2/3 of 4H, times the multiplier, rounded up to ``multiple_of``."""
    width = int(2 * 4 * hidden_size / 3)
    if ffn_dim_multiplier is not None:
        width = int(ffn_dim_multiplier * width)
    return multiple_of * ((width + multiple_of - 1) // multiple_of)


class LongSeqModelConfig(PretrainedConfig):
    """Shape and numerics of the shared decoder.

    Args:
        vocab_size: vocabulary size (rows of the embedding and of the LM head).
        hidden_size: model width H.
        num_layers: decoder layers (alias ``num_hidden_layers``).
        num_heads: query heads N; head_dim = hidden_size / num_heads (alias ``num_attention_heads``).
        n_kv_heads: key/value heads K (GQA); None means num_heads (alias ``num_key_value_heads``).
        intermediate_size: FFN width (gate/up output); None: computed from ``multiple_of`` and
            ``ffn_dim_multiplier`` as MindFormers' LLaMA does.
        multiple_of, ffn_dim_multiplier: LLaMA FFN rounding (used only when ``intermediate_size`` is None).
        rms_norm_eps: RMSNorm epsilon.
        theta: RoPE base (alias ``rope_theta``).
        qkv_has_bias: bias on the q/k/v projections (Qwen v1 and Qwen1.5).
        tie_word_embeddings: the LM head reuses the embedding table.
        seq_length: tokens per sample (the whole sequence, before context parallelism splits it).
        compute_dtype: float32, bfloat16 or float16: dtype of matmuls and activations; softmax, RMSNorm
            statistics, attention merges and the loss stay float32.
        param_init_type: dtype the weights are stored in.
        initializer_range: std of the normal init of projections and embeddings.
        init_seed: seed of the weight init (every rank draws the same weights without communication).
        use_flash_attention: FlashAttentionScore on Ascend (required there when CP > 1; ``LongSeqConfig.check_model``).
        use_attn_mask_compression: visibility from positions and document ids, the fixed 2048 x 2048 compressed
            mask for FlashAttentionScore; False: the (B, 1, S, S) dense mask MindFormers builds.
        use_eod_reset: with packed documents (``actual_seq_len`` given to the model), RoPE positions restart at
            0 in every document instead of running 0..S-1 over the packed sample (MindFormers' key).
        long_seq: optional dict of the plugin's own knobs (``layout``, ``block_size``) when the model is built by
            MindFormers' builder from ``model.model_config`` alone.
        family: llama2, qwen or qwen1_5 (set by the family classes).

    Aliases (``MODEL_KEY_ALIASES`` in ``mf_longseq.config``) are resolved by the family classes before this
    constructor runs; two spellings with different values are refused.

    Raises:
        ConfigError: a value of the wrong type or range, or a broken shape rule (names the key and the fix).
    """

    model_type = "mf_longseq"
    PRESETS: Dict[str, dict] = {}       # size -> published shape (each family's config class sets its own)

    def __init__(self, vocab_size: int = 32000, hidden_size: int = 4096, num_layers: int = DEFAULT_NUM_LAYERS,
                 num_heads: int = 32, n_kv_heads: Optional[int] = None, intermediate_size: Optional[int] = None,
                 multiple_of: int = 256, ffn_dim_multiplier: Optional[float] = None, rms_norm_eps: float = 1e-5,
                 theta: float = 10000.0, qkv_has_bias: bool = False, tie_word_embeddings: bool = False,
                 seq_length: int = 4096, compute_dtype: str = "float32", param_init_type: str = "float32",
                 initializer_range: float = 0.02, init_seed: int = 1234, use_flash_attention: bool = True,
                 use_attn_mask_compression: bool = False, use_eod_reset: bool = False,
                 long_seq: Optional[dict] = None, family: str = "llama2", **kwargs):
        aliases = [k for others in MODEL_KEY_ALIASES.values() for k in others if k in kwargs]
        if aliases:
            _fail(aliases[0], kwargs[aliases[0]], "is an alias that LongSeqModelConfig does not resolve itself",
                  "build the config with a family class (LlamaLongSeqConfig, ...) or use the canonical key")
        derived = [k for k in kwargs if isinstance(getattr(type(self), str(k), None), property)]
        if derived:
            _fail(derived[0], kwargs[derived[0]], "is computed from the other keys and cannot be set",
                  "remove it (head_dim = hidden_size / num_heads; the FFN width is intermediate_size)")
        super().__init__(**kwargs)
        self.vocab_size, self.hidden_size, self.num_layers = vocab_size, hidden_size, num_layers
        self.num_heads = num_heads
        self.n_kv_heads = num_heads if n_kv_heads is None else n_kv_heads
        self.intermediate_size, self.multiple_of, self.ffn_dim_multiplier = (intermediate_size, multiple_of,
                                                                              ffn_dim_multiplier)
        self.rms_norm_eps, self.theta = rms_norm_eps, theta
        self.qkv_has_bias, self.tie_word_embeddings = qkv_has_bias, tie_word_embeddings
        self.seq_length = seq_length
        self.compute_dtype, self.param_init_type = compute_dtype, param_init_type
        self.initializer_range, self.init_seed = initializer_range, init_seed
        self.use_flash_attention, self.use_attn_mask_compression = use_flash_attention, use_attn_mask_compression
        self.use_eod_reset = use_eod_reset
        self.long_seq = long_seq
        self.family = family
        self.validate()

    # ------------------------------------------------------------------------------------------- derived
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def ffn_hidden_size(self) -> int:
        """Width of the gate/up projections."""
        if self.intermediate_size is not None:
            return int(self.intermediate_size)
        return llama_ffn_size(self.hidden_size, self.multiple_of, self.ffn_dim_multiplier)

    def check_values(self) -> None:
        """Type and range of every key, then the normalised values (floats, dtype names, a dict ``long_seq``)."""
        for key in _POSITIVE_INTS:
            value = getattr(self, key)
            if not _is_int(value) or not 1 <= value <= MAX_COUNT:
                _fail(key, value, f"must be a positive integer (at most {MAX_COUNT})", f"set {key} to 1 or more")
        for key in ("intermediate_size",):
            value = getattr(self, key)
            if value is not None and (not _is_int(value) or not 1 <= value <= MAX_COUNT):
                _fail(key, value, f"must be a positive integer (at most {MAX_COUNT})",
                      f"set {key} to the FFN width, or remove it to use MindFormers' LLaMA rule")
        for key in _POSITIVE_NUMBERS:
            setattr(self, key, _number(key, getattr(self, key), positive=True))
        if self.ffn_dim_multiplier is not None:
            self.ffn_dim_multiplier = _number("ffn_dim_multiplier", self.ffn_dim_multiplier, positive=True)
        self.initializer_range = _number("initializer_range", self.initializer_range, positive=False)
        if not _is_int(self.init_seed) or not 0 <= self.init_seed < 2 ** 32:
            _fail("init_seed", self.init_seed, "must be an integer in [0, 2**32)", "set init_seed to e.g. 1234")
        for key in _BOOLS:
            if not isinstance(getattr(self, key), bool):
                _fail(key, getattr(self, key), "must be True or False", f"write {key}: True or False")
        self.compute_dtype = _dtype_name("compute_dtype", self.compute_dtype)
        self.param_init_type = _dtype_name("param_init_type", self.param_init_type)
        if self.long_seq is not None and not isinstance(self.long_seq, Mapping):
            _fail("long_seq", self.long_seq, "must be a mapping of the plugin's keys", "write long_seq: {layout: "
                  "zigzag} or remove it")
        self.long_seq = dict(self.long_seq or {})
        if not isinstance(self.family, str) or self.family not in FAMILIES:
            _fail("family", self.family, "unknown model family", f"use one of {', '.join(FAMILIES)}")

    def validate(self) -> None:
        """Check every value and the shape rules; raise ConfigError naming the key, the value and a fix."""
        self.check_values()
        if self.hidden_size % self.num_heads:
            _fail("hidden_size", self.hidden_size, f"must be divisible by num_heads = {self.num_heads}",
                  "choose hidden_size = num_heads x head_dim")
        if self.head_dim % 2:
            _fail("hidden_size", self.hidden_size, f"gives an odd head_dim {self.head_dim}; rotary embedding "
                  "rotates pairs of dimensions", "choose hidden_size / num_heads even")
        if self.num_heads % self.n_kv_heads:
            _fail("n_kv_heads", self.n_kv_heads, f"must divide num_heads = {self.num_heads}",
                  f"use one of {_divisors(self.num_heads)}")
        if not 1 <= self.ffn_hidden_size <= MAX_COUNT:
            _fail("intermediate_size", self.intermediate_size, f"gives an FFN width of {self.ffn_hidden_size}",
                  f"set a width between 1 and {MAX_COUNT}")

    def parallel_values(self) -> Dict[str, Any]:
        """``LongSeqConfig`` fields this model config carries: the ``parallel_config`` MindFormers' trainer sets on
        it before building the network, and the plugin's ``long_seq`` knobs, read through the one key map of
        ``mf_longseq.config`` (``section_fields``).  The model's own facts stay here (``LongSeqConfig`` has none).
        """
        values = {}
        parallel = _as_plain_dict(getattr(self, "parallel_config", None))
        for name, key in section_fields("parallel_config").items():
            if parallel.get(key) is not None:
                value = parallel[key]
                values[name] = getattr(value, "value", value)       # enums (ContextParallelAlgo) -> their string
        for name, key in section_fields("long_seq").items():
            if key in self.long_seq:
                values[name] = self.long_seq[key]
        return values


def check_model_parallel(config: LongSeqModelConfig, model_parallel: int) -> None:
    """The vocabulary and the FFN width split evenly over ``model_parallel`` ranks (tensor-parallel layers).

    Raises:
        ConfigError: on ``parallel_config.model_parallel``.
    """
    if config.vocab_size % model_parallel or config.ffn_hidden_size % model_parallel:
        raise ConfigError("parallel_config.model_parallel", model_parallel,
                          f"must divide model.model_config.vocab_size = {config.vocab_size} and the FFN width "
                          f"{config.ffn_hidden_size}", "pad the vocabulary / choose a model_parallel dividing both")


def _dtype_name(key: str, value) -> str:
    """'float32' / 'bfloat16' / 'float16' from a string or a MindSpore dtype."""
    name = str(value).lower().replace("mindspore.", "") if isinstance(value, str) or hasattr(value, "dtype") \
        or type(value).__module__.startswith("mindspore") else None
    name = _DTYPE_ALIASES.get(name, name)
    if name not in DTYPES:
        _fail(key, value, "unsupported dtype", f"use one of {', '.join(DTYPES)}")
    return name


def _as_plain_dict(obj) -> dict:
    if obj is None:
        return {}
    if isinstance(obj, dict):
        return dict(obj)
    if hasattr(obj, "to_dict"):
        try:
            return dict(obj.to_dict())
        except TypeError:
            pass
    return {k: getattr(obj, k) for k in dir(obj) if not k.startswith("_") and not callable(getattr(obj, k, None))}


def preset_values(table: dict, size: str, family: str) -> dict:
    """A copy of ``table[size]``; ValueError listing the sizes when there is none."""
    if size not in table:
        raise ValueError(f"size = {size!r}: no {family} preset. Fix: use one of {', '.join(table)}.")
    return dict(table[size])


def parameter_shapes(config: LongSeqModelConfig) -> "OrderedDict[str, Tuple[int, ...]]":
    """Every weight of ``LongSeqForCausalLM`` (Hugging Face LLaMA/Qwen2 names) and its shape, in model order.

    Weights are (out_features, in_features), as in ``nn.Dense`` and Hugging Face.
    """
    h, v, d = config.hidden_size, config.vocab_size, config.head_dim
    q_out, kv_out, ffn = config.num_heads * d, config.n_kv_heads * d, config.ffn_hidden_size
    shapes = OrderedDict()
    shapes["model.embed_tokens.weight"] = (v, h)
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (h,)
        for name, out in (("q_proj", q_out), ("k_proj", kv_out), ("v_proj", kv_out)):
            shapes[p + f"self_attn.{name}.weight"] = (out, h)
            if config.qkv_has_bias:
                shapes[p + f"self_attn.{name}.bias"] = (out,)
        shapes[p + "self_attn.o_proj.weight"] = (h, q_out)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
        shapes[p + "mlp.gate_proj.weight"] = (ffn, h)
        shapes[p + "mlp.up_proj.weight"] = (ffn, h)
        shapes[p + "mlp.down_proj.weight"] = (h, ffn)
    shapes["model.norm.weight"] = (h,)
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (v, h)
    return shapes


def check_weights(weights: Dict[str, np.ndarray], config: LongSeqModelConfig, source: str) -> None:
    """Every weight the model has, with its shape, and nothing else (raises ValueError naming the first issue)."""
    shapes = parameter_shapes(config)
    missing = [n for n in shapes if n not in weights]
    if missing:
        raise ValueError(f"{source}: {len(missing)} weights of the model are missing (first: {missing[0]}). "
                         "Fix: convert with the config the checkpoint was trained with.")
    extra = [n for n in weights if n not in shapes]
    if extra:
        raise ValueError(f"{source}: {len(extra)} tensors the model does not have (first: {extra[0]}). "
                         "Fix: check the model family and config.")
    for name, shape in shapes.items():
        if tuple(weights[name].shape) != tuple(shape):
            raise ValueError(f"{source}: {name} has shape {tuple(weights[name].shape)}, the model expects "
                             f"{tuple(shape)}. Fix: convert with the config the checkpoint was trained with.")


def count_parameters(config: LongSeqModelConfig) -> int:
    """Total number of weights, from the shapes alone (nothing is allocated)."""
    total = 0
    for shape in parameter_shapes(config).values():
        n = 1
        for dim in shape:
            n *= dim
        total += n
    return total


__all__ = ["LongSeqModelConfig", "preset_values", "parameter_shapes", "check_weights", "count_parameters", "llama_ffn_size",
           "check_model_parallel", "DTYPES", "FAMILIES"]
