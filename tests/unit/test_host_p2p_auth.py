"""The host transport admits only its own ranks (issue 20, item 2), shown with transports in this process:
a stranger's header is never received, oversize headers allocate nothing, a bad or replayed hello and a second
connection of a connected rank are refused and logged, a flood of strangers keeps the thread count bounded, and
in every case the healthy exchange still returns the peer's bytes."""
import socket
import struct
import threading
import time

import numpy as np
import pytest
from mindspore import Tensor

from mf_longseq.parallel import host_auth, host_p2p
from mf_longseq.parallel.host_p2p import HostTransport
from mf_longseq.parallel.mesh import Group

SECRET = b"test secret of the in-process pair"
X0 = np.arange(12, dtype=np.float32).reshape(3, 4)
X1 = -np.arange(12, dtype=np.float32).reshape(3, 4)


@pytest.fixture
def pair():
    """Ranks 0 and 1 in this process, knowing each other's address and the group's key; closed afterwards."""
    a = HostTransport(0, timeout=20, host="127.0.0.1", handshake_timeout=1.0, max_pending=8)
    b = HostTransport(1, timeout=20, host="127.0.0.1", handshake_timeout=1.0, max_pending=8)
    for t in (a, b):
        t.set_addresses("pair", {0: ("127.0.0.1", a.port), 1: ("127.0.0.1", b.port)}, SECRET)
    groups = [Group(axis="cp", ranks=(0, 1), index=i, name="pair") for i in (0, 1)]
    yield a, b, groups
    a.close(), b.close()


def _exchange(a, b, groups):
    """One healthy exchange: each rank must receive exactly the other's tensor."""
    ha, hb = a.start(Tensor(X0), groups[0], 1, 1), b.start(Tensor(X1), groups[1], 0, 0)
    assert np.array_equal(ha.wait().asnumpy(), X1), "rank 0 did not receive rank 1's tensor"
    assert np.array_equal(hb.wait().asnumpy(), X0), "rank 1 did not receive rank 0's tensor"


def _stranger(port: int, payload: bytes, linger: float = 0.2) -> None:
    with socket.create_connection(("127.0.0.1", port)) as sock:
        try:
            sock.sendall(payload)
        except OSError:
            pass                                                     # refused and closed under us: fine
        time.sleep(linger)


def _wait_refused(t, count: int, seconds: float = 5.0):
    deadline = time.time() + seconds
    while t.refusals.count < count and time.time() < deadline:
        time.sleep(0.02)
    return [reason for _, reason in t.refusals.recent]


def _old_hello_and_header(rank: int, nbytes: int) -> bytes:
    return struct.pack("<q", rank) + struct.pack("<QQ", 0, nbytes)


def test_a_strangers_injected_block_is_never_received(pair):
    a, b, groups = pair
    injected = np.full(12, 666.0, np.float32).tobytes()
    _stranger(a.port, _old_hello_and_header(1, len(injected)) + injected)
    reasons = _wait_refused(a, 1)
    assert any("not an mf_longseq host p2p hello" in r for r in reasons), reasons
    _exchange(a, b, groups)


@pytest.mark.parametrize("nbytes", [2 ** 62, 2 ** 33])
def test_an_oversize_header_from_a_stranger_allocates_nothing(pair, nbytes):
    a, b, groups = pair
    before = _rss_mib()
    with socket.create_connection(("127.0.0.1", a.port)) as sock:
        sock.sendall(_old_hello_and_header(1, nbytes))
        chunk, sent = bytes(1 << 20), 0
        try:
            while sent < 256 << 20:                                  # the issue sent 512 MiB after 2**33
                sock.sendall(chunk)
                sent += len(chunk)
        except OSError:
            pass                                                     # the transport closed the connection
    _wait_refused(a, 1)
    assert _rss_mib() - before < 64, f"RSS grew by {_rss_mib() - before:.0f} MiB"
    _exchange(a, b, groups)


