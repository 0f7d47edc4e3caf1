"""``optimizer.type: LongSeqAdamW``: MindFormers' ``AdamW`` update on one flat buffer, for the Trainer route.

MindFormers' ``AdamW`` (``mindformers.core.optim.AdamW``) updates each parameter with its own ``hyper_map`` call;
in PyNative every call dispatches a dozen small ops per parameter, about half of a tiny model's step on CPU.
This optimizer applies the same update (``train/optim.py``'s ``adamw_flat_update``: bias-corrected moments,
decoupled weight decay ``p * (1 - lr * wd)``, MindFormers' learning rate at ``global_step`` before the increment)
to all parameters in the order of one flat float32 buffer, in place and piece by piece (``apply_update``: a few
4 MiB buffers beyond the weights, gradients and moments), as ``mf-longseq train`` does.  It takes what MindFormers'
trainer passes (``build_optim``): the parameter groups of ``get_optimizer_grouped_parameters`` (each group's
``weight_decay``; no decay on norms and biases) and the ``lr_schedule`` cell::

    optimizer:
      type: LongSeqAdamW
      auto_register: registry.LongSeqAdamW
      betas: [0.9, 0.95]
      eps: 1.e-8
      weight_decay: 0.1

``tests/unit/test_train_optim.py`` checks it against MindFormers' ``AdamW``.  Its moments are two flat
Parameters (``adam_m.flat``, ``adam_v.flat``), saved by MindFormers' checkpoints under those names.
"""
import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops

from mf_longseq.config import ConfigError
from mf_longseq.train.optim import apply_update, plan_pieces


def _per_param_decay(params, weight_decay: float) -> list:
    """Each parameter's weight decay: its group's ``weight_decay`` (else the optimizer's)."""
    if not params or not isinstance(params[0], dict):
        return [float(weight_decay)] * len(params)
    out = []
    for group in params:
        value = group.get("weight_decay", weight_decay)
        if isinstance(value, nn.Cell):
            raise ConfigError("optimizer.weight_decay", type(value).__name__, "LongSeqAdamW takes a constant weight "
                              "decay per parameter group", "give a number, or use optimizer.type: AdamW")
        if "lr" in group:
            raise ConfigError("grouped_lr_schedule", "per-group learning rates", "LongSeqAdamW applies one learning "
                              "rate to every parameter", "remove grouped_lr_schedule, or use optimizer.type: AdamW")
        out += [float(value)] * len(group["params"])
    return out


class LongSeqAdamW(nn.Optimizer):
    """MindFormers' AdamW on a flat buffer (module docstring).

    Args:
        params: list of Parameters or MindFormers' parameter groups (dicts with ``params``, ``weight_decay``).
        learning_rate: a float or a MindSpore ``LearningRateSchedule`` (MindFormers' ``lr_schedule``).
        betas: (b1, b2) in [0, 1); eps > 0; weight_decay: the decay of groups that name none.

    Raises:
        ConfigError: a dynamic weight decay or per-group learning rates (not implemented; MindFormers' AdamW has them).
    """

    def __init__(self, params, learning_rate=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, **unused):
        params = list(params)
        decays = _per_param_decay(params, weight_decay)
        super().__init__(learning_rate, params, weight_decay=0.0)
        self.betas, self.eps = (float(betas[0]), float(betas[1])), float(eps)
        self.sizes = [int(np.prod(p.shape)) for p in self.parameters]
        total = sum(self.sizes)
        self.pieces = plan_pieces([tuple(p.shape) for p in self.parameters], decays)   # train/optim.py
        self.adam_m = Parameter(Tensor(np.zeros(total, np.float32)), name="adam_m.flat", requires_grad=False)
        self.adam_v = Parameter(Tensor(np.zeros(total, np.float32)), name="adam_v.flat", requires_grad=False)

    def construct(self, gradients):
        return self.step_flat(ops.cat([g.astype(ms.float32).reshape(-1) for g in gradients]))

    def step_flat(self, grad) -> bool:
        """One update with the gradient as one flat (sum of sizes,) float32 buffer, in ``parameters`` order (what
        ``LongSeqTrainOneStepCell`` holds after its one collective: no split and re-concatenation)."""
        lr = self.get_lr()                                     # at global_step before the increment, as AdamW
        lr = float(lr.asnumpy()) if isinstance(lr, Tensor) else float(lr)
        self.assignadd(self.global_step, self.global_step_increase_tensor)
        step = int(self.global_step.asnumpy().reshape(-1)[0])
        apply_update(self.parameters, self.pieces, grad, self.adam_m, self.adam_v, lr=lr, step=step,
                     betas=self.betas, eps=self.eps)                          # in place, piece by piece
        return True


__all__ = ["LongSeqAdamW"]
