"""Exchanges between the ranks of one group. Nothing here knows about attention.

Every function takes an explicit ``Group`` (see ``mesh.py``).  Native primitives are used where the backend has
them (Ascend/GPU: AlltoAll, AllGather, ReduceScatter, point-to-point send/receive).  On CPU only AllReduce works
outside the world group, so there:

* ring shift: the host transport (``host_p2p.py``: TCP between the ranks, on background threads, so the
  transfer runs while the caller computes);
* all-to-all and all-to-all-v (Ulysses): the host transport too, one transfer per pair of ranks, all started
  before the first is waited for (``_exchange_host``); each rank moves only the parts it sends;
* pipeline ``send_recv``: an AllReduce in the two-rank group of sender and receiver, the receiver adding zeros.
  Per-rank buffers stay the size of what moves.
* all-gather: an AllReduce of a zero buffer holding this rank's part in its slot.

The decision native-or-emulated is made here, from ``group.device_target``, and nowhere else.

Started exchanges: ``ring_shift_start`` returns a ``Pending`` at once; its ``wait()`` returns the received tensor.
Between the two the caller computes (the ring starts the next K/V block, computes the current one, then waits).
Native: the isend/irecv works of ``batch_isend_irecv``, waited in ``wait()``.  CPU: the tensor is read to the
host at start and the host transport's threads move it while the caller's kernels run (an AllReduce would run
on the same execution queue as those kernels, after or before them, never beside); ``wait()`` joins and
returns a Tensor.  ``ring_shift`` is start-then-wait.

Base pieces (``CommStats``, ``Pending``, ``is_emulated``, ``all_reduce``, ``all_reduce_world``) live in
``comm_core.py`` and are imported from here.

Raw functions (``ring_shift``, ``all_gather``, ``reduce_scatter``, ``all_to_all``, ``all_reduce``) are not
differentiable; the Cells at the bottom (``AllToAll``, ``AllGather``, ``ReduceScatter``) are, each with its backward
stated next to it.

Every call counts bytes into ``group.stats``: ``logical`` is what the native primitive sends from this rank,
``wire`` is the size of the buffers this rank really hands to collectives (equal to logical on native backends).
``in_flight_bytes`` / ``peak_in_flight_bytes``: logical bytes of started exchanges not yet waited for.
"""
import logging
import math

import mindspore as ms
from mindspore import nn, ops

from mf_longseq.parallel import host_p2p
from mf_longseq.parallel.comm_core import (CommStats, Pending, _nbytes, all_reduce, all_reduce_world,  # noqa: F401
                                           allreduce_sum as _allreduce_sum, is_emulated)

logger = logging.getLogger(__name__)


def _shift_native(x, group, offset: int):
    """Post isend to index+offset and irecv from index-offset; returns the finishing function."""
    import mindspore.mint.distributed as dist
    n, me = group.size, group.index
    x = x if x.is_contiguous() else x.contiguous()          # HCCL sends a dense buffer (a K or V slice is a view)
    received = ops.zeros_like(x)
    work = dist.batch_isend_irecv([
        dist.P2POp(dist.isend, x, group.ranks[(me + offset) % n], group=group.name),
        dist.P2POp(dist.irecv, received, group.ranks[(me - offset) % n], group=group.name),
    ])

    def finish():
        for handle in work:
            handle.wait()
        return received
    return finish


def ring_shift_start(x, group, offset: int = 1) -> Pending:
    """Start sending ``x`` to group index ``index + offset``; ``wait()`` returns what ``index - offset`` sent.

    Every rank of the group starts its shifts in the same order (transfers pair up in that order).  Do not change
    ``x`` in place before ``wait()``.  CPU: ``x`` is read to the host here (this waits for the ops producing it),
    then moves on the host transport's threads (``host_p2p``) while the caller computes.

    Raises (from ``wait()``, CPU): TimeoutError / ConnectionError naming the peer rank, the group and the fix.
    """
    if group.size == 1 or offset % group.size == 0:
        return Pending(lambda: x)
    group.stats.add("ring_shift", _nbytes(x), _nbytes(x))
    if is_emulated(group):
        n, me = group.size, group.index
        transfer = host_p2p.transport().start(x, group, (me + offset) % n, (me - offset) % n)
        return Pending(transfer.wait, group.stats, _nbytes(x))
    return Pending(_shift_native(x, group, offset), group.stats, _nbytes(x))


