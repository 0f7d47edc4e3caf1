"""``plan --emit-yaml``: the chosen layout as a MindFormers YAML, in MindFormers' section layout.

The file is checked before it is written: ``LongSeqConfig.from_mindformers`` (every plugin rule) and
``models.model_config_from`` (the model section builds).  Model shapes are the presets' (``--model``).
"""
import yaml

from mf_longseq.config import ConfigError, LongSeqConfig
from mf_longseq.families import FAMILIES
from mf_longseq.parallel.algorithms import ALGORITHMS
from mf_longseq.parallel.plan import RunPlan
from mf_longseq.planner.run_settings import Settings


def template(model: str, plan: RunPlan, settings: Settings) -> dict:
    """The YAML tree of one run."""
    from mf_longseq.planner.shapes import _config_of
    config = _config_of(model)
    config_type, arch_type = FAMILIES[config.family].config_class, FAMILIES[config.family].model_class
    model_config = {"type": config_type, **{k: v for k, v in config.to_dict().items() if k in _MODEL_KEYS}}
    model_config.update(seq_length=settings.seq_len, compute_dtype=settings.compute_dtype,
                        param_init_type=settings.param_dtype, use_flash_attention=True,
                        use_attn_mask_compression=settings.mask_compression)
    mindformers_algo = ALGORITHMS[plan.algo].mindformers     # else only long_seq.cp_algo takes the name
    return {
        "seed": 0,
        "run_mode": "train",
        "context": {"device_target": "Ascend" if settings.backend == "ascend" else "CPU", "mode": 1},
        "parallel": {"enable_alltoall": settings.use_alltoall,
                     "enable_parallel_optimizer": settings.zero > 0},
        "parallel_config": {"data_parallel": plan.dp, "model_parallel": plan.mp,
                            "context_parallel": plan.cp, "pipeline_stage": plan.pp,
                            "micro_batch_num": settings.micro_batch_num,
                            **({"context_parallel_algo": plan.algo} if mindformers_algo else {}),
                            "ulysses_degree_in_cp": plan.ulysses_degree_in_cp,
                            "use_seq_parallel": settings.seq_parallel, "vocab_emb_dp": True},
        "recompute_config": {"recompute": settings.recompute},
        "runner_config": {"batch_size": settings.micro_batch},
        "model": {"model_config": model_config, "arch": {"type": arch_type}},
        "long_seq": {"layout": plan.seq_layout, "block_size": settings.block_size,
                     "device_num": plan.world_size, "loss_tile": settings.loss_tile,
                     "mlp_tile": settings.mlp_tile, "offload_layer_inputs": settings.offload_layer_inputs,
                     **({} if mindformers_algo else {"cp_algo": plan.algo})},
    }


_MODEL_KEYS = ("vocab_size", "hidden_size", "num_layers", "num_heads", "n_kv_heads", "intermediate_size",
               "rms_norm_eps", "theta", "qkv_has_bias", "tie_word_embeddings")


def emit_yaml(path: str, model: str, plan: RunPlan, settings: Settings) -> dict:
    """Write the template of ``layout`` (recompute and memory features from ``settings``) to ``path`` after
    checking it; returns the tree.

    Raises:
        ConfigError: a rule of this build refuses the tree (e.g. a build whose ``use_seq_parallel`` cannot run
            with context_parallel > 1: then plan with ``--seq-parallel off``).
    """
    from mf_longseq.models import model_config_from
    tree = template(model, plan, settings)
    try:
        LongSeqConfig.from_mindformers(tree)
    except ConfigError as err:
        if err.key != "parallel_config.use_seq_parallel":
            raise
        raise ConfigError(err.key, True, f"{err.problem} in this build, so the planned run cannot be written",
                          "plan again with --seq-parallel off") from err
    model_config_from(tree)
    header = (f"# mf-longseq plan --model {model} --seq-len {settings.seq_len} --devices {plan.world_size}: "
              f"{plan.label()}{' with recompute' if settings.recompute else ''}, features: "
              f"{settings.features()}\n")
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(header + yaml.safe_dump(tree, sort_keys=False))
    return tree
