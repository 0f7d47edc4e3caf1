"""Per-device memory of one layout: weights, gradients, optimizer states, activations (with and without
recompute), attention buffers per algorithm, the mask and the logits.  Bytes, worst pipeline stage.

Legend: s = b S / CP tokens on the device, h hidden, F FFN width, V vocabulary, t = mp, Nt = N/t and
Kt = max(K/t, 1) heads on the device (kv heads replicated when mp exceeds them), D head dim, e compute bytes,
L_s = ceil(L / pp) layers of a stage.

Weights and gradients: the stage's parameters (projections, FFN, embedding and LM head split over mp, norms
replicated), in ``param_dtype`` / ``grad_dtype``.  Optimizer: AdamW m and v in float32, plus a float32 master
copy when the weights are half precision.  ``zero`` >= 1 / 2 / 3 splits the optimizer / gradients / weights
over the dp x cp ranks.

Activations kept for backward, per layer (what the decoder in ``models/decoder.py`` and the engine keep alive
in PyNative: every op's inputs that its backward reads, custom-bprop Cells' inputs and outputs); r = t with
sequence parallelism (``seq_parallel`` and t > 1), else 1:

    norms      2 x (s h 4 + s h e) / r  float32 input copy and the normalised output, twice per layer
               (+ SP: 2 s h e, the all-gathered normalised inputs of the q/k/v and gate/up projections, which
               their weight gradients read)
    q, k, v    s (Nt + 2 Kt) D e        projections
    RoPE       2 s (Nt + Kt) D e        rotated halves and the rotated q, k
    attention  s (Nt + 2 Kt) D e + 2 s Nt D e + 4 s Nt     BNSD q, k, v, the output in both layouts, lse
               (+ Ulysses: the head-layout q, k, v and output of the busiest Ulysses rank, s U (2 n_max +
               2 k_max) D e; n_max = ceil(Nt/U), k_max its most kv heads, ``attention/head_split.py``)
    MLP        s (F/t) (4 e + 4 [e < 4]) gate, silu, up, their product, and the gate's float32 copy when the
                                        compute dtype is half (a float32 gate is not copied); 0 with ``mlp_tile``
                                        (the tile's intermediates are recomputed in the backward)

Each layer's input (the recompute checkpoint) is s h e / r.  Without recompute every layer keeps its
activations and input; with recompute only the inputs are kept, and one layer's activations live during its
backward.  1F1B keeps m = min(pp, micro_batch_num) micro-batches in flight on the first stage.  With
``offload_layer_inputs`` the inputs go to the host after their layer's forward and come back one layer ahead of
its backward: the device holds min(m L_s, 2) of them, the host a copy of every one (``host``, m L_s inputs at the
end of the forward: ``models/offload.py`` copies each layer's input, the last two too, and frees the copy at the
layer's backward; not part of the total).

Backward working set: while a layer's backward runs, the gradients of its largest block exist next to the
activations not yet released: the MLP's d(product), d(silu), d(up) (3 s F/t e; with ``mlp_tile`` T those of
one tile plus its recomputed intermediates, T F/t (3 e + 4 e + 4)) and the hidden-state gradient in and out
(2 s h e / r; + SP: s h e, the full gradient of a gathered input before its reduce-scatter).  The logits
(below) die when the loss's backward ends, before the first layer's backward allocates these: the two are a max,
not a sum, as the memory pool serves the MLP's gradients from the freed logits.  Measured (``python
benchmarks/memory_phases.py llama_ring_cp2_wide_ffn --layers``, ring CP 2, S 4096, FFN 2816: 3 s F e = 66 MiB
of MLP gradients, 384 MiB of logits): the last layer's MLP backward raises the peak 1.2 MiB above the loss's,
its attention backward 62 MiB (that term stays summed).

Attention buffers (transient, the backward of one layer; ``attention/ring.py``, ``ulysses.py``): the kernel's
float32 block gradients (s Nt D 4 + 2 s Kh D 4; none for the ring on backend "cpu", whose fused kernel adds into
dq and the arriving dK/dV in place, ``backward_into``) and the float32 dq (s Nt D 4); ring: K and V and the incoming K
and V (2 x 2 s Kh D e), the float32 dK/dV leaving and arriving (2 x 2 s Kh D 4), every accumulation in place;
Ulysses: the output gradient in head layout and the returned [dq | dk | dv] leaving and arriving,
s U (n_max + 2 (n_max + 2 k_max)) D e; Kh the kv heads a ring carries (under Ulysses the most any Ulysses rank
receives); with the AllGather-based exchange also the gathered tensor, U times the larger of the busiest rank's
output (U s n_max) and the packed kv.  The blockwise kernel (backend "cpu") adds
its float32 tiles, T = min(block_size, S/R): in the backward of one tile the scores, their masked copy, p,
dp, dp - delta, ds and the transposed p and ds are alive together, 8 of (b Nt T^2 4) (under Ulysses the kernel
runs the busiest rank's n_max heads over S/R tokens: 8 of (b n_max T^2 4)); and float32 copies of
q, k, v when the compute dtype is half.
Mask: dense b S^2 bytes (uint8) without compression, 2048^2 with (none on the CPU kernel).

Logits on the last stage, per (token, vocabulary entry of this mp rank) ``LOGIT_BYTES`` = 16: at the peak
(the backward of exp inside logsumexp) four float32 arrays of s x V/t are alive: the float32 logits (kept by
ReduceMax's backward), exp(logits - max) (kept by Exp's backward), its incoming gradient and the outgoing one.
The compute-dtype logits are dead by then (Cast's backward keeps nothing): the earlier 22 = e + 5 x 4 counted
them and one float32 array too many.  Measured: the Ascend dry-run allocator (``ms.runtime.max_memory_allocated``)
16.2 bytes per entry at vocabulary 151936 (issue 19).  CPU ranks (``LOGIT_BYTES["cpu"]`` = 48, float32
compute; ``tests/dist/test_planner_memory.py``): on one rank the forward + backward of ``qwen_vocab_cp1`` (256
tokens x 151936) grows 40 bytes per entry beyond its gradients (``benchmarks/memory_phases.py``), but the ring
CP 2 ranks of the same shape measure 200 - 260 MiB more, the tiled one 1386 - 1415 MiB: with 40 the plan is
1.15 - 1.19x under them, with 48 within 0.86 - 1.06 (docs/planner_memory.md).
With ``loss_tile`` T the tile's logits are recomputed in the backward, so the term is min(T, s) V/t x 16, plus
the per-token float32 logsumexp and target logit the tiles keep (8 s).

Optimizer step (``step``): after the backward the activations and transients are gone, and the update runs
beside the weights, gradients and optimizer states.  It adds the runner's flat float32 gradient (P x 4 bytes,
P = the stage's parameters: ``Trainer.sync_gradients`` / ``LongSeqAdamW`` sum them as one buffer, beside the
per-parameter gradients) and the update's own buffers, ``train/optim.py``'s ``step_transient_bytes``: AdamW
updates m, v and the weights in place in pieces of at most ``STEP_CHUNK`` elements, with ``STEP_TEMPORARIES``
float32 piece-sized buffers alive at once (10 x 4 MiB).  The peak of a step is the larger of its two phases::

    total = weights + gradients + optimizer + max(backward phase, step)
    backward phase = activations (kept) + max(backward, logits) + attention + mask
    step = P x 4 + step_transient_bytes(P)       (``zero`` 0; 0 with ``zero`` >= 1)

The step term is mf_longseq's flat AdamW (``mf-longseq train``'s runner, ``optimizer.type: LongSeqAdamW``), which
keeps the whole optimizer on every rank (``zero`` 0, as ``planner/run.py`` plans the runner).  With ``zero`` >= 1
the update is MindFormers' parallel optimizer, per parameter shard, with no flat gradient; its transient (one
shard's temporaries) is not modelled.

Measured (CPU ranks, ``benchmarks/memory_phases.py``): before the in-place update the flat AdamW step grew ~8.5
float32 buffers of P above the backward's peak (1.2 - 1.5x the plan where P is mostly a 151936 vocabulary,
docs/planner_memory.md); now the step stays under the backward's peak there, as the formula says.
"""
import math
from dataclasses import dataclass, fields
from typing import List, Tuple