def ring_shift(x, group, offset: int = 1):
    """Send ``x`` to group index ``index + offset`` and return what index ``index - offset`` sent."""
    return ring_shift_start(x, group, offset).wait()


def send_recv(send, group, peer: int, recv_shape=None, recv_dtype=None):
    """Point-to-point with group index ``peer``: send ``send`` (or None) and receive a ``recv_shape`` tensor of
    ``recv_dtype`` (or None, nothing to receive).  Both ranks call it at the same point with mirrored arguments.

    Emulated (CPU): ONE AllReduce in the two-rank group of the flat buffer [low -> high | high -> low] (low =
    the smaller group index), each rank filling the slot of what it sends, so a two-way exchange (pipeline
    "send forward, receive backward") costs one collective.  Native: isend / irecv.
    """
    if recv_shape is None and send is None:
        return None
    recv_count = 0 if recv_shape is None else int(math.prod(recv_shape))
    sent = 0 if send is None else _nbytes(send)
    if not is_emulated(group):
        import mindspore.mint.distributed as dist
        received = None if recv_shape is None else ops.zeros(tuple(recv_shape), recv_dtype)
        peer_rank = group.ranks[peer]
        pending = ([dist.P2POp(dist.isend, send, peer_rank, group=group.name)] if send is not None else []) + \
            ([dist.P2POp(dist.irecv, received, peer_rank, group=group.name)] if received is not None else [])
        for handle in dist.batch_isend_irecv(pending):
            handle.wait()
        group.stats.add("send_recv", sent, sent)
        return received
    dtype = send.dtype if send is not None else recv_dtype
    mine = [] if send is None else [send.reshape(-1)]
    theirs = [ops.zeros((recv_count,), dtype)] if recv_count else []
    low_first = group.index < peer
    buffer = ops.cat(mine + theirs if low_first else theirs + mine)                # (sent + received elements,)
    group.stats.add("send_recv", sent, _nbytes(buffer))
    total = _allreduce_sum(buffer, group.pair(group.index, peer))
    if recv_shape is None:
        return None
    start = send.size if (low_first and send is not None) else 0
    return total[start:start + recv_count].reshape(tuple(recv_shape)).astype(recv_dtype)


def all_gather(x, group, dim: int):
    """Concatenate every rank's ``x`` along ``dim`` in group order."""
    n = group.size
    if n == 1:
        return x
    if is_emulated(group):
        slots = [ops.zeros_like(x)] * n
        slots[group.index] = x
        buffer = ops.cat(slots, axis=dim)                                  # (.., n * x.shape[dim], ..)
        group.stats.add("all_gather", _nbytes(x) * (n - 1), _nbytes(buffer))
        return _allreduce_sum(buffer, group.name)
    group.stats.add("all_gather", _nbytes(x) * (n - 1), _nbytes(x) * (n - 1))
    stacked = ops.AllGather(group=group.name)(x.swapaxes(0, dim))            # gathers along dim 0
    return stacked.swapaxes(0, dim)


def _chunk(x, n: int, dim: int, i: int):
    size = x.shape[dim] // n
    return ops.narrow(x, dim, i * size, size)


