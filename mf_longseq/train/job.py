"""One training job from a MindFormers YAML: context, model, data, optimizer, loop, checkpoints.

    records = run_job(JobOptions(config="x.yaml", steps=20, output_dir="out", save_every=5))

Run keys read from the YAML (MindFormers' places): ``seed``, ``runner_config.batch_size`` (sequences per dp rank;
with pipeline stages, per micro-batch as in MindFormers: a step takes batch_size x micro_batch_num per dp rank),
``model.model_config.vocab_size`` / ``pad_token_id``, ``optimizer``, ``lr_schedule``, ``runner_wrapper``
(clipping), ``train_dataset`` (``dataset_dir``), ``callbacks``, ``parallel``; the rest through ``LongSeqConfig``
and the model builder.  ``train/support.py`` lists what is honoured; any other MindFormers key it finds is
refused there, before device work.

The layout is dp x pp x cp x mp (``parallel_config``): the model is built on the rank's mesh (tensor-parallel
layers under mp), and with pipeline_stage > 1 each rank trains its stage (``build_trainer``).  ``--resume`` may
name a checkpoint written under another layout (``runner.resume`` reshards it).
"""
import logging
import os
from dataclasses import dataclass, replace
from typing import Any, Callable, Optional

import numpy as np

from mf_longseq.train import checkpoint as ckpt
from mf_longseq.train import context as run_context
from mf_longseq.train.data import open_source
from mf_longseq.train.files import safe_path, write_atomic
from mf_longseq.train.monitor import Monitor, rss_mib
from mf_longseq.train.optim import AdamW, OptimSettings
from mf_longseq.train.packing import PackingSettings
from mf_longseq.train.runner import LoopSettings, Trainer, resume, save_checkpoint, train_loop
from mf_longseq.train.settings import RunSettings, plain

logger = logging.getLogger(__name__)


@dataclass
class JobOptions:
    """Command-line level settings of a job (``mf-longseq train`` flags)."""

    config: Any                              # YAML path, dict or MindFormerConfig
    steps: int = 10                          # the run ends after update number `steps` (also when resuming)
    data: Optional[str] = None               # token file; None = synthetic tokens
    dataset_dir: Optional[str] = None        # overrides train_dataset.data_loader.dataset_dir (MindRecord)
    data_dtype: Optional[str] = None         # dtype of a raw .bin file
    save_every: int = 0                      # checkpoint period in steps (0: no checkpoints)
    output_dir: Optional[str] = None
    resume: Optional[str] = None             # output dir or step dir to continue from
    load_checkpoint: Optional[str] = None    # start weights (ours or MindFormers' names); default: the YAML's key
    seed: Optional[int] = None               # overrides the YAML's `seed`


def load_tree(config: Any) -> dict:
    """The config as plain nested dicts and lists (YAML-writable): ``validation.load_tree`` (a YAML path read once,
    ``base_config`` merged by ``MindFormerConfig``; a dict or a MindFormerConfig taken as it is), with MindFormers'
    config objects turned into plain values.

    Raises:
        InputError / ConfigError: as ``validation.load_tree`` (unreadable path, not a mapping of sections).
    """
    from mf_longseq.train.validation import load_tree as read_config
    return plain(read_config(config))


def with_dataset_dir(tree: dict, dataset_dir: Optional[str]) -> dict:
    """``tree`` with ``train_dataset.data_loader.dataset_dir`` set to ``dataset_dir`` (unchanged when None)."""
    if dataset_dir is None:
        return tree
    dataset = dict(tree.get("train_dataset") or {})
    dataset["data_loader"] = {**(dataset.get("data_loader") or {"type": "MindDataset"}), "dataset_dir": dataset_dir}
    return {**tree, "train_dataset": dataset}


def build_default_model(settings: RunSettings, mesh, model_class: Optional[type] = None):
    """The model ``settings`` describe (``model_class``, default ``settings.model_class``: the plain model
    ``model.arch.type`` names; MindFormers' Trainer route passes the registered class, ``mf_route/models.py``) on
    its own copy of the model config and ``mesh``, every decoder layer recomputed when
    ``recompute_config.recompute`` is True."""
    import copy
    from mf_longseq.models.build import apply_recompute
    cls = model_class or settings.model_class
    model = cls(copy.deepcopy(settings.model), mesh=mesh, long_seq_config=settings.long_seq)
    apply_recompute(model, settings.loop.recompute)
    return model


