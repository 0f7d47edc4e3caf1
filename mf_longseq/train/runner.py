"""The training loop: one step on every rank, gradient synchronisation, checkpoints, resume.

One step on a rank of a dp x cp mesh (weights replicated over dp x cp)::

    batch      = batch_for_step(step, dp_id)                   whole sequences of this dp rank, labels shifted
    shard      = shard_sequence(batch, layout)                 (B, S) -> (B, S/CP) this rank's tokens
    count      = all_reduce(sum(loss_mask), dp_cp)             global token count (not differentiated;
                                                               this and the gradient sum: train/step_math.py)
    loss_sum, grads = executor(shard, 1 / count)               sum of CE * mask over this rank's tokens and
                                                               d(loss_sum / count) / d(weights): this rank's
                                                               share of the global-mean objective
    grads      = all_reduce(grads, dp_cp)                      sum over ranks = gradient of the global mean
    grads      = clip(grads, max_grad_norm)                    runner_wrapper.use_clip_grad (train/clip.py)
    AdamW step; logged loss = all_reduce(loss_sum) / count

Packed documents (``packing`` set): ``actual_seq_len`` (B, L) is computed from the whole sequences of the batch,
before sharding, and passed to the model as a fourth input; labels across document ends are kept (MindFormers'
default) unless ``eod_mask_loss``.

The executor (``train/executor.py``) is the only part that differs between layouts: ``PlainStep`` differentiates
the whole model on the local batch; ``PipelinedStep`` runs this rank's pipeline stage over micro-batches with
the schedule of ``parallel/pipeline.py`` (its loss_sum is summed over the pp stages).

The exchanges inside attention have custom backwards that send gradients back to the rank owning the tokens,
so the sum over ranks of the per-rank gradients is the gradient of the whole objective: CP=N equals CP=1.
"""
import logging
import time
from dataclasses import dataclass
from typing import Callable, List, Optional

import numpy as np

from mf_longseq.train import checkpoint as ckpt
from mf_longseq.train.data import batch_for_step
from mf_longseq.train.monitor import Monitor, StepRecord, peak_rss_mib
from mf_longseq.train import step_math

logger = logging.getLogger(__name__)


@dataclass
class StepResult:
    loss: float
    tokens: int
    lr: float


