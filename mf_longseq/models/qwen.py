"""Qwen (v1: 7B, 14B, 72B): q/k/v bias, RMSNorm eps 1e-6, untied embeddings, RoPE theta 1e4 (72B: 1e6).

Qwen v1's ``intermediate_size`` counts *both* SwiGLU halves: its Hugging Face MLP has ``w1`` and ``w2`` of width
``intermediate_size // 2`` (Qwen-7B: 22016 -> 11008).  ``QwenLongSeqConfig`` keeps that convention for the key
(so a Qwen ``config.json`` or MindFormers Qwen YAML value reads unchanged) and builds the decoder with
``ffn_hidden_size = intermediate_size // 2``.  The fused ``c_attn`` (q, k, v) weight and the ``w1`` (up) /
``w2`` (gate) names are a checkpoint matter: ``mf_longseq.models.convert`` maps them.

Sizes are the published ``config.json`` shapes of Qwen/Qwen-{7B,14B,72B}.  ``tiny`` is a CPU test size.
"""
from mf_longseq.config import canonical_model_keys
from mf_longseq.models.decoder import LongSeqForCausalLM, register_classes
from mf_longseq.models.model_config import LongSeqModelConfig, _fail, preset_values

QWEN_PRESETS = {
    "7b": dict(hidden_size=4096, num_layers=32, num_heads=32, intermediate_size=22016, vocab_size=151936),
    "14b": dict(hidden_size=5120, num_layers=40, num_heads=40, intermediate_size=27392, vocab_size=152064),
    "72b": dict(hidden_size=8192, num_layers=80, num_heads=64, intermediate_size=49152, vocab_size=152064,
                theta=1000000.0),
    "tiny": dict(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=256, vocab_size=256),
}


class QwenLongSeqConfig(LongSeqModelConfig):
    """Qwen v1 shape (defaults: the 7B's). ``intermediate_size`` is Qwen v1's (twice the FFN width)."""

    PRESETS = QWEN_PRESETS

    def __init__(self, **kwargs):
        defaults = dict(vocab_size=151936, intermediate_size=22016, rms_norm_eps=1e-6, theta=10000.0,
                        qkv_has_bias=True, tie_word_embeddings=False, family="qwen")
        super().__init__(**{**defaults, **canonical_model_keys(kwargs)})

    @property
    def ffn_hidden_size(self) -> int:
        return int(self.intermediate_size) // 2

    def validate(self) -> None:
        self.check_values()
        if self.intermediate_size is None or self.intermediate_size % 2:
            _fail("intermediate_size", self.intermediate_size, "Qwen v1 counts both SwiGLU halves, so it must be "
                  "an even number", "set intermediate_size to twice the FFN width (Qwen-7B: 22016)")
        super().validate()

    @classmethod
    def from_preset(cls, size: str, **overrides) -> "QwenLongSeqConfig":
        """The published shape of Qwen-``size`` (7b, 14b, 72b, tiny), with ``overrides`` applied."""
        return cls(**{**preset_values(cls.PRESETS, size, "Qwen"), **overrides})


class QwenLongSeqForCausalLM(LongSeqForCausalLM):
    """Qwen v1 causal LM with context-parallel attention (see ``LongSeqForCausalLM``)."""

    config_class = QwenLongSeqConfig


register_classes(QwenLongSeqConfig)           # the model name: registry.py (mf_route/models.py)