def test_an_oversize_header_from_a_proved_rank_fails_only_that_receive_naming_sizes():
    """Even a rank that knows the key cannot make the reader allocate what is not due: the header is checked
    against the receive started here (48 bytes) and the error names both sizes."""
    t = HostTransport(0, timeout=5, host="127.0.0.1", handshake_timeout=1.0)
    t.set_addresses("g", {0: ("127.0.0.1", t.port), 1: ("127.0.0.1", 1)}, SECRET)
    try:
        with socket.create_connection(("127.0.0.1", t.port), timeout=5) as sock:
            host_auth.client_handshake(sock, SECRET, 1, 0, "g")
            handle = t.start(Tensor(X0), Group(axis="cp", ranks=(0, 1), index=0, name="g"), 0, 1)
            sock.sendall(struct.pack("<QQ", 0, 2 ** 62))
            with pytest.raises(ConnectionError, match=r"rank 1: message 0 announced 4611686018427387904 bytes "
                                                      r"where 48 were due"):
                handle.wait()
        # rank 0's message to itself went out, so its own proved connection (and that reader) exists; rank 1's
        # reader ends on its own thread, so give it a moment under load instead of racing it
        assert t.wait_sent(handle._sent, 5), "rank 0's message to itself was never sent"
        deadline, readers = time.monotonic() + 10, None
        while time.monotonic() < deadline:
            readers = [th for th in threading.enumerate() if th.name == "mfls-p2p-recv"]
            if len(readers) == 1:
                break
            time.sleep(0.02)
        assert len(readers) == 1, "rank 1's reader should have ended (only rank 0's own connection is read)"
        assert "announced 4611686018427387904 bytes" in t.inbox(1).error
    finally:
        t.close()


def test_bad_hellos_are_refused_and_logged_without_touching_the_run(pair, capsys):
    a, b, groups = pair
    hello = struct.Struct("<4sHqq16sH")
    bad = {
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + bytes(40): "not an mf_longseq host p2p hello",
        hello.pack(b"MFLS", 1, 1, 0, bytes(16), 4) + b"pair" + bytes(32): "wrong proof for claimed rank 1",
        hello.pack(b"MFLS", 1, 7, 0, bytes(16), 4) + b"pair": "claimed rank 7 is not a rank of group pair",
        hello.pack(b"MFLS", 1, 1, 5, bytes(16), 4) + b"pair": "hello for rank 5, this is rank 0",
        hello.pack(b"MFLS", 1, 1, 0, bytes(16), 60000): "group name of 60000 bytes",
        hello.pack(b"MFLS", 1, 1, 0, bytes(16), 5) + b"other": "unknown group 'other'",
    }
    for payload in bad:
        _stranger(a.port, payload, linger=0.0)
    reasons = _wait_refused(a, len(bad))
    for want in bad.values():
        assert any(want in r for r in reasons), (want, reasons)
    err = capsys.readouterr().err
    assert "mf_longseq host p2p (rank 0): refused a connection from ('127.0.0.1'," in err
    assert "the run goes on" in err
    _exchange(a, b, groups)


def test_a_replayed_hello_and_a_second_connection_of_a_connected_rank_are_refused():
    t = HostTransport(0, timeout=5, host="127.0.0.1", handshake_timeout=1.0)
    t.set_addresses("g", {0: ("127.0.0.1", t.port), 1: ("127.0.0.1", 1)}, SECRET)
    recorded = []

    class Recorder:                                       # a socket that remembers what the client sent
        def __init__(self, sock):
            self.sock = sock

        def sendall(self, data):
            recorded.append(bytes(data))
            self.sock.sendall(data)

        def __getattr__(self, name):
            return getattr(self.sock, name)
    try:
        first = socket.create_connection(("127.0.0.1", t.port), timeout=5)
        host_auth.client_handshake(Recorder(first), SECRET, 1, 0, "g")          # proved and accepted
        with socket.create_connection(("127.0.0.1", t.port), timeout=5) as replay:
            replay.sendall(recorded[0])                                          # the recorded hello
            replay.recv(48)                                                      # a fresh challenge
            replay.sendall(recorded[1])                                          # the recorded proof
            assert replay.recv(1) == b"", "a replayed proof was accepted"
        with socket.create_connection(("127.0.0.1", t.port), timeout=5) as second:
            with pytest.raises(OSError):
                host_auth.client_handshake(second, SECRET, 1, 0, "g")           # proved, but rank 1 is taken
        reasons = _wait_refused(t, 2)
        assert any("wrong proof for claimed rank 1" in r and "replayed" in r for r in reasons), reasons
        assert any("rank 1 is already connected (one connection per peer)" in r for r in reasons), reasons
        # the first (proved) connection is still rank 1's: its message arrives
        handle = t.start(Tensor(X0), Group(axis="cp", ranks=(0, 1), index=0, name="g"), 0, 1)
        first.sendall(struct.pack("<QQ", 0, X1.nbytes) + X1.tobytes())
        assert np.array_equal(handle.wait().asnumpy(), X1)
        first.close()
    finally:
        t.close()


