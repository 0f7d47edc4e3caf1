"""The model families mf_longseq builds (LLaMA2, Qwen v1, Qwen1.5), in one table.

    from mf_longseq.families import FAMILIES, family
    family("qwen1_5").config_class         # 'Qwen2LongSeqConfig'

Every part that names a family reads this table: the model builder (``models/build.py``: the classes of
``module``), the model config's check of ``family``, the planner (``plan --model <family>-<size>``, the emitted
YAML's class names), the checkpoint converter (Hugging Face ``architectures`` / ``model_type``), ``adopt``
(MindFormers' own class names), the YAML templates (``yaml_templates/generate.py``: titles, token ids) and the
registry (``registry.py``: the names ``auto_register`` reaches).  A family's shape rules, numerics defaults and
preset sizes stay in its module (``Family.module``: the config class's ``PRESETS``).

This module imports nothing (no MindSpore, no MindFormers), so any layer may read it.
"""
from dataclasses import dataclass
from typing import Dict, Tuple


@dataclass(frozen=True)
class Family:
    """One model family.

    Attributes:
        name: the key everywhere (``LongSeqModelConfig.family``, ``plan --model <name>-<size>``, template folder).
        title: its name in prose and headers (``LLaMA2``).
        module: the module defining the config and model classes (it registers the config class in MindFormers).
        config_class, model_class: the registered class names (``model.model_config.type``, ``model.arch.type``).
        hf_architecture, hf_model_type: Hugging Face ``config.json`` ``architectures[0]`` and ``model_type``.
        mindformers_classes: MindFormers' own (``model_config.type``, ``arch.type``) that ``adopt`` rewrites to
            this family (empty: none).
        token_ids: (bos, eos, pad) of the published tokenizer, written into the templates.
    """

    name: str
    title: str
    module: str
    config_class: str
    model_class: str
    hf_architecture: str
    hf_model_type: str
    mindformers_classes: Tuple[str, ...]
    token_ids: Tuple[int, int, int]


FAMILIES: Dict[str, Family] = {f.name: f for f in (
    Family("llama2", "LLaMA2", "mf_longseq.models.llama2", "LlamaLongSeqConfig", "LlamaLongSeqForCausalLM",
           "LlamaForCausalLM", "llama", ("LlamaConfig", "LlamaForCausalLM"), (1, 2, 0)),
    Family("qwen", "Qwen", "mf_longseq.models.qwen", "QwenLongSeqConfig", "QwenLongSeqForCausalLM",
           "QWenLMHeadModel", "qwen", ("QwenConfig", "QwenForCausalLM"), (151643, 151643, 151643)),
    Family("qwen1_5", "Qwen1.5", "mf_longseq.models.qwen1_5", "Qwen2LongSeqConfig", "Qwen2LongSeqForCausalLM",
           "Qwen2ForCausalLM", "qwen2", ("Qwen2Config", "Qwen2ForCausalLM"), (151643, 151643, 151643)),
)}


def family(name: str) -> Family:
    """The family called ``name``; ValueError listing the families when there is none."""
    if name not in FAMILIES:
        raise ValueError(f"model family {name!r}: unknown. Fix: use one of {', '.join(FAMILIES)}.")
    return FAMILIES[name]


__all__ = ["Family", "FAMILIES", "family"]