from mf_longseq.attention.head_split import HeadSplit
from mf_longseq.parallel.algorithms import ALGORITHMS, resolve
from mf_longseq.parallel.plan import RunPlan
from mf_longseq.planner.run_settings import Settings
from mf_longseq.planner.shapes import ModelShape
from mf_longseq.train.optim import step_transient_bytes


@dataclass(frozen=True)
class Memory:
    """Bytes per device, by item."""

    weights: int
    gradients: int
    optimizer: int
    activations: int
    activations_recompute: int
    backward: int
    attention: int
    mask: int
    logits: int
    host: int = 0               # layer inputs offloaded to host memory (not device memory, not in the total)
    step: int = 0               # the optimizer step beyond the states: flat gradient, update pieces (module doc)

    def total(self, recompute: bool) -> int:
        """The step's peak: the states plus the larger of the backward phase and the optimizer step."""
        acts = self.activations_recompute if recompute else self.activations
        backward_phase = acts + max(self.backward, self.logits) + self.attention + self.mask   # module doc
        return self.weights + self.gradients + self.optimizer + max(backward_phase, self.step)

    def rows(self) -> List[Tuple[str, int]]:
        return [(f.name, getattr(self, f.name)) for f in fields(self)]


LOGIT_BYTES = {"ascend": 16, "cpu": 48}     # per (token, vocabulary entry) at the cross entropy's peak (module doc)


