"""mf_longseq: context parallelism (ring, Ulysses, hybrid) for long-sequence training with MindFormers.

Importing the package registers its classes in MindFormers' registry (``mf_longseq.registry``): the
ContextParallelAttention layer, the LLaMA2 / Qwen / Qwen1.5 configs and models.  It needs no device and no
communication.  (MindFormers' own import writes its logs under ``$LOCAL_DEFAULT_PATH``, default ``./output``.)
"""
import contextlib as _contextlib
import sys as _sys

# MindFormers prints import-time warnings on stdout; keep stdout clean for tools (``validate --json``).
with _contextlib.redirect_stdout(_sys.stderr):
    from mf_longseq import registry  # noqa: F401  (registration is the import's only effect)

__version__ = "0.1.0"