def test_the_client_refuses_a_listener_that_does_not_know_the_key():
    with socket.create_server(("127.0.0.1", 0)) as impostor:
        port = impostor.getsockname()[1]

        def serve():
            conn, _ = impostor.accept()
            with conn:
                conn.recv(1024)
                conn.sendall(bytes(48))                                          # a nonce and a made-up proof
                time.sleep(0.5)
        threading.Thread(target=serve, daemon=True).start()
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            with pytest.raises(host_auth.HandshakeError, match=r"is not rank 1 of group g \(wrong proof\)"):
                host_auth.client_handshake(sock, SECRET, 0, 1, "g")


def _p2p_threads():
    return [th for th in threading.enumerate() if th.name.startswith("mfls-p2p")]


def test_three_hundred_strangers_keep_the_thread_count_bounded(pair):
    a, b, groups = pair
    _exchange(a, b, groups)                                        # connections and their threads exist
    baseline = len(_p2p_threads())
    strangers, peak = [], 0
    for _ in range(300):
        try:
            strangers.append(socket.create_connection(("127.0.0.1", a.port), timeout=5))
        except OSError:
            pass
        peak = max(peak, len(_p2p_threads()))
    time.sleep(0.3)
    peak = max(peak, len(_p2p_threads()))
    assert len(strangers) >= 200, "the test could not open the connections"
    assert peak <= baseline + a.max_pending, (baseline, peak)
    _exchange(a, b, groups)                                        # the run goes on, strangers still connected
    for sock in strangers:
        sock.close()
    deadline = time.time() + 5
    while len(_p2p_threads()) > baseline and time.time() < deadline:
        time.sleep(0.05)
    assert len(_p2p_threads()) == baseline, "threads of strangers left alive"
    assert a.refusals.count >= len(strangers) - a.max_pending


def test_a_fresh_transport_can_connect_while_strangers_hold_every_pending_slot(pair):
    """The connecting side retries until its timeout: strangers holding the pending hellos delay, not break."""
    a, b, groups = pair
    holders = [socket.create_connection(("127.0.0.1", a.port)) for _ in range(a.max_pending)]
    try:
        time.sleep(0.1)
        _exchange(a, b, groups)
    finally:
        for sock in holders:
            sock.close()


def test_one_host_groups_listen_on_loopback_only(monkeypatch):
    """The address exchange: every rank of the group on this host -> the port listens on 127.0.0.1 even
    when the scheduler's address is routable; ranks on two hosts -> the routable address."""
    import mf_longseq.parallel.comm_core as comm_core
    routable = next((ip for ip in _local_ipv4s() if not ip.startswith("127.")), None)
    if routable is None:
        pytest.skip("no routable IPv4 address on this machine")
    monkeypatch.setattr(host_p2p, "local_ipv4", lambda: routable)
    other_host = [[10, 9, 9, 9]]

    def fake_allreduce(x, group_name):                 # the other rank's row, as the real AllReduce would add
        table = x.asnumpy().copy()
        if table.ndim == 2:
            table[1, :4] = other_host[0] if other_host[0] else table[0, :4]
            table[1, 4:] = 7
        else:
            table[1] = 50000
        return Tensor(table)
    monkeypatch.setattr(comm_core, "allreduce_sum", fake_allreduce)
    for other, want in ((None, "127.0.0.1"), ([10, 9, 9, 9], routable)):
        other_host[0] = other
        t = HostTransport(0, timeout=5)
        try:
            table = t.addresses(Group(axis="cp", ranks=(0, 1), index=0, name="g"))
            assert list(t._listeners) == [want]
            assert table[0] == (want, t._listeners[want].getsockname()[1])
            assert table[1][1] == 50000 and len(t.group_key("g")) == 32
        finally:
            t.close()


def _local_ipv4s():
    import subprocess
    out = subprocess.run(["hostname", "-I"], capture_output=True, text=True).stdout.split()
    return [ip for ip in out if ip.count(".") == 3]


def _rss_mib() -> float:
    with open("/proc/self/status", encoding="utf-8") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0
