"""Pipeline parallelism over the ``pp`` group: the schedule of every stage and its execution.

Stage s of P holds a contiguous range of decoder layers (``plan.stage_layers``); the embedding lives on the first
stage, the final norm, LM head and loss on the last.  A step splits the batch into M micro-batches and runs a
schedule, a list of ``Action``s per stage:

* ``gpipe``: every forward, then every backward (M stage inputs kept per stage).
* ``1f1b``: P-s-1 warm-up forwards, then one forward / one backward alternately, then the remaining backwards
  (Narayanan et al., "Efficient Large-Scale Language Model Training on GPU Clusters Using Megatron-LM", 2021,
  https://arxiv.org/abs/2104.04473, section 2.2): at most P-s stage inputs kept on stage s.

Transfers between neighbouring stages are ``comm.send_recv`` in the pp group.  The steady 1F1B phase pairs
"send activation i forward, receive gradient j back" into one two-way transfer (one collective on CPU), so the
k-th transfer of the pair (s, s+1) is the same transfer on both ranks and no cycle of waits can form (the
schedules are checked by a one-process simulation in tests/unit/test_pipeline_schedule.py).

A stage's backward recomputes its forward: ``GradOperation(get_all=True, get_by_list=True, sens_param=True)``
on the stage Cell, with the gradient received from the next stage as ``sens`` (on the last stage, the sens of
the objective).  Only the stage inputs are kept between a micro-batch's forward and its backward.

What a stage runs is ``models/stage.py`` (``DecoderStage``); the training step around the schedule (the batch
cut into micro-batches, the gradient sum over dp x cp, the optimizer) is the trainer's, through its pipelined
step executor (``train/executor.py`` ``PipelinedStep``).  This module imports nothing from ``train/``.
"""
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import mindspore as ms
from mindspore import ParameterTuple, ops

from mf_longseq.parallel.comm import send_recv

ACT, GRAD = "act", "grad"
SCHEDULES = ("gpipe", "1f1b")


@dataclass(frozen=True)
class Action:
    """One step of a stage's schedule.

    ``kind`` is "F" (forward of ``micro``), "B" (backward of ``micro``) or "comm": a transfer with the stage at
    ``peer`` (-1 previous, +1 next) sending ``send`` and/or receiving ``recv``, each a (ACT|GRAD, micro) pair.
    """

    kind: str
    micro: int = -1
    peer: int = 0
    send: Optional[Tuple[str, int]] = None
    recv: Optional[Tuple[str, int]] = None


def _forward_steps(stage: int, num_stages: int, i: int, *, recv: bool = True, send: bool = True) -> List[Action]:
    steps = []
    if recv and stage > 0:
        steps.append(Action("comm", peer=-1, recv=(ACT, i)))
    steps.append(Action("F", i))
    if send and stage < num_stages - 1:
        steps.append(Action("comm", peer=+1, send=(ACT, i)))
    return steps


def _backward_steps(stage: int, num_stages: int, j: int, *, recv: bool = True, send: bool = True) -> List[Action]:
    steps = []
    if recv and stage < num_stages - 1:
        steps.append(Action("comm", peer=+1, recv=(GRAD, j)))
    steps.append(Action("B", j))
    if send and stage > 0:
        steps.append(Action("comm", peer=-1, send=(GRAD, j)))
    return steps


def gpipe(stage: int, num_stages: int, num_micro: int) -> List[Action]:
    """All forwards, then all backwards in the same order."""
    steps = []
    for i in range(num_micro):
        steps += _forward_steps(stage, num_stages, i)
    for j in range(num_micro):
        steps += _backward_steps(stage, num_stages, j)
    return steps


def one_f_one_b(stage: int, num_stages: int, num_micro: int) -> List[Action]:
    """1F1B (PipeDream-Flush): warm-up forwards, steady one-forward-one-backward, cool-down backwards."""
    first, last = stage == 0, stage == num_stages - 1
    warmup = min(num_stages - stage - 1, num_micro)
    steps = []
    for i in range(warmup):
        steps += _forward_steps(stage, num_stages, i)
    steady = num_micro - warmup
    if steady > 0 and not first:
        steps.append(Action("comm", peer=-1, recv=(ACT, warmup)))
    for j in range(steady):
        i = warmup + j
        steps.append(Action("F", i))
        if not last:                                  # send activation i, receive gradient j: one transfer
            steps.append(Action("comm", peer=+1, send=(ACT, i), recv=(GRAD, j)))
        steps.append(Action("B", j))
        if not first:
            more = j + 1 < steady                     # send gradient j, receive the next input: one transfer
            steps.append(Action("comm", peer=-1, send=(GRAD, j), recv=(ACT, i + 1) if more else None))
    for j in range(steady, num_micro):
        steps += _backward_steps(stage, num_stages, j)
    return steps