class Trainer:
    """Runs training steps of ``model`` on this rank of ``mesh``.

    Args:
        model: Cell with ``model(input_ids, labels, loss_mask) -> (loss_sum, token_count)`` on (B, S/CP) shards.
        mesh: this rank's ``Mesh`` (groups created when it has more than one rank).
        optimizer: an ``AdamW`` over the executor's parameters (default executor: ``model.trainable_params()``).
        source: token source (``SyntheticTokens`` / ``ArrayTokens``).
        batch_size: sequences per dp rank per step.
        layout: sequence layout of the CP shards (``LongSeqConfig.layout``).
        pad_token_id: labels equal to it do not count (None: every label counts).
        packing: ``PackingSettings`` for packed samples (the model then also takes ``actual_seq_len``); None:
            every sample is one document.
        executor: how this rank gets its loss and gradients (``train/executor.py``): ``PlainStep`` (default,
            the whole model) or ``PipelinedStep`` (this rank's pipeline stage, micro-batches and a schedule).

    Raises:
        ValueError: a batch size the executor cannot split.
    """

    def __init__(self, *, model, mesh, optimizer, source, batch_size: int, layout: str,
                 pad_token_id: Optional[int] = None, packing=None, executor=None):
        if executor is None:
            from mf_longseq.train.executor import PlainStep
            executor = PlainStep(model, optimizer.params)
        executor.check_batch_size(batch_size)
        assert [p.name for p in executor.params] == [p.name for p in optimizer.params], \
            "the optimizer must update the executor's parameters, in its gradient order"
        self.model, self.mesh, self.optimizer, self.source = model, mesh, optimizer, source
        self.batch_size, self.layout, self.pad_token_id = batch_size, layout, pad_token_id
        self.packing, self.executor = packing, executor
        self.params = list(optimizer.params)
        self.group = mesh.group("dp_cp")
        self.max_grad_norm: Optional[float] = None          # runner_wrapper.max_grad_norm when use_clip_grad
        self.losses: List[float] = []

    def _sum(self, value: float) -> float:
        """Sum of a host scalar (the step's loss_sum) over the dp x cp ranks, in float32."""
        import mindspore as ms
        from mf_longseq.parallel.comm import all_reduce
        return float(all_reduce(ms.Tensor(np.array([value], np.float32)), self.group).asnumpy()[0])

    def local_batch(self, step: int):
        """This rank's (B, S/CP) shards of the dp rank's batch at ``step``, as Tensors: input_ids, labels,
        loss_mask, and with packing a fourth, actual_seq_len (B, eod_pad_length) of the whole sequences."""
        import mindspore as ms
        from mf_longseq.parallel import shard_sequence
        dp_id = self.mesh.coords()["dp_id"]
        batch = batch_for_step(self.source, step, batch_size=self.batch_size, dp=self.mesh.dp, dp_id=dp_id,
                               pad_token_id=self.pad_token_id)
        loss_mask, packed = batch.loss_mask, []
        if self.packing is not None:                                            # before sharding: global ends
            actual_seq_len, loss_mask = self.packing.pack(batch.input_ids, batch.loss_mask)
            packed = [ms.Tensor(actual_seq_len)]                               # (B, eod_pad_length) int32
        shards = [shard_sequence(x, self.mesh, self.layout, seq_dim=1)          # (B, S) -> (B, S/CP)
                  for x in (batch.input_ids, batch.labels, loss_mask)]
        return [ms.Tensor(np.ascontiguousarray(x)) for x in shards] + packed

    def sync_gradients(self, grads):
        """The gradients summed over dp x cp, as one flat float32 buffer (one collective per step), clipped to
        ``max_grad_norm`` by the whole model's norm when it is set (``train/clip.py``)."""
        from mf_longseq.parallel.tensor_parallel import shard_specs
        sharded = shard_specs(self.model) if self.max_grad_norm is not None else None
        flat, _ = step_math.sync_flat_gradients(self.optimizer.flatten(grads), self.group,
                                                sizes=self.optimizer.sizes, names=[p.name for p in self.params],
                                                mesh=self.mesh, max_grad_norm=self.max_grad_norm, sharded=sharded)
        return flat

    def step(self, step: int) -> StepResult:
        """Run update number ``step`` (0-based): the executor's forward and backward, gradient sum, AdamW."""
        import mindspore as ms
        inputs = self.local_batch(step)                        # ids, labels, loss_mask (B, S/CP) (+ packing)
        input_ids, loss_mask = inputs[0], inputs[2]
        count = step_math.global_token_count(float(loss_mask.asnumpy().sum(dtype=np.float64)), self.group,
                                             where=f"step {step} (pad_token_id = {self.pad_token_id}): ")
        loss_sum, grads = self.executor(inputs, ms.Tensor(np.float32(1.0 / count)))
        lr = self.optimizer.step_flat(self.sync_gradients(grads))
        loss = self._sum(loss_sum) / count
        self.losses.append(loss)
        tokens = self.batch_size * self.mesh.dp * input_ids.shape[1] * self.mesh.cp
        return StepResult(loss=loss, tokens=tokens, lr=lr)

    def broadcast_weights(self) -> None:
        """Make every dp x cp rank start from dp_cp rank 0's weights (rank 0's values plus zeros elsewhere)."""
        from mindspore import ops
        from mf_longseq.parallel.comm import all_reduce
        if self.group.size == 1:
            return
        for p in self.params:
            mine = p if self.group.index == 0 else ops.zeros_like(p)
            p.set_data(all_reduce(mine * 1, self.group))

    def state_parameters(self):
        """Everything a checkpoint holds for this rank: the parameters of what it runs (the whole model, or under
        pp its stage) and their optimizer moments."""
        return list(self.executor.cell.get_parameters()) + self.optimizer.state_parameters()


