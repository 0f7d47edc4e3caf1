"""Point-to-point transfers between CPU ranks over TCP, on background threads.  Knows nothing about attention.

Why: under msrun with CPU workers MindSpore has no Send/Receive, and an AllReduce-based emulation runs on the same
execution queue as the compute, so it cannot overlap it.  Here a transfer is started by copying the tensor to the
host once (``asnumpy()``); the bytes then move on threads of this module while the caller launches its next
kernel; ``HostTransfer.wait()`` hands back a MindSpore Tensor.  Socket send/receive release the GIL in the system
call, so the threads progress while the Python thread waits for a kernel.

Wiring (one ``HostTransport`` per process, created at first use, closed at exit):

* each process listens on one TCP port; the addresses of a group's ranks (IPv4 host as 4 integers, port) are
  exchanged once per group, at its first transfer, by an AllReduce in that group (every rank of the group calls
  the transfer at the same point, as for any collective); the host is the address this node uses to reach the
  msrun scheduler (``MS_SCHED_HOST``), so ranks on other nodes can connect;
* one outgoing connection per destination rank, with one sender thread sending in the order transfers were
  started; one reader thread per incoming connection, which receives messages as they arrive (so a sender never
  waits for the receiver's program to reach its ``wait()``: no cycle of waits can form);
* every message carries a sequence number per (sender, receiver) pair; a receive started as the k-th from a
  source takes the k-th message from it, whatever the order of the ``wait()`` calls.  Both sides must start
  their transfers to/from each other in the same order (true when every rank runs the same program).

Errors: ``TimeoutError`` when a peer does not connect or send within ``timeout`` seconds, ``ConnectionError``
when a peer closes its connection; both name this rank, the peer, the group and the fix.
"""
import atexit
import ipaddress
import math
import os
import queue
import socket
import struct
import threading
import time
from typing import Dict, Optional, Tuple

import numpy as np

_HEADER = struct.Struct("<QQ")            # sequence number, payload bytes
_HELLO = struct.Struct("<q")              # the connecting process's global rank
TIMEOUT_ENV = "MF_LONGSEQ_P2P_TIMEOUT"
DEFAULT_TIMEOUT_S = 300.0


def _timeout_seconds(value, source: str) -> float:
    """``value`` as a finite number of seconds > 0; ``source`` names where it came from in the error.

    Raises:
        ValueError: not a number, not finite, or not positive.
    """
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = float("nan")
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"{source} = {value!r}: the host transport's timeout must be a finite number of seconds > 0. "
                         f"Fix: e.g. {source} = {DEFAULT_TIMEOUT_S:.0f}.")
    return seconds


def default_timeout() -> float:
    """Seconds from ``MF_LONGSEQ_P2P_TIMEOUT`` (default 300), read when a transport is made, not at import."""
    value = os.environ.get(TIMEOUT_ENV)
    return DEFAULT_TIMEOUT_S if value is None else _timeout_seconds(value, TIMEOUT_ENV)
_FIX = ("check that every rank of the group is alive and runs the same transfers in the same order (see its "
        "worker log); raise MF_LONGSEQ_P2P_TIMEOUT (seconds) if a rank is only slow")


def _recv_exact(sock, view) -> None:
    while len(view):
        got = sock.recv_into(view)
        if got == 0:
            raise ConnectionError("connection closed by the peer")
        view = view[got:]


def local_ipv4() -> str:
    """The IPv4 address this node uses to reach the msrun scheduler (``MS_SCHED_HOST``); 127.0.0.1 without one."""
    host = os.environ.get("MS_SCHED_HOST", "127.0.0.1")
    try:
        target = socket.gethostbyname(host)
        if ipaddress.ip_address(target).is_loopback:
            return "127.0.0.1"
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:     # no packet is sent
            probe.connect((target, int(os.environ.get("MS_SCHED_PORT", "8118"))))
            return probe.getsockname()[0]
    except OSError:
        return "127.0.0.1"


class _Inbox:
    """Messages from one source rank, by sequence number, filled by that connection's reader thread."""

    def __init__(self):
        self.cond = threading.Condition()
        self.messages: Dict[int, np.ndarray] = {}
        self.arrived = 0
        self.error: Optional[str] = None

    def take(self, seq: int, timeout: float) -> np.ndarray:
        with self.cond:
            if not self.cond.wait_for(lambda: seq in self.messages or self.error is not None, timeout):
                raise TimeoutError
            if seq not in self.messages:
                raise ConnectionError(self.error)
            return self.messages.pop(seq)


