"""MindSpore context of a training run: device, PyNative mode, communication, auto-parallel context, mesh.

``context:`` keys used: ``device_target`` (through ``LongSeqConfig``) and ``runtime_num_threads``.  The run is
always PyNative.  Op dispatch is decided in one place, ``configure_op_dispatch`` (used by training, the pipeline
executor, the demo and the benchmarks): synchronous on CPU, MindSpore's default asynchronous dispatch elsewhere (see its docstring for
the measurements).

``parallel:`` keys of a MindFormers YAML go to ``mindspore.set_auto_parallel_context`` as MindFormers passes them,
with two rules of this plugin:

* ``parallel_mode``: MindFormers' spellings (0-3, ``SEMI_AUTO_PARALLEL``, ...) are read, but mf_longseq does its
  parallelism itself (explicit collectives in PyNative, where MindSpore only supports ``stand_alone`` and
  ``data_parallel``): ``data_parallel`` is kept, every other mode becomes ``stand_alone`` (what MindFormers
  calls ``MANUAL_PARALLEL``), and a log line says so.
* ``device_num`` and ``global_rank`` come from the real world (msrun), not the YAML.

Keys MindSpore does not know are errors naming the key; keys that only steer MindSpore's automatic (graph-mode)
parallelism are applied - so ``get_auto_parallel_context`` reads them back - and listed in a log line, since the
plugin's PyNative path does not use them.  ``enable_alltoall`` reaches the attention layers through
``LongSeqConfig.enable_alltoall`` (the same value).
"""
import difflib
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional

logger = logging.getLogger(__name__)

# MindFormers' parallel_mode spellings (mindformers.tools.utils.PARALLEL_MODE), mapped to MindSpore's names.
PARALLEL_MODES = {0: "data_parallel", 1: "semi_auto_parallel", 2: "auto_parallel", 3: "hybrid_parallel",
                  "DATA_PARALLEL": "data_parallel", "SEMI_AUTO_PARALLEL": "semi_auto_parallel",
                  "AUTO_PARALLEL": "auto_parallel", "HYBRID_PARALLEL": "hybrid_parallel",
                  "STAND_ALONE": "stand_alone", "MANUAL_PARALLEL": "stand_alone"}
# Keys our explicit-collective PyNative path honours itself (the rest only steer MindSpore's auto parallel).
USED_BY_PLUGIN = ("parallel_mode", "enable_alltoall", "device_num", "global_rank")
# Set from the world, never from the YAML.
FROM_WORLD = ("device_num", "global_rank")


@dataclass
class RunContext:
    """What ``setup`` did: this process's rank, the world size, the mesh and the applied parallel context."""

    rank: int
    world_size: int
    mesh: Any
    distributed: bool
    parallel_context: Dict[str, Any] = field(default_factory=dict)
    not_used_by_plugin: tuple = ()


def under_msrun() -> bool:
    """True in a process started by msrun: a worker (MS_ROLE=MS_WORKER) or the scheduler (MS_SCHED), which runs
    the same script and serves the cluster inside ``mindspore.communication.init()``."""
    return os.environ.get("MS_ROLE") in ("MS_WORKER", "MS_SCHED") and "MS_WORKER_NUM" in os.environ


def resolve_parallel_mode(value: Any) -> str:
    """MindSpore's name for a MindFormers ``parallel.parallel_mode`` value (int or any spelling)."""
    key = value.upper() if isinstance(value, str) else value
    if key in PARALLEL_MODES:
        return PARALLEL_MODES[key]
    if isinstance(value, str) and value.lower() in PARALLEL_MODES.values():
        return value.lower()
    raise ValueError(f"parallel.parallel_mode = {value!r}: unknown mode. Fix: use 0 (data_parallel), "
                     "1 (semi_auto_parallel), 2 (auto_parallel), 3 (hybrid_parallel) or STAND_ALONE.")


