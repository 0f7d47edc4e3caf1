"""Who may talk to the host transport (``host_p2p.py``): a per-group secret and a challenge-response hello.

The secret: at a group's first transfer every rank of the group draws ``WORDS`` random 24-bit words
(``secrets``), and one AllReduce of the group (the same one that exchanges the listening addresses) gives every
rank of the group every rank's words; the key is SHA-256 over a label, the group name, its ranks and all the
words.  Only the processes that took part in that collective know it; it is never sent on the host transport's
sockets.  (The collective's own traffic is MindSpore's: whoever can read it - e.g. capture packets between the
nodes - can also read the K/V blocks, which are not encrypted; the protection here is against a process that
connects, not against one that listens on the wire.)

The hello (RFC 2104 HMAC-SHA256 for every proof), after the connecting rank ``src`` opened a TCP connection to
rank ``dst``'s listening port::

    src -> dst   HELLO      magic "MFLS", version, src, dst, client nonce (16 bytes), group name
    dst -> src   CHALLENGE  server nonce (16 bytes), HMAC(key, "server" | transcript)
    src -> dst   PROOF      HMAC(key, "client" | transcript)
    dst -> src   ACK        one byte: the connection is this peer's (dst reads its messages from now on)

``transcript`` = src, dst, both nonces and the group name.  The server's nonce is fresh per connection, so a
recorded PROOF does not pass again (replay); the client checks the server's proof, so it never sends a K/V block
to a process that merely took the port.  Every read of the hello has a short deadline (``HANDSHAKE_TIMEOUT_S``)
and sizes fixed in advance (a group name of at most ``MAX_GROUP_NAME`` bytes): a stranger costs no allocation
beyond them.  ``Refusals`` keeps the reason of every refused connection and logs the first ones to stderr.
"""
import hashlib
import hmac
import secrets
import socket
import struct
import sys
import threading
import time
from collections import deque
from typing import Callable, Optional, Sequence, Tuple

import numpy as np

MAGIC, VERSION = b"MFLS", 1
WORDS = 11                                  # random 24-bit words per rank: 264 bits each, exact in float32
NONCE = 16
MAX_GROUP_NAME = 255
HANDSHAKE_TIMEOUT_S = 10.0                  # a connection that has not proved itself by then is closed
MAX_PENDING = 16                            # hellos served at once; more connections are closed at once
_HELLO = struct.Struct(f"<4sHqq{NONCE}sH")  # magic, version, src, dst, client nonce, group name length
_DIGEST = hashlib.sha256().digest_size
ACK = b"\x01"


class HandshakeError(ConnectionError):
    """A connection that did not prove it comes from a rank of the group (the message says why)."""


def random_words() -> np.ndarray:
    """``WORDS`` random integers in [0, 2**24) (exact in float32, the dtype every backend all-reduces)."""
    return np.array([secrets.randbelow(1 << 24) for _ in range(WORDS)], np.float32)


def group_key(group_name: str, ranks: Sequence[int], words: np.ndarray) -> bytes:
    """The group's key: SHA-256 of a label, the group name, its global ranks and every rank's random words
    (a ``len(ranks) x WORDS`` array, identical on every rank after the AllReduce)."""
    digest = hashlib.sha256(b"mf_longseq host p2p key v1\0" + group_name.encode() + b"\0")
    digest.update(np.asarray(ranks, np.int64).tobytes())
    digest.update(np.asarray(words, np.float32).astype(np.int64).tobytes())
    return digest.digest()


def _transcript(src: int, dst: int, client_nonce: bytes, server_nonce: bytes, group_name: str) -> bytes:
    return struct.pack("<qq", src, dst) + client_nonce + server_nonce + group_name.encode()


def _proof(key: bytes, side: bytes, transcript: bytes) -> bytes:
    return hmac.new(key, side + b"\0" + transcript, hashlib.sha256).digest()


def recv_exact(sock, view, deadline: Optional[float] = None) -> None:
    """Fill ``view`` (a memoryview) from ``sock``; ConnectionError when the peer closes first, TimeoutError
    when ``deadline`` (``time.monotonic()``) passes first (the socket's timeout is set to what remains)."""
    while len(view):
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no complete hello within the handshake deadline")
            sock.settimeout(left)
        got = sock.recv_into(view)
        if got == 0:
            raise ConnectionError("connection closed by the peer")
        view = view[got:]


def _recv(sock, size: int, deadline: Optional[float] = None) -> bytes:
    buf = bytearray(size)
    recv_exact(sock, memoryview(buf), deadline)
    return bytes(buf)


