"""One decoder for LLaMA2, Qwen (v1) and Qwen1.5: RMSNorm, RoPE from global positions, GQA attention through
``ContextParallelAttention``, SwiGLU MLP, optional q/k/v bias.  The families are presets of this file.

Shapes (legend): B batch, S tokens of this rank (S_global / CP), H hidden, N query heads, K kv heads, D head dim,
F FFN width, V vocabulary.

Labels and context parallelism.  Next-token labels are made by the data side *before* sharding: a sample holds
S_global + 1 tokens, ``input_ids = tokens[:-1]`` and ``labels = tokens[1:]``, and both are cut with the same
``shard_sequence`` layout (and padding marked 0 in ``loss_mask``).  So every rank holds the label of each of its
tokens, also of a shard's last token, whose next token lives on another rank (zigzag makes that true of two
chunks per rank).  The model never shifts.  Each rank returns the sum of its per-token cross entropy (times the
mask) and its token count; sum(loss_sum) / sum(count) over the CP (and DP) ranks is exactly the single-device
mean loss, and differentiating ``loss_sum / global_count`` on every rank, then summing gradients over dp x cp,
is exactly its gradient.

One batch per step.  ``construct`` first builds the step's ``ShardedBatch`` (``batch.py``): the
global positions of this rank's tokens, the RoPE tables, the document ids of packed samples and the
``AttentionPlan`` (sample groups, ring masks, the dense mask when use_attn_mask_compression is off), then runs
``forward_batch``.  Layers read the batch's ``cos``, ``sin`` and ``attention``; nothing is rebuilt per layer.

Packed documents (EOD).  ``construct`` / ``logits`` take MindFormers' ``actual_seq_len`` (B, L): the global
cumulative document ends of every sample (``documents.py``).  The batch turns them into global document ids
(B, S_global), which every layer's attention uses for block-diagonal causal masking, and, when
``use_eod_reset``, into per-document RoPE positions, of which each rank takes its own tokens with the same
``shard_sequence`` layout as the ids.  Without ``actual_seq_len`` the model is unchanged (one document).

Numerics: weights are stored in ``param_init_type`` and cast to ``compute_dtype`` for matmuls; RMSNorm
statistics, softmax and attention merges (inside the kernel) and the cross entropy are float32.  RoPE angles are
computed in float64 on the host from the global positions of this rank's tokens (``mf_longseq/rope.py``), then cast.

Weights carry Hugging Face LLaMA / Qwen2 names (``model.layers.0.self_attn.q_proj.weight``, (out, in) layout),
one weight per projection (q/k/v/o, gate/up/down).  Model parallelism (``parallel/tensor_parallel.py``): q/k/v,
gate/up and the LM head are column-parallel, o/down row-parallel, the embedding vocabulary-parallel; every rank
keeps its shard under the same name.  Pipeline stages run parts of this model (``models/stage.py``, scheduled
by ``parallel/pipeline.py``).
"""
import zlib
from typing import ClassVar, Optional

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops
from mindformers.models.modeling_utils import PreTrainedModel
from mindformers.tools.register import MindFormerModuleType, MindFormerRegister

from mf_longseq.attention.layer import ContextParallelAttention
from mf_longseq.batch import BatchSpec, ShardedBatch
from mf_longseq.config import LongSeqConfig
from mf_longseq.models.model_config import LongSeqModelConfig, parameter_shapes
from mf_longseq.rope import apply_rope
from mf_longseq.models.tiled_loss import TiledHeadLoss, resolve_loss_tile
from mf_longseq.models.tiled_mlp import TiledMLP
from mf_longseq.models.tiling import upcast_matmul
from mf_longseq.models.model_config import check_model_parallel
from mf_longseq.parallel.mesh import Mesh
from mf_longseq.parallel.sequence_parallel import Identity, SequenceParallel
from mf_longseq.parallel.tensor_parallel import (ColumnParallelLinear, CopyToMP, RowParallelLinear,
                                                 SharedInputColumns, VocabParallelEmbedding, local_units,
                                                 shard_array, shard_specs, vocab_parallel_cross_entropy)

