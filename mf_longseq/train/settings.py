"""``RunSettings``: every setting of one run, parsed once from the MindFormers YAML by ``check_run``.

    settings = check_run("run.yaml", steps=20)      # train/validation.py: every rule, then this object
    settings.long_seq.context_parallel              # LongSeqConfig (config.py)
    settings.model.seq_length                       # the registered model config (models/model_config.py)
    settings.data.batch_size, settings.data.seed    # runner_config.batch_size, seed, ...
    settings.optimizer.learning_rate                # OptimSettings (train/optim.py); None on MindFormers' route
    settings.loop.checkpoint_period                 # CheckpointMonitor.save_checkpoint_steps, clipping, ...

The YAML is read in one place (``read_settings``, called by ``train/validation.py collect_run`` after the rules
hold): every value below comes from ``config.node_at`` there, and nothing under ``check_run`` reads the YAML
again (``tests/unit/test_settings.py`` checks that no function of ``train/``, ``planner/`` or ``tools/`` outside
the parsers takes the raw tree).  The object and its sections are frozen dataclasses; the mapping sections
MindFormers' own builders need (``train_dataset``, ``parallel``) are read-only copies.
"""
import copy
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Mapping, Optional, Tuple

from mf_longseq.config import LongSeqConfig, node_at
from mf_longseq.train.packing import PackingSettings

if TYPE_CHECKING:                                   # train/optim.py imports MindSpore
    from mf_longseq.train.optim import OptimSettings


@dataclass(frozen=True)
class DataSettings:
    """What the run feeds the model.

    Attributes:
        batch_size: ``runner_config.batch_size``: samples per dp rank per step (per micro-batch with pipeline
            stages, as MindFormers); 1 when unset.
        seed: ``seed`` (weights and synthetic data); 0 when unset.
        pad_token_id: ``model.model_config.pad_token_id`` as written (None: every label counts).
        dataset_dir: ``train_dataset.data_loader.dataset_dir`` (MindRecord), None when unset.
        packing: ``PackingSettings`` (``train_dataset.data_loader.config.create_compressed_eod_mask``), None: off.
        train_dataset: the ``train_dataset`` section as written (read-only), for MindFormers' dataset builder.
    """

    batch_size: int = 1
    seed: int = 0
    pad_token_id: Optional[int] = None
    dataset_dir: Optional[str] = None
    packing: Optional[PackingSettings] = None
    train_dataset: Mapping = field(default_factory=lambda: MappingProxyType({}))

    def dataset_section(self) -> dict:
        """A writable copy of ``train_dataset`` (MindFormers' builder takes a plain dict)."""
        return copy.deepcopy(dict(self.train_dataset))


@dataclass(frozen=True)
class LoopKeys:
    """The YAML's keys of the training loop and its checkpoints.

    Attributes:
        steps: ``--steps`` of ``mf-longseq train`` (None when ``check_run`` was not given it).
        checkpoint_period: CheckpointMonitor's ``save_checkpoint_steps`` (0: none).
        max_grad_norm: ``runner_wrapper.max_grad_norm`` when ``use_clip_grad`` is True, else None (no clipping).
        recompute: ``recompute_config.recompute``.
        load_checkpoint: the YAML's ``load_checkpoint`` (start weights), None when unset.
    """

    steps: Optional[int] = None
    checkpoint_period: int = 0
    max_grad_norm: Optional[float] = None
    recompute: bool = False
    load_checkpoint: Optional[str] = None


@dataclass(frozen=True)
class RuntimeKeys:
    """MindSpore's sections: ``context`` (as ``runtime_context_kwargs`` reads it) and ``parallel`` (the
    auto-parallel context, applied by ``train/context.py setup``), read-only."""

    context: Mapping = field(default_factory=lambda: MappingProxyType({}))
    parallel: Mapping = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True)
