"""``build_model``: a LLaMA2 / Qwen / Qwen1.5 model with context-parallel attention from a MindFormers config.

    model = build_model("yaml_templates/tiny/llama2_tiny_s256_cp2_colossalai_cp.yaml")   # mesh from the YAML
    loss_sum, token_count = model(input_ids_local, labels_local, loss_mask_local)

The classes are the ones the YAML names (``model.model_config.type`` and ``model.arch.type``, looked up in
MindFormers' registry), so the same file builds through MindFormers' own ``build_network(config.model)``.  The
name ``model.arch.type`` registers is a class of ``mf_route/models.py`` (MindFormers' column forms, settings read
from MindFormers); ``build_model`` builds the plain model of this package it extends (``plain_model``), unless
asked for the registered one (``registered=True``: MindFormers' Trainer route).  The parallel settings come from
the same file through ``LongSeqConfig.from_mindformers``; the mesh, when not given, from those settings.
"""
import importlib
from typing import Any, Optional

from mindformers.tools.register import MindFormerModuleType, MindFormerRegister

from mf_longseq.config import ConfigError, LongSeqConfig, _as_dict, check_offload, model_config_section
from mf_longseq.families import FAMILIES
from mf_longseq.models.decoder import LongSeqForCausalLM
from mf_longseq.models.model_config import LongSeqModelConfig
from mf_longseq.models.offload import apply_offload
from mf_longseq.parallel.mesh import Mesh


def _family_classes(attribute: str) -> dict:
    """family name -> the class its module defines (``families.py``: ``config_class`` or ``model_class``); importing
    the module registers its classes in MindFormers' registry."""
    return {name: getattr(importlib.import_module(f.module), getattr(f, attribute)) for name, f in FAMILIES.items()}


CONFIG_CLASSES = _family_classes("config_class")
MODEL_CLASSES = _family_classes("model_class")


def _registered(kind, name: str, key: str, base: type) -> type:
    ours = ", ".join(sorted(c.__name__ for c in (CONFIG_CLASSES if base is LongSeqModelConfig
                                                  else MODEL_CLASSES).values()))
    try:
        cls = MindFormerRegister.get_cls(kind, name) if isinstance(name, str) and name and \
            MindFormerRegister.is_exist(kind, name) else None
    except ValueError:                              # MindFormers' own lookup refuses some names outright
        cls = None
    if cls is None:
        raise ConfigError(key, name, "not registered in MindFormers", f"use one of {ours} (import mf_longseq.models "
                          "first)")
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise ConfigError(key, name, "a MindFormers class, not one of mf_longseq's, so it has no context-parallel "
                          "attention", f"use one of {ours}")
    return cls


def model_config_from(tree: Any) -> LongSeqModelConfig:
    """The ``model.model_config`` section of a MindFormers config (YAML path, dict, MindFormerConfig) as our config."""
    section = dict(model_config_section(_as_dict(tree)))
    if not section:
        raise ConfigError("model.model_config", None, "missing", "add a model: {model_config: {type: "
                          "LlamaLongSeqConfig, ...}, arch: {type: LlamaLongSeqForCausalLM}} section")
    section.pop("auto_register", None)
    name = section.pop("type", "LlamaLongSeqConfig")
    config_cls = _registered(MindFormerModuleType.CONFIG, name, "model.model_config.type", LongSeqModelConfig)
    strange = [k for k in section if not isinstance(k, str)]
    if strange:
        raise ConfigError(f"model.model_config.{strange[0]}", section[strange[0]], "a key must be a name",
                          "write the key as text")
    return config_cls(**section)