def sp_split(plan: RunPlan, settings: Settings) -> int:
    """r: what sequence parallelism divides the residual stream, norms and layer inputs by (mp, or 1 when off)."""
    return plan.mp if settings.seq_parallel else 1


def local_heads(heads: int, mp: int) -> int:
    """Heads one mp rank holds (``tensor_parallel.local_units``): heads / mp, or 1 when replicated."""
    return max(heads // mp, 1)


def stage_params(shape: ModelShape, plan: RunPlan) -> int:
    """Parameters on one device of the largest pipeline stage."""
    t, h, d = plan.mp, shape.hidden, shape.head_dim
    nt, kt = local_heads(shape.heads, t), local_heads(shape.kv_heads, t)
    plain = h * d * (2 * shape.heads + 2 * shape.kv_heads) + 3 * h * shape.ffn + 2 * h
    bias = (shape.layer_params - plain) // (shape.heads + 2 * shape.kv_heads) * (nt + 2 * kt) \
        if shape.layer_params > plain else 0
    layer = h * d * (2 * nt + 2 * kt) + 3 * h * (shape.ffn // t) + 2 * h + bias
    per_stage = math.ceil(shape.layers / plan.pp) * layer
    first = shape.embedding_params // t
    last = shape.head_params // t + shape.norm_params
    return per_stage + (first + last if plan.pp == 1 else max(first, last))


def _most_kv(split: HeadSplit) -> int:
    """kv heads of the Ulysses rank that receives the most."""
    return max(split.kv_count(j) for j in range(split.degree))


def layer_activations(shape: ModelShape, plan: RunPlan, settings: Settings) -> int:
    """Bytes one decoder layer keeps for backward, per micro-batch (see the module docstring)."""
    e, s = settings.bytes_of("compute"), settings.micro_batch * settings.seq_len // plan.cp
    h, d, f = shape.hidden, shape.head_dim, shape.ffn // plan.mp
    nt, kt = local_heads(shape.heads, plan.mp), local_heads(shape.kv_heads, plan.mp)
    r = sp_split(plan, settings)
    norms = 2 * (s * h * 4 + s * h * e) // r + (2 * s * h * e if r > 1 else 0)
    qkv = s * (nt + 2 * kt) * d * e
    rope = 2 * s * (nt + kt) * d * e
    attention = s * (nt + 2 * kt) * d * e + 2 * s * nt * d * e + 4 * s * nt
    if plan.ulysses > 1:
        split = HeadSplit(nt, kt, plan.ulysses)                           # the busiest Ulysses rank's heads
        attention += s * plan.ulysses * (2 * split.busiest + 2 * _most_kv(split)) * d * e
    mlp = 0 if settings.mlp_tile else s * f * (4 * e + (4 if e < 4 else 0))
    return norms + qkv + rope + attention + mlp


def attention_buffers(shape: ModelShape, plan: RunPlan, settings: Settings) -> int:
    """Transient bytes of one layer's attention backward, on top of what is kept."""
    e, s = settings.bytes_of("compute"), settings.micro_batch * settings.seq_len // plan.cp
    d, u = shape.head_dim, plan.ulysses
    nt, kt = local_heads(shape.heads, plan.mp), local_heads(shape.kv_heads, plan.mp)
    split = HeadSplit(nt, kt, u) if u > 1 else None
    kr = split.kv_heads_received if split else kt                           # kv heads over the Ulysses ranks
    kh = _most_kv(split) if split else kt                                   # kv heads entering the ring
    in_place = plan.ring > 1 and settings.backend == "cpu"                # the fused kernel's backward_into
    out = s * nt * d * 4 + (0 if in_place else s * nt * d * 4 + 2 * s * kh * d * 4)   # dq, block grads (float32)
    if plan.ring > 1:
        out += 2 * (2 * s * kh * d * e) + 2 * (2 * s * kh * d * 4)
    if u > 1:
        out += s * u * (3 * split.busiest + 4 * kh) * d * e                 # dout, [dq | dk | dv] out and in
    if u > 1 and not settings.use_alltoall:
        out += u * s * max(u * split.busiest, kr) * d * e
    if settings.backend == "cpu":                    # the kernel's heads: under Ulysses the busiest rank's
        tile, heads = min(settings.block_size, settings.seq_len // plan.ring), split.busiest if split else nt
        out += 8 * settings.micro_batch * heads * tile * tile * 4 + s * (nt + 2 * kh) * d * 4 * (1 if e < 4 else 0)
    return out


def backward_working_set(shape: ModelShape, plan: RunPlan, settings: Settings) -> int:
    """Bytes of a layer's backward beyond what it keeps: the MLP's gradients (one tile's with ``mlp_tile``, and
    its recomputed intermediates) and the hidden-state gradient in and out (module docstring)."""
    e, s = settings.bytes_of("compute"), settings.micro_batch * settings.seq_len // plan.cp
    f, h, r = shape.ffn // plan.mp, shape.hidden, sp_split(plan, settings)
    mlp = 3 * s * f * e
    if settings.mlp_tile:
        tile = min(settings.mlp_tile, s)
        mlp = tile * f * (3 * e + 4 * e + 4)
    return mlp + 2 * s * h * e // r + (s * h * e if r > 1 else 0)


def logits_bytes(shape: ModelShape, plan: RunPlan, settings: Settings) -> int:
    """The cross entropy's peak on the last stage: s V/t x ``LOGIT_BYTES``, or one tile's with ``loss_tile`` plus
    the per-token statistics the tiles keep (module docstring)."""
    s, vt = settings.micro_batch * settings.seq_len // plan.cp, shape.vocab // plan.mp
    if settings.loss_tile:
        return min(settings.loss_tile, s) * vt * LOGIT_BYTES[settings.backend] + 8 * s
    return s * vt * LOGIT_BYTES[settings.backend]


def memory_per_device(shape: ModelShape, plan: RunPlan, settings: Settings) -> Memory:
    """Every item of the per-device memory of ``layout`` (bytes, worst pipeline stage)."""
    params, group = stage_params(shape, plan), plan.dp * plan.cp
    split = lambda stage: group if settings.zero >= stage else 1                          # noqa: E731
    optimizer = params * (8 + (4 if settings.bytes_of("param") < 4 else 0)) // split(1)
    inputs = math.ceil(shape.layers / plan.pp) * min(plan.pp, max(settings.micro_batch_num, 1))
    per_layer = layer_activations(shape, plan, settings)
    s = settings.micro_batch * settings.seq_len // plan.cp
    layer_input = s * shape.hidden * settings.bytes_of("compute") // sp_split(plan, settings)
    on_device = min(inputs, 2) if settings.offload_layer_inputs else inputs
    mask = 2048 * 2048 if settings.mask_compression else settings.micro_batch * settings.seq_len ** 2
    if settings.mask_compression and settings.backend == "cpu":
        mask = 0                                                  # the blockwise kernel decides from positions
    return Memory(weights=params * settings.bytes_of("param") // split(3),
                  gradients=params * settings.bytes_of("grad") // split(2),
                  optimizer=optimizer, activations=inputs * per_layer + on_device * layer_input,
                  activations_recompute=on_device * layer_input + per_layer,
                  backward=backward_working_set(shape, plan, settings),
                  attention=resolve(ALGORITHMS[plan.algo].buffers)(shape, plan, settings), mask=mask,
                  logits=logits_bytes(shape, plan, settings),
                  host=inputs * layer_input if settings.offload_layer_inputs else 0,
                  step=params * 4 + step_transient_bytes(params) if settings.zero == 0 else 0)