def build_trainer(*, model, mesh, config, settings: OptimSettings, source, batch_size: int,
                  pad_token_id: Optional[int], packing: Optional[PackingSettings] = None,
                  max_grad_norm: Optional[float] = None) -> Trainer:
    """The trainer of this rank, with its step executor (``train/executor.py``): ``PlainStep`` (dp x cp x mp), or
    with ``parallel_config.pipeline_stage`` > 1 the ``PipelinedStep`` of this rank's stage
    (``parallel_config.micro_batch_num`` micro-batches, 1F1B schedule); AdamW over the executor's parameters.
    ``packing``: packed documents (``train_dataset.data_loader.config.create_compressed_eod_mask``); every
    pipeline stage gets the micro-batch's document ids through its ``ShardedBatch``."""
    from mf_longseq.train.executor import PipelinedStep, PlainStep
    if config.pipeline_stage > 1:
        executor = PipelinedStep(model, mesh=mesh, micro_batch_num=config.micro_batch_num, schedule="1f1b")
    else:
        executor = PlainStep(model)
    trainer = Trainer(model=model, mesh=mesh, optimizer=AdamW(executor.params, settings), source=source,
                      batch_size=batch_size, layout=config.layout, pad_token_id=pad_token_id, packing=packing,
                      executor=executor)
    trainer.max_grad_norm = max_grad_norm
    return trainer


def samples_per_step(batch_size: int, config) -> int:
    """Samples of one step per dp rank: ``runner_config.batch_size``, times ``parallel_config.micro_batch_num``
    with pipeline stages (MindFormers: the global batch is batch_size x data_parallel x micro_batch_num, each
    micro-batch holding batch_size samples)."""
    return batch_size * config.micro_batch_num if config.pipeline_stage > 1 else batch_size


def open_job_source(opts: "JobOptions", settings: RunSettings, mesh, *, seed: int, batch_size: int):
    """--data when given, else ``train_dataset.data_loader.dataset_dir`` (MindFormers' builder), else synthetic."""
    data, vocab, seq_length = settings.data, settings.model.vocab_size, settings.model.seq_length
    if opts.data is None and data.dataset_dir:
        from mf_longseq.train.mf_data import DatasetDirTokens
        return DatasetDirTokens(settings, dp_id=mesh.coords()["dp_id"], dp=mesh.dp, batch_size=batch_size,
                                seq_length=seq_length, vocab_size=vocab, steps=opts.steps,
                                pad_token_id=data.pad_token_id)
    return open_source(opts.data, vocab_size=vocab, seq_length=seq_length, seed=seed, dtype=opts.data_dtype,
                       eod_token_id=data.packing.eod_token_id if data.packing else None,
                       pad_token_id=data.pad_token_id)