def client_handshake(sock, key: bytes, src: int, dst: int, group_name: str) -> None:
    """The connecting side (rank ``src`` to rank ``dst``), on a connected ``sock`` with a deadline set.

    Raises:
        HandshakeError: the listener did not prove it knows the group's key, or did not accept the connection.
        OSError: the connection failed or timed out.
    """
    name = group_name.encode()
    nonce = secrets.token_bytes(NONCE)
    sock.sendall(_HELLO.pack(MAGIC, VERSION, src, dst, nonce, len(name)) + name)
    reply = _recv(sock, NONCE + _DIGEST)
    server_nonce, server_proof = reply[:NONCE], reply[NONCE:]
    transcript = _transcript(src, dst, nonce, server_nonce, group_name)
    if not hmac.compare_digest(server_proof, _proof(key, b"server", transcript)):
        raise HandshakeError(f"the process listening at {sock.getpeername()} is not rank {dst} of group "
                             f"{group_name} (wrong proof)")
    sock.sendall(_proof(key, b"client", transcript))
    if _recv(sock, 1) != ACK:
        raise HandshakeError(f"rank {dst} did not accept the connection")


def server_handshake(sock, rank: int, key_of: Callable[[str, float], Optional[Tuple[bytes, Sequence[int]]]],
                     deadline: float) -> Tuple[int, str]:
    """The listening side (this process is global rank ``rank``); returns (src rank, group name) once proved.

    ``key_of(group_name, seconds)`` gives (key, global ranks) of a group this process belongs to, waiting up to
    ``seconds`` for its address exchange to finish, or None.  Everything must arrive before ``deadline``
    (``time.monotonic()``).  The caller sends ``ACK`` (or closes) afterwards.

    Raises:
        HandshakeError: anything but a valid hello from another rank of a known group.
        OSError: the connection failed or the deadline passed.
    """
    magic, version, src, dst, client_nonce, length = _HELLO.unpack(_recv(sock, _HELLO.size, deadline))
    if magic != MAGIC or version != VERSION:
        raise HandshakeError(f"not an mf_longseq host p2p hello (magic {magic!r}, version {version})")
    if length > MAX_GROUP_NAME:
        raise HandshakeError(f"group name of {length} bytes (at most {MAX_GROUP_NAME})")
    group_name = _recv(sock, length, deadline).decode("utf-8", errors="replace")
    if dst != rank:
        raise HandshakeError(f"hello for rank {dst}, this is rank {rank}")
    known = key_of(group_name, max(0.0, deadline - time.monotonic()))
    if known is None:
        raise HandshakeError(f"unknown group {group_name!r}")
    key, ranks = known
    if src not in ranks:
        raise HandshakeError(f"claimed rank {src} is not a rank of group {group_name} {tuple(ranks)}")
    server_nonce = secrets.token_bytes(NONCE)
    transcript = _transcript(src, dst, client_nonce, server_nonce, group_name)
    sock.sendall(server_nonce + _proof(key, b"server", transcript))
    if not hmac.compare_digest(_recv(sock, _DIGEST, deadline), _proof(key, b"client", transcript)):
        raise HandshakeError(f"wrong proof for claimed rank {src} of group {group_name} (not a rank of this "
                             "launch, or a replayed hello)")
    return src, group_name


class Refusals:
    """Connections this transport refused: a count, the last ``keep`` reasons, the first ``log_first`` on
    stderr (so a flood of strangers cannot fill a worker log)."""

    def __init__(self, rank: int, keep: int = 100, log_first: int = 20, out=None):
        self.rank, self.log_first, self.out = rank, log_first, out
        self.count = 0
        self.recent: deque = deque(maxlen=keep)
        self._lock = threading.Lock()

    def add(self, peer, reason: str) -> None:
        with self._lock:
            self.count += 1
            self.recent.append((peer, reason))
            count = self.count
        if count <= self.log_first:
            more = "; further refusals are counted, not logged" if count == self.log_first else ""
            print(f"mf_longseq host p2p (rank {self.rank}): refused a connection from {peer}: {reason}; "
                  f"the run goes on{more}", file=self.out or sys.stderr, flush=True)


def connect_proved(address, key: bytes, src: int, dst: int, group_name: str, deadline: float,
                   is_closed: Callable[[], bool]):
    """A TCP connection to ``address`` whose hello ``dst`` accepted; retried until ``deadline`` (monotonic).

    Retried: refused or reset connections, a listener busy with other hellos, a wrong proof (a process that took
    the port).  Raises the last error once the deadline passed or the transport closed.
    """
    while True:
        sock = None
        try:
            sock = socket.create_connection(address, timeout=max(0.1, min(HANDSHAKE_TIMEOUT_S,
                                                                           deadline - time.monotonic())))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            client_handshake(sock, key, src, dst, group_name)
            sock.settimeout(None)
            return sock
        except OSError:
            if sock is not None:
                sock.close()
            if time.monotonic() > deadline or is_closed():
                raise
            time.sleep(0.05)
