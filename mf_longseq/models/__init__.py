"""Models: one shared decoder (``decoder.py``) and three families as presets (LLaMA2, Qwen v1, Qwen1.5).

Importing this package registers the config classes (``LlamaLongSeqConfig``, ``QwenLongSeqConfig``,
``Qwen2LongSeqConfig``) in MindFormers' registry (CONFIG).  The model names (``*ForCausalLM``, MODELS) are
registered by ``mf_longseq/registry.py`` for the classes of ``mf_route/models.py`` (these plain models plus
MindFormers' settings and columns); ``build_model`` builds the plain ones, which take (config, mesh, settings).

    from mf_longseq.models import build_model
    model = build_model("run.yaml")                                   # or a dict / MindFormerConfig
    loss_sum, token_count = model(input_ids_local, labels_local, loss_mask_local)
"""
from mf_longseq.models.build import CONFIG_CLASSES, MODEL_CLASSES, build_model, model_config_from
from mf_longseq.models.decoder import LongSeqForCausalLM
from mf_longseq.models.llama2 import LLAMA2_PRESETS, LlamaLongSeqConfig, LlamaLongSeqForCausalLM
from mf_longseq.models.model_config import LongSeqModelConfig, count_parameters, parameter_shapes
from mf_longseq.models.qwen import QWEN_PRESETS, QwenLongSeqConfig, QwenLongSeqForCausalLM
from mf_longseq.models.qwen1_5 import QWEN1_5_PRESETS, Qwen2LongSeqConfig, Qwen2LongSeqForCausalLM

__all__ = ["build_model", "model_config_from", "CONFIG_CLASSES", "MODEL_CLASSES", "LongSeqModelConfig",
           "LongSeqForCausalLM", "count_parameters", "parameter_shapes",
           "LlamaLongSeqConfig", "LlamaLongSeqForCausalLM", "LLAMA2_PRESETS",
           "QwenLongSeqConfig", "QwenLongSeqForCausalLM", "QWEN_PRESETS",
           "Qwen2LongSeqConfig", "Qwen2LongSeqForCausalLM", "QWEN1_5_PRESETS"]
