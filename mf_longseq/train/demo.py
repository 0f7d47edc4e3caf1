"""The ``mf-longseq demo`` run: a tiny LLaMA2 at S = 8192 with CP = 2 (ring attention, zigzag layout) on 2 CPU ranks.

The model is small (hidden 64, 2 layers, 2 heads / 1 kv head, vocabulary 256) so that 20 steps at the full
8192-token sequence finish in a few minutes on a 2-core machine; the sequence is never shortened.  The tokens
are the seeded synthetic Markov stream (``data.SyntheticTokens``), which the model learns: the loss falls.
The config is written to ``<output_dir>/demo_config.yaml`` in MindFormers' layout, so the same run is
``mf-longseq train --config <output_dir>/demo_config.yaml --workers 2``.
"""
import os

import yaml


def demo_tree(seq_length: int = 8192, context_parallel: int = 2) -> dict:
    """The demo's MindFormers config (dict)."""
    return {
        "seed": 0,
        "run_mode": "train",
        "runner_config": {"batch_size": 1},
        "context": {"device_target": "CPU", "mode": 1, "runtime_num_threads": 1},
        "parallel": {"parallel_mode": 1, "enable_alltoall": False},
        "parallel_config": {"data_parallel": 1, "model_parallel": 1, "context_parallel": context_parallel,
                            "pipeline_stage": 1, "micro_batch_num": 1, "context_parallel_algo": "colossalai_cp",
                            "ulysses_degree_in_cp": 1, "use_seq_parallel": False},
        "model": {
            "model_config": {"type": "LlamaLongSeqConfig", "vocab_size": 256, "hidden_size": 64, "num_layers": 2,
                             "num_heads": 2, "n_kv_heads": 1, "intermediate_size": 128,
                             "seq_length": seq_length, "compute_dtype": "float32", "param_init_type": "float32",
                             "use_flash_attention": False, "use_attn_mask_compression": True,
                             "initializer_range": 0.02, "init_seed": 1234},
            "arch": {"type": "LlamaLongSeqForCausalLM"},
        },
        "long_seq": {"layout": "zigzag", "block_size": 2048},
        "optimizer": {"type": "AdamW", "betas": [0.9, 0.95], "eps": 1.0e-8, "weight_decay": 0.01},
        "lr_schedule": {"type": "ConstantWarmUpLR", "learning_rate": 0.003, "warmup_steps": 2},
    }


def write_demo_config(tree: dict, output_dir: str) -> str:
    """Write the demo config into ``output_dir``; returns its path."""
    os.makedirs(output_dir, exist_ok=True)
    from mf_longseq.train.files import safe_path, write_atomic
    return write_atomic(safe_path(output_dir, "demo_config.yaml"),
                        "# mf-longseq demo: tiny LLaMA2, S = 8192, CP = 2 ring (colossalai_cp), zigzag, 2 CPU ranks\n"
                        + yaml.safe_dump(tree, sort_keys=False))