def parallel_context_kwargs(parallel: Optional[Mapping], *, world_size: int, rank: int) -> Dict[str, Any]:
    """The keyword arguments for ``set_auto_parallel_context`` from a YAML ``parallel:`` section.

    Raises:
        ValueError: a key MindSpore's auto-parallel context does not have (with a did-you-mean).
    """
    from mindspore.parallel._auto_parallel_context import _set_auto_parallel_context_func_map as known
    kwargs: Dict[str, Any] = {}
    for key, value in dict(parallel or {}).items():
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f"did you mean parallel.{close[0]}?" if close else "remove it"
            raise ValueError(f"parallel.{key} = {value!r}: not a mindspore.set_auto_parallel_context key. "
                             f"Fix: {hint}.")
        if key in FROM_WORLD or value is None:
            continue
        kwargs[key] = value
    asked = kwargs.get("parallel_mode", "stand_alone")
    mode = resolve_parallel_mode(asked)
    if mode not in ("stand_alone", "data_parallel"):
        logger.info("parallel.parallel_mode = %r (%s): mf_longseq runs its own collectives in PyNative mode; "
                    "using stand_alone (MindFormers' MANUAL_PARALLEL).", asked, mode)
        mode = "stand_alone"
    kwargs["parallel_mode"] = mode
    if kwargs.get("full_batch"):
        logger.info("parallel.full_batch = True is for MindSpore's auto parallel; set to False (as MindFormers "
                    "does for non-auto modes): every dp rank reads its own batch.")
        kwargs["full_batch"] = False
    if isinstance(kwargs.get("dataset_strategy"), list):
        kwargs["dataset_strategy"] = tuple(tuple(item) for item in kwargs["dataset_strategy"])
    if mode != "stand_alone" or world_size > 1:
        kwargs["device_num"], kwargs["global_rank"] = world_size, rank
    return kwargs


def apply_parallel_context(parallel: Optional[Mapping], *, world_size: int, rank: int) -> Dict[str, Any]:
    """Reset MindSpore's auto-parallel context and apply the YAML's ``parallel:`` section; returns what was set."""
    from mindspore import context
    kwargs = parallel_context_kwargs(parallel, world_size=world_size, rank=rank)
    context.reset_auto_parallel_context()
    context.set_auto_parallel_context(**kwargs)
    unused = tuple(sorted(k for k in kwargs if k not in USED_BY_PLUGIN))
    if unused:
        logger.info("parallel keys applied to MindSpore but not used by mf_longseq's PyNative path: %s",
                    ", ".join(unused))
    return kwargs


def runtime_context_kwargs(section: Optional[Mapping]) -> Dict[str, Any]:
    """The ``context:`` keys applied besides the device: ``runtime_num_threads`` (CPU kernel threads per rank;
    1 is fastest when several ranks share a few cores).  The run is always PyNative; ``mode: 0`` is logged."""
    section = dict(section or {})
    if section.get("mode") in (0, "GRAPH_MODE"):
        logger.info("context.mode = %r: mf_longseq trains in PyNative mode.", section["mode"])
    threads = section.get("runtime_num_threads")
    if threads is None:
        return {}
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"context.runtime_num_threads = {threads!r}: must be a positive integer. Fix: e.g. 1 "
                         "when several CPU ranks share a few cores.")
    return {"runtime_num_threads": threads}


def configure_op_dispatch(device_target: str) -> bool:
    """Run ops synchronously on the Python thread (``ms.runtime.launch_blocking()``) when the device is the CPU.

    Why (measured on a 2-core host): under PyNative's asynchronous dispatch the ops run on a backend thread while
    the Python thread busy-waits for them (``AsyncRQueue::Wait``), so on CPU one core spins beside the kernel's
    threads - there is no separate device to keep busy, the "device" is the same cores.  The fused attention
    kernel (S = 4096, 8 heads, 1 thread) took 1415 ms asynchronously and 842 ms synchronously
    (``benchmarks/pynative_gil.py``; ``benchmarks/kernel_bench.py --impls fused_cpu fused_cpu_async`` compares
    both in one run; the figures for training and the demo are in ``docs/design.md``, "CPU op dispatch").  On
    Ascend the host must stay ahead of the device, so the asynchronous default is kept there.

    The pipeline's stage transfers need it too: on CPU they are emulated (``parallel/comm.py``) by blocking
    collectives in several two-rank groups, deadlock-free in the order they are issued, but PyNative's
    asynchronous launch may run them in another order (seen on CPU: a hang after a few steps); so
    ``train/executor.py`` ``PipelinedStep`` calls this function too, for runs that did not go through ``setup``.
    This is the one place of the package that switches the dispatch mode.

    Synchronous dispatch keeps the kernels on the Python thread, but MindSpore releases the GIL while an op
    runs (``benchmarks/pynative_gil.py``: a counting Python thread keeps 0.457 of its idle rate during the
    kernel, against 0.502 beside NumPy's GIL-free matmul), so a background Python thread (the ring's host
    transport, ``parallel/host_p2p.py``) still runs.

    Args:
        device_target: ``"CPU"``, ``"Ascend"`` or ``"GPU"`` (the run's ``context.device_target``).

    Returns:
        True when synchronous dispatch was switched on (CPU).  The setting is per process and stays on.
    """
    import mindspore as ms
    if device_target != "CPU":
        return False
    ms.runtime.launch_blocking()
    return True


