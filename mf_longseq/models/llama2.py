"""LLaMA2 (7B, 13B, 70B): the shared decoder without q/k/v bias, RoPE theta 1e4, RMSNorm eps 1e-5, vocab 32000.

Sizes are the published Hugging Face ``config.json`` shapes of meta-llama/Llama-2-{7b,13b,70b}-hf
(70B: 8 kv heads, FFN 28672).  ``tiny`` is a CPU test size.
"""
from mf_longseq.config import canonical_model_keys
from mf_longseq.models.decoder import LongSeqForCausalLM, register_classes
from mf_longseq.models.model_config import LongSeqModelConfig, preset_values

LLAMA2_PRESETS = {
    "7b": dict(hidden_size=4096, num_layers=32, num_heads=32, n_kv_heads=32, intermediate_size=11008),
    "13b": dict(hidden_size=5120, num_layers=40, num_heads=40, n_kv_heads=40, intermediate_size=13824),
    "70b": dict(hidden_size=8192, num_layers=80, num_heads=64, n_kv_heads=8, intermediate_size=28672),
    "tiny": dict(hidden_size=64, num_layers=2, num_heads=4, n_kv_heads=2, intermediate_size=128, vocab_size=256),
}


class LlamaLongSeqConfig(LongSeqModelConfig):
    """LLaMA2 shape (defaults: the 7B's numerics). See ``LongSeqModelConfig`` for the keys."""

    PRESETS = LLAMA2_PRESETS

    def __init__(self, **kwargs):
        defaults = dict(vocab_size=32000, rms_norm_eps=1e-5, theta=10000.0, qkv_has_bias=False,
                        tie_word_embeddings=False, family="llama2")
        super().__init__(**{**defaults, **canonical_model_keys(kwargs)})

    @classmethod
    def from_preset(cls, size: str, **overrides) -> "LlamaLongSeqConfig":
        """The published shape of LLaMA2-``size`` (7b, 13b, 70b, tiny), with ``overrides`` applied."""
        return cls(**{**preset_values(cls.PRESETS, size, "LLaMA2"), **overrides})


class LlamaLongSeqForCausalLM(LongSeqForCausalLM):
    """LLaMA2 causal LM with context-parallel attention (see ``LongSeqForCausalLM``)."""

    config_class = LlamaLongSeqConfig


register_classes(LlamaLongSeqConfig)          # the model name: registry.py (mf_route/models.py)
