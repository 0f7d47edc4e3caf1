"""Model shapes for the planner, taken from the model presets of ``mf_longseq.models`` (LLaMA2, Qwen, Qwen1.5).

    shape = model_shape("llama2-70b")        # or "qwen-72b", "qwen1_5-14b" / "qwen1.5-14b", or a YAML path
    shape.layer_params, shape.embedding_params, shape.head_params, shape.total_params

Parameter counts come from ``mf_longseq.models.parameter_shapes`` (the weights the model really has), so the
planner and the model cannot disagree.  There is no separate shape table here.
"""
import os
import re
from dataclasses import dataclass
from typing import Dict

from mf_longseq.families import FAMILIES

# "<family>-<size>": a family of the table ("qwen1_5" also written "qwen1.5"), then a preset size
_MODEL_NAME = re.compile("({})[-_]?(\\w+)".format(
    "|".join(name.replace("_", "[._]") for name in sorted(FAMILIES, key=len, reverse=True))))


@dataclass(frozen=True)
class ModelShape:
    """What the memory and communication models need of a decoder.

    Attributes:
        name: e.g. "llama2-70b".
        hidden, layers, heads, kv_heads, ffn, vocab: the shape (ffn: width of gate/up).
        layer_params: weights of one decoder layer; embedding_params: the token embedding; head_params: the
            LM head (0 when tied); norm_params: the final norm.
    """

    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int
    layer_params: int
    embedding_params: int
    head_params: int
    norm_params: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def total_params(self) -> int:
        return self.layers * self.layer_params + self.embedding_params + self.head_params + self.norm_params


def _presets() -> Dict[str, dict]:
    from mf_longseq.models import CONFIG_CLASSES
    return {name: cls.PRESETS for name, cls in CONFIG_CLASSES.items()}


def available_models() -> list:
    """Every name ``model_shape`` accepts, e.g. ['llama2-13b', 'llama2-70b', ...]."""
    return sorted(f"{family}-{size}" for family, table in _presets().items() for size in table)


def _config_of(name: str):
    from mf_longseq.models import CONFIG_CLASSES, model_config_from
    if name.endswith((".yaml", ".yml")) or os.path.isfile(name):
        return model_config_from(name)
    found = _MODEL_NAME.fullmatch(name.strip().lower())
    family = found.group(1).replace(".", "_") if found else None
    if family is None or found.group(2) not in _presets()[family]:
        raise ValueError(f"--model = {name!r}: unknown model. Fix: use one of {', '.join(available_models())} "
                         "or the path of a YAML with a model.model_config section")
    return CONFIG_CLASSES[family].from_preset(found.group(2))


def model_shape(name: str) -> ModelShape:
    """The shape of a preset ("llama2-70b") or of a YAML's ``model.model_config``."""
    return shape_of(_config_of(name), name)


def shape_of(config, name: str) -> ModelShape:
    """The shape of a model config object (``LongSeqModelConfig``), called ``name``."""
    from mf_longseq.models import parameter_shapes
    sizes = {key: _numel(shape) for key, shape in parameter_shapes(config).items()}
    layer = sum(n for key, n in sizes.items() if key.startswith("model.layers.0."))
    return ModelShape(name=name, hidden=config.hidden_size, layers=config.num_layers, heads=config.num_heads,
                      kv_heads=config.n_kv_heads, ffn=config.ffn_hidden_size, vocab=config.vocab_size,
                      layer_params=layer, embedding_params=sizes["model.embed_tokens.weight"],
                      head_params=sizes.get("lm_head.weight", 0), norm_params=sizes["model.norm.weight"])


def _numel(shape) -> int:
    n = 1
    for dim in shape:
        n *= dim
    return n