def world_gather(values: List[float], rank: int, world_size: int) -> List[float]:
    """Per-rank values gathered on every rank (a world all-reduce of a vector with this rank's slot filled)."""
    if world_size == 1:
        return list(values)
    import mindspore as ms
    from mf_longseq.parallel.comm import all_reduce_world
    vec = np.zeros(world_size, np.float32)
    vec[rank] = values[0]
    return [float(x) for x in all_reduce_world(ms.Tensor(vec)).asnumpy()]


def barrier(world_size: int) -> Callable[[], None]:
    """A function that returns once every rank has called it (a world AllReduce)."""
    def wait():
        world_gather([0.0], 0, world_size)
    return wait


def shared_from_rank0(values: List[int], rank: int, world_size: int) -> List[int]:
    """Rank 0's integers (each < 2**24: exact in float32) on every rank (a world AllReduce, the others add 0)."""
    if world_size == 1:
        return list(values)
    import mindspore as ms
    from mf_longseq.parallel.comm import all_reduce_world
    vec = np.array(values if rank == 0 else [0] * len(values), np.float32)
    return [int(x) for x in all_reduce_world(ms.Tensor(vec)).asnumpy()]


def agree_save_id(rank: int, world_size: int) -> str:
    """One save id for every rank: 12 hex digits drawn by rank 0 (``checkpoint.new_save_id``)."""
    raw = int(ckpt.new_save_id(), 16)
    a, b = shared_from_rank0([raw >> 24, raw & 0xFFFFFF], rank, world_size)
    return f"{(a << 24) | b:012x}"


@dataclass
class LoopSettings:
    """The loop of one run: steps [start_step, end_step), checkpoint period, where results go."""

    end_step: int
    start_step: int = 0
    save_every: int = 0
    output_dir: Optional[str] = None
    memory_before_mib: Optional[float] = None     # this rank's RSS just before the model was built
    memory_planned_mib: Optional[float] = None    # the planner's peak for this run (``planner/run.py``)


def train_loop(trainer: Trainer, run, loop: LoopSettings, *, monitor: Monitor,
               save: Optional[Callable[[int], None]] = None) -> List[StepRecord]:
    """Run the steps, log each one, checkpoint every ``loop.save_every`` steps and at the end."""
    for step in range(loop.start_step, loop.end_step):
        start = time.perf_counter()
        result = trainer.step(step)
        seconds = time.perf_counter() - start
        peak = peak_rss_mib()
        rss = world_gather([peak], run.rank, run.world_size)
        planned = measured = None
        if loop.memory_planned_mib is not None and loop.memory_before_mib is not None:
            planned = world_gather([loop.memory_planned_mib], run.rank, run.world_size)
            measured = world_gather([peak - loop.memory_before_mib], run.rank, run.world_size)
        monitor.record(StepRecord(step=step + 1, loss=result.loss, tokens=result.tokens, seconds=seconds,
                                  lr=result.lr, peak_rss_mib=rss, memory_planned_mib=planned,
                                  memory_measured_mib=measured))
        done = step + 1
        if save is not None and loop.save_every and (done % loop.save_every == 0 or done == loop.end_step):
            save(done)
    monitor.close()
    return monitor.records


