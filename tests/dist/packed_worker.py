"""msrun worker: packed documents (EOD) under every CP algorithm; one launch of 4 CPU workers runs every case.

Usage (under msrun): python packed_worker.py OUT_DIR [CASE,CASE,..]
Attention cases (``CASES``): each rank writes OUT_DIR/<case>/rank<r>.npz with its positions, output and
gradients (dq, dk, dv).  Model cases (``MODEL_CASES``): a tiny LLaMA2 (use_eod_reset) on packed samples; each
rank writes its loss sum, token count and the gradient of its loss sum for every weight (the test adds them up
over a dp group and compares with the one-process model, ``build_packed_model(None)``).
Documents come from EOD tokens through ``train.packing`` (MindFormers' actual_seq_len format), per sample,
and cross shard boundaries, zigzag chunk boundaries and (for zigzag) the gap between a rank's two chunks.
"""
import os
from dataclasses import dataclass

import numpy as np

from worker_main import join_launch, run_cases

WORLD = 4
SEQ_LEN = 96
EOD = 2
# Document ends per sample: sample 0 has a document [5, 90) spanning every zigzag chunk of CP 4 (chunk 12)
# and CP 2 (chunk 24), so rank 0 sees it in both of its chunks; sample 1 has a 1-token document at 60.
DOC_ENDS = ([5, 90, 96], [17, 31, 50, 60, 61, 83, 96])


@dataclass(frozen=True)
class PackedCase:
    name: str
    algo: str
    cp: int
    ulysses: int = 1
    layout: str = "zigzag"
    use_alltoall: bool = False
    per_sample: bool = True          # (B, S) ids; False: sample 1's ids shared by the batch as (S,)
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 8
    batch: int = 2
    block: int = 32

    @property
    def dp(self) -> int:
        return WORLD // self.cp


CASES = [
    PackedCase("ring_cp2_zigzag", "colossalai_cp", 2),
    PackedCase("ring_cp2_contiguous_shared_ids", "colossalai_cp", 2, layout="contiguous", per_sample=False),
    PackedCase("ring_cp4_zigzag", "colossalai_cp", 4),
    PackedCase("ring_cp4_contiguous", "colossalai_cp", 4, layout="contiguous"),
    PackedCase("ulysses_cp2", "ulysses_cp", 2, ulysses=2),
    PackedCase("ulysses_cp4_alltoall", "ulysses_cp", 4, ulysses=4, use_alltoall=True),
    PackedCase("hybrid_cp4_u2r2_zigzag", "hybrid_cp", 4, ulysses=2),
    PackedCase("hybrid_cp4_u2r2_contiguous_alltoall", "hybrid_cp", 4, ulysses=2, layout="contiguous",
               use_alltoall=True),
]


def segment_ids(case: PackedCase) -> np.ndarray:
    """(B, S) or (S,) document ids, derived from EOD tokens the way the dataset side does it."""
    from mf_longseq.documents import segment_ids_from_actual_seq_len
    from mf_longseq.train.packing import actual_seq_len_from_tokens
    tokens = np.full((len(DOC_ENDS), SEQ_LEN), 7, dtype=np.int64)
    for b, ends in enumerate(DOC_ENDS):
        tokens[b, [e - 1 for e in ends]] = EOD                        # a document ends after its EOD token
    ids = segment_ids_from_actual_seq_len(actual_seq_len_from_tokens(tokens, EOD, 8), SEQ_LEN)
    return ids if case.per_sample else ids[1]


@dataclass(frozen=True)
class ModelCase:
    name: str
    algo: str
    cp: int
    ulysses: int = 1
    layout: str = "zigzag"

    @property
    def dp(self) -> int:
        return WORLD // self.cp


MODEL_CASES = [
    ModelCase("model_ring_cp2_zigzag", "colossalai_cp", 2),
    ModelCase("model_ulysses_cp2", "ulysses_cp", 2, ulysses=2),
    ModelCase("model_hybrid_cp4_u2r2_zigzag", "hybrid_cp", 4, ulysses=2),
]


def build_packed_model(case, rank: int = 0):
    """The tiny LLaMA2 of the model cases on ``case``'s mesh (groups created), or on one process (case None)."""
    from mf_longseq.config import LongSeqConfig
    from mf_longseq.models import LlamaLongSeqConfig, build_model
    from mf_longseq.parallel import Mesh
    cfg = LlamaLongSeqConfig.from_preset("tiny", seq_length=SEQ_LEN, use_eod_reset=True, initializer_range=0.2)
    parallel = {} if case is None else dict(data_parallel=case.dp, context_parallel=case.cp,
                                            context_parallel_algo=case.algo, ulysses_degree_in_cp=case.ulysses,
                                            layout=case.layout)
    long_seq = LongSeqConfig(block_size=16, **parallel)
    mesh = Mesh(rank=0) if case is None else Mesh.from_config(long_seq, rank=rank).create_groups()
    return build_model(cfg, mesh=mesh, long_seq_config=long_seq)