def rank_cores(environ: Mapping[str, str], usable, threads: int) -> Optional[list]:
    """The CPUs an msrun CPU worker should run on: ``threads`` of the ``usable`` CPUs (sorted), at the worker's
    local index (msrun's ``DEVICE_ID``), when every worker of the launch gets its own: all workers on this host
    (the scheduler at a loopback address) and MS_WORKER_NUM x threads <= len(usable).  None otherwise (not an
    msrun worker, several hosts, or more threads than CPUs: then the OS places the threads).
    """
    import ipaddress
    try:
        workers, index = int(environ["MS_WORKER_NUM"]), int(environ["DEVICE_ID"])
        local = ipaddress.ip_address(environ.get("MS_SCHED_HOST", "127.0.0.1")).is_loopback
    except (KeyError, ValueError):
        return None
    usable = sorted(usable)
    if environ.get("MS_ROLE") != "MS_WORKER" or not local or not 0 <= index < workers \
            or workers * threads > len(usable):
        return None
    return usable[index * threads:(index + 1) * threads]


def bind_rank_cores(device_target: str) -> Optional[list]:
    """Bind every thread of this CPU msrun worker to its own CPUs (``rank_cores``, with ``runtime_num_threads``);
    returns them, or None when nothing was bound.  Threads started later inherit the binding.

    Why (measured on a 2-core host, demo and ring attention at CP = 2): MindSpore's CPU thread pool
    (``ActorThread_0``, ``KernelThread_0``) spins in sched_yield after every parallel op; unbound, a rank's
    spinning threads run on the core where the other rank computes - 25-40 % of a rank's CPU samples were those
    yields.  Bound, they only take turns with their own rank.  msrun's ``--bind_core True`` binds the same way
    (one CPU per local worker, with taskset); this does it inside the worker so that every launch gets it.
    MindSpore's own ``mindspore.runtime.set_cpu_affinity(True, affinity_cpu_list=[...])`` binds nothing on the CPU
    backend (2.9, checked: every thread kept all CPUs), so it cannot be used here.
    """
    if device_target != "CPU" or not hasattr(os, "sched_setaffinity"):
        return None
    import mindspore as ms
    threads = int(ms.get_context("runtime_num_threads") or 1)
    cores = rank_cores(os.environ, os.sched_getaffinity(0), threads)
    if cores is None:
        return None
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cores)
        except OSError:                             # a thread that ended meanwhile
            pass
    logger.info("CPU rank bound to CPUs %s (runtime_num_threads = %d)", cores, threads)
    return cores


def _set_device(target: str) -> None:
    """Set the device unless the process already did (msrun workers may set it, with their device id)."""
    import mindspore as ms
    from mindspore.device_manager import DeviceManagerConf
    if DeviceManagerConf.get_instance().is_device_enable():
        current = ms.get_current_device().device_target
        if current != target:
            raise ValueError(f"context.device_target = {target!r}: this process already runs on {current!r}. "
                             f"Fix: set context.device_target: {current} (or start a new process).")
        return
    ms.set_device(target)


def setup(settings) -> RunContext:
    """Device, PyNative mode, communication (under msrun), auto-parallel context and the rank mesh.

    Args:
        settings: the run's ``RunSettings`` (``check_run``): ``settings.long_seq`` (``LongSeqConfig``) and
            ``settings.runtime`` (the ``context:`` keys; the ``parallel:`` section, applied to MindSpore).

    Returns:
        A ``RunContext`` with the mesh (communication groups created when there is more than one rank).

    Raises:
        ValueError: the degrees do not match the number of ranks, or a bad ``parallel:`` key.
    """
    import mindspore as ms
    from mf_longseq.config import check_world_size
    from mf_longseq.parallel import Mesh
    config = settings.long_seq
    _set_device(config.device_target)
    configure_op_dispatch(config.device_target)
    ms.set_context(mode=ms.PYNATIVE_MODE, **runtime_context_kwargs(settings.runtime.context))
    distributed = under_msrun()
    rank, world_size = 0, 1
    if distributed:
        from mindspore.communication import GlobalComm, get_group_size, get_rank, init
        if not GlobalComm.INITED:                   # a process may run several jobs (tests): init once
            init()
        rank, world_size = get_rank(), get_group_size()
    check_world_size(config, world_size)
    applied = apply_parallel_context(settings.runtime.parallel, world_size=world_size, rank=rank)
    mesh = Mesh.from_config(config, rank=rank)
    if world_size > 1:
        mesh.create_groups()
    bind_rank_cores(config.device_target)
    unused = tuple(sorted(k for k in applied if k not in USED_BY_PLUGIN))
    return RunContext(rank=rank, world_size=world_size, mesh=mesh, distributed=distributed,
                      parallel_context=applied, not_used_by_plugin=unused)