MS_DTYPES = {"float32": ms.float32, "bfloat16": ms.bfloat16, "float16": ms.float16}


def _zeros(shape, dtype) -> Parameter:
    return Parameter(Tensor(np.zeros(shape, np.float32), dtype))


def require_mesh(mesh, who: str) -> Mesh:
    """``mesh`` when it is a ``Mesh``; the model never builds one itself (nor reads MindSpore's context).

    Raises:
        ValueError: naming ``who`` and the builders that pass the mesh.
    """
    if not isinstance(mesh, Mesh):
        raise ValueError(f"{who} needs this rank's Mesh (mf_longseq.parallel.Mesh), got {mesh!r}. Fix: build the "
                         "model with mf_longseq.models.build_model(yaml, mesh=...), or pass mesh= and "
                         "long_seq_config= (a LongSeqConfig) to the class; MindFormers' build_network builds the "
                         "registered class (mf_route/models.py), which takes both from MindFormers' settings.")
    return mesh


class MatMulNT(nn.Cell):
    """a (M, K) @ b (N, K)^T -> (M, N) in a's dtype.

    CPU has no bfloat16 / float16 MatMul kernel: there the half-precision operands are multiplied in float32
    and the product rounded back (half-precision storage, float32 accumulation, as on Ascend's cube unit).
    """

    def __init__(self, compute_dtype, device_target: str):
        super().__init__()
        self.matmul = ops.MatMul(transpose_b=True)
        self.upcast = upcast_matmul(compute_dtype, device_target)            # the mesh's device_target

    def construct(self, a, b):
        if self.upcast:
            return self.matmul(a.astype(ms.float32), b.astype(ms.float32)).astype(a.dtype)
        return self.matmul(a, b)


class RMSNorm(nn.Cell):
    """x / sqrt(mean(x^2) + eps) * weight, statistics in float32; output in x's dtype."""

    def __init__(self, hidden: int, eps: float, param_dtype):
        super().__init__()
        self.eps = eps
        self.weight = Parameter(Tensor(np.ones((hidden,), np.float32), param_dtype))

    def normalize(self, x):
        """x / sqrt(mean(x^2) + eps) in x's dtype (per token: sequence parallelism runs it on split tokens)."""
        x32 = x.astype(ms.float32)
        return (x32 * ops.rsqrt((x32 * x32).mean(-1, keep_dims=True) + self.eps)).astype(x.dtype)

    def construct(self, x):
        normed = self.normalize(x)
        return normed * self.weight.astype(normed.dtype)


class Attention(nn.Cell):
    """GQA self-attention over this rank's shard; the sequence exchange is ``ContextParallelAttention``'s."""

    def __init__(self, config: LongSeqModelConfig, long_seq: LongSeqConfig, mesh: Mesh):
        super().__init__()
        h, d, n, kv = config.hidden_size, config.head_dim, config.num_heads, config.n_kv_heads
        mp = mesh.group("mp")                      # model parallel: whole heads per rank, kv heads replicated
        self.num_heads, self.kv_heads, self.head_dim = local_units(n, mp.size), local_units(kv, mp.size), d
        dtypes = dict(param_dtype=MS_DTYPES[config.param_init_type], compute_dtype=MS_DTYPES[config.compute_dtype])
        bias = config.qkv_has_bias
        self.q_proj = ColumnParallelLinear(h, n * d, group=mp, units=n, has_bias=bias, **dtypes)
        self.k_proj = ColumnParallelLinear(h, kv * d, group=mp, units=kv, has_bias=bias, **dtypes)
        self.v_proj = ColumnParallelLinear(h, kv * d, group=mp, units=kv, has_bias=bias, **dtypes)
        self.o_proj = RowParallelLinear(n * d, h, group=mp, units=n, has_bias=False, **dtypes)
        self.qkv = SharedInputColumns([self.q_proj, self.k_proj, self.v_proj], group=mp)   # one f for q, k, v
        self.core = ContextParallelAttention(config=long_seq, mesh=mesh, causal=True,
                                             use_flash_attention=config.use_flash_attention,
                                             use_attn_mask_compression=config.use_attn_mask_compression)

    def construct(self, x, cos, sin, plan=None):
        """x (B, S, H); cos, sin the step's RoPE tables; plan the step's ``AttentionPlan`` (``ShardedBatch``).

        ``plan`` None: the attention builds a one-document plan for this call (a caller without a batch).
        """
        b, s, _ = x.shape
        q, k, v = self.qkv(x)
        q = q.reshape(b, s, self.num_heads, self.head_dim)                              # (B, S, H) -> (B, S, N, D)
        k = k.reshape(b, s, self.kv_heads, self.head_dim)                               # (B, S, K, D)
        v = v.reshape(b, s, self.kv_heads, self.head_dim)                               # (B, S, K, D)
        out = self.core(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, plan=plan)  # (B, S, N, D)
        return self.o_proj(out.reshape(b, s, self.num_heads * self.head_dim))          # (B, S, N*D) -> (B, S, H)


