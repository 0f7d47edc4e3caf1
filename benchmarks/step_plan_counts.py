"""How often one training step builds its attention masks and their plans (host work that must not grow with
the number of layers).

    PYTHONPATH=tests .venv/bin/python benchmarks/step_plan_counts.py [--layers 4]

One forward + backward of a tiny LLaMA (CP = 1, S = 32, two packed samples with different documents, so two
sample groups) for: use_attn_mask_compression on (fused CPU kernel), off (``DenseMask``, tiles read by the
blockwise kernel), and the FlashAttentionScore kernel with its NumPy stand-in (``tests/flash_emulator.py``).
Printed per case: ring masks built, tile plans computed (``tile_bounds`` runs twice per plan), and
FlashAttentionScore call plans computed.  With one ``ShardedBatch`` per step each is once per sample group.
"""
import argparse

import numpy as np
import mindspore as ms
from mindspore import Tensor

import mf_longseq.attention.flash as flash_mod
import mf_longseq.attention.mask as mask_mod
from mf_longseq.attention.flash import FlashKernel
from mf_longseq.attention.mask import AttentionMask, DenseMask
from mf_longseq.config import LongSeqConfig
from mf_longseq.models import LlamaLongSeqConfig, build_model
from mf_longseq.parallel import Mesh

S = 32
DOC_ENDS = np.array([[5, 19, 20, 32, 32], [11, 32, 32, 32, 32]])
COUNTS = {"masks": 0, "tile_bounds": 0, "flash_plans": 0}


def _count(name, fn):
    def counted(*args, **kwargs):
        COUNTS[name] += 1
        return fn(*args, **kwargs)
    return counted


def install_counters() -> None:
    for cls in (AttentionMask, DenseMask):
        cls.__init__ = _count("masks", cls.__init__)
    mask_mod.tile_bounds = _count("tile_bounds", mask_mod.tile_bounds)
    flash_mod.plan_flash_calls = _count("flash_plans", flash_mod.plan_flash_calls)


def one_step(layers: int, compression: bool, kernel: str) -> dict:
    cfg = LlamaLongSeqConfig.from_preset("tiny", seq_length=S, num_layers=layers, use_eod_reset=True,
                                         use_attn_mask_compression=compression)
    long_seq = LongSeqConfig(block_size=8)
    model = build_model(cfg, mesh=Mesh(rank=0), long_seq_config=long_seq)
    if kernel == "flash":
        from flash_emulator import NumpyFlashPrimitives
        shared = FlashKernel(primitives=NumpyFlashPrimitives(), compute_dtype=ms.float32)
        for layer in model.model.layers:
            layer.self_attn.core.kernel = shared
    ids = np.random.default_rng(0).integers(3, cfg.vocab_size, (2, S)).astype(np.int32)
    step = ms.value_and_grad(lambda a, b, c: model(a, b, c, DOC_ENDS)[0], None, model.trainable_params())
    for key in COUNTS:
        COUNTS[key] = 0
    step(Tensor(ids), Tensor(ids), Tensor(np.ones((2, S), np.float32)))
    return {"masks": COUNTS["masks"], "tile_plans": COUNTS["tile_bounds"] // 2, "flash_plans": COUNTS["flash_plans"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    layers = parser.parse_args().layers
    install_counters()
    for compression, kernel in ((True, "fused"), (False, "fused"), (True, "flash")):
        got = one_step(layers, compression, kernel)
        print(f"layers={layers} compression={compression} kernel={kernel}: ring masks {got['masks']}, "
              f"tile plans {got['tile_plans']}, FlashAttentionScore call plans {got['flash_plans']}")


if __name__ == "__main__":
    main()