def model_class_from(tree: Any, model_config: LongSeqModelConfig, registered: bool = False) -> type:
    """The ``*ForCausalLM`` class ``model.arch.type`` names (default: the family's class): the plain model of this
    package (``registered`` False), or the class registered under that name (``registered`` True)."""
    model = _as_dict(tree).get("model")
    arch = model.get("arch") if isinstance(model, dict) else None
    if arch is not None and not isinstance(arch, dict):
        raise ConfigError("model.arch", arch, "must be a section (a mapping of keys)",
                          "write model.arch: {type: LlamaLongSeqForCausalLM}")
    name = arch["type"] if arch and "type" in arch else FAMILIES[model_config.family].model_class
    cls = _registered(MindFormerModuleType.MODELS, name, "model.arch.type", LongSeqForCausalLM)
    return cls if registered else (cls.plain_model or cls)


def default_mesh(long_seq: LongSeqConfig) -> Mesh:
    """``Mesh.from_config``; communication groups created when it spans more than one rank."""
    mesh = Mesh.from_config(long_seq)
    return mesh.create_groups() if mesh.world_size > 1 else mesh


def build_model(config: Any, *, mesh=None, long_seq_config: Optional[LongSeqConfig] = None,
                registered: bool = False) -> LongSeqForCausalLM:
    """Build the model a MindFormers config describes.

    Args:
        config: a YAML path, a MindFormers config / nested dict (whole file: ``model``, ``parallel_config``,
            ``long_seq``...), or a ``LongSeqModelConfig`` (then parallel settings come from ``long_seq_config``
            or from the model config itself: CP off unless its ``parallel_config`` says otherwise).
        mesh: the rank ``Mesh``; default ``default_mesh(long_seq_config)`` (groups created when > 1 rank).
        long_seq_config: parallel settings; default ``LongSeqConfig.from_mindformers(config)``.
        registered: build the class registered under ``model.arch.type`` (``mf_route/models.py``: takes
            MindFormers' dataset columns, refuses graph mode) instead of the plain model it extends.

    Returns:
        The ``*ForCausalLM`` the YAML names (``model.arch.type``; default: the family's class), with every decoder
        layer recomputed in backward when ``recompute_config.recompute`` is True.

    Raises:
        ValueError: unknown or foreign class names, broken shapes or parallel settings (the message names the key).
    """
    if isinstance(config, LongSeqModelConfig):
        long_seq = long_seq_config or LongSeqConfig(**config.parallel_values())
        model_cls = model_class_from({}, config, registered)
        return model_cls(config, mesh=mesh or default_mesh(long_seq), long_seq_config=long_seq)
    tree = _as_dict(config)
    model_config = model_config_from(tree)
    model_cls = model_class_from(tree, model_config, registered)
    long_seq = long_seq_config or LongSeqConfig.from_mindformers(tree)
    model = model_cls(model_config, mesh=mesh or default_mesh(long_seq), long_seq_config=long_seq)
    apply_recompute(model, (tree.get("recompute_config") or {}).get("recompute", False))
    return model


def apply_recompute(model: LongSeqForCausalLM, recompute) -> None:
    """``recompute_config.recompute: True``: every decoder layer keeps only its input for backward and recomputes
    the rest (``Cell.recompute``, which MindSpore also runs in PyNative mode); with
    ``long_seq.offload_layer_inputs`` that input waits in host memory (``models/offload.py``).

    Raises:
        ConfigError: recompute not True or False; offload without recompute.
    """
    check_recompute(recompute)
    check_offload(model.long_seq.offload_layer_inputs, recompute)
    if recompute and model.long_seq.offload_layer_inputs:
        apply_offload(model, recompute)
    elif recompute:
        for layer in model.model.layers:
            layer.recompute()


def check_recompute(recompute) -> None:
    """``recompute_config.recompute`` must be True or False (ConfigError otherwise)."""
    if not isinstance(recompute, bool):
        raise ConfigError("recompute_config.recompute", recompute, "mf_longseq takes True or False (no per-stage "
                          "list)", "write recompute_config.recompute: True or False")


__all__ = ["build_model", "default_mesh", "model_config_from", "model_class_from", "apply_recompute", "check_recompute", "CONFIG_CLASSES", "MODEL_CLASSES"]
