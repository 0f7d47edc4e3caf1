"""Model cases: one training step per family through ``train.job.run_job``, and one decoder layer per template.

Training steps (batches ``model_cp2``: rank 0 of ``RANK_SIZE=2``; ``model_2x2x2x1``: rank 0 of ``RANK_SIZE=8``):
a real template of the family with tiny model shapes (bf16 compute, flash attention on) and the parallel
degrees of the batch; everything else (optimizer, lr schedule, parallel section, algorithm, layout) as the
template says.  ``run_job`` is the product's own route (context set-up, model build, data, AdamW, gradient
all-reduce); the worker stands in for msrun (``init()`` with the fake CANN's RANK_SIZE / RANK_ID).

Templates (batches ``templates_w<world size>``, ``MS_SIMULATION_LEVEL=0``): for every YAML under
``yaml_templates/`` except ``tiny/``, rank 0's ``DecoderLayer`` with the template's real hidden size, heads, kv
heads, FFN width, sequence length and parallel degrees (so its per-rank shapes), forward and backward.
"""
import copy
import os
import time
from collections import Counter
from pathlib import Path

import numpy as np
import mindspore as ms
from mindspore import ops

from asim_worker import batch, case, host_count_as_if_every_rank_equal

ROOT = Path(__file__).resolve().parents[2]
TEMPLATES = ROOT / "yaml_templates"
TINY_MODEL = dict(seq_length=4096, vocab_size=512, hidden_size=256, num_layers=2, num_heads=4, n_kv_heads=2,
                  intermediate_size=512, compute_dtype="bfloat16", use_flash_attention=True)
FAMILY_TEMPLATES = {"llama2": ("llama2/7b_32k_cp4_colossalai_cp.yaml", "llama2/7b_32k_cp2_ulysses_cp.yaml"),
                    "qwen": ("qwen/7b_32k_cp4_colossalai_cp.yaml", "qwen/7b_64k_cp8_ulysses_cp.yaml"),
                    "qwen1_5": ("qwen1_5/7b_32k_cp4_colossalai_cp.yaml", "qwen1_5/7b_64k_cp8_ulysses_cp.yaml")}


def _load(relative):
    import yaml
    with open(TEMPLATES / relative, encoding="utf-8") as handle:
        return yaml.safe_load(handle)


def _tiny_tree(relative, dp, mp, cp, pp):
    tree = copy.deepcopy(_load(relative))
    model = tree["model"]["model_config"]
    model.update(TINY_MODEL)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):     # the template's ids lie past the tiny vocab
        if key in model:
            model[key] = min(model[key], TINY_MODEL["vocab_size"] - 1)
    tree["parallel_config"].update(data_parallel=dp, model_parallel=mp, context_parallel=cp, pipeline_stage=pp,
                                   micro_batch_num=max(pp, 1))
    if tree["parallel_config"]["context_parallel_algo"] == "hybrid_cp":
        tree["parallel_config"]["ulysses_degree_in_cp"] = 2 if cp % 2 == 0 else 1
    tree["long_seq"]["device_num"] = dp * mp * cp * pp
    assert tree["context"]["device_target"] == "Ascend", tree["context"]
    return tree


def _host_sums_as_if_every_rank_equal():
    """``Trainer._sum`` (logged loss) still runs its AllReduce through the Ascend front end, but the dummy
    collective returns meaningless values (zero).  The host value returned here is what the sum is when every
    rank holds the same value: value x group size.  The token count: ``host_count_as_if_every_rank_equal``."""
    from mf_longseq.train.runner import Trainer
    original = getattr(Trainer._sum, "__wrapped__", Trainer._sum)

    def summed(self, value):
        original(self, value)
        return value * self.group.size
    summed.__wrapped__ = original
    Trainer._sum = summed
    host_count_as_if_every_rank_equal()


def train_step(family, which, dp, mp, cp, pp, packed=False):
    """One ``run_job`` step on this rank; checks the kernel, the dtypes that reach HCCL and the step record.

    ``packed``: MindFormers' packed documents (``create_compressed_eod_mask``, EOD = the template's eos id):
    the attention must then have run TND calls."""
    from cases_comm import Recorder
    from mf_longseq.attention.flash import FlashKernel
    from mf_longseq.train import context as run_context
    from mf_longseq.train import job
    tree = _tiny_tree(FAMILY_TEMPLATES[family][which], dp, mp, cp, pp)
    if packed:
        tree["train_dataset"]["data_loader"]["config"] = {"create_compressed_eod_mask": True, "eod": 2}
        tree["model"]["model_config"]["eos_token_id"] = 2
    built = []

    def factory(settings, mesh):
        model = job.build_default_model(settings, mesh)
        built.append(model)
        return model
    run_context.under_msrun = lambda: True                      # the worker plays an msrun worker (init() done)
    _host_sums_as_if_every_rank_equal()
    with Recorder() as rec:
        records = job.run_job(job.JobOptions(config=tree, steps=1), model_factory=factory)
    assert len(records) == 1, records
    model = built[0]
    kernel = model.model.layers[0].self_attn.core.kernel
    assert isinstance(kernel, FlashKernel), type(kernel)
    moved = Counter((c["op"], c["dtype"]) for c in rec.calls)
    algo = tree["parallel_config"]["context_parallel_algo"]
    attention_ops = {"colossalai_cp": ("isend", "irecv"), "ulysses_cp": ("AlltoAll",) if
                     tree["parallel"]["enable_alltoall"] else ("AllGather",)}[algo]
    for op in attention_ops:
        assert moved[(op, "BFloat16")] > 0, f"{algo}: no bf16 {op} reached HCCL: {dict(moved)}"
    layouts = {c.input_layout for c in rec.flash_calls}
    assert ("TND" in layouts) == packed, f"packed = {packed}: FlashAttentionScore layouts {layouts}"
    if mp > 1:
        assert moved[("AllReduce", "BFloat16")] > 0, f"mp = {mp}: no bf16 AllReduce: {dict(moved)}"
    return {"collectives": {f"{k[0]} {k[1]}": v for k, v in sorted(moved.items())}, "algo": algo,
            "record": str(records[0])[:300]}


