"""Registration of the plugin's classes in MindFormers' registry (``MindFormerRegister``).

Imported by ``mf_longseq/__init__.py``; it only registers (no device, no communication, no env writes).
MindFormers' import writes its logs under ``$LOCAL_DEFAULT_PATH`` (default ``./output``).
"""
from mindformers.tools.register import MindFormerModuleType, MindFormerRegister

from mf_longseq.attention.layer import ContextParallelAttention


def _register(cls, module_type):
    if not MindFormerRegister.is_exist(module_type, cls.__name__):
        MindFormerRegister.register_cls(cls, module_type=module_type)
    return cls


_register(ContextParallelAttention, MindFormerModuleType.MODULES)

# MindFormers' Trainer route (run_mindformer.py): the trainer that keeps the CP layout, the dataset sharded over dp
# only, the runner wrapper that sums gradients over dp x cp (mf_route/trainer.py, train/mf_dataset.py,
# mf_route/wrapper.py).
from mf_longseq.train.mf_dataset import LongSeqCausalLanguageModelDataset  # noqa: E402
from mf_longseq.mf_route.trainer import LongSeqTrainer  # noqa: E402
from mf_longseq.mf_route.wrapper import LongSeqTrainOneStepCell  # noqa: E402
from mf_longseq.mf_route.optim import LongSeqAdamW  # noqa: E402

_register(LongSeqTrainer, MindFormerModuleType.TRAINER)
_register(LongSeqCausalLanguageModelDataset, MindFormerModuleType.DATASET)
_register(LongSeqTrainOneStepCell, MindFormerModuleType.WRAPPER)
_register(LongSeqAdamW, MindFormerModuleType.OPTIMIZER)             # MindFormers' AdamW on one flat buffer

# Model families: importing mf_longseq.models registers the config classes (CONFIG) of every family of
# ``families.py``; the model classes (MODELS) are registered here.  Their names, set here from that table, also make this file the target of MindFormers'
# auto_register route, without importing mf_longseq first (mf_longseq must be installed or on PYTHONPATH):
#     python run_mindformer.py --register_path <path of the mf_longseq package> --config run.yaml
#     model.model_config.auto_register: registry.LlamaLongSeqConfig
#     model.arch.auto_register: registry.LlamaLongSeqForCausalLM
#     trainer.auto_register: registry.LongSeqTrainer          (and the dataset task / runner_wrapper likewise)
# The model names belong to mf_route/models.py's classes (built from the model config alone, MindFormers' columns),
# each the plain model of models/ it extends.
from mf_longseq.families import FAMILIES  # noqa: E402
from mf_longseq.models import CONFIG_CLASSES  # noqa: E402
from mf_longseq.mf_route.models import ROUTE_CLASSES  # noqa: E402

for _name, _family in FAMILIES.items():
    globals()[_family.config_class] = CONFIG_CLASSES[_name]
    globals()[_family.model_class] = _register(ROUTE_CLASSES[_name], MindFormerModuleType.MODELS)