def build_schedule(kind: str, stage: int, num_stages: int, num_micro: int) -> List[Action]:
    """The actions of ``stage`` for schedule ``kind`` (``gpipe`` or ``1f1b``)."""
    if kind not in SCHEDULES:
        raise ValueError(f"pipeline schedule = {kind!r}: unknown. Fix: use one of {', '.join(SCHEDULES)}")
    if num_stages > 1 and num_micro < num_stages:
        raise ValueError(f"parallel_config.micro_batch_num = {num_micro}: must be >= parallel_config."
                         f"pipeline_stage = {num_stages}. Fix: set micro_batch_num to {num_stages} or more")
    return (gpipe if kind == "gpipe" else one_f_one_b)(stage, num_stages, num_micro)


class PipelineRunner:
    """Runs one stage's schedule for one step and accumulates its parameter gradients.

    Args:
        cell: the stage Cell.  First stage: ``cell(*micro_inputs[i])``; other stages:
            ``cell(activation, *micro_inputs[i])``.  Non-last stages return the activation to send
            (shape ``act_shape``); the last stage returns its objective (a Tensor or a tuple).
        group: the pp ``Group`` (its index is the stage).
        act_shape, act_dtype: shape and dtype of the activation between stages (one micro-batch).
        sens_fn: last stage only: output of a micro-batch -> the sens of its backward (default: 1 for the
            first output, 0 for the others).
    """

    def __init__(self, cell, *, group, act_shape: Sequence[int], act_dtype=ms.float32,
                 sens_fn: Optional[Callable] = None):
        self.cell, self.group = cell, group
        self.act_shape, self.act_dtype = tuple(act_shape), act_dtype
        self.stage, self.num_stages = group.index, group.size
        self.first, self.last = self.stage == 0, self.stage == self.num_stages - 1
        self.params = ParameterTuple(cell.trainable_params())
        self.grad_op = ops.GradOperation(get_all=True, get_by_list=True, sens_param=True)
        self.sens_fn = sens_fn or _objective_sens

    def run(self, micro_inputs: Sequence[tuple], schedule: str = "1f1b"):
        """Execute the schedule over ``micro_inputs`` (one tuple of Tensors per micro-batch).

        Returns:
            (outputs, grads): outputs of the last stage per micro-batch (None elsewhere) and the parameter
            gradients of this stage summed over micro-batches (in ``self.params`` order).
        """
        num_micro = len(micro_inputs)
        acts: Dict[int, object] = {}          # received activations (stage inputs) by micro-batch
        saved: Dict[int, tuple] = {}          # stage inputs kept for the backward
        outs: Dict[int, object] = {}          # activations to send / last-stage outputs
        grads_in: Dict[int, object] = {}      # gradients received from the next stage
        grads_out: Dict[int, object] = {}     # gradients of our input activation, to send back
        total = None
        for action in build_schedule(schedule, self.stage, self.num_stages, num_micro):
            if action.kind == "F":
                i = action.micro
                inputs = tuple(micro_inputs[i]) if self.first else (acts.pop(i),) + tuple(micro_inputs[i])
                saved[i] = inputs
                outs[i] = self.cell(*inputs)
            elif action.kind == "B":
                j = action.micro
                sens = self.sens_fn(outs[j]) if self.last else grads_in.pop(j)
                input_grads, param_grads = self.grad_op(self.cell, self.params)(*saved.pop(j), sens)
                if not self.first:
                    grads_out[j] = input_grads[0]
                total = list(param_grads) if total is None else [a + b for a, b in zip(total, param_grads)]
            else:
                self._transfer(action, outs, grads_out, acts, grads_in)
        outputs = [outs.get(i) for i in range(num_micro)] if self.last else [None] * num_micro
        return outputs, total

    def _transfer(self, action: Action, outs, grads_out, acts, grads_in):
        send = None
        if action.send is not None:
            what, micro = action.send
            send = outs.pop(micro) if what == ACT else grads_out.pop(micro)
        peer = self.stage + action.peer
        shape = self.act_shape if action.recv is not None else None
        received = send_recv(send, self.group, peer, shape, self.act_dtype)
        if action.recv is not None:
            what, micro = action.recv
            (acts if what == ACT else grads_in)[micro] = received


def _objective_sens(out):
    """Sens of a last-stage output: 1 for the objective (the first output), 0 for the others (logging only)."""
    if isinstance(out, (tuple, list)):
        return (ops.ones_like(out[0]),) + tuple(ops.zeros_like(o) for o in out[1:])
    return ops.ones_like(out)


__all__ = ["Action", "PipelineRunner", "SCHEDULES", "build_schedule", "gpipe", "one_f_one_b"]
