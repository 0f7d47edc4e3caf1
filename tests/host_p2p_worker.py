"""A rank of the host p2p unit tests (tests/unit/test_host_p2p.py), run as a multiprocessing 'spawn' child."""
import numpy as np

DTYPES = ("float32", "float16", "bfloat16", "int32", "float64")
SHAPES = ((3, 5), (2, 1, 7, 4), (1,), (64, 1024))


def payload(rank: int, dtype: str, shape, salt: int = 0):
    """What ``rank`` sends (distinct per rank, dtype, shape and salt), as a NumPy array."""
    import mindspore as ms
    from mindspore import Tensor
    rng = np.random.default_rng([rank, DTYPES.index(dtype), len(shape), salt])
    values = rng.standard_normal(shape) * 100
    if dtype == "bfloat16":
        return Tensor(values.astype(np.float32)).astype(ms.bfloat16).asnumpy()
    return values.astype(dtype)


def run(rank: int, size: int, offsets, ports_out, table_in, results):
    """Start every (offset, dtype, shape) transfer, then wait in reverse order; report what arrived."""
    from mindspore import Tensor
    from mf_longseq.parallel.host_p2p import HostTransport
    from mf_longseq.parallel.mesh import Group
    try:
        transport = HostTransport(rank, timeout=60, host="127.0.0.1")
        ports_out.put((rank, transport.port))
        group = Group(axis="cp", ranks=tuple(range(size)), index=rank, name="test_ring")
        transport.set_addresses(group.name, table_in.get(timeout=120), b"host_p2p_worker shared test secret")
        started = []
        for offset in offsets:
            for dtype in DTYPES:
                for shape in SHAPES:
                    x = Tensor(payload(rank, dtype, shape, offset))
                    src = (rank - offset) % size
                    handle = transport.start(x, group, (rank + offset) % size, src)
                    started.append(((offset, dtype, shape, src), handle))
        got = {}
        for key, handle in reversed(started):
            out = handle.wait()
            got[key] = (str(out.dtype), tuple(out.shape), out.asnumpy().tobytes())
        transport.close()
        results.put((rank, got))
    except Exception as err:  # reported to the test, which fails with it
        results.put((rank, repr(err)))
