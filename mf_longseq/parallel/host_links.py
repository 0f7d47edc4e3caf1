"""The per-peer state of the host transport (``host_p2p.py``): what arrives from one rank (``Inbox``, filled by
``read_messages`` on that connection's thread) and what goes to one rank (``Outbox``, one sender thread).

A message is a header (``HEADER``: sequence number, payload bytes) and the payload.  ``read_messages`` checks the
header against the receive that is due - the k-th message from a rank must be the k-th receive this process
started from it (``Inbox.expect``), with that many bytes - before it allocates anything.
"""
import queue
import socket
import struct
import threading
import time
from typing import Callable, Dict, Optional, Tuple

import numpy as np

from mf_longseq.parallel import host_auth
from mf_longseq.parallel.host_auth import recv_exact

HEADER = struct.Struct("<QQ")             # sequence number, payload bytes


class ProtocolError(Exception):
    """A proved peer's header is not the message that is due (the ranks started different transfers)."""


class Inbox:
    """Messages from one source rank, by sequence number, filled by that connection's reader thread."""

    def __init__(self):
        self.cond = threading.Condition()
        self.messages: Dict[int, np.ndarray] = {}
        self.expected: Dict[int, int] = {}      # sequence number -> bytes, registered by ``start``
        self.arrived = 0
        self.error: Optional[str] = None

    def expect(self, seq: int, nbytes: int) -> None:
        with self.cond:
            self.expected[seq] = nbytes
            self.cond.notify_all()

    def due(self, seq: int, closed) -> Optional[int]:
        """Bytes of message ``seq``, once this process started that receive (None: the transport closed)."""
        with self.cond:
            while seq not in self.expected:
                if closed():
                    return None
                self.cond.wait(1.0)
            return self.expected.pop(seq)

    def take(self, seq: int, timeout: float) -> np.ndarray:
        with self.cond:
            if not self.cond.wait_for(lambda: seq in self.messages or self.error is not None, timeout):
                raise TimeoutError
            if seq not in self.messages:
                raise ConnectionError(self.error)
            return self.messages.pop(seq)


class Outbox:
    """One destination: its connection and the thread that sends queued messages in order."""

    def __init__(self, transport: "host_p2p.HostTransport", dst: int, address: Tuple[str, int], group_name: str):
        self.transport, self.dst, self.address, self.group_name = transport, dst, address, group_name
        self.jobs: "queue.Queue" = queue.Queue()
        self.sock: Optional[socket.socket] = None
        self.sent_seq = 0
        self.thread = threading.Thread(target=self._run, name=f"mfls-p2p-send-{dst}", daemon=True)
        self.thread.start()

    def _connect(self):
        t = self.transport
        sock = host_auth.connect_proved(self.address, t.group_key(self.group_name), t.rank, self.dst,
                                        self.group_name, time.monotonic() + t.timeout, lambda: t.closed)
        self.sock = sock
        t.track(sock)

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
                    self.sock.sendall(HEADER.pack(self.sent_seq, payload.nbytes))
                    self.sock.sendall(payload)
                    self.sent_seq += 1
                except Exception as err:                         # noqa: BLE001 - reported by wait()
                    error = f"{type(err).__name__}: {err}"
            done.append(error)
            self.transport.notify()



def read_messages(conn, src: int, inbox: Inbox, closed: Callable[[], bool]) -> None:
    """Read proved rank ``src``'s messages from ``conn`` into ``inbox`` until the connection ends; every error
    (closed connection, a header that is not the one due) is recorded in ``inbox.error`` for ``wait()``."""
    header = bytearray(HEADER.size)
    try:
        while True:
            recv_exact(conn, memoryview(header))
            seq, nbytes = HEADER.unpack(header)
            if seq != inbox.arrived:
                raise ProtocolError(f"message {seq} arrived where {inbox.arrived} was due")
            due = inbox.due(seq, closed)
            if due is None:
                return
            if nbytes != due:
                raise ProtocolError(f"message {seq} announced {nbytes} bytes where {due} were due: the "
                                    "ranks started different transfers")
            data = np.empty(nbytes, np.uint8)
            recv_exact(conn, memoryview(data))
            with inbox.cond:
                inbox.messages[seq] = data
                inbox.arrived += 1
                inbox.cond.notify_all()
    except Exception as err:                                 # noqa: BLE001 - reported by wait()
        if not closed():
            what = f"rank {src}: {err}" if isinstance(err, ProtocolError) else \
                f"rank {src} closed its connection ({err}): did it exit, fail or restart?"
            with inbox.cond:
                inbox.error = what
                inbox.cond.notify_all()