MODEL_CP2, MODEL_2X2X2X1 = batch("cp2_rank0", rank_size=2), batch("model_2x2x2x1", rank_size=8)
for _family in FAMILY_TEMPLATES:
    case(MODEL_CP2, f"{_family}_cp2")(lambda f=_family: train_step(f, 0, 1, 1, 2, 1))
    case(MODEL_2X2X2X1, f"{_family}_dp2_mp2_cp2_pp1")(lambda f=_family: train_step(f, 1, 2, 2, 2, 1))
case(MODEL_CP2, "llama2_cp2_packed_documents")(lambda: train_step("llama2", 0, 1, 1, 2, 1, packed=True))


# ------------------------------------------------------------------------------------------------ templates
def template_files():
    return sorted(p.relative_to(TEMPLATES).as_posix() for p in TEMPLATES.glob("*/*.yaml")
                  if p.parent.name != "tiny")


def world_size_of(relative) -> int:
    p = _load(relative)["parallel_config"]
    return p["data_parallel"] * p["model_parallel"] * p["context_parallel"] * p["pipeline_stage"]


def template_layer(relative):
    """Rank 0's decoder layer of ``relative`` (num_layers cut to 1): forward + backward, shapes checked."""
    from mf_longseq.config import LongSeqConfig
    from mf_longseq.models.build import model_config_from
    from mf_longseq.models.decoder import MS_DTYPES, DecoderLayer
    from mf_longseq.rope import rope_tables
    from mf_longseq.parallel.mesh import Mesh
    from mf_longseq.parallel.sharding import global_positions
    tree = _load(relative)
    world, rank = int(os.environ["RANK_SIZE"]), int(os.environ["RANK_ID"])
    long_seq = LongSeqConfig.from_mindformers(tree)
    assert long_seq.world_size == world, (long_seq.world_size, world)
    model_config = model_config_from(tree)
    mesh = Mesh.from_config(long_seq, rank=rank).create_groups()
    one_layer = copy.deepcopy(model_config)
    one_layer.num_layers = 1
    started = time.time()
    layer = DecoderLayer(one_layer, long_seq, mesh)
    built = time.time() - started
    dtype = MS_DTYPES[model_config.compute_dtype]
    s_loc = model_config.seq_length // mesh.cp
    cos, sin = rope_tables(global_positions(model_config.seq_length, mesh, long_seq.layout), model_config.head_dim,
                           model_config.theta)
    cos, sin = (ms.Tensor(t[None, :, None, :], dtype) for t in (cos, sin))          # (1, S/CP, 1, D)
    x = ops.zeros((1, s_loc, model_config.hidden_size), dtype)                     # (B, S/CP, H)
    weights = layer.trainable_params()

    def loss(x):
        out = layer(x, cos, sin)
        assert out.shape == x.shape and out.dtype == x.dtype, f"layer out {out.shape} {out.dtype}, x {x.shape}"
        return out.astype(ms.float32).sum()
    dx, dw = ms.grad(loss, grad_position=0, weights=weights)(x)
    assert dx.shape == x.shape, (dx.shape, x.shape)
    for g, p in zip(dw, weights):
        assert g.shape == p.shape, (p.name, g.shape, p.shape)
    dx.asnumpy()
    attn = layer.self_attn
    assert type(attn.core.kernel).__name__ == "FlashKernel", type(attn.core.kernel)      # the Ascend branch
    assert attn.num_heads * mesh.mp == model_config.num_heads, (attn.num_heads, mesh.mp)
    return {"mesh": repr(mesh), "x": list(x.shape), "heads": attn.num_heads, "kv_heads": attn.kv_heads,
            "head_dim": attn.head_dim, "algo": long_seq.context_parallel_algo,
            "params": int(sum(np.prod(p.shape) for p in weights)), "build_s": round(built, 2),
            "run_s": round(time.time() - started - built, 2)}


def _register_templates():
    for relative in template_files():
        world = world_size_of(relative)
        case(batch(f"templates_w{world}", rank_size=world, level=0), relative)(lambda r=relative: template_layer(r))


_register_templates()