def model_batch():
    """Whole-sequence (B, S) input_ids, labels, loss_mask and (B, 8) actual_seq_len with documents ``DOC_ENDS``."""
    from mf_longseq.train.packing import actual_seq_len_from_tokens
    rng = np.random.default_rng(31)
    tokens = rng.integers(3, 256, (len(DOC_ENDS), SEQ_LEN + 1))
    for b, ends in enumerate(DOC_ENDS):
        tokens[b, [e - 1 for e in ends]] = EOD                        # a document ends after its EOD token
    input_ids, labels = tokens[:, :-1].astype(np.int32), tokens[:, 1:].astype(np.int32)
    loss_mask = (rng.random(input_ids.shape) > 0.2).astype(np.float32)
    return input_ids, labels, loss_mask, actual_seq_len_from_tokens(input_ids, EOD, 8).astype(np.int32)


def model_loss_and_grads(model, input_ids, labels, loss_mask, actual_seq_len):
    """(loss_sum, token_count, {weight name: d loss_sum / d weight}) of one forward and backward."""
    import mindspore as ms
    from mindspore import Tensor
    params = model.trainable_params()
    grad_fn = ms.value_and_grad(lambda *xs: model(*xs), None, params, has_aux=True)
    (loss_sum, count), grads = grad_fn(Tensor(input_ids), Tensor(labels), Tensor(loss_mask), Tensor(actual_seq_len))
    return (float(loss_sum.asnumpy()), float(count.asnumpy()),
            {p.name: np.array(g.asnumpy()) for p, g in zip(params, grads)})


def run_model_case(case: ModelCase, rank: int, out_dir: str) -> None:
    from mf_longseq.parallel import shard_sequence
    model = build_packed_model(case, rank)
    input_ids, labels, loss_mask, actual_seq_len = model_batch()
    local = [shard_sequence(x, model.mesh, case.layout, seq_dim=1) for x in (input_ids, labels, loss_mask)]
    loss_sum, count, grads = model_loss_and_grads(model, *local, actual_seq_len)   # ends stay global
    os.makedirs(os.path.join(out_dir, case.name), exist_ok=True)
    np.savez(os.path.join(out_dir, case.name, f"rank{rank}.npz"), dp_id=model.mesh.coords()["dp_id"],
             loss_sum=loss_sum, count=count, **{"grad:" + name: g for name, g in grads.items()})


def inputs(case: PackedCase, dp_id: int):
    """Full-sequence q, k, v, dout of one dp group (the test rebuilds them the same way)."""
    rng = np.random.default_rng(2000 + dp_id)
    b, s, n, kv, d = case.batch, SEQ_LEN, case.heads, case.kv_heads, case.head_dim
    return {name: rng.standard_normal(shape).astype(np.float32)
            for name, shape in (("q", (b, s, n, d)), ("k", (b, s, kv, d)), ("v", (b, s, kv, d)),
                                ("dout", (b, s, n, d)))}


def run_case(case: PackedCase, rank: int, out_dir: str) -> None:
    import mindspore as ms
    from mindspore import Tensor
    from mf_longseq.attention import context_parallel_attention, select_kernel
    from mf_longseq.parallel import Mesh, global_positions, shard_sequence

    mesh = Mesh(dp=case.dp, cp=case.cp, ulysses=case.ulysses, rank=rank).create_groups()
    dp_id = mesh.coords()["dp_id"]
    local = {name: Tensor(shard_sequence(x, mesh, case.layout, seq_dim=1))
             for name, x in inputs(case, dp_id).items()}
    ids, kernel = segment_ids(case), select_kernel("CPU", case.block)     # CPU default: fused kernel

    def loss(q, k, v):
        out = context_parallel_attention(q, k, v, mesh=mesh, algo=case.algo, causal=True, layout=case.layout,
                                         kernel=kernel, use_alltoall=case.use_alltoall, segment_ids=ids)
        return (out * local["dout"]).sum(), out

    (_, out), grads = ms.value_and_grad(loss, grad_position=(0, 1, 2), has_aux=True)(
        local["q"], local["k"], local["v"])
    os.makedirs(os.path.join(out_dir, case.name), exist_ok=True)
    np.savez(os.path.join(out_dir, case.name, f"rank{rank}.npz"), dp_id=dp_id,
             positions=global_positions(SEQ_LEN, mesh, case.layout), out=out.asnumpy(),
             dq=grads[0].asnumpy(), dk=grads[1].asnumpy(), dv=grads[2].asnumpy())


def main():
    rank, out_dir, only = join_launch(WORLD)
    run_cases(CASES, lambda case: run_case(case, rank, out_dir), only, rank)
    run_cases(MODEL_CASES, lambda case: run_model_case(case, rank, out_dir), only, rank)


if __name__ == "__main__":
    main()
