"""Enumerate every layout of N devices that ``LongSeqConfig`` accepts, keep those that fit the device memory,
and rank them by an estimated step time.

Rank order (``parallel/plan.py``) is mp fastest, then CP (Ulysses inside ring), then dp, then pp; a group whose
ranks span more than ``devices_per_node`` consecutive ranks crosses nodes and gets the inter-node bandwidth.

Time model (an estimate for ranking, not a measurement): compute = model FLOPs of the step on this device
(6 x parameters x tokens, plus causal attention 6 x L x h x S per token, x 4/3 with recompute; under Ulysses the
attention part is the busiest rank's, x ceil(N/U) / (N/U) of the mean when the heads split unevenly) at
``tflops`` x ``efficiency``; communication = the bytes of ``comm.py`` (CP exchanges, tensor-parallel
all-reduces, gradient all-reduce) over the group's bandwidth, not overlapped; the 1F1B pipeline adds
(pp - 1) / micro_batch_num of the compute.  The memory features cost: ``mlp_tile`` one more MLP forward
(6 h F flops per token and layer), ``loss_tile`` one more LM-head forward (2 h V per token), sequence parallelism
nothing (its all-gather + reduce-scatter move the bytes of the all-reduce they replace), ``offload_layer_inputs``
the part of each layer input's two host copies (out and back, at ``host_gbps``) that one layer's compute does
not hide.

Feature choice (``Choices``): a feature the user fixed (CLI flag or YAML key) is used as given; one left to the
planner ("auto") is tried off and on (tiles from ``default_tile``), and each layout keeps the fastest combination
that fits (ties: the least memory), recompute only where needed.  Offload is tried only with recompute; sequence
parallelism only with mp > 1, and on "auto" only where ``LongSeqConfig`` accepts it with the layout's CP degree
(``--seq-parallel on`` models it everywhere, as issue 19 specifies it).
"""
import itertools
from dataclasses import dataclass, replace
from typing import Iterator, List, Optional, Sequence

from mf_longseq.attention.head_split import HeadSplit
from mf_longseq.config import LOSS_TILE_BUDGET_BYTES, LongSeqConfig, default_loss_tile
from mf_longseq.planner import comm
from mf_longseq.parallel.algorithms import ALGORITHMS
from mf_longseq.parallel.plan import MINDFORMERS_ALGOS, RunPlan
from mf_longseq.planner.run_settings import Settings
from mf_longseq.planner.memory import Memory, local_heads, memory_per_device, stage_params
from mf_longseq.planner.shapes import ModelShape


@dataclass(frozen=True)
class Hardware:
    """Device and network figures of the time model (defaults: an Ascend 910B-class NPU, 8 per node)."""

    memory: int = 64 * 2 ** 30
    reserve: float = 0.10                   # kept free for the runtime, workspaces, fragmentation
    tflops: float = 280.0
    efficiency: float = 0.45
    intra_node_gbps: float = 100.0          # GB/s per device inside a node
    inter_node_gbps: float = 25.0           # GB/s per device across nodes
    devices_per_node: int = 8
    host_gbps: float = 20.0                 # GB/s per device between device and host memory (offload)

    @property
    def usable(self) -> int:
        return int(self.memory * (1 - self.reserve))


@dataclass(frozen=True)
class Candidate:
    """A plan (``RunPlan``: degrees, algorithm, cut) that fits, with its memory, traffic and estimated step time."""

    plan: RunPlan
    settings: Settings
    memory: Memory
    recompute: bool
    comm_bytes: dict
    step_seconds: float

    @property
    def memory_total(self) -> int:
        return self.memory.total(self.recompute)


TILE_BUDGET = LOSS_TILE_BUDGET_BYTES    # bytes: one tile's intermediates (mlp_tile), as loss_tile's logits


