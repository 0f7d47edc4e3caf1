"""Point-to-point transfers between CPU ranks over TCP, on background threads.  Knows nothing about attention.

Why: under msrun with CPU workers MindSpore has no Send/Receive, and an AllReduce-based emulation runs on the same
execution queue as the compute, so it cannot overlap it.  Here a transfer is started by copying the tensor to the
host once (``asnumpy()``); the bytes then move on threads of this module while the caller launches its next
kernel; ``HostTransfer.wait()`` hands back a MindSpore Tensor.  Socket send/receive release the GIL in the system
call, so the threads progress while the Python thread waits for a kernel.

Wiring (one ``HostTransport`` per process, created at first use, closed at exit):

* at a group's first transfer, two AllReduces in that group (every rank of the group calls the transfer at the
  same point, as for any collective) exchange (1) each rank's host - the IPv4 address it uses to reach the msrun
  scheduler (``MS_SCHED_HOST``) - and random words, from which every rank of the group derives the group's key
  (``host_auth.py``), and (2) each rank's listening port.  When every rank of the group has the same host the
  ports listen on loopback (127.0.0.1) only; otherwise on that routable address, still behind the hello;
* one outgoing connection per destination rank, opened with the authenticated hello of ``host_auth.py``
  (challenge-response over the group's key), with one sender thread sending in the order transfers were started;
* an incoming connection is served by one thread: the hello first (a short deadline, at most ``MAX_PENDING``
  hellos at once: more connections are closed at once), then, once the peer proved it is a rank of the group,
  its messages as they arrive (so a sender never waits for the receiver's program to reach its ``wait()``: no
  cycle of waits can form).  One connection per peer: a second proved hello from a connected rank is refused.
  A refused connection is logged (``Refusals``) and touches nothing of the run;
* every message carries a sequence number per (sender, receiver) pair; a receive started as the k-th from a
  source takes the k-th message from it, whatever the order of the ``wait()`` calls.  Both sides must start
  their transfers to/from each other in the same order (true when every rank runs the same program).  The
  header's sequence number and size are checked against the k-th receive started here (its size is that of
  the tensor sent in the same ``start``) before anything is allocated; the reader waits for that ``start``.

Errors: ``TimeoutError`` when a peer does not connect or send within ``timeout`` seconds, ``ConnectionError``
when a peer closes its connection; both name this rank, the peer, the group and the fix.
"""
import atexit
import ipaddress
import math
import os
import socket
import threading
import time
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from mf_longseq.parallel import host_auth, host_links
from mf_longseq.parallel.host_links import Inbox, Outbox

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
        rank: this process's global rank (named in the hello).
        timeout: seconds a connect or a receive may take before an error (finite, > 0; default
            ``MF_LONGSEQ_P2P_TIMEOUT`` or 300).
        host: IPv4 address to listen on (at once) and to publish; default: chosen per group at its address
            exchange (127.0.0.1 when all its ranks are on this host, else ``local_ipv4()``).
        handshake_timeout: seconds an incoming connection may take to prove itself (``host_auth``).
        max_pending: incoming connections served at once before they proved themselves; more are closed.

    Raises:
        ValueError: a timeout (or ``MF_LONGSEQ_P2P_TIMEOUT``) that is not a finite number > 0.
    """

    def __init__(self, rank: int, timeout: Optional[float] = None, host: Optional[str] = None,
                 handshake_timeout: float = host_auth.HANDSHAKE_TIMEOUT_S, max_pending: int = host_auth.MAX_PENDING):
        self.rank = rank
        self.timeout = default_timeout() if timeout is None else _timeout_seconds(timeout, "timeout")
        self.host = host
        self.handshake_timeout, self.max_pending = handshake_timeout, max_pending
        self.closed = False
        self.pace_bytes_per_s = 0.0   # > 0: each message waits nbytes / rate before it is sent (benchmarks
        #                               emulate a slower link; the wait is a sleep: no CPU, no GIL)
        self.refusals = host_auth.Refusals(rank)
        self._lock = threading.Lock()
        self._sent_cond = threading.Condition(self._lock)
        self._groups_cond = threading.Condition()
        self._sockets, self._threads = set(), set()
        self._listeners: Dict[str, socket.socket] = {}
        self._pending = 0
        self._peers: Dict[int, socket.socket] = {}            # src rank -> its one proved connection
        self._inboxes: Dict[int, Inbox] = {}
        self._outboxes: Dict[int, Outbox] = {}
        self._recv_seq: Dict[int, int] = {}
        self._addresses: Dict[str, Dict[int, Tuple[str, int]]] = {}
        self._keys: Dict[str, Tuple[bytes, Tuple[int, ...]]] = {}
        self.port = self.listen(host) if host else None

    # ----------------------------------------------------------------------------------------- threads
    def _spawn(self, target, name, *args):
        def run():
            try:
                target(*args)
            finally:
                with self._lock:
                    self._threads.discard(thread)
        thread = threading.Thread(target=run, name=name, daemon=True)
        with self._lock:
            self._threads.add(thread)
        thread.start()

    def track(self, sock) -> None:
        with self._lock:
            self._sockets.add(sock)

    def _forget(self, sock) -> None:
        with self._lock:
            self._sockets.discard(sock)
        sock.close()

    def listen(self, host: str) -> int:
        """The port listening on ``host`` (opened, with its accepting thread, at first call)."""
        with self._lock:
            listener, new = self._listeners.get(host), host not in self._listeners
            if new:
                listener = self._listeners[host] = socket.create_server((host, 0), backlog=64)
        if new:
            self._spawn(self._accept_loop, "mfls-p2p-accept", listener)
        return listener.getsockname()[1]

    def _accept_loop(self, listener):
        while not self.closed:
            try:
                conn, peer = listener.accept()
            except OSError:
                return                                           # listener closed
            with self._lock:
                busy = self._pending >= self.max_pending
                self._pending += 0 if busy else 1
            if busy:
                conn.close()
                self.refusals.add(peer, f"{self.max_pending} hellos already pending")
                continue
            self.track(conn)
            self._spawn(self._serve, "mfls-p2p-recv", conn, peer)

    def _serve(self, conn, peer):
        """One incoming connection: the hello, then (a proved rank of a group) its messages."""
        src = None
        try:
            src, _ = host_auth.server_handshake(conn, self.rank, self._key_of,
                                                time.monotonic() + self.handshake_timeout)
            with self._lock:
                if src in self._peers:
                    raise host_auth.HandshakeError(f"rank {src} is already connected (one connection per peer)")
                self._peers[src] = conn
            conn.sendall(host_auth.ACK)
            conn.settimeout(None)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except Exception as err:                                 # noqa: BLE001 - a stranger: drop, log, go on
            if not self.closed:
                self.refusals.add(peer, f"{type(err).__name__}: {err}")
            self._forget(conn)
            return
        finally:
            with self._lock:
                self._pending -= 1
        self._read_loop(conn, src)

    def _read_loop(self, conn, src: int):
        """Messages of proved rank ``src`` (``host_links.read_messages``) until its connection ends."""
        host_links.read_messages(conn, src, self.inbox(src), lambda: self.closed)

    def inbox(self, src: int) -> Inbox:
        with self._lock:
            return self._inboxes.setdefault(src, Inbox())

    def notify(self) -> None:
        with self._sent_cond:
            self._sent_cond.notify_all()

    def wait_sent(self, done: list, timeout: float) -> bool:
        with self._sent_cond:
            return self._sent_cond.wait_for(lambda: bool(done), timeout)

    def pace(self, nbytes: int) -> None:
        if self.pace_bytes_per_s > 0:
            time.sleep(nbytes / self.pace_bytes_per_s)

    # ----------------------------------------------------------------------------------------- groups
    def set_addresses(self, group_name: str, table: Dict[int, Tuple[str, int]], secret: bytes) -> None:
        """Give a group's addresses (global rank -> (host, port)) and key (``secret``, >= 16 bytes, the same on
        every rank of the group) instead of exchanging them over the group's collective."""
        if len(secret) < 16:
            raise ValueError(f"secret of {len(secret)} bytes: the host transport's key needs >= 16 random bytes")
        self._addresses[group_name] = dict(table)
        self._set_key(group_name, bytes(secret), tuple(sorted(table)))

    def _set_key(self, group_name: str, key: bytes, ranks: Sequence[int]) -> None:
        with self._groups_cond:
            self._keys[group_name] = (key, tuple(ranks))
            self._groups_cond.notify_all()

    def _key_of(self, group_name: str, seconds: float):
        with self._groups_cond:
            self._groups_cond.wait_for(lambda: group_name in self._keys or self.closed, seconds)
            return self._keys.get(group_name)

    def group_key(self, group_name: str) -> bytes:
        return self._keys[group_name][0]

    def addresses(self, group) -> Dict[int, Tuple[str, int]]:
        """Global rank -> (host, port) of every rank of ``group``, and the group's key: two AllReduces in the
        group, at first use (module docstring)."""
        if group.name not in self._addresses:
            from mindspore import Tensor
            from mf_longseq.parallel.comm_core import allreduce_sum
            words = host_auth.WORDS
            mine = self.host or local_ipv4()
            first = np.zeros((group.size, 4 + words), np.float32)           # 4 octets, random 24-bit words
            first[group.index] = [*ipaddress.IPv4Address(mine).packed, *host_auth.random_words()]
            first = allreduce_sum(Tensor(first), group.name).asnumpy()
            hosts = [str(ipaddress.IPv4Address(bytes(int(o) for o in row[:4]))) for row in first]
            host = self.host or ("127.0.0.1" if len(set(hosts)) == 1 else mine)
            ports = np.zeros(group.size, np.float32)                        # ports < 2**16: exact in float32
            ports[group.index] = self.listen(host)
            ports = allreduce_sum(Tensor(ports), group.name).asnumpy().astype(np.int64)
            self._set_key(group.name, host_auth.group_key(group.name, group.ranks, first[:, 4:]), group.ranks)
            published = ["127.0.0.1"] * group.size if host == "127.0.0.1" and not self.host else hosts
            self._addresses[group.name] = {rank: (published[i], int(ports[i])) for i, rank in enumerate(group.ranks)}
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
                outbox = self._outboxes[dst] = Outbox(self, dst, addresses[dst], group.name)
            seq = self._recv_seq.get(src, 0)
            self._recv_seq[src] = seq + 1
        self.inbox(src).expect(seq, payload.nbytes)
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
        with self._groups_cond:
            self._groups_cond.notify_all()
        for listener in self._listeners.values():
            try:
                listener.shutdown(socket.SHUT_RDWR)                  # wakes the accepting thread
            except OSError:
                pass
            listener.close()
        with self._lock:
            sockets, self._sockets = self._sockets, set()
            threads = list(self._threads)
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
        for thread in threads:
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
