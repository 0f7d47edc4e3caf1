"""Qwen1.5 (7B, 14B, 72B), the Qwen2 architecture: q/k/v bias, RoPE theta 1e6, RMSNorm eps 1e-6, untied
embeddings (for these sizes), vocab 151936 (7B) / 152064 (14B, 72B).

Sizes are the published Hugging Face ``config.json`` shapes of Qwen/Qwen1.5-{7B,14B,72B}.  ``tiny`` is a CPU
test size.
"""
from mf_longseq.config import canonical_model_keys
from mf_longseq.models.decoder import LongSeqForCausalLM, register_classes
from mf_longseq.models.model_config import LongSeqModelConfig, preset_values

QWEN1_5_PRESETS = {
    "7b": dict(hidden_size=4096, num_layers=32, num_heads=32, n_kv_heads=32, intermediate_size=11008,
               vocab_size=151936),
    "14b": dict(hidden_size=5120, num_layers=40, num_heads=40, n_kv_heads=40, intermediate_size=13696,
                vocab_size=152064),
    "72b": dict(hidden_size=8192, num_layers=80, num_heads=64, n_kv_heads=64, intermediate_size=24576,
                vocab_size=152064),
    "tiny": dict(hidden_size=64, num_layers=2, num_heads=4, n_kv_heads=2, intermediate_size=128, vocab_size=256),
}


class Qwen2LongSeqConfig(LongSeqModelConfig):
    """Qwen1.5 / Qwen2 shape (defaults: the 7B's numerics). See ``LongSeqModelConfig`` for the keys."""

    PRESETS = QWEN1_5_PRESETS

    def __init__(self, **kwargs):
        defaults = dict(vocab_size=151936, rms_norm_eps=1e-6, theta=1000000.0, qkv_has_bias=True,
                        tie_word_embeddings=False, family="qwen1_5")
        super().__init__(**{**defaults, **canonical_model_keys(kwargs)})

    @classmethod
    def from_preset(cls, size: str, **overrides) -> "Qwen2LongSeqConfig":
        """The published shape of Qwen1.5-``size`` (7b, 14b, 72b, tiny), with ``overrides`` applied."""
        return cls(**{**preset_values(cls.PRESETS, size, "Qwen1.5"), **overrides})


class Qwen2LongSeqForCausalLM(LongSeqForCausalLM):
    """Qwen1.5 causal LM with context-parallel attention (see ``LongSeqForCausalLM``)."""

    config_class = Qwen2LongSeqConfig


register_classes(Qwen2LongSeqConfig)          # the model name: registry.py (mf_route/models.py)