def save_checkpoint(trainer: Trainer, run, *, output_dir: str, step: int, settings, data: dict) -> str:
    """Write this rank's file (every rank calls it at the same step) and, on rank 0, the metadata.

    The rank file holds ``trainer.state_parameters()`` (under pp: this stage's weights and moments only); the
    metadata names the run's plan (``settings.long_seq.plan``, the ``RunSettings`` of ``check_run``), the shard
    spec of every mp-split weight and ``num_layers``, for resharding.  ``num_layers`` is the built model's
    (``trainer.model.config``; a YAML that omits the key builds the config class's default).  A model without a
    config (a plain Cell given to ``run_job``, e.g. the tests' stand-ins) has no decoder layers to reshard: None.
    """
    from mf_longseq.parallel.tensor_parallel import shard_specs
    opt = trainer.optimizer.settings
    model_config = getattr(trainer.model, "config", None)
    return ckpt.save(output_dir, step=step, rank=run.rank, parameters=trainer.state_parameters(),
                     barrier=barrier(run.world_size), save_id=agree_save_id(run.rank, run.world_size),
                     plan=settings.long_seq.plan, config_text=settings.config_text, data=data,
                     optimizer={"type": "AdamW", "step_count": trainer.optimizer.step_count,
                                "learning_rate": opt.learning_rate, "betas": list(opt.betas), "eps": opt.eps,
                                "weight_decay": opt.weight_decay, "lr_schedule": opt.lr_schedule,
                                "total_steps": opt.total_steps},
                     losses=trainer.losses,
                     shard_specs={name: spec.to_dict() for name, spec in shard_specs(trainer.model).items()},
                     num_layers=None if model_config is None else model_config.num_layers)


def resume(trainer: Trainer, run, config, path: str) -> int:
    """Load a checkpoint into the trainer, under this run's plan; returns the step to continue from.

    Another dp / cp reads one replica; another mp or pp reshards the whole checkpoint for this rank
    (``checkpoint.state_for_rank``).  The dp x cp replicas then compare a digest of what they loaded
    (``verify_replicas``): the weights and moments are exactly those of the saved run, the same on every replica.

    Raises:
        ValueError: no complete checkpoint, a plan it cannot be resharded to, or replicas that loaded
            different state (naming the step directory).
    """
    directory = ckpt.find_resume_dir(path)
    meta = ckpt.read_meta(directory)
    plan = config.plan
    values = ckpt.state_for_rank(directory, meta, run.rank, plan)
    verify_replicas(trainer, values, directory)
    load_trainer_state(trainer, values, meta["optimizer"]["step_count"], source=directory)
    trainer.losses = list(meta["losses"])
    if run.rank == 0:
        from mf_longseq.parallel.reshard import saved_plan
        saved = saved_plan(meta)
        how = "" if ckpt.same_split(meta, plan) else (
            f", resharded from mp {saved.mp} x pp {saved.pp} to mp {plan.mp} x pp {plan.pp}")
        logger.info("resumed from %s (step %d%s)", directory, meta["step"], how)
    return int(meta["step"])


def verify_replicas(trainer: Trainer, values, directory: str) -> None:
    """Refuse (``checkpoint.check_replicas``) when the dp x cp ranks of this rank's group loaded different state.

    Each rank puts the 4-integer ``state_digest`` of its loaded values in its slot of a (group size, 4) float32
    buffer; one AllReduce over the dp x cp group (the others add zeros) gives every rank every digest, exactly.
    """
    group = trainer.group
    if group.size == 1:
        return
    import mindspore as ms
    from mf_longseq.parallel.comm import all_reduce
    names = {p.name for p in trainer.state_parameters()}
    mine = np.zeros((group.size, 4), np.float32)
    mine[group.index] = ckpt.state_digest({k: v for k, v in values.items() if k in names})
    digests = all_reduce(ms.Tensor(mine), group).asnumpy().astype(np.int64).tolist()
    ckpt.check_replicas(directory, digests, list(group.ranks))


def load_trainer_state(trainer: Trainer, values, step_count: int, *, source: str) -> None:
    """Set the trainer's checkpointed parameters and AdamW moments (``adam_m.<name>`` / ``adam_v.<name>``) from
    ``values`` (name -> array) and the optimizer's update counter to ``step_count``."""
    moments = trainer.optimizer.state_parameters()
    moment_names = {p.name for p in moments}
    weights = [p for p in trainer.state_parameters() if p.name not in moment_names]
    ckpt.assign(values, weights + moments, source)
    trainer.optimizer.load_state(moments, step_count)