class MLP(nn.Cell):
    """SwiGLU: down(silu(gate(x)) * up(x)); (B, S, H) -> (B, S, F) -> (B, S, H).

    ``tile`` (``long_seq.mlp_tile``) > 0: the same function tile by tile over the tokens, intermediates recomputed
    in the backward (``tiled_mlp.TiledMLP``, between gate/up's f and down's g).
    """

    def __init__(self, config: LongSeqModelConfig, mesh: Mesh, tile: int = 0):
        super().__init__()
        h, f = config.hidden_size, config.ffn_hidden_size
        mp = require_mesh(mesh, "MLP").group("mp")     # model parallel: gate/up split on F, down on its input
        dtypes = dict(param_dtype=MS_DTYPES[config.param_init_type], compute_dtype=MS_DTYPES[config.compute_dtype])
        self.gate_proj = ColumnParallelLinear(h, f, group=mp, has_bias=False, **dtypes)
        self.up_proj = ColumnParallelLinear(h, f, group=mp, has_bias=False, **dtypes)
        self.down_proj = RowParallelLinear(f, h, group=mp, has_bias=False, **dtypes)
        self.gate_up = SharedInputColumns([self.gate_proj, self.up_proj], group=mp)   # one f for gate and up
        self.compute_dtype = dtypes["compute_dtype"]
        self.tiled = TiledMLP(tile, self.compute_dtype, mesh.device_target) if tile else None

    def construct(self, x):
        if self.tiled is not None:
            weights = [w.astype(self.compute_dtype) for w in
                       (self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight)]
            return self.down_proj.reduce(self.tiled(self.gate_up.copy(x), *weights))
        gate, up = self.gate_up(x)
        act = ops.silu(gate.astype(ms.float32)).astype(gate.dtype)        # float32 (CPU has no half Sigmoid)
        return self.down_proj(act * up)


class DecoderLayer(nn.Cell):
    """Pre-norm block: x + attn(norm(x)), then + mlp(norm(.)).

    Under sequence parallelism (``parallel/sequence_parallel.py``) x, the norms' statistics and the residual
    adds hold this rank's S/MP tokens: each norm's output is gathered before attention / MLP, their row-parallel
    partial sums are reduce-scattered back.
    """

    def __init__(self, config: LongSeqModelConfig, long_seq: LongSeqConfig, mesh: Mesh):
        super().__init__()
        param_dtype = MS_DTYPES[config.param_init_type]
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, param_dtype)
        self.self_attn = Attention(config, long_seq, mesh)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, param_dtype)
        self.mlp = MLP(config, mesh, tile=long_seq.mlp_tile)
        self.sp = SequenceParallel(mesh.group("mp"), long_seq.use_seq_parallel)
        self.sp.replace_tensor_parallel_exchanges(columns=(self.self_attn.qkv, self.mlp.gate_up),
                                                  rows=(self.self_attn.o_proj, self.mlp.down_proj))

    def construct(self, x, cos, sin, plan=None):
        """x (B, S/SP, H) -> (B, S/SP, H), SP = MP under sequence parallelism, else 1; cos, sin, plan: the
        step's (``ShardedBatch.cos/sin/attention``, all S tokens)."""
        x = x + self.sp.scatter(self.self_attn(self.sp.norm(self.input_layernorm, x), cos, sin, plan))
        return x + self.sp.scatter(self.mlp(self.sp.norm(self.post_attention_layernorm, x)))