def default_tile(bytes_per_token: int, tokens: int) -> int:
    """The MLP tile the planner picks: the largest power of two T >= 128 with T x ``bytes_per_token`` <=
    ``TILE_BUDGET`` (256 MiB), at most ``tokens`` (this rank's s); bytes_per_token = F/t x (4 e + 4) (one
    token's MLP intermediates).  The loss tile is the model's own rule, ``config.default_loss_tile``."""
    tile = 128
    while tile * 2 * bytes_per_token <= TILE_BUDGET and tile * 2 <= tokens:
        tile *= 2
    return min(tile, tokens)


@dataclass(frozen=True)
class Choices:
    """The memory features the planner may use: None = it picks (off or on), a value = fixed by the user.

    Attributes:
        loss_tile, mlp_tile: tokens per tile (0 = off), or None.
        seq_parallel, offload_layer_inputs: True / False, or None.
    """

    loss_tile: Optional[int] = None
    mlp_tile: Optional[int] = None
    seq_parallel: Optional[bool] = None
    offload_layer_inputs: Optional[bool] = None

    @classmethod
    def off(cls) -> "Choices":
        """Every feature off: the run as it was before them."""
        return cls(loss_tile=0, mlp_tile=0, seq_parallel=False, offload_layer_inputs=False)

    def variants(self, shape: ModelShape, plan: RunPlan, settings: Settings) -> Iterator[Settings]:
        """``settings`` with every combination of the features left to the planner (module docstring)."""
        s, e = settings.micro_batch * settings.seq_len // plan.cp, settings.bytes_of("compute")
        loss = min(default_loss_tile(shape.vocab // plan.mp), s)      # the model's own default rule
        mlp = default_tile(shape.ffn // plan.mp * (4 * e + 4), s)
        options = [[0, loss] if self.loss_tile is None else [self.loss_tile],
                   [0, mlp] if self.mlp_tile is None else [self.mlp_tile],
                   [False] if plan.mp == 1 else ([False, True] if _sp_accepted(plan) else [False])
                   if self.seq_parallel is None else [self.seq_parallel],
                   [False, True] if self.offload_layer_inputs is None else [self.offload_layer_inputs]]
        for loss_tile, mlp_tile, sp, offload in itertools.product(*options):
            yield replace(settings, loss_tile=loss_tile, mlp_tile=mlp_tile, seq_parallel=sp,
                          offload_layer_inputs=offload)


def _sp_accepted(plan: RunPlan) -> bool:
    """Whether ``LongSeqConfig`` accepts ``use_seq_parallel`` with this layout's degrees (the rule lives there)."""
    try:
        LongSeqConfig(model_parallel=plan.mp, context_parallel=plan.cp, use_seq_parallel=True)
    except ValueError:
        return False
    return True


def _divisors(n: int) -> List[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def layouts(devices: int, shape: ModelShape, algos: Sequence[str], max_mp: int = 8) -> Iterator[RunPlan]:
    """Every (dp, mp, cp, pp, algo, ulysses) with dp x mp x cp x pp = devices (CP algorithms only when cp > 1)."""
    for mp in _divisors(devices):
        if mp > max_mp:
            continue
        for cp in _divisors(devices // mp):
            for pp in _divisors(devices // mp // cp):
                dp = devices // mp // cp // pp
                if pp > shape.layers:
                    continue
                if cp == 1:
                    yield RunPlan(dp=dp, mp=mp, pp=pp)
                    continue
                for algo in algos:
                    for u in ALGORITHMS[algo].planner_degrees(cp):
                        yield RunPlan(dp=dp, mp=mp, cp=cp, pp=pp, algo=algo, ulysses=u)


def check(plan: RunPlan, shape: ModelShape, settings: Settings) -> Optional[str]:
    """None if ``LongSeqConfig`` accepts the layout, else its error message (the rules live there)."""
    try:
        parallel = LongSeqConfig(data_parallel=plan.dp, model_parallel=plan.mp, context_parallel=plan.cp,
                                 pipeline_stage=plan.pp, micro_batch_num=max(settings.micro_batch_num, plan.pp),
                                 cp_algo=plan.algo, ulysses_degree_in_cp=plan.ulysses_degree_in_cp,
                                 enable_alltoall=settings.use_alltoall,
                                 device_target="Ascend" if settings.backend == "ascend" else "CPU",
                                 block_size=settings.block_size)
        parallel.check_model({"seq_length": settings.seq_len, "num_heads": shape.heads, "n_kv_heads": shape.kv_heads,
                              "num_layers": shape.layers, "use_flash_attention": True})
    except ValueError as err:
        return str(err)
    return None


def ulysses_split(shape: ModelShape, plan: RunPlan) -> Optional[HeadSplit]:
    """How the layout's Ulysses ranks share one mp rank's heads (None without Ulysses)."""
    if plan.ulysses == 1:
        return None
    return HeadSplit(local_heads(shape.heads, plan.mp), local_heads(shape.kv_heads, plan.mp), plan.ulysses)


def step_traffic(shape: ModelShape, plan: RunPlan, settings: Settings) -> dict:
    """Bytes one device sends in one step, by exchange (CP kinds from ``comm.attention_bytes``)."""
    micro = max(settings.micro_batch_num, plan.pp)
    layers = -(-shape.layers // plan.pp)
    call = comm.AttentionCall(batch=settings.micro_batch, seq_len=settings.seq_len,
                              heads=local_heads(shape.heads, plan.mp),
                              kv_heads=local_heads(shape.kv_heads, plan.mp), head_dim=shape.head_dim,
                              itemsize=settings.bytes_of("compute"), cp=plan.cp, ulysses=plan.ulysses,
                              use_alltoall=settings.use_alltoall, algo=plan.algo)
    out = {kind: n * layers * micro for kind, n in comm.attention_bytes(call).items()} if plan.cp > 1 else {}
    tokens = settings.micro_batch * settings.seq_len // plan.cp
    out["mp_all_reduce"] = comm.tensor_parallel_bytes(tokens, shape.hidden, settings.bytes_of("compute"),
                                                      plan.mp) * layers * micro
    out["grad_all_reduce"] = comm.gradient_allreduce_bytes(stage_params(shape, plan), settings.bytes_of("grad"),
                                                           plan.dp * plan.cp)
    return {k: v for k, v in out.items() if v}


def _bandwidth(span: int, hw: Hardware) -> float:
    return (hw.intra_node_gbps if span <= hw.devices_per_node else hw.inter_node_gbps) * 1e9


def step_seconds(shape: ModelShape, plan: RunPlan, settings: Settings, recompute: bool, hw: Hardware) -> float:
    """Estimated seconds of one step (see the module docstring)."""
    micro = max(settings.micro_batch_num, plan.pp)
    tokens = settings.micro_batch * settings.seq_len * micro                     # per dp replica
    split = ulysses_split(shape, plan)
    imbalance = split.imbalance if split else 1.0                                # busiest Ulysses rank's heads
    flops = tokens * (6 * shape.total_params + 6 * shape.layers * shape.hidden * settings.seq_len * imbalance)
    flops *= (4 / 3 if recompute else 1)
    flops += tokens * shape.layers * 6 * shape.hidden * shape.ffn if settings.mlp_tile else 0   # MLP again
    flops += tokens * 2 * shape.hidden * shape.vocab if settings.loss_tile else 0            # LM head again
    flops /= plan.mp * plan.cp * plan.pp
    compute = flops / (hw.tflops * 1e12 * hw.efficiency)
    traffic = step_traffic(shape, plan, settings)
    spans = {"all_to_all": plan.mp * plan.ulysses, "all_gather": plan.mp * plan.ulysses,
             "ring_shift": plan.mp * plan.cp, "mp_all_reduce": plan.mp,
             "grad_all_reduce": plan.mp * plan.cp * plan.dp}
    network = sum(n / _bandwidth(spans.get(kind, plan.mp * plan.cp), hw)     # other kinds: the CP group
                  for kind, n in traffic.items())
    bubble = compute * (plan.pp - 1) / micro
    return compute + network + bubble + _offload_exposed(shape, plan, settings, compute, hw)


def _offload_exposed(shape: ModelShape, plan: RunPlan, settings: Settings, compute: float, hw: Hardware) -> float:
    """Seconds of layer-input copies (out after the forward, back before the backward) one layer's compute does
    not hide."""
    if not settings.offload_layer_inputs:
        return 0.0
    layers = -(-shape.layers // plan.pp) * max(settings.micro_batch_num, plan.pp)
    s = settings.micro_batch * settings.seq_len // plan.cp
    nbytes = s * shape.hidden * settings.bytes_of("compute") // (plan.mp if settings.seq_parallel else 1)
    per_layer = compute / layers
    return layers * max(0.0, 2 * nbytes / (hw.host_gbps * 1e9) - per_layer)


def _fitting(shape: ModelShape, plan: RunPlan, settings: Settings, hw: Hardware,
             choices: Choices) -> Optional[Candidate]:
    """The fastest feature combination and recompute setting of ``layout`` that fits (None: none fits)."""
    best = None
    for variant in choices.variants(shape, plan, settings):
        memory = memory_per_device(shape, plan, variant)
        for recompute in (False, True):
            if variant.offload_layer_inputs and not recompute or memory.total(recompute) > hw.usable:
                continue
            run = replace(variant, recompute=recompute)
            cand = Candidate(plan, run, memory, recompute, step_traffic(shape, plan, run),
                             step_seconds(shape, plan, run, recompute, hw))
            if best is None or (cand.step_seconds, cand.memory_total) < (best.step_seconds, best.memory_total):
                best = cand
            break
    return best


def recommend(shape: ModelShape, devices: int, settings: Settings, hw: Hardware,
              algos: Sequence[str] = MINDFORMERS_ALGOS,
              max_mp: int = 8, choices: Choices = Choices.off()) -> List[Candidate]:
    """Layouts that fit ``hw.usable`` bytes, fastest first, each with its fastest fitting features (``choices``:
    the default uses none of them, as before they existed) and recompute only where needed."""
    out = []
    for plan in layouts(devices, shape, algos, max_mp):
        if check(plan, shape, settings) is not None:
            continue
        s = replace(settings, micro_batch_num=max(settings.micro_batch_num, plan.pp))
        found = _fitting(shape, plan, s, hw, choices)
        if found is not None:
            out.append(found)
    return sorted(out, key=lambda c: (c.step_seconds, c.memory_total))


def _least(choices: Choices) -> Choices:
    """Every feature the planner may pick, on (the least memory ``choices`` allow)."""
    return Choices(loss_tile=choices.loss_tile, mlp_tile=choices.mlp_tile,
                   seq_parallel=True if choices.seq_parallel is None else choices.seq_parallel,
                   offload_layer_inputs=True if choices.offload_layer_inputs is None
                   else choices.offload_layer_inputs)


def closest(shape: ModelShape, devices: int, settings: Settings, hw: Hardware,
            algos: Sequence[str] = MINDFORMERS_ALGOS,
            max_mp: int = 8, choices: Choices = Choices.off()) -> Optional[Candidate]:
    """The valid layout (and features ``choices`` allow) that needs the least memory, with recompute, whether it
    fits or not."""
    best = None
    for plan in layouts(devices, shape, algos, max_mp):
        if check(plan, shape, settings) is None:
            s = replace(settings, micro_batch_num=max(settings.micro_batch_num, plan.pp), recompute=True)
            for variant in _least(choices).variants(shape, plan, s):
                memory = memory_per_device(shape, plan, variant)
                if best is None or memory.total(True) < best.memory_total:
                    best = Candidate(plan, variant, memory, True, step_traffic(shape, plan, variant),
                                     step_seconds(shape, plan, variant, True, hw))
    return best
