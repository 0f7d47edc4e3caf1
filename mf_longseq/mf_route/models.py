"""The model classes MindFormers' builder builds: the names ``model.arch.type`` registers.

MindFormers' ``build_network`` calls the registered class with the model config alone, and its ``Model.train``
calls the network with the dataset's columns.  Each class here is the plain model of its family
(``models/``: ``LlamaLongSeqForCausalLM``, ``QwenLongSeqForCausalLM``, ``Qwen2LongSeqForCausalLM``, same name,
same weights and weight names) plus:

* construction from the config alone: the parallel settings and mesh MindFormers set up, read by
  ``mf_route/adapter.py`` (``builder_settings``: ``config.parallel_config``, MindSpore's context, the running
  ranks; graph mode refused), when ``mesh`` / ``long_seq_config`` are not given (``LongSeqTrainer`` gives both);
* MindFormers' column forms: ``construct(input_ids, labels=None, loss_mask=None, position_ids=None,
  actual_seq_len=None)``, by position or by name (MindFormers' DataOrderWrapperCell passes the dataset's column
  names): the pretraining column ``input_ids`` (B, S + 1), or the five packed columns, whole (B, S) (and (B, L)).
  Returns one float32 scalar, the global mean loss over dp x cp, equal on every rank (``mf_route/inputs.py``).

The plain model's own form (this rank's shards, ``(loss_sum, token_count)``) stays ``forward_batch(make_batch(...))``.
"""
import numpy as np
from mindspore import Tensor

from mf_longseq.mf_route.adapter import builder_settings
from mf_longseq.mf_route.inputs import GlobalMeanLoss, columns_batch
from mf_longseq.models import MODEL_CLASSES


class MindFormersColumns:
    """The builder-route half of a registered class (mixed in before the plain model; see the module docstring).

    Args:
        config: the family's model config (with MindFormers' ``parallel_config`` when the builder set it).
        mesh, long_seq_config: as the plain model's; None: MindFormers' (``builder_settings``).

    Raises:
        ConfigError: graph mode, or the settings' rules; ValueError: the degrees do not match the running ranks.
    """

    def __init__(self, config, mesh=None, long_seq_config=None, **kwargs):
        long_seq, mesh = builder_settings(config, mesh, long_seq_config)      # as given, else MindFormers'
        super().__init__(config, mesh=mesh, long_seq_config=long_seq, **kwargs)
        self.global_loss = GlobalMeanLoss(self.mesh.group("dp_cp"))

    def construct(self, input_ids, labels=None, loss_mask=None, position_ids=None, actual_seq_len=None):
        batch, count = self.mindformers_batch(input_ids, labels, loss_mask, position_ids, actual_seq_len)
        loss_sum, _ = self.forward_batch(batch)
        return self.global_loss(loss_sum, Tensor(np.float32(count)))

    def mindformers_batch(self, input_ids, labels=None, loss_mask=None, position_ids=None, actual_seq_len=None):
        """(this rank's ``ShardedBatch``, global token count over dp x cp as a host float) of MindFormers'
        whole-sequence columns: host work and index tables, built once outside any gradient (the runner wrapper
        differentiates only ``forward_batch``, as ``mf-longseq train`` does)."""
        del position_ids                                  # derived from actual_seq_len (module docstring)
        return columns_batch(self, self.global_loss.group, input_ids, labels, loss_mask, actual_seq_len)


def _registered_class(plain: type) -> type:
    return type(plain.__name__, (MindFormersColumns, plain),
                {"__module__": __name__, "plain_model": plain,
                 "__doc__": f"``model.arch.type: {plain.__name__}``: MindFormers' builder route of the plain "
                            f"``{plain.__module__}.{plain.__name__}`` (module docstring)."})


# family name -> the class registered under the plain class's name, families.py's model_class (registry.py)
ROUTE_CLASSES = {name: _registered_class(plain) for name, plain in MODEL_CLASSES.items()}

__all__ = ["MindFormersColumns", "ROUTE_CLASSES"]
