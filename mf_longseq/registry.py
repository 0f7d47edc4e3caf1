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
