"""Ulysses for any head counts (issue 14), in one process: the head split, the exchange plans of every rank of a
group simulated together (forward and backward, including N = K = 40 at U = 16, which needs more ranks than this
machine runs), the config rules and the planner's view of uneven layouts.

The simulation moves NumPy arrays exactly as ``parallel.comm.AllToAllV`` moves tensors (part j of rank i =
rank i's input at ``send_index[j]`` of ``scatter_dim``; received parts concatenated along ``gather_dim``;
backward: cut, send back, sum at the indices) with the plans ``attention/ulysses.py`` builds, and runs the float64
oracle on each rank's segments; the gathered result must equal full attention.
"""
import importlib
import itertools

import numpy as np
import pytest

from mf_longseq.attention.head_split import HeadSplit
from mf_longseq.attention.ulysses import check_ulysses_heads, to_heads_plan, to_seq_plan
from run_settings import checked_settings
from mf_longseq.parallel.comm import pair_rounds
from mf_longseq.planner.comm import AttentionCall, attention_bytes
from oracle import causal_allowed, reference_attention

GRID = [(n, k, u) for n in range(1, 13) for k in range(1, n + 1) if n % k == 0 for u in range(2, n + 1)]


# ----------------------------------------------------------------------------------------------- head split
@pytest.mark.parametrize("n, k, u", GRID + [(40, 40, 16), (40, 8, 16), (40, 40, 32), (48, 8, 32), (64, 8, 24)])
def test_split_is_balanced_and_kv_heads_are_exactly_those_read(n, k, u):
    split = HeadSplit(n, k, u)
    g = n // k
    ranges = [split.q_range(j) for j in range(u)]
    assert [h for a, b in ranges for h in range(a, b)] == list(range(n))           # contiguous, complete, once
    assert sorted({b - a for a, b in ranges}) in ([n // u], [n // u, -(-n // u)])
    assert split.busiest == max(b - a for a, b in ranges)
    holders = {}
    for j, (a, b) in enumerate(ranges):
        kv0, kv1 = split.kv_range(j)
        assert list(range(kv0, kv1)) == sorted({h // g for h in range(a, b)})       # exactly the kv heads read
        for kv in range(kv0, kv1):
            holders.setdefault(kv, []).append(j)
    for kv, ranks in holders.items():                    # a copy only where two ranks read the same kv head
        readers = {j for j, (a, b) in enumerate(ranges) if any(h // g == kv for h in range(a, b))}
        assert set(ranks) == readers
    assert split.kv_heads_received == sum(len(r) for r in holders.values())
    assert split.replicated_kv_heads == split.kv_heads_received - k
    assert split.kv_heads_received <= k + u - 1           # at most one extra copy per boundary between ranks


@pytest.mark.parametrize("n, k, u", GRID + [(40, 8, 16), (48, 8, 32)])
def test_segments_are_uniform_gqa_calls_covering_the_rank(n, k, u):
    split = HeadSplit(n, k, u)
    g = n // k
    for j in range(u):
        (q0, q1), (kv0, _) = split.q_range(j), split.kv_range(j)
        segments = split.segments(j)
        assert 1 <= len(segments) <= 3
        assert [h for (a, b), _ in segments for h in range(a, b)] == list(range(q1 - q0))
        for (a, b), (c, d) in segments:
            width = (b - a) // (d - c)
            assert width * (d - c) == b - a                                   # uniform group size
            for h in range(a, b):                                             # local GQA = global h // G
                assert kv0 + c + (h - a) // width == (q0 + h) // g


def test_describe_says_how_uneven():
    assert HeadSplit(40, 40, 16).describe() == ("40 query heads over Ulysses 16: 3,3,3,3,3,3,3,3,2,2,2,2,2,2,2,2 "
                                                "(busiest 3 = 1.20x the mean); 40 kv heads: 40 received, 0 replicated")
    assert HeadSplit(10, 2, 4).replicated_kv_heads == 3 and HeadSplit(8, 8, 4).imbalance == 1.0


def test_refusals_name_the_fix():
    with pytest.raises(ValueError, match=r"Ulysses degree 6 exceeds the 5 query heads .* Fix: use a Ulysses degree "
                                         r"of at most 5"):
        check_ulysses_heads(5, 5, 6)
    with pytest.raises(ValueError, match=r"3 kv heads do not divide the 8 query heads"):
        check_ulysses_heads(8, 3, 2)


@pytest.mark.parametrize("n", range(2, 18))
def test_pair_rounds_meet_every_pair_once_in_matching_rounds(n):
    met = []
    for rnd in pair_rounds(n):
        for me, peer in rnd.items():
            if peer is not None:
                assert rnd[peer] == me
                met.append((min(me, peer), max(me, peer)))
    assert sorted(met) == sorted(2 * [(i, j) for i, j in itertools.combinations(range(n), 2)])


# ----------------------------------------------------------------------------------------------- exchange plans
def _exchange(xs, plan, scatter_dim, gather_dim):
    """AllToAllV forward over all ranks at once (see the module docstring)."""
    u = len(xs)
    parts = [[np.take(xs[i], list(plan["send_index"][j]), axis=scatter_dim) for j in range(u)] for i in range(u)]
    for i, j in itertools.product(range(u), range(u)):
        assert parts[i][j].shape[scatter_dim] == plan["counts"][i][j]
        assert parts[i][j].shape[gather_dim] == plan["gather_sizes"][i]
    return [np.concatenate([parts[i][j] for i in range(u)], axis=gather_dim) for j in range(u)]


def _exchange_back(douts, xs, plan, scatter_dim, gather_dim):
    """AllToAllV backward over all ranks: cut along gather_dim, return to the sender, sum at the indices."""
    u = len(xs)
    cuts = np.cumsum(plan["gather_sizes"])[:-1]
    pieces = [np.split(d, cuts, axis=gather_dim) for d in douts]               # pieces[j][i]: rank j -> rank i
    grads = []
    for i in range(u):
        dx = np.zeros_like(xs[i]).swapaxes(0, scatter_dim)
        for j in range(u):
            np.add.at(dx, list(plan["send_index"][j]), pieces[j][i].swapaxes(0, scatter_dim))
        grads.append(dx.swapaxes(0, scatter_dim))
    return grads


def _simulate_ulysses(n, k, u, causal, seq=8, b=1, d=2, seed=0):
    """Every rank of one Ulysses group, forward and backward, in float64; returns (out, dq, dk, dv) (B, S, ., D)."""
    rng = np.random.default_rng(seed)
    q, dout = rng.standard_normal((2, b, seq * u, n, d))
    kk, vv = rng.standard_normal((2, b, seq * u, k, d))
    split = check_ulysses_heads(n, k, u)
    shard = lambda x, j: x[:, j * seq:(j + 1) * seq]                          # noqa: E731
    packed = [np.concatenate([shard(q, j), shard(kk, j), shard(vv, j)], axis=2) for j in range(u)]
    heads = _exchange(packed, to_heads_plan(split, seq), 2, 1)                 # (B, S, n_j + 2 k_j, D)
    pos = np.arange(seq * u)
    allowed = causal_allowed(pos, pos, causal=causal)
    seq_douts = [shard(dout, j) for j in range(u)]
    outs_h, douts_h = [], []
    d_heads = []
    # The output gradient on the head side is the to_seq exchange run backward.
    douts_h = _exchange_back(seq_douts, [np.zeros((b, seq * u, split.q_count(j), d)) for j in range(u)],
                             to_seq_plan(split, seq), 1, 2)
    for j in range(u):
        nq, nk = split.q_count(j), split.kv_count(j)
        qh, kh, vh = heads[j][:, :, :nq], heads[j][:, :, nq:nq + nk], heads[j][:, :, nq + nk:]
        out_j, dq_j, dk_j, dv_j = np.zeros_like(qh), np.zeros_like(qh), np.zeros_like(kh), np.zeros_like(vh)
        for (a, c), (e, f) in split.segments(j):
            o, _, (gq, gk, gv) = reference_attention(qh[:, :, a:c], kh[:, :, e:f], vh[:, :, e:f], allowed,
                                                     1 / np.sqrt(d), douts_h[j][:, :, a:c])
            out_j[:, :, a:c], dq_j[:, :, a:c] = o, gq
            dk_j[:, :, e:f] += gk
            dv_j[:, :, e:f] += gv
        outs_h.append(out_j)
        d_heads.append(np.concatenate([dq_j, dk_j, dv_j], axis=2))
    out = np.concatenate(_exchange(outs_h, to_seq_plan(split, seq), 1, 2), axis=1)
    d_packed = _exchange_back(d_heads, packed, to_heads_plan(split, seq), 2, 1)
    grads = [np.concatenate([dp[:, :, lo:hi] for dp in d_packed], axis=1)
             for lo, hi in ((0, n), (n, n + k), (n + k, n + 2 * k))]
    ref_out, _, ref_grads = reference_attention(q, kk, vv, allowed, 1 / np.sqrt(d), dout)
    return (out, *grads), (ref_out, *ref_grads)


@pytest.mark.parametrize("n, k, u", [(40, 40, 16), (6, 3, 2), (10, 2, 4), (5, 5, 2), (6, 3, 4), (40, 8, 16),
                                     (48, 8, 32), (7, 1, 3)])
@pytest.mark.parametrize("causal", [True, False])
def test_every_rank_simulated_equals_full_attention(n, k, u, causal):
    got, ref = _simulate_ulysses(n, k, u, causal)
    for name, a, r in zip(("out", "dq", "dk", "dv"), got, ref):
        assert a.shape == r.shape, name
        np.testing.assert_allclose(a, r, rtol=0, atol=1e-12, err_msg=name)


@pytest.mark.parametrize("n, k, u", [(40, 40, 16), (10, 2, 4), (6, 3, 2), (48, 8, 32)])
@pytest.mark.parametrize("use_alltoall", [True, False])
def test_byte_model_equals_the_plans_bytes(n, k, u, use_alltoall):
    """Bytes each rank hands to other ranks, counted from the plans, equal ``planner.comm.attention_bytes``."""
    b, seq, d, e = 2, 4, 8, 4
    split = HeadSplit(n, k, u)
    call = AttentionCall(b, seq * u, n, k, d, e, cp=u, ulysses=u, use_alltoall=use_alltoall)
    unit = b * d * e
    heads, to_seq = to_heads_plan(split, seq), to_seq_plan(split, seq)

    def sent(plan, gather, j, other):                   # this rank's part for `other`, in bytes
        return plan["counts"][j][other] * gather * unit
    for j in range(u):
        others = [o for o in range(u) if o != j]
        if use_alltoall:
            forward = sum(sent(heads, seq, j, o) + sent(to_seq, split.q_count(j), j, o) for o in others)
            backward = sum(seq * split.q_count(o) * unit + sent(heads, seq, o, j) for o in others)
        else:
            longest = lambda plan, g: max(sum(plan["counts"][i]) * g(i) for i in range(u)) * unit   # noqa: E731
            forward = (u - 1) * (longest(heads, lambda i: seq) + longest(to_seq, split.q_count))
            backward = (u - 1) * (seq * n * unit + max(u * seq * (split.q_count(i) + 2 * split.kv_count(i))
                                                        for i in range(u)) * unit)
        kind = "all_to_all" if use_alltoall else "all_gather"
        assert attention_bytes(call, "forward", j) == {kind: forward}
        assert attention_bytes(call, "backward", j) == {kind: backward}
    assert attention_bytes(call) == max((attention_bytes(call, "both", j) for j in range(u)),
                                        key=lambda c: c[kind])


# ----------------------------------------------------------------------------------------------- config, planner
@pytest.mark.parametrize("kw", [
    dict(num_heads=6, num_kv_heads=3, context_parallel=2, context_parallel_algo="ulysses_cp"),
    dict(num_heads=10, num_kv_heads=2, context_parallel=4, context_parallel_algo="ulysses_cp"),
    dict(num_heads=40, num_kv_heads=40, context_parallel=16, context_parallel_algo="ulysses_cp"),
    dict(num_heads=40, num_kv_heads=40, context_parallel=32, context_parallel_algo="ulysses_cp"),
    dict(num_heads=48, num_kv_heads=8, context_parallel=32, context_parallel_algo="ulysses_cp"),
    dict(num_heads=6, num_kv_heads=3, context_parallel=4, context_parallel_algo="hybrid_cp", ulysses_degree_in_cp=2),
    dict(num_heads=40, num_kv_heads=40, model_parallel=2, context_parallel=8, context_parallel_algo="ulysses_cp"),
])
def test_config_accepts_what_now_works(kw):
    checked_settings(seq_length=4096, **kw)


def test_config_refuses_more_ulysses_ranks_than_heads_per_mp_rank():
    with pytest.raises(ValueError, match=r"parallel_config\.ulysses_degree_in_cp = 4: the Ulysses degree 4 exceeds "
                                         r"the query heads per model-parallel rank, .* = 6 / 2 = 3"):
        checked_settings(seq_length=4096, num_heads=6, num_kv_heads=6, model_parallel=2, context_parallel=8,
                         context_parallel_algo="hybrid_cp", ulysses_degree_in_cp=4)


def test_planner_accepts_uneven_layouts_and_charges_the_busiest_rank(monkeypatch):
    """40 heads at Ulysses 16 is a valid plan; its attention FLOPs are the busiest rank's, 1.2x the mean."""
    rec = importlib.import_module("mf_longseq.planner.recommend")
    from mf_longseq.parallel.plan import RunPlan
    from mf_longseq.planner.run_settings import Settings
    from mf_longseq.planner.shapes import model_shape
    shape, settings, hw = model_shape("qwen-14b"), Settings(seq_len=262144), rec.Hardware()   # 40 heads, 40 kv
    layout = RunPlan(cp=16, algo="ulysses_cp", ulysses=16)
    assert rec.check(layout, shape, settings) is None
    assert rec.ulysses_split(shape, layout).imbalance == pytest.approx(1.2)
    charged = rec.step_seconds(shape, layout, settings, False, hw)
    monkeypatch.setattr(rec, "ulysses_split", lambda *_: None)                       # as if evenly split
    even = rec.step_seconds(shape, layout, settings, False, hw)
    attention_flops = settings.seq_len * 6 * shape.layers * shape.hidden * settings.seq_len / layout.cp
    assert charged - even == pytest.approx(0.2 * attention_flops / (hw.tflops * 1e12 * hw.efficiency))


def test_plan_prints_how_uneven_the_heads_are(capsys):
    import argparse
    from mf_longseq.planner import cli as plan_cli
    parser = argparse.ArgumentParser()
    plan_cli.register(parser.add_subparsers())
    args = parser.parse_args(["plan", "--model", "qwen-14b", "--seq-len", "262144", "--devices", "16",
                              "--algo", "ulysses_cp", "--max-mp", "1", "--no-features",
                              "--device-memory", "192GiB"])    # cp16 fits: the heads line, not memory, is tested
    args.func(args)
    out = capsys.readouterr().out
    assert "dp1 mp1 cp16 pp1 ulysses_cp" in out and "(invalid" not in out.split("ulysses_cp", 1)[1].split("\n")[0]
    assert "40 query heads over Ulysses 16: 3,3,3,3,3,3,3,3,2,2,2,2,2,2,2,2 (busiest 3 = 1.20x the mean); 40 kv " \
           "heads: 40 received, 0 replicated (0.0 MiB of kv copies per layer fwd)" in out


@pytest.mark.parametrize("n, k, u, copies", [(10, 2, 4, 3), (6, 3, 2, 1), (40, 40, 16, 0), (8, 2, 4, 2)])
def test_replicated_kv_bytes_are_the_copies_beyond_one_per_head(n, k, u, copies):
    from mf_longseq.planner.comm import replicated_kv_bytes
    b, s, d, e = 1, 64, 4, 2
    call = AttentionCall(b, s * u, n, k, d, e, cp=u, ulysses=u)
    split = HeadSplit(n, k, u)
    assert split.replicated_kv_heads == copies
    kv_sent = sum((u - 1) * b * s * 2 * split.kv_count(j) * d * e for j in range(u))     # to every destination
    assert replicated_kv_bytes(call) == kv_sent - (u - 1) * b * s * 2 * k * d * e