class RunSettings:
    """One run's settings (the module docstring); built by ``check_run`` only.

    Attributes:
        long_seq: the parallel settings, ``LongSeqConfig`` (degrees, algorithm, sequence layout, tiles;
            ``long_seq.plan`` is the RunPlan).
        model: the model config the run builds (the registered class ``model.model_config.type`` names).
        model_class: the registered ``*ForCausalLM`` class ``model.arch.type`` names.
        data, optimizer, loop, runtime: the sections above (``optimizer`` is None on MindFormers' route, where
            MindFormers builds its own optimizer).
        warnings: keys MindFormers reads but mf_longseq does not (they change nothing here).
        config_text: the configuration as YAML text (written beside checkpoints as ``config.yaml``).
    """

    long_seq: LongSeqConfig
    model: Any
    model_class: type
    data: DataSettings = DataSettings()
    optimizer: Optional["OptimSettings"] = None
    loop: LoopKeys = LoopKeys()
    runtime: RuntimeKeys = RuntimeKeys()
    warnings: Tuple[str, ...] = ()
    config_text: str = ""


def plain(node):
    """Nested dicts / lists of plain values (YAML-writable), from MindFormers' config objects."""
    if isinstance(node, dict):
        return {str(k): plain(v) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return [plain(v) for v in node]
    if node is None or isinstance(node, (bool, int, float, str)):
        return node
    if hasattr(node, "to_dict"):
        return plain(node.to_dict())
    return plain(vars(node)) if hasattr(node, "__dict__") else str(node)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _section(tree: Mapping, path: str) -> Mapping:
    return MappingProxyType(copy.deepcopy(dict(node_at(tree, path) or {})))


def read_settings(tree: Mapping, *, long_seq: LongSeqConfig, model, model_class: type, warnings=(),
                  optimizer: Optional["OptimSettings"] = None, packing: Optional[PackingSettings] = None,
                  steps: Optional[int] = None) -> RunSettings:
    """The ``RunSettings`` of ``tree`` (a plain dict) whose rules ``collect_run`` checked; ``optimizer`` and
    ``packing`` are the sections it already parsed while checking (each is parsed once)."""
    import yaml
    wrapper = node_at(tree, "runner_wrapper") or {}
    norm = wrapper.get("max_grad_norm", 1.0)
    period = 0                  # (MindFormers' route checks neither key: its own callbacks and wrapper read them)
    for callback in node_at(tree, "callbacks") or []:
        if isinstance(callback, Mapping) and callback.get("type") == "CheckpointMonitor":
            period = callback.get("save_checkpoint_steps") or 0
            period = period if isinstance(period, int) and not isinstance(period, bool) else 0
            break
    data = DataSettings(batch_size=node_at(tree, "runner_config.batch_size", 1) or 1,
                        seed=node_at(tree, "seed", 0) or 0,
                        pad_token_id=node_at(tree, "model.model_config.pad_token_id"),
                        dataset_dir=node_at(tree, "train_dataset.data_loader.dataset_dir") or None,
                        packing=packing, train_dataset=_section(tree, "train_dataset"))
    loop = LoopKeys(steps=steps, checkpoint_period=period,
                    max_grad_norm=float(norm) if wrapper.get("use_clip_grad") is True and _is_number(norm) else None,
                    recompute=bool(node_at(tree, "recompute_config.recompute", False)),
                    load_checkpoint=node_at(tree, "load_checkpoint") or None)
    runtime = RuntimeKeys(context=_section(tree, "context"), parallel=_section(tree, "parallel"))
    return RunSettings(long_seq=long_seq, model=model, model_class=model_class, data=data, optimizer=optimizer,
                       loop=loop, runtime=runtime, warnings=tuple(warnings),
                       config_text=yaml.safe_dump(plain(tree), sort_keys=False))


__all__ = ["RunSettings", "DataSettings", "LoopKeys", "RuntimeKeys", "read_settings", "plain"]