class DecoderModel(nn.Cell):
    """Embedding, decoder layers, final norm: ids (B, S) -> hidden (B, S, H) in compute dtype."""

    def __init__(self, config: LongSeqModelConfig, long_seq: LongSeqConfig, mesh: Mesh):
        super().__init__()
        param_dtype, compute_dtype = MS_DTYPES[config.param_init_type], MS_DTYPES[config.compute_dtype]
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, group=mesh.group("mp"),
                                                   param_dtype=param_dtype, compute_dtype=compute_dtype)
        self.layers = nn.CellList([DecoderLayer(config, long_seq, mesh) for _ in range(config.num_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, param_dtype)
        self.sp = SequenceParallel(mesh.group("mp"), long_seq.use_seq_parallel)
        self.sp.replace_tensor_parallel_exchanges(embedding=self.embed_tokens)   # (B, S/SP, H) to the layers
        self.layer_offload = None            # a LayerInputOffload (models/offload.py), set by apply_recompute

    def run_layer(self, layer, x, batch: ShardedBatch):
        """One decoder layer on the batch; its saved input goes to host memory when offload is on."""
        if self.layer_offload is not None:
            return self.layer_offload.run(layer, x, batch.cos, batch.sin, batch.attention)
        return layer(x, batch.cos, batch.sin, batch.attention)

    def final_norm(self, x):
        """Last layer's output (B, S/SP, H) -> normed final hidden (B, S/CP, H), gathered under SP."""
        return self.sp.norm(self.norm, x)

    def construct(self, batch: ShardedBatch):
        """The step's ``ShardedBatch`` -> final hidden (B, S/CP, H); every layer reads the batch's RoPE tables
        and attention plan."""
        x = self.embed_tokens(batch.input_ids)
        for layer in self.layers:
            x = self.run_layer(layer, x, batch)
        return self.final_norm(x)


def cross_entropy(logits, labels):
    """Per-token cross entropy in float32: logsumexp(logits) - logits[label]; (B, S, V), (B, S) -> (B, S)."""
    logits = logits.astype(ms.float32)
    target = ops.gather_elements(logits, -1, labels.astype(ms.int32).expand_dims(-1)).squeeze(-1)   # (B, S)
    return ops.logsumexp(logits, -1) - target


class LongSeqForCausalLM(PreTrainedModel):
    """Causal LM over this rank's shard of the sequence: returns (loss_sum, token_count).

    Args:
        config: a ``LongSeqModelConfig`` (or a family subclass).
        mesh: this rank's ``Mesh`` (required: ``build_model`` builds it from the YAML; MindFormers' builder route
            builds it in ``mf_route/models.py``).  The model reads no global context.
        long_seq_config: the parallel settings (``LongSeqConfig.from_mindformers(yaml)``; required).  The model's
            facts (heads, sequence, layers, flags) are read from ``config`` only; ``LongSeqConfig.check_model``
            checks them against the degrees.

    ``construct(input_ids, labels, loss_mask, actual_seq_len=None)``: input_ids, labels (B, S/CP) int, loss_mask
    (B, S/CP) float, this rank's shards in ``long_seq_config.layout`` (labels already shifted globally; see the
    module docstring); optional actual_seq_len (B, L) int (Tensor or ndarray), the *global* cumulative document
    ends of each packed sample, the same on every CP rank (None: one document).  Returns loss_sum (float32 scalar,
    differentiable): sum over this rank's tokens of cross entropy x mask, and token_count (float32 scalar, no
    gradient): sum of loss_mask on this rank.  MindFormers' dataset columns are the registered classes' form
    (``mf_route/models.py``).

    Raises:
        ValueError: ``mesh`` or ``long_seq_config`` missing (``require_mesh``); ConfigError / ValueError: the
            settings do not fit the model (``LongSeqConfig.check_model``, ``check_model_parallel``).
    """

    config_class = LongSeqModelConfig
    base_model_prefix = "model"
    # The models/ class a registered class of mf_route/models.py extends (None: this class is the plain model).
    plain_model: ClassVar[Optional[type]] = None

    def __init__(self, config: LongSeqModelConfig, mesh: Optional[Mesh] = None,
                 long_seq_config: Optional[LongSeqConfig] = None, **kwargs):
        require_mesh(mesh, type(self).__name__)
        if not isinstance(long_seq_config, LongSeqConfig):
            raise ValueError(f"{type(self).__name__} needs its parallel settings (long_seq_config, a LongSeqConfig), "
                             f"got {long_seq_config!r}. Fix: build it with mf_longseq.models.build_model(yaml), or "
                             "pass long_seq_config=LongSeqConfig.from_mindformers(yaml).")
        super().__init__(config)
        self.long_seq, self.mesh = long_seq_config, mesh
        self.long_seq.check_model(config)                       # the model's facts against the degrees
        check_model_parallel(config, self.long_seq.model_parallel)
        self.mesh.check_settings(self.long_seq)                 # degrees, algorithm, layout: read from the mesh
        self.compute_dtype = MS_DTYPES[config.compute_dtype]
        self.model = DecoderModel(config, self.long_seq, self.mesh)
        self.mp_group = self.mesh.group("mp")     # the LM head is split on the vocabulary, like the embedding
        self.lm_head = None if config.tie_word_embeddings else ColumnParallelLinear(
            config.hidden_size, config.vocab_size, group=self.mp_group, has_bias=False,
            param_dtype=MS_DTYPES[config.param_init_type], compute_dtype=self.compute_dtype)
        # f of a tied head; under SP the final norm's gather takes its place (and that of the LM head's f)
        self.head_copy = Identity() if self.model.sp.on else CopyToMP(self.mp_group)
        self.model.sp.replace_tensor_parallel_exchanges(columns=[self.lm_head.shared] if self.lm_head else [])
        self.head_matmul = MatMulNT(self.compute_dtype, self.mesh.device_target)
        vocab_part = config.vocab_size // self.mp_group.size
        self.loss_tile = resolve_loss_tile(self.long_seq.loss_tile, vocab_part)     # 0: untiled head
        self.tiled_loss = TiledHeadLoss(self.loss_tile, self.mp_group, self.mp_group.index * vocab_part,
                                        self.compute_dtype, self.mesh.device_target) if self.loss_tile else None
        self.batch_spec = BatchSpec(mesh=self.mesh, layout=self.mesh.plan.seq_layout, head_dim=config.head_dim,
                                    theta=config.theta, compute_dtype=self.compute_dtype,
                                    use_eod_reset=config.use_eod_reset,
                                    use_attn_mask_compression=config.use_attn_mask_compression)
        self.init_weights_from_seed(config.init_seed)

    @classmethod
    def can_generate(cls) -> bool:
        """Training-only model: MindFormers' builder builds no generation config for it."""
        return False

    def init_weights_from_seed(self, seed: int) -> None:
        """Normal(0, initializer_range) for matrices and embeddings, ones for norms, zeros for biases.

        Each weight draws from its own generator seeded by (seed, crc32(name)): every rank and every run with the
        same seed gets the same weights, whatever the construction order.  Under model parallelism every rank
        draws the full weight and keeps its shard, so any layout starts from the same model.
        """
        sigma = self.config.initializer_range
        full_shapes, specs = parameter_shapes(self.config), shard_specs(self)
        mp, mp_id = self.mp_group.size, self.mp_group.index
        for name, param in self.parameters_and_names():
            if len(param.shape) == 2:
                rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
                full = rng.normal(0.0, sigma, full_shapes.get(name, param.shape)).astype(np.float32)
                if name in specs:
                    full = shard_array(full, specs[name], mp, mp_id)
                param.set_data(Tensor(np.ascontiguousarray(full), param.dtype))

    def make_batch(self, input_ids, labels=None, loss_mask=None, actual_seq_len=None) -> ShardedBatch:
        """The step's ``ShardedBatch`` of this rank's (B, S/CP) shards (``ShardedBatch.from_shards``): RoPE
        tables, document ids and the attention plan, built once for every layer and the backward."""
        return ShardedBatch.from_shards(self.batch_spec, input_ids, labels, loss_mask, actual_seq_len)

    def forward_batch(self, batch: ShardedBatch):
        """(loss_sum, token_count) of a batch with labels and loss_mask (see the class docstring)."""
        return self.head_loss(self.model(batch), batch.labels, batch.loss_mask)

    def embed(self, batch: ShardedBatch):
        """The first stage of a pipeline: the batch's ids -> (B, S/CP/SP, H) embeddings in compute dtype (SP =
        model_parallel under sequence parallelism, else 1).  Layer i then runs
        ``self.model.run_layer(self.model.layers[i], hidden, batch)``, the last stage
        ``self.head_loss(self.model.final_norm(hidden), batch.labels, batch.loss_mask)``."""
        return self.model.embed_tokens(batch.input_ids)

    def logits(self, input_ids, actual_seq_len=None):
        """(B, S/CP) ids -> (B, S/CP, V/MP) float32 logits of this rank's tokens (its vocabulary slice)."""
        return self.head_logits(self.model(self.make_batch(input_ids, actual_seq_len=actual_seq_len)))

    def head_logits(self, hidden):
        """Final hidden (B, S, H) -> (B, S, V/MP) float32 logits (vocabulary ids [mp_id*V/MP, (mp_id+1)*V/MP))."""
        if self.lm_head is not None:
            return self.lm_head(hidden).astype(ms.float32)
        b, s, h = hidden.shape
        table = self.model.embed_tokens.weight.astype(self.compute_dtype)                # (V/MP, H), tied
        hidden = self.head_copy(hidden)
        return self.head_matmul(hidden.reshape(b * s, h), table).reshape(b, s, -1).astype(ms.float32)

    def head_loss(self, hidden, labels, loss_mask):
        """(loss_sum, token_count) from the final hidden state; the cross entropy never gathers the vocabulary.

        ``long_seq.loss_tile`` > 0 (``self.loss_tile``): logits and loss tile by tile, recomputed in the backward
        (``tiled_loss.TiledHeadLoss``); else the whole (B, S, V/MP) float32 logits at once."""
        mask = loss_mask.astype(ms.float32)
        labels = ops.where(mask > 0, labels.astype(ms.int32), ops.zeros_like(labels, dtype=ms.int32))
        if self.tiled_loss is not None:
            b, s, h = hidden.shape
            head = self.lm_head.weight if self.lm_head is not None else self.model.embed_tokens.weight  # (V/MP, H)
            loss_sum, _ = self.tiled_loss(self.head_copy(hidden).reshape(b * s, h), head.astype(self.compute_dtype),
                                          labels.reshape(-1), mask.reshape(-1))
            return loss_sum, ops.stop_gradient(mask.sum())
        logits = self.head_logits(hidden)                                                # (B, S, V/MP)
        if self.mp_group.size == 1:
            ce = cross_entropy(logits, labels)                                           # (B, S)
        else:
            ce = vocab_parallel_cross_entropy(logits, labels, group=self.mp_group,
                                              vocab_start=self.mp_group.index * logits.shape[-1])
        return (ce * mask).sum(), ops.stop_gradient(mask.sum())

    def construct(self, input_ids, labels, loss_mask, actual_seq_len=None):
        return self.forward_batch(self.make_batch(input_ids, labels, loss_mask, actual_seq_len))


def register_classes(*classes) -> None:
    """Register config classes (CONFIG) in MindFormers' registry, once.  The model names (MODELS) belong to the
    classes MindFormers' builder can build from the config alone (``mf_route/models.py``, registered by
    ``registry.py``)."""
    for cls in classes:
        kind = MindFormerModuleType.CONFIG if issubclass(cls, LongSeqModelConfig) else MindFormerModuleType.MODELS
        if not MindFormerRegister.is_exist(kind, cls.__name__):
            MindFormerRegister.register_cls(cls, module_type=kind)


__all__ = ["LongSeqForCausalLM", "DecoderModel", "DecoderLayer", "Attention", "MLP", "RMSNorm", "cross_entropy",
           "register_classes", "MS_DTYPES"]
