"""Exchange cases: what each algorithm hands to HCCL on rank r of CP = N (``RANK_SIZE=N RANK_ID=r``, one process).

MindSpore's simulation replaces the collective library with a dummy (nothing waits for peers, values are
meaningless), but every collective still goes through MindSpore's Ascend front end (infer of shapes and
dtypes, kernel selection).  ``Recorder`` wraps MindSpore's collective entry points (the primitives, mint /
comm_func functions, ``batch_isend_irecv``) and notes each call: op, group, peer, dtype, element count.  The
expectations are the algorithms' data flow, written out here from their definitions (not read back from
``parallel/comm.py``):

    ring (R ranks)      K and V, each (B, K, S/R, D) in q's dtype and sent as its own transfer (no stacked
                        copy, issue 23), to the next ring rank R-1 times forward and R-1 times backward;
                        dK and dV float32, each its own transfer, R times backward; as many receives from
                        the previous ring rank.  Nothing else.
    Ulysses (U ranks)   q/k/v packed (B, S/U, N + 2K', D) and the output (B, S/U, N, D): one AlltoAll each
                        forward and one each backward, in q's dtype (K' = max(K, U) kv heads after repeats);
                        with enable_alltoall False an AllGather of each instead (U times the elements out).
    hybrid (U x R)      the Ulysses exchanges inside the Ulysses group, the ring exchanges of 1/U of the kv
                        heads and S/R tokens inside the ring group.
    kvallgather (CP)    K and V, each (B, S/CP, K, D) in q's dtype, one AllGather each over the CP group forward
                        and again backward (CP times the elements out); dK and dV of the whole sequence, float32,
                        one ReduceScatter each backward (1/CP of the elements out).  Nothing else.
"""
import functools
import os
from collections import Counter

import mindspore as ms
from mindspore import ops

from asim_worker import batch, case

B, H, KV, D = 1, 8, 4, 128
SEQ = 8192

PRIMITIVES = ("AllGather", "AlltoAll", "AllReduce", "ReduceScatter", "Send", "Receive")
# mint.distributed.isend / irecv are patched in the package and in its ``distributed`` module together (P2POp
# checks them by identity against the module's names); inside batch_isend_irecv they are recorded by the batch.
P2P_FUNCTIONS = ("isend", "irecv")
FUNCTIONS = {"mindspore.mint.distributed": ("all_gather_into_tensor", "all_to_all_single", "all_to_all", "send",
                                           "recv", "all_reduce", "reduce_scatter_tensor"),
             "mindspore.communication.comm_func": ("all_gather_into_tensor", "all_to_all_single_with_output_shape",
                                                   "all_to_all_with_output_shape", "isend", "irecv", "send",
                                                   "recv", "all_reduce", "reduce_scatter_tensor")}


def _desc(x):
    return {"dtype": str(x.dtype), "shape": list(x.shape), "numel": int(x.size)}


class Recorder:
    """Patches MindSpore's collective entry points for the duration of a ``with`` block; ``calls`` lists them.
    ``flash_calls`` lists the FlashAttentionScore calls the FlashKernels planned (``FlashKernel.plan``)."""

    def __init__(self):
        self.calls, self.flash_calls, self._undo = [], [], []

    def _flash_plan(self, plan):
        def recorded(kernel, mask, batch=1):
            calls = plan(kernel, mask, batch)
            self.flash_calls.extend(calls)
            return calls
        return recorded

    def _patch(self, owner, name, replacement):
        self._undo.append((owner, name, getattr(owner, name)))
        setattr(owner, name, replacement)

    def __enter__(self):
        import importlib
        import mindspore.mint.distributed as dist
        for name in PRIMITIVES:
            self._patch(ops, name, self._primitive(name, getattr(ops, name)))
        self._patch(dist, "batch_isend_irecv", self._batch(dist.batch_isend_irecv))
        from mf_longseq.attention.flash import FlashKernel
        self._patch(FlashKernel, "plan", self._flash_plan(FlashKernel.plan))
        module = importlib.import_module("mindspore.mint.distributed.distributed")
        for name in P2P_FUNCTIONS:
            wrapped = self._p2p(name, getattr(dist, name))
            self._patch(dist, name, wrapped)
            self._patch(module, name, wrapped)
        for module, names in FUNCTIONS.items():
            mod = importlib.import_module(module)
            for name in names:
                if hasattr(mod, name):
                    self._patch(mod, name, self._function(f"{module.split('.')[-1]}.{name}", getattr(mod, name)))
        return self

    def __exit__(self, *exc):
        for owner, name, original in reversed(self._undo):
            setattr(owner, name, original)

    def _primitive(self, name, cls):
        recorder = self

        def build(*args, **kwargs):
            prim = cls(*args, **kwargs)

            def call(*inputs):
                out = prim(*inputs)
                entry = {"op": name, "group": kwargs.get("group"), **(_desc(inputs[0]) if inputs else {})}
                if hasattr(out, "shape"):
                    entry["out_shape"], entry["out_numel"] = list(out.shape), int(out.size)
                entry.update({k: v for k, v in kwargs.items() if k in ("split_count", "split_dim", "concat_dim",
                                                                        "dest_rank", "src_rank")})
                recorder.calls.append(entry)
                return out
            return call
        return build

    def _batch(self, original):
        @functools.wraps(original)
        def batch(p2p_ops):
            for op in p2p_ops:
                kind = op.op if isinstance(op.op, str) else op.op.__name__
                self.calls.append({"op": kind, "peer": op.peer, "group": op.group, **_desc(op.tensor)})
            return original(p2p_ops)
        return batch

    def _p2p(self, name, original):
        @functools.wraps(original)
        def call(tensor, *args, **kwargs):
            peer = kwargs.get("dst", kwargs.get("src", args[0] if args else None))
            self.calls.append({"op": name, "peer": peer, "group": kwargs.get("group"), **_desc(tensor)})
            return original(tensor, *args, **kwargs)
        return call

    def _function(self, label, original):
        @functools.wraps(original)
        def call(*args, **kwargs):
            tensors = [a for a in args if hasattr(a, "shape")]
            entry = {"op": label, "group": kwargs.get("group"), **(_desc(tensors[0]) if tensors else {})}
            self.calls.append(entry)
            return original(*args, **kwargs)
        return call