def reduce_scatter(x, group, dim: int):
    """Sum over the group, then keep this rank's 1/n chunk along ``dim`` (``x.shape[dim]`` divisible by n).

    Native: ReduceScatter along dim 0 (another ``dim`` is moved to the front and back).  Emulated (CPU): an
    AllReduce of the whole ``x``, then the chunk (n times the received bytes; the result is the same).
    """
    n = group.size
    if n == 1:
        return x
    if x.shape[dim] % n != 0:
        raise ValueError(f"reduce_scatter: dimension {dim} of shape {tuple(x.shape)} is not divisible by the "
                         f"group size {n}")
    if is_emulated(group):
        return _chunk(all_reduce(x, group), n, dim, group.index)
    group.stats.add("reduce_scatter", _nbytes(x) * (n - 1) // n, _nbytes(x) * (n - 1) // n)
    scattered = ops.ReduceScatter(group=group.name)(x.swapaxes(0, dim))                   # along dim 0
    return scattered.swapaxes(0, dim)


def all_to_all(x, group, scatter_dim: int, gather_dim: int, use_alltoall: bool = True):
    """Split ``x`` into group.size chunks along ``scatter_dim``; chunk j goes to index j; the received chunks
    are concatenated along ``gather_dim`` in group order.

    ``use_alltoall=False`` is the AllGather-based exchange (gather along ``gather_dim``, keep this rank's chunk of
    ``scatter_dim``): more bytes and a transient buffer group.size times larger, but no AlltoAll needed.
    CPU (no AlltoAll): the chunks move over the host transport (``_exchange_host``), same bytes as AlltoAll.
    """
    n = group.size
    if n == 1:
        return x
    if x.shape[scatter_dim] % n != 0:
        raise ValueError(f"all_to_all: dimension {scatter_dim} of shape {tuple(x.shape)} is not divisible by the "
                         f"group size {n}")
    if not use_alltoall:
        return _chunk(all_gather(x, group, gather_dim), n, scatter_dim, group.index)
    if not is_emulated(group):
        group.stats.add("all_to_all", _nbytes(x) * (n - 1) // n, _nbytes(x) * (n - 1) // n)
        return ops.AlltoAll(split_count=n, split_dim=scatter_dim, concat_dim=gather_dim, group=group.name)(x)
    chunks = [_chunk(x, n, scatter_dim, j) for j in range(n)]
    shapes = [[tuple(chunks[0].shape)] * n for _ in range(n)]
    return ops.cat(_exchange_host(chunks, group, shapes), axis=gather_dim)


# --------------------------------------------------------------------------------------------------- differentiable
class AllToAll(nn.Cell):
    """Differentiable all-to-all. Backward: the same exchange with scatter and gather dims swapped."""

    def __init__(self, group, scatter_dim: int, gather_dim: int, use_alltoall: bool = True):
        super().__init__()
        self.group, self.scatter_dim, self.gather_dim, self.use_alltoall = group, scatter_dim, gather_dim, use_alltoall

    def construct(self, x):
        return all_to_all(x, self.group, self.scatter_dim, self.gather_dim, self.use_alltoall)

    def bprop(self, x, out, dout):
        return (all_to_all(dout, self.group, self.gather_dim, self.scatter_dim, self.use_alltoall),)


class AllGather(nn.Cell):
    """Differentiable all-gather along ``dim``. Backward: reduce-scatter (sum, keep this rank's chunk)."""

    def __init__(self, group, dim: int):
        super().__init__()
        self.group, self.dim = group, dim

    def construct(self, x):
        return all_gather(x, self.group, self.dim)

    def bprop(self, x, out, dout):
        return (reduce_scatter(dout, self.group, self.dim),)


class ReduceScatter(nn.Cell):
    """Differentiable reduce-scatter along ``dim``. Backward: all-gather of the output gradient along ``dim``
    (every rank's input contributed to every chunk, so each rank's input gradient is the whole gathered one)."""

    def __init__(self, group, dim: int):
        super().__init__()
        self.group, self.dim = group, dim

    def construct(self, x):
        return reduce_scatter(x, self.group, self.dim)

    def bprop(self, x, out, dout):
        return (all_gather(dout, self.group, self.dim),)


# =================================================================================================== variable size
# All-to-all whose parts differ in size per destination (uneven head splits).  Same transport rules as above:
# native AlltoAllV where the backend has it; on CPU the host transport's pairwise transfers (``_exchange_host``);
# with use_alltoall=False the AllGather-based exchange of padded flat buffers.
def pair_rounds(n: int):
    """A round-robin schedule of every pair of ``n`` indices: a list of rounds, each {index: partner or None}.

    Circle method: with m = n rounded up to even, round r pairs m-1 with r and i with j where i + j = 2r
    (mod m-1); an index paired with m-1 >= n sits the round out.  Every rank meets each other rank once, in the
    same round as seen by both, so blocking two-rank exchanges cannot wait on each other in a cycle.
    """
    m = n + n % 2
    rounds = []
    for r in range(m - 1):
        partner = {}
        for me in range(n):
            other = r if me == m - 1 else m - 1 if me == r else (2 * r - me) % (m - 1)
            partner[me] = other if other < n else None
        rounds.append(partner)
    return rounds


def _exchange_host(parts, group, shapes):
    """CPU all-to-all(v) over the host transport: ``parts[j]`` to index j, returns ``received[i]`` from i.

    Every transfer is started (``pair_rounds`` order, the same on every rank) before the first is waited for, so
    the host transport's threads move all of them at once, each only its own bytes.  A pair whose two directions
    differ in size (uneven head splits) pads the smaller flat part to the larger: the transport receives a
    tensor like the one it sends.  Received blocks are released by the caller once concatenated.
    """
    n, me = group.size, group.index
    transport, started = host_p2p.transport(), []
    for partner in pair_rounds(n):
        peer = partner[me]
        if peer is None:
            continue
        send, recv_shape = parts[peer].reshape(-1), tuple(shapes[peer][me])
        count = max(send.shape[0], int(math.prod(recv_shape)))
        if send.shape[0] < count:
            send = ops.cat([send, ops.zeros((count - send.shape[0],), send.dtype)])
        group.stats.add("all_to_all", _nbytes(parts[peer]), _nbytes(send))
        started.append((peer, recv_shape, transport.start(send, group, peer, peer)))
    received = [None] * n
    received[me] = parts[me]
    for peer, recv_shape, transfer in started:
        flat = transfer.wait()
        count = int(math.prod(recv_shape))
        received[peer] = (flat if flat.shape[0] == count else flat[:count]).reshape(recv_shape)
    return received


def _all_to_all_v_gathered(parts, group, shapes):
    """AllGather-based: every rank gathers every rank's flat parts (padded to the longest) and keeps its own."""
    n, me = group.size, group.index
    sizes = [[int(math.prod(shapes[i][j])) for j in range(n)] for i in range(n)]
    longest = max(sum(row) for row in sizes)
    flat = ops.cat([p.reshape(-1) for p in parts])
    if flat.shape[0] < longest:
        flat = ops.cat([flat, ops.zeros((longest - flat.shape[0],), flat.dtype)])
    rows = all_gather(flat.reshape(1, longest), group, 0)                    # (n, longest)
    received = []
    for i in range(n):
        start = sum(sizes[i][:me])
        received.append(rows[i, start:start + sizes[i][me]].reshape(tuple(shapes[i][me])))
    return received


def all_to_all_v(parts, group, shapes, use_alltoall: bool = True):
    """Variable-size all-to-all: ``parts[j]`` goes to group index j; returns ``received``, ``received[i]`` from i.

    Args:
        parts: one tensor per group index (one dtype); ``parts[j].shape == shapes[index][j]``.
        group: the ``Group``.
        shapes: the whole plan, ``shapes[i][j]`` the shape index i sends to index j (every rank passes the same).
        use_alltoall: False selects the AllGather-based exchange (padded flat buffers, n-1 times the bytes).

    Returns:
        list of n tensors, ``received[i].shape == shapes[i][index]``; ``received[index] is parts[index]``.

    Logical bytes (``all_to_all``): the parts sent to other indices; AllGather-based (``all_gather``): (n-1)
    times the longest rank's flat parts.
    """
    n, me = group.size, group.index
    if n == 1:
        return list(parts)
    for j, part in enumerate(parts):
        assert tuple(part.shape) == tuple(shapes[me][j]), (j, part.shape, shapes[me][j])
    if not use_alltoall:
        return _all_to_all_v_gathered(parts, group, shapes)
    if not is_emulated(group):
        import mindspore.mint.distributed as dist
        outputs = [ops.zeros(tuple(shapes[i][me]), parts[0].dtype) for i in range(n)]
        sent = sum(_nbytes(p) for j, p in enumerate(parts) if j != me)
        group.stats.add("all_to_all", sent, sent)
        if all(tuple(s) == tuple(shapes[0][0]) for row in shapes for s in row):
            # An even plan is a plain AlltoAll (one tensor, HCCL's fixed-size path): (n, *part) -> (n, *part).
            stacked = ops.AlltoAll(split_count=n, split_dim=0, concat_dim=0, group=group.name)(ops.stack(parts))
            return list(ops.unstack(stacked, 0))
        handle = dist.all_to_all(outputs, list(parts), group=group.name)
        if handle is not None:
            handle.wait()
        return outputs
    return _exchange_host(parts, group, shapes)


class AllToAllV(nn.Cell):
    """Differentiable variable-size all-to-all along tensor dims.

    Forward: part j = ``x`` at indices ``send_index[j]`` of ``scatter_dim`` (an index may go to several ranks);
    the received parts are concatenated along ``gather_dim`` in group order.  Backward: the output gradient is cut
    along ``gather_dim`` into the received parts, each goes back to its sender (the plan transposed), and the
    sender sums the returned parts into ``x``'s shape at their indices (copies of one index are summed).

    Args:
        group: the ``Group``.
        scatter_dim, gather_dim: tensor dims.
        send_index: this rank's index lists, one per destination.
        counts: ``counts[i][j]`` = len(index i sends to j), the whole plan; every source must send the same
            count to a given destination (the output's ``scatter_dim``).
        gather_sizes: ``gather_sizes[i]`` = ``x.shape[gather_dim]`` on index i (other dims equal on all ranks).
        use_alltoall: False selects the AllGather-based exchange.
    """

    def __init__(self, group, scatter_dim: int, gather_dim: int, send_index, counts, gather_sizes,
                 use_alltoall: bool = True):
        super().__init__()
        self.group, self.scatter_dim, self.gather_dim = group, scatter_dim, gather_dim
        self.send_index = [ms.Tensor(list(idx), ms.int32) for idx in send_index]
        self.counts, self.gather_sizes, self.use_alltoall = counts, list(gather_sizes), use_alltoall
        flat = [i for idx in send_index for i in idx]
        self.segment_ids = ms.Tensor(flat, ms.int32)
        self.is_permutation = flat == list(range(len(flat)))     # plain cut: backward concatenates, no sum
        self.ranges = [(idx[0], len(idx)) if len(idx) and list(idx) == list(range(idx[0], idx[0] + len(idx)))
                       else None for idx in map(list, send_index)]

    def _shapes(self, x_shape):
        n = self.group.size

        def shape(i, j):
            s = list(x_shape)
            s[self.scatter_dim], s[self.gather_dim] = self.counts[i][j], self.gather_sizes[i]
            return tuple(s)
        return [[shape(i, j) for j in range(n)] for i in range(n)]

    def construct(self, x):
        parts = [ops.narrow(x, self.scatter_dim, *cut) if cut else ops.gather(x, idx, self.scatter_dim)
                 for idx, cut in zip(self.send_index, self.ranges)]
        received = all_to_all_v(parts, self.group, self._shapes(x.shape), self.use_alltoall)
        return ops.cat(received, axis=self.gather_dim)

    def bprop(self, x, out, dout):
        n = self.group.size
        pieces = ops.split(dout, self.gather_sizes, axis=self.gather_dim)
        forward = self._shapes(x.shape)
        back = all_to_all_v(list(pieces), self.group, [[forward[j][i] for j in range(n)] for i in range(n)],
                            self.use_alltoall)
        grads = ops.cat(back, axis=self.scatter_dim)                        # scatter_dim: sum of my counts
        if self.is_permutation and grads.shape[self.scatter_dim] == x.shape[self.scatter_dim]:
            return (grads,)
        summed = ops.unsorted_segment_sum(grads.astype(ms.float32).moveaxis(self.scatter_dim, 0), self.segment_ids,
                                          x.shape[self.scatter_dim])        # copies of an index summed
        return (summed.moveaxis(0, self.scatter_dim).astype(x.dtype),)