class _Outbox:
    """One destination: its connection and the thread that sends queued messages in order."""

    def __init__(self, transport: "HostTransport", dst: int, address: Tuple[str, int]):
        self.transport, self.dst, self.address = transport, dst, address
        self.jobs: "queue.Queue" = queue.Queue()
        self.sock: Optional[socket.socket] = None
        self.sent_seq = 0
        self.thread = threading.Thread(target=self._run, name=f"mfls-p2p-send-{dst}", daemon=True)
        self.thread.start()

    def _connect(self):
        deadline = time.monotonic() + self.transport.timeout
        while True:
            try:
                sock = socket.create_connection(self.address, timeout=max(0.1, deadline - time.monotonic()))
                break
            except OSError:
                if time.monotonic() > deadline or self.transport.closed:
                    raise
                time.sleep(0.05)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(None)
        sock.sendall(_HELLO.pack(self.transport.rank))
        self.sock = sock
        self.transport.track(sock)

    def _run(self):
        error = None
        while True:
            job = self.jobs.get()
            if job is None:
                return
            payload, done = job
            if error is None:
                try:
                    if self.sock is None:
                        self._connect()
                    self.transport.pace(payload.nbytes)
                    self.sock.sendall(_HEADER.pack(self.sent_seq, payload.nbytes))
                    self.sock.sendall(payload)
                    self.sent_seq += 1
                except OSError as err:
                    error = f"{type(err).__name__}: {err}"
            done.append(error)
            self.transport.notify()


class HostTransfer:
    """A started send-to-``dst`` / receive-from-``src``; ``wait()`` returns the received array as a Tensor."""

    def __init__(self, transport, src: int, dst: int, recv_seq: int, host: np.ndarray, group_name: str, keep):
        self._transport, self._src, self._dst, self._seq = transport, src, dst, recv_seq
        self._shape, self._dtype, self._group_name = host.shape, host.dtype, group_name
        self._keep = keep                 # the tensor and its host copy, read by the sender thread until sent
        self._sent: list = []             # the sender thread appends None (sent) or the error

    def wait(self, timeout: Optional[float] = None):
        """The received tensor (shape and dtype of the sent one).

        Raises:
            TimeoutError: the source did not send within ``timeout`` (default: the transport's) seconds.
            ConnectionError: a peer closed its connection or could not be reached.
        """
        from mindspore import Tensor
        t = self._transport
        timeout = t.timeout if timeout is None else timeout
        where = f"rank {t.rank}, group {self._group_name}"
        try:
            data = t.inbox(self._src).take(self._seq, timeout)
        except TimeoutError:
            raise TimeoutError(f"host p2p ({where}): nothing received from rank {self._src} within {timeout:.0f} s "
                               f"(message {self._seq}); {_FIX}") from None
        except ConnectionError as err:
            raise ConnectionError(f"host p2p ({where}): receiving from rank {self._src} failed ({err}); "
                                  f"{_FIX}") from None
        if not t.wait_sent(self._sent, timeout):
            raise TimeoutError(f"host p2p ({where}): sending to rank {self._dst} did not finish within "
                               f"{timeout:.0f} s; {_FIX}")
        if self._sent[0] is not None:
            raise ConnectionError(f"host p2p ({where}): sending to rank {self._dst} failed ({self._sent[0]}); {_FIX}")
        self._keep = None
        if data.nbytes != int(np.prod(self._shape)) * self._dtype.itemsize:
            raise ValueError(f"host p2p ({where}): rank {self._src} sent {data.nbytes} bytes, expected a "
                             f"{tuple(self._shape)} {self._dtype} array: the ranks started different transfers")
        return Tensor.from_numpy(data.view(self._dtype).reshape(self._shape))