def rank_info():
    return int(os.environ["RANK_SIZE"]), int(os.environ["RANK_ID"])


def _inputs(cp):
    q = ops.ones((B, SEQ // cp, H, D), ms.float32).astype(ms.bfloat16)
    k = ops.ones((B, SEQ // cp, KV, D), ms.float32).astype(ms.bfloat16)
    return q, k, k * 1


def run_algorithm(algo, ulysses, use_alltoall):
    """Forward + backward of ``context_parallel_attention`` (FlashKernel) on this rank; the recorded calls."""
    from mf_longseq.attention.api import context_parallel_attention
    from mf_longseq.attention.flash import FlashKernel
    from mf_longseq.parallel.mesh import Mesh
    from mf_longseq.parallel.plan import RunPlan
    cp, rank = rank_info()
    mesh = Mesh(plan=RunPlan(cp=cp, ulysses=ulysses, algo=algo), rank=rank, device_target="Ascend").create_groups()
    q, k, v = _inputs(cp)

    def loss(a, b, c):
        out = context_parallel_attention(a, b, c, mesh=mesh, algo=algo, kernel=FlashKernel(),
                                         use_alltoall=use_alltoall)
        assert out.shape == a.shape and out.dtype == a.dtype, f"out {out.shape} {out.dtype} vs {a.shape}"
        return out.astype(ms.float32).sum()
    with Recorder() as rec:
        grads = ms.grad(loss, grad_position=(0, 1, 2))(q, k, v)
        grads[0].asnumpy()
    for g, x in zip(grads, (q, k, v)):
        assert g.shape == x.shape and g.dtype == x.dtype, f"grad {g.shape} {g.dtype} vs {x.shape} {x.dtype}"
    return mesh, rec.calls


def _p2p_counter(calls):
    return Counter((c["op"], c["peer"], c["dtype"], c["numel"]) for c in calls if c["op"] in ("isend", "irecv"))


def expected_ring(mesh, group, heads_kv, seq_local, dtype="BFloat16"):
    """The ring's point-to-point transfers of this rank (see the module docstring)."""
    r = group.size
    nxt, prev = group.ranks[(group.index + 1) % r], group.ranks[(group.index - 1) % r]
    numel = B * heads_kv * seq_local * D                         # one of K, V (or dK, dV): two transfers a step
    want = Counter()
    for op, peer in (("isend", nxt), ("irecv", prev)):
        want[(op, peer, dtype, numel)] += 2 * 2 * (r - 1)
        want[(op, peer, "Float32", numel)] += 2 * r
    return want


def expected_ulysses(u, kv_after_repeat, seq_local, use_alltoall, dtype="BFloat16"):
    packed, out = B * seq_local * (H + 2 * kv_after_repeat) * D, B * seq_local * H * D
    if use_alltoall:
        return Counter({("AlltoAll", dtype, packed, packed): 2, ("AlltoAll", dtype, out, out): 2})
    return Counter({("AllGather", dtype, packed, packed * u): 2, ("AllGather", dtype, out, out * u): 2})


def _collectives(calls):
    return Counter((c["op"], c["dtype"], c["numel"], c.get("out_numel")) for c in calls
                   if c["op"] in ("AlltoAll", "AllGather"))


def _check(got, want, calls, what):
    assert got == want, (f"{what}: HCCL saw {dict(got)}, the algorithm needs {dict(want)}; calls: "
                         f"{[{k: c[k] for k in ('op', 'dtype', 'shape') if k in c} for c in calls][:40]}")


def ring_case():
    mesh, calls = run_algorithm("colossalai_cp", 1, False)
    cp, _ = rank_info()
    _check(_p2p_counter(calls), expected_ring(mesh, mesh.group("ring"), KV, SEQ // cp), calls, "ring")
    others = [c for c in calls if c["op"] not in ("isend", "irecv")]
    assert not others, f"ring: collectives besides send/receive: {others}"
    return {"calls": calls}


def ulysses_case(use_alltoall):
    cp, _ = rank_info()
    mesh, calls = run_algorithm("ulysses_cp", cp, use_alltoall)
    kv = max(KV, cp)
    _check(_collectives(calls), expected_ulysses(cp, kv, SEQ // cp, use_alltoall), calls, "ulysses")
    names = {c["group"] for c in calls}
    assert names == {mesh.group("ulysses").name}, names
    assert not _p2p_counter(calls), "ulysses: point-to-point transfers"
    return {"calls": calls}


def hybrid_case(ulysses, use_alltoall=True):
    cp, _ = rank_info()
    mesh, calls = run_algorithm("hybrid_cp", ulysses, use_alltoall)
    ring = mesh.group("ring")
    kv = max(KV, ulysses)
    _check(_collectives(calls), expected_ulysses(ulysses, kv, SEQ // cp, use_alltoall), calls, "hybrid ulysses")
    _check(_p2p_counter(calls), expected_ring(mesh, ring, kv // ulysses, SEQ // ring.size), calls, "hybrid ring")
    assert {c["group"] for c in calls if c["op"] in ("isend", "irecv")} == {ring.name}
    assert {c["group"] for c in calls if c["op"] in ("AlltoAll", "AllGather")} == {mesh.group("ulysses").name}
    return {"calls": calls}


def kvallgather_case():
    cp, _ = rank_info()
    mesh, calls = run_algorithm("kvallgather_cp", 1, False)
    part = B * (SEQ // cp) * KV * D                                          # one of K, V on this rank
    got = Counter((c["op"], c["dtype"], c["numel"], c.get("out_numel")) for c in calls)
    want = Counter({("AllGather", "BFloat16", part, part * cp): 4, ("ReduceScatter", "Float32", part * cp, part): 2})
    _check(got, want, calls, "kvallgather")
    assert {c["group"] for c in calls} == {mesh.group("cp").name}
    return {"calls": calls}


def public_functions_case():
    """The exchange layer's public functions on the CP group, each call's result shape/dtype and HCCL op."""
    from mf_longseq.parallel.comm import all_gather, all_reduce, all_to_all, ring_shift, send_recv
    from mf_longseq.parallel.mesh import Mesh
    cp, rank = rank_info()
    mesh = Mesh(cp=cp, rank=rank, device_target="Ascend").create_groups()
    group = mesh.group("cp")
    x = ops.ones((2, cp * 3, 4, 16), ms.float32).astype(ms.bfloat16)                 # (B, S, N, D)
    seen = {}
    checks = (
        ("ring_shift", lambda: ring_shift(x, group), x.shape),
        ("all_to_all", lambda: all_to_all(x, group, 1, 2, True), (2, 3, 4 * cp, 16)),
        ("all_to_all_allgather", lambda: all_to_all(x, group, 1, 2, False), (2, 3, 4 * cp, 16)),
        ("all_gather", lambda: all_gather(x, group, 2), (2, cp * 3, 4 * cp, 16)),
        ("all_reduce", lambda: all_reduce(x, group), x.shape),
        ("send_recv", lambda: send_recv(x, group, (group.index + 1) % cp, x.shape, x.dtype), x.shape),
    )
    for name, fn, shape in checks:
        with Recorder() as rec:
            out = fn()
            out.asnumpy()
        assert tuple(out.shape) == tuple(shape) and out.dtype == x.dtype, f"{name}: {out.shape} {out.dtype}"
        assert rec.calls, f"{name}: nothing reached HCCL"
        moved = {c["dtype"] for c in rec.calls}
        assert moved == {str(x.dtype)}, f"{name}: HCCL moved {sorted(moved)} for a {x.dtype} tensor"
        seen[name] = [{k: c.get(k) for k in ("op", "dtype", "shape", "out_shape", "peer")} for c in rec.calls]
    return {"calls": seen}


def _register(cp, rank):
    name = batch(batch_of(cp, rank), rank_size=cp, rank_id=rank)
    case(name, "ring")(ring_case)
    case(name, "ulysses_alltoall")(lambda: ulysses_case(True))
    case(name, "ulysses_allgather")(lambda: ulysses_case(False))
    for u in [d for d in (2, 4) if cp % d == 0 and d < cp]:
        case(name, f"hybrid_u{u}_r{cp // u}")(lambda u=u: hybrid_case(u))
    if cp == 4:
        case(name, "hybrid_u2_r2_allgather")(lambda: hybrid_case(2, False))
        case(name, "kvallgather")(kvallgather_case)
    case(name, "public_functions")(public_functions_case)


def batch_of(cp, rank):
    """Rank 0 of CP = 2 shares its process with the CP = 2 training steps (``cases_model``)."""
    return "cp2_rank0" if (cp, rank) == (2, 0) else f"comm_cp{cp}_rank{rank}"


COMM_BATCHES = ((2, 0), (4, 2), (8, 5))
for _cp, _rank in COMM_BATCHES:
    _register(_cp, _rank)
