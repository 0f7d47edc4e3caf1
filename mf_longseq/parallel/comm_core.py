"""The base of the exchanges (``comm.py``): byte counters, the native-or-emulated rule, AllReduce, started
exchanges.  Nothing here knows about attention; import these names from ``comm.py``.
"""
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Dict

import mindspore as ms
from mindspore import ops


@dataclass
class CommStats:
    """Bytes and calls per exchange kind, for one process."""

    calls: Dict[str, int] = field(default_factory=lambda: defaultdict(int))
    logical_bytes: Dict[str, int] = field(default_factory=lambda: defaultdict(int))
    wire_bytes: Dict[str, int] = field(default_factory=lambda: defaultdict(int))
    in_flight_bytes: int = 0
    peak_in_flight_bytes: int = 0

    def add(self, kind: str, logical: int, wire: int) -> None:
        self.calls[kind] += 1
        self.logical_bytes[kind] += int(logical)
        self.wire_bytes[kind] += int(wire)

    def reset(self) -> None:
        self.calls.clear()
        self.logical_bytes.clear()
        self.wire_bytes.clear()
        self.in_flight_bytes = self.peak_in_flight_bytes = 0

    def started(self, nbytes: int) -> None:
        self.in_flight_bytes += int(nbytes)
        self.peak_in_flight_bytes = max(self.peak_in_flight_bytes, self.in_flight_bytes)

    def finished(self, nbytes: int) -> None:
        self.in_flight_bytes -= int(nbytes)

    def total(self, which: str = "logical") -> int:
        table = self.logical_bytes if which == "logical" else self.wire_bytes
        return sum(table.values())

    def as_dict(self) -> dict:
        return {k: {"calls": self.calls[k], "logical_bytes": self.logical_bytes[k], "wire_bytes": self.wire_bytes[k]}
                for k in sorted(self.calls)}


def is_emulated(group) -> bool:
    """True where the backend lacks sub-group AllGather / AlltoAll / send-receive (CPU)."""
    return group.device_target == "CPU"


def _nbytes(x) -> int:
    return x.size * x.itemsize


def allreduce_sum(x, group_name: str, upcast: bool = True):
    # AllReduce of bf16 is not available on every backend's CPU kernels: move fp32, hand back the input dtype.
    # Native backends (HCCL) reduce bf16 as is (upcast=False): fp32 would double the bytes of every mp all-reduce.
    if upcast and x.dtype == ms.bfloat16:
        return ops.AllReduce(group=group_name)(x.astype(ms.float32)).astype(x.dtype)
    return ops.AllReduce(group=group_name)(x)


def all_reduce(x, group):
    """Sum of ``x`` over the group, on every rank."""
    if group.size == 1:
        return x
    n = group.size
    group.stats.add("all_reduce", _nbytes(x) * 2 * (n - 1) // n, _nbytes(x))
    return allreduce_sum(x, group.name, upcast=is_emulated(group))


def all_reduce_world(x):
    """Sum of ``x`` over every process of the launch (the world group), on every rank; no mesh needed."""
    from mindspore.communication import GlobalComm
    return allreduce_sum(x, GlobalComm.WORLD_COMM_GROUP)


class Pending:
    """A started exchange: ``wait()`` (once) finishes it and returns its result.

    Args:
        finish: called by ``wait()``; returns the received tensor.
        stats, nbytes: the group's ``CommStats`` and the logical bytes in flight until ``wait()``.
    """

    def __init__(self, finish, stats=None, nbytes: int = 0):
        self._finish, self._stats, self._nbytes = finish, stats, nbytes
        if stats is not None:
            stats.started(nbytes)

    def wait(self):
        """The received tensor. Raises RuntimeError when called a second time."""
        if self._finish is None:
            raise RuntimeError("Pending.wait() called twice: an exchange is finished once")
        finish, self._finish = self._finish, None
        if self._stats is not None:
            self._stats.finished(self._nbytes)
        return finish()