class HostTransport:
    """This process's TCP endpoint (see module docstring).

    Args:
        rank: this process's global rank (sent to peers when connecting).
        timeout: seconds a connect or a receive may take before an error (finite, > 0; default
            ``MF_LONGSEQ_P2P_TIMEOUT`` or 300).

    Raises:
        ValueError: a timeout (or ``MF_LONGSEQ_P2P_TIMEOUT``) that is not a finite number > 0.
        host: IPv4 address to listen on and to publish (default ``local_ipv4()``).
    """

    def __init__(self, rank: int, timeout: Optional[float] = None, host: Optional[str] = None):
        self.rank = rank
        self.timeout = default_timeout() if timeout is None else _timeout_seconds(timeout, "timeout")
        self.host = host or local_ipv4()
        self.closed = False
        self.pace_bytes_per_s = 0.0   # > 0: each message waits nbytes / rate before it is sent (benchmarks
        #                               emulate a slower link; the wait is a sleep: no CPU, no GIL)
        self._lock = threading.Lock()
        self._sent_cond = threading.Condition(self._lock)
        self._sockets, self._threads = [], []
        self._inboxes: Dict[int, _Inbox] = {}
        self._outboxes: Dict[int, _Outbox] = {}
        self._recv_seq: Dict[int, int] = {}
        self._addresses: Dict[str, Dict[int, Tuple[str, int]]] = {}
        self._listener = socket.create_server((self.host, 0), backlog=64)
        self.port = self._listener.getsockname()[1]
        self._spawn(self._accept_loop, "mfls-p2p-accept")

    # ----------------------------------------------------------------------------------------- threads
    def _spawn(self, target, name, *args):
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        self._threads.append(thread)
        thread.start()

    def track(self, sock) -> None:
        with self._lock:
            self._sockets.append(sock)

    def _accept_loop(self):
        while not self.closed:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return                                           # listener closed
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.track(conn)
            self._spawn(self._read_loop, "mfls-p2p-recv", conn)

    def _read_loop(self, conn):
        hello = bytearray(_HELLO.size)
        src, inbox = None, None
        try:
            _recv_exact(conn, memoryview(hello))
            src = _HELLO.unpack(hello)[0]
            inbox = self.inbox(src)
            header = bytearray(_HEADER.size)
            while True:
                _recv_exact(conn, memoryview(header))
                seq, nbytes = _HEADER.unpack(header)
                data = np.empty(nbytes, np.uint8)
                _recv_exact(conn, memoryview(data))
                with inbox.cond:
                    if seq != inbox.arrived:                     # two connections from one rank (it restarted?)
                        raise ConnectionError(f"message {seq} arrived where {inbox.arrived} was due")
                    inbox.messages[seq] = data
                    inbox.arrived += 1
                    inbox.cond.notify_all()
        except (OSError, ConnectionError) as err:
            if inbox is not None and not self.closed:
                with inbox.cond:
                    inbox.error = f"rank {src} closed its connection ({err}): did it exit, fail or restart?"
                    inbox.cond.notify_all()

    def inbox(self, src: int) -> _Inbox:
        with self._lock:
            return self._inboxes.setdefault(src, _Inbox())

    def notify(self) -> None:
        with self._sent_cond:
            self._sent_cond.notify_all()

    def wait_sent(self, done: list, timeout: float) -> bool:
        with self._sent_cond:
            return self._sent_cond.wait_for(lambda: bool(done), timeout)

    def pace(self, nbytes: int) -> None:
        if self.pace_bytes_per_s > 0:
            time.sleep(nbytes / self.pace_bytes_per_s)

    # ----------------------------------------------------------------------------------------- addresses
    def set_addresses(self, group_name: str, table: Dict[int, Tuple[str, int]]) -> None:
        """Give the addresses of a group's ranks (global rank -> (host, port)) instead of exchanging them."""
        self._addresses[group_name] = dict(table)

    def addresses(self, group) -> Dict[int, Tuple[str, int]]:
        """Global rank -> (host, port) of every rank of ``group``: one AllReduce in the group, at first use."""
        if group.name not in self._addresses:
            from mindspore import Tensor
            from mf_longseq.parallel.comm_core import allreduce_sum
            table = np.zeros((group.size, 5), np.float32)          # 4 octets and a port: exact in float32
            table[group.index] = [*ipaddress.IPv4Address(self.host).packed, self.port]
            summed = allreduce_sum(Tensor(table), group.name).asnumpy().astype(np.int64)
            self._addresses[group.name] = {
                rank: (str(ipaddress.IPv4Address(bytes(int(o) for o in row[:4]))), int(row[4]))
                for rank, row in zip(group.ranks, summed)}
        return self._addresses[group.name]

    # ----------------------------------------------------------------------------------------- transfers
    def start(self, x, group, dst_index: int, src_index: int) -> HostTransfer:
        """Send tensor ``x`` to group index ``dst_index`` and receive a tensor like it from ``src_index``.

        ``x`` is copied to the host here (this waits for the ops that produce it); the bytes move on threads.
        """
        if self.closed:
            raise RuntimeError("host p2p transport is closed (the process is exiting)")
        addresses = self.addresses(group)
        dst, src = group.ranks[dst_index], group.ranks[src_index]
        host = x.asnumpy()
        payload = np.ascontiguousarray(host).reshape(-1).view(np.uint8)
        with self._lock:
            outbox = self._outboxes.get(dst)
            if outbox is None:
                outbox = self._outboxes[dst] = _Outbox(self, dst, addresses[dst])
            seq = self._recv_seq.get(src, 0)
            self._recv_seq[src] = seq + 1
        transfer = HostTransfer(self, src, dst, seq, host, group.name, (x, host))
        outbox.jobs.put((payload, transfer._sent))
        return transfer

    def close(self) -> None:
        """Stop every thread and close every socket (idempotent; registered at exit)."""
        if self.closed:
            return
        self.closed = True
        for outbox in list(self._outboxes.values()):
            outbox.jobs.put(None)
        for outbox in list(self._outboxes.values()):
            outbox.thread.join(timeout=5)
        try:
            self._listener.shutdown(socket.SHUT_RDWR)                  # wakes the accepting thread
        except OSError:
            pass
        self._listener.close()
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
        for thread in self._threads:
            thread.join(timeout=5)


_TRANSPORT: list = []          # this process's transport (a process resource, like the communication backend)


def transport(rank: Optional[int] = None) -> HostTransport:
    """This process's ``HostTransport``, created at first call (``rank``: default MindSpore's ``get_rank()``)."""
    if not _TRANSPORT or _TRANSPORT[0].closed:
        if rank is None:
            from mindspore.communication import get_rank
            rank = get_rank()
        _TRANSPORT[:] = [HostTransport(rank)]
        atexit.register(_TRANSPORT[0].close)
    return _TRANSPORT[0]
