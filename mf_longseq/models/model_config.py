"""LongSeqModelConfig: the shape of one decoder (LLaMA2, Qwen v1, Qwen1.5), as a MindFormers ``PretrainedConfig``.

Keys follow MindFormers' ``model.model_config`` spellings (``num_heads``, ``n_kv_heads``, ``num_layers``,
``theta``, ``qkv_has_bias``, ``compute_dtype``...), so a MindFormers LLaMA YAML section reads unchanged.  The FFN
width is ``intermediate_size`` when given, else MindFormers' LLaMA rule (``multiple_of``,
``ffn_dim_multiplier``); Qwen v1 overrides ``ffn_hidden_size`` (its ``intermediate_size`` counts both halves).

``parameter_shapes(config)`` lists every weight with its shape without allocating anything; the parameter
counts, the checkpoint converter and the tests all use it.
"""
from collections import OrderedDict
from typing import Any, Dict, Optional, Tuple

from mindformers.models.configuration_utils import PretrainedConfig

DTYPES = ("float32", "bfloat16", "float16")
FAMILIES = ("llama2", "qwen", "qwen1_5")


def _fail(key: str, value: Any, problem: str, fix: str):
    raise ValueError(f"model.model_config.{key} = {value!r}: {problem}. Fix: {fix}.")


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
        num_layers: decoder layers.
        num_heads: query heads N; head_dim = hidden_size / num_heads.
        n_kv_heads: key/value heads K (GQA); None means num_heads.
        intermediate_size: FFN width (gate/up output); None: computed from ``multiple_of`` and
            ``ffn_dim_multiplier`` as MindFormers' LLaMA does.
        multiple_of, ffn_dim_multiplier: LLaMA FFN rounding (used only when ``intermediate_size`` is None).
        rms_norm_eps: RMSNorm epsilon.
        theta: RoPE base.
        qkv_has_bias: bias on the q/k/v projections (Qwen v1 and Qwen1.5).
        tie_word_embeddings: the LM head reuses the embedding table.
        seq_length: tokens per sample (the whole sequence, before context parallelism splits it).
        compute_dtype: float32, bfloat16 or float16: dtype of matmuls and activations; softmax, RMSNorm
            statistics, attention merges and the loss stay float32.
        param_init_type: dtype the weights are stored in.
        initializer_range: std of the normal init of projections and embeddings.
        init_seed: seed of the weight init (every rank draws the same weights without communication).
        use_flash_attention, use_attn_mask_compression: read by ``LongSeqConfig`` (Ascend kernel settings).
        use_eod_reset: with packed documents (``actual_seq_len`` given to the model), RoPE positions restart at
            0 in every document instead of running 0..S-1 over the packed sample (MindFormers' key).
        long_seq: optional dict of the plugin's own knobs (``layout``, ``block_size``) when the model is built by
            MindFormers' builder from ``model.model_config`` alone.
        family: llama2, qwen or qwen1_5 (set by the family classes).
    """

    model_type = "mf_longseq"

    def __init__(self, vocab_size: int = 32000, hidden_size: int = 4096, num_layers: int = 32,
                 num_heads: int = 32, n_kv_heads: Optional[int] = None, intermediate_size: Optional[int] = None,
                 multiple_of: int = 256, ffn_dim_multiplier: Optional[float] = None, rms_norm_eps: float = 1e-5,
                 theta: float = 10000.0, qkv_has_bias: bool = False, tie_word_embeddings: bool = False,
                 seq_length: int = 4096, compute_dtype: str = "float32", param_init_type: str = "float32",
                 initializer_range: float = 0.02, init_seed: int = 1234, use_flash_attention: bool = True,
                 use_attn_mask_compression: bool = False, use_eod_reset: bool = False,
                 long_seq: Optional[dict] = None, family: str = "llama2", **kwargs):
        super().__init__(**kwargs)
        self.vocab_size, self.hidden_size, self.num_layers = vocab_size, hidden_size, num_layers
        self.num_heads = num_heads
        self.n_kv_heads = num_heads if n_kv_heads is None else n_kv_heads
        self.intermediate_size, self.multiple_of, self.ffn_dim_multiplier = (intermediate_size, multiple_of,
                                                                              ffn_dim_multiplier)
        self.rms_norm_eps, self.theta = float(rms_norm_eps), float(theta)
        self.qkv_has_bias, self.tie_word_embeddings = bool(qkv_has_bias), bool(tie_word_embeddings)
        self.seq_length = seq_length
        self.compute_dtype, self.param_init_type = _dtype_name(compute_dtype), _dtype_name(param_init_type)
        self.initializer_range, self.init_seed = float(initializer_range), int(init_seed)
        self.use_flash_attention, self.use_attn_mask_compression = use_flash_attention, use_attn_mask_compression
        self.use_eod_reset = use_eod_reset
        self.long_seq = dict(long_seq or {})
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

    def validate(self) -> None:
        """Check the shape; raise ValueError naming the key, the value and a fix."""
        for key in ("vocab_size", "hidden_size", "num_layers", "num_heads", "n_kv_heads", "seq_length"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                _fail(key, value, "must be a positive integer", f"set {key} to 1 or more")
        if self.hidden_size % self.num_heads:
            _fail("hidden_size", self.hidden_size, f"must be divisible by num_heads = {self.num_heads}",
                  "choose hidden_size = num_heads x head_dim")
        if self.head_dim % 2:
            _fail("hidden_size", self.hidden_size, f"gives an odd head_dim {self.head_dim}; rotary embedding "
                  "rotates pairs of dimensions", "choose hidden_size / num_heads even")
        if self.num_heads % self.n_kv_heads:
            _fail("n_kv_heads", self.n_kv_heads, f"must divide num_heads = {self.num_heads}",
                  f"use one of {[d for d in range(1, self.num_heads + 1) if self.num_heads % d == 0]}")
        if self.ffn_hidden_size < 1:
            _fail("intermediate_size", self.intermediate_size, "gives an empty FFN", "set a positive width")
        if not isinstance(self.use_eod_reset, bool):
            _fail("use_eod_reset", self.use_eod_reset, "must be True or False",
                  "set use_eod_reset: True (RoPE positions restart per packed document) or False")
        if self.family not in FAMILIES:
            _fail("family", self.family, "unknown model family", f"use one of {', '.join(FAMILIES)}")

    def long_seq_values(self) -> Dict[str, Any]:
        """LongSeqConfig fields this model config knows (shape, Ascend kernel flags, parallel_config if set).

        MindFormers' trainer sets ``parallel_config`` on the model config before building the network, so a model
        built by MindFormers' builder still sees the context-parallel degrees.
        """
        values = {"seq_length": self.seq_length, "num_heads": self.num_heads, "num_kv_heads": self.n_kv_heads,
                  "num_layers": self.num_layers, "use_flash_attention": bool(self.use_flash_attention),
                  "use_attn_mask_compression": bool(self.use_attn_mask_compression)}
        parallel = _as_plain_dict(getattr(self, "parallel_config", None))
        for key, name in (("data_parallel", "data_parallel"), ("model_parallel", "model_parallel"),
                          ("context_parallel", "context_parallel"), ("pipeline_stage", "pipeline_stage"),
                          ("micro_batch_num", "micro_batch_num"), ("context_parallel_algo", "context_parallel_algo"),
                          ("ulysses_degree_in_cp", "ulysses_degree_in_cp"), ("use_seq_parallel", "use_seq_parallel")):
            if parallel.get(key) is not None:
                value = parallel[key]
                values[name] = getattr(value, "value", value)       # enums (ContextParallelAlgo) -> their string
        for key in ("layout", "block_size"):
            if key in self.long_seq:
                values[key] = self.long_seq[key]
        return values


def _dtype_name(value) -> str:
    """'float32' / 'bfloat16' / 'float16' from a string or a MindSpore dtype."""
    name = str(value).lower().replace("mindspore.", "")
    aliases = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
    name = aliases.get(name, name)
    if name not in DTYPES:
        _fail("compute_dtype", value, "unsupported dtype", f"use one of {', '.join(DTYPES)}")
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


def count_parameters(config: LongSeqModelConfig) -> int:
    """Total number of weights, from the shapes alone (nothing is allocated)."""
    total = 0
    for shape in parameter_shapes(config).values():
        n = 1
        for dim in shape:
            n *= dim
        total += n
    return total


__all__ = ["LongSeqModelConfig", "preset_values", "parameter_shapes", "count_parameters", "llama_ffn_size",
           "DTYPES", "FAMILIES"]
