"""Host point-to-point transport (parallel/host_p2p.py): exact bytes both ways for several dtypes and shapes,
a 4-rank ring, waits in any order, clear errors when a peer never sends or goes away, nothing left open."""
import multiprocessing as mp
import re
import socket
import threading

import numpy as np
import pytest
from mindspore import Tensor

import host_p2p_worker as worker
from mf_longseq.parallel.host_p2p import HostTransport, local_ipv4
from mf_longseq.parallel.mesh import Group

SECRET = b"0123456789abcdef-test-secret"


def _ring(size: int, offsets):
    """Run ``size`` spawned ranks of ``worker.run``; returns {rank: {(offset, dtype, shape, src): received}}."""
    ctx = mp.get_context("spawn")
    ports, results = ctx.Queue(), ctx.Queue()
    tables = [ctx.Queue() for _ in range(size)]
    procs = [ctx.Process(target=worker.run, args=(r, size, offsets, ports, tables[r], results)) for r in range(size)]
    for p in procs:
        p.start()
    try:
        table = dict(ports.get(timeout=180) for _ in range(size))
        for q in tables:
            q.put({r: ("127.0.0.1", port) for r, port in table.items()})
        out = dict(results.get(timeout=180) for _ in range(size))
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    for rank, got in out.items():
        assert isinstance(got, dict), f"rank {rank} failed: {got}"
    return out


def _check(out, size):
    for rank, got in out.items():
        for (offset, dtype, shape, src), (got_dtype, got_shape, data) in got.items():
            assert src == (rank - offset) % size
            want = worker.payload(src, dtype, shape, offset)
            assert (got_dtype.lower(), got_shape) == (dtype, tuple(shape)), (rank, src, dtype, shape)
            assert data == want.tobytes(), f"rank {rank}: bytes from rank {src} differ ({dtype} {shape})"


def test_two_ranks_exchange_exact_bytes_of_every_dtype_both_ways():
    out = _ring(2, offsets=(1,))
    assert sorted(out) == [0, 1]
    assert all(len(got) == len(worker.DTYPES) * len(worker.SHAPES) for got in out.values())
    _check(out, 2)


def test_four_rank_ring_shifts_by_one_and_by_two():
    _check(_ring(4, offsets=(1, 2, 3)), 4)


def _pair(timeout: float = 5.0):
    """Two transports in this process, ranks 0 and 1, knowing each other's address."""
    a, b = HostTransport(0, timeout=timeout, host="127.0.0.1"), HostTransport(1, timeout=timeout, host="127.0.0.1")
    table = {0: ("127.0.0.1", a.port), 1: ("127.0.0.1", b.port)}
    for t in (a, b):
        t.set_addresses("pair", table, SECRET)
    groups = [Group(axis="cp", ranks=(0, 1), index=i, name="pair") for i in (0, 1)]
    return (a, b), groups


def _p2p_threads():
    return [t for t in threading.enumerate() if t.name.startswith("mfls-p2p")]


def test_in_process_pair_and_nothing_left_open_after_close():
    (a, b), (ga, gb) = _pair()
    x0, x1 = np.arange(12, dtype=np.float32).reshape(3, 4), -np.arange(12, dtype=np.float32).reshape(3, 4)
    h0, h1 = a.start(Tensor(x0), ga, 1, 1), b.start(Tensor(x1), gb, 0, 0)
    assert np.array_equal(h1.wait().asnumpy(), x0) and np.array_equal(h0.wait().asnumpy(), x1)
    assert _p2p_threads()
    a.close(), b.close()
    assert not _p2p_threads(), "threads left after close()"
    assert all(l.fileno() == -1 for l in a._listeners.values()) and not a._sockets and not b._sockets
    with pytest.raises(RuntimeError, match="transport is closed"):
        a.start(Tensor(x0), ga, 1, 1)


def _wait_fails_then_close(transport, handle, error, pattern):
    try:
        with pytest.raises(error, match=pattern):
            handle.wait()
    finally:
        transport.close()


def test_a_peer_that_never_sends_times_out_naming_rank_group_seconds_and_fix():
    with socket.socket() as unused:                      # a port nobody listens on
        unused.bind(("127.0.0.1", 0))
        dead_port = unused.getsockname()[1]
    t = HostTransport(0, timeout=1.0, host="127.0.0.1")
    t.set_addresses("lonely", {0: ("127.0.0.1", t.port), 1: ("127.0.0.1", dead_port)}, SECRET)
    group = Group(axis="cp", ranks=(0, 1), index=0, name="lonely")
    _wait_fails_then_close(t, t.start(Tensor(np.ones(4, np.float32)), group, 1, 1), TimeoutError,
                           r"rank 0, group lonely\): nothing received from rank 1 within 1 s"
                           r".*every rank of the group is alive.*MF_LONGSEQ_P2P_TIMEOUT")
    assert not _p2p_threads()


def test_a_peer_that_goes_away_is_a_connection_error_naming_it():
    (a, b), (ga, gb) = _pair(timeout=30)
    x = Tensor(np.ones(8, np.float32))
    ha, hb = a.start(x, ga, 1, 1), b.start(x, gb, 0, 0)
    ha.wait(), hb.wait()                                 # both connections exist now
    b.close()
    _wait_fails_then_close(a, a.start(x, ga, 1, 1), ConnectionError,
                           r"rank 0, group pair\): receiving from rank 1 failed \(rank 1 closed its connection")


def test_the_published_address_is_the_one_that_reaches_the_scheduler(monkeypatch):
    monkeypatch.setenv("MS_SCHED_HOST", "localhost")
    assert local_ipv4() == "127.0.0.1"
    monkeypatch.setenv("MS_SCHED_HOST", "no-such-host.invalid")
    assert local_ipv4() == "127.0.0.1"
    monkeypatch.setenv("MS_SCHED_HOST", socket.gethostname())
    address = local_ipv4()
    assert socket.inet_aton(address) and address in ("127.0.0.1", socket.gethostbyname(socket.gethostname()))


@pytest.mark.parametrize("value", ["abc", "", "inf", "nan", "0", "-5"])
def test_a_bad_timeout_is_refused_naming_the_variable_and_not_at_import(value, monkeypatch):
    """MF_LONGSEQ_P2P_TIMEOUT is read when a transport is made: a bad value breaks neither ``import mf_longseq``
    nor anything that never uses the CPU transport; making a transport names the variable, the value and the fix."""
    import mf_longseq.parallel.host_p2p as host_p2p
    monkeypatch.setenv("MF_LONGSEQ_P2P_TIMEOUT", value)          # set after the import: read at construction
    with pytest.raises(ValueError, match=rf"MF_LONGSEQ_P2P_TIMEOUT = {re.escape(repr(value))}: the host "
                                         r"transport's timeout must be a finite number of seconds > 0. Fix"):
        host_p2p.HostTransport(0, host="127.0.0.1")
    with pytest.raises(ValueError, match=r"timeout = -1: .*finite number of seconds > 0"):
        host_p2p.HostTransport(0, timeout=-1, host="127.0.0.1")