def run_job(opts: JobOptions, *, model_factory: Callable = build_default_model, stream=None):
    """Run the job on this rank (under msrun: every rank runs it). Returns the rank's list of StepRecords.

    ``model_factory(settings, mesh)`` builds the model (default ``build_default_model``); ``settings`` is the
    ``RunSettings`` of ``check_run``, the one object every part below reads (``train/settings.py``).
    """
    import mindspore as ms
    from mf_longseq.train.validation import check_run
    tree = with_dataset_dir(load_tree(opts.config), opts.dataset_dir)      # --dataset-dir overrides the YAML
    settings = check_run(tree, steps=opts.steps)              # every rule, before any device work
    config, data = settings.long_seq, settings.data
    run = run_context.setup(settings)
    seed = data.seed if opts.seed is None else opts.seed
    ms.set_seed(seed)
    np.random.seed(seed)
    memory_before, memory_planned = rss_mib(), planned_memory_mib(settings)
    model = model_factory(settings, run.mesh)
    batch_size = samples_per_step(data.batch_size, config)
    source = open_job_source(opts, settings, run.mesh, seed=seed, batch_size=batch_size)
    trainer = build_trainer(model=model, mesh=run.mesh, config=config, settings=settings.optimizer, source=source,
                            batch_size=batch_size, packing=data.packing, max_grad_norm=settings.loop.max_grad_norm,
                            pad_token_id=data.pad_token_id if source.kind != "synthetic" else None)
    if not opts.resume:             # no broadcast before a resume: the replicas' digests compare what each loaded
        trainer.broadcast_weights()
    load_start(trainer, model, run.mesh, opts, settings)     # refuses --load-checkpoint beside --resume
    start = resume(trainer, run, config, opts.resume) if opts.resume else 0
    if start >= opts.steps:
        raise ValueError(f"--steps {opts.steps}: the checkpoint is already at step {start}. "
                         f"Fix: pass --steps larger than {start}.")
    output_dir = opts.output_dir or (ckpt.run_dir_of(opts.resume) if opts.resume else None)
    period = settings.loop.checkpoint_period
    if not opts.save_every and period and output_dir:            # (the CLI always has one)
        opts = replace(opts, save_every=period)                  # CheckpointMonitor.save_checkpoint_steps
    if opts.save_every and not output_dir:
        raise ValueError("--save-every needs --output-dir. Fix: pass --output-dir DIR.")
    if output_dir and run.rank == 0:
        os.makedirs(output_dir, exist_ok=True)
        write_atomic(safe_path(output_dir, "config.yaml"), settings.config_text)
        if opts.save_every:
            _retire_abandoned(output_dir, start, opts.resume)
    monitor = Monitor(run.rank, opts.steps, output_dir, stream=stream, start_step=start)
    monitor.say(f"mf-longseq train: {run.mesh}, algo {config.algo}, layout {config.layout}, "
                f"seq_length {settings.model.seq_length}, batch {trainer.batch_size} per dp rank, data "
                f"{_data_line(source.describe())}, steps {start + 1}..{opts.steps}")
    data_state = {**source.describe(), "batch_size": trainer.batch_size}

    def save(step):
        save_checkpoint(trainer, run, output_dir=output_dir, step=step, settings=settings, data=data_state)

    loop = LoopSettings(end_step=opts.steps, start_step=start, save_every=opts.save_every, output_dir=output_dir,
                        memory_before_mib=memory_before, memory_planned_mib=memory_planned)
    return train_loop(trainer, run, loop, monitor=monitor, save=save if opts.save_every else None)


def planned_memory_mib(settings: RunSettings) -> Optional[float]:
    """The planner's peak per device for this run, MiB (``planner/run.py``); None, with a warning, for a model
    the planner cannot describe (a custom model factory's)."""
    from mf_longseq.planner.run import planned_mib
    try:
        return planned_mib(settings)
    except (ValueError, KeyError, TypeError) as err:
        logger.warning("memory_planned_mib: the planner cannot describe this run (%s); not logged", err)
        return None


def load_start(trainer: Trainer, model, mesh, opts: JobOptions, settings: RunSettings) -> Optional[str]:
    """Start from weights: ``--load-checkpoint`` or the YAML's ``load_checkpoint`` (ignored with ``--resume``, which
    restores the run's own weights and optimizer) fills every parameter this rank trains; returns the path.

    Raises:
        ValueError: --load-checkpoint with --resume; a weight the checkpoint lacks (``start_weights``).
    """
    from mf_longseq.models.start_weights import fill_parameters, read_start_weights
    if opts.load_checkpoint and opts.resume:
        raise ValueError(f"--load-checkpoint {opts.load_checkpoint} and --resume {opts.resume}: two starting points. "
                         "Fix: --resume continues a run (weights and optimizer); --load-checkpoint starts a new run "
                         "from weights. Pass one of them.")
    path = None if opts.resume else (opts.load_checkpoint or settings.loop.load_checkpoint)
    if path:
        fill_parameters(trainer.params, read_start_weights(path, model.config), model=model, mesh=mesh, source=path)
        logger.info("start weights from %s", path)
    return path


def _data_line(described: dict) -> str:
    """The run header's data: ``synthetic``, or the kind and the absolute path it reads."""
    return f"{described['kind']} {described['path']}" if "path" in described else described["kind"]


def _retire_abandoned(output_dir: str, start: int, resume_path: Optional[str]) -> None:
    """Move the checkpoints of an abandoned history out of ``output_dir`` (``checkpoint.retire_abandoned``)."""
    resumed_from = ckpt.find_resume_dir(resume_path) if resume_path else None
    moved = ckpt.retire_abandoned(output_dir, start_step=start, resumed_from=resumed_from)
    if moved:
        logger.warning("moved %d checkpoint(s) of an abandoned run out of the way: %s (this run %s; \"the latest\" "
                       "checkpoint of %s is now one of this run's history)", len(moved), ", ".join(moved),
                       f"resumed from {resumed_from}" if resumed_from else "starts fresh", output_dir)
