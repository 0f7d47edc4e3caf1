"""LongSeqConfig: every rule raises a ValueError naming the key, the value and the fix."""
import pytest

from mf_longseq.config import LongSeqConfig
from run_settings import checked_settings
from mf_longseq.models import model_config_from

BASE = dict(seq_length=4096, num_heads=8, num_kv_heads=2)


def make(**kw):
    return checked_settings(**{**BASE, **kw})[0]


def test_defaults_are_ring_zigzag_cp_off():
    cfg = make()
    assert (cfg.context_parallel, cfg.context_parallel_algo, cfg.layout) == (1, "colossalai_cp", "zigzag")
    assert (cfg.ulysses_degree, cfg.ring_degree, cfg.world_size) == (1, 1, 1)


@pytest.mark.parametrize("algo, u_in_cp, expect", [
    ("colossalai_cp", 1, (1, 4)), ("ulysses_cp", 1, (4, 1)), ("hybrid_cp", 2, (2, 2))])
def test_derived_degrees(algo, u_in_cp, expect):
    cfg = make(context_parallel=4, context_parallel_algo=algo, ulysses_degree_in_cp=u_in_cp)
    assert (cfg.ulysses_degree, cfg.ring_degree) == expect


def test_frozen():
    with pytest.raises(Exception):
        make().context_parallel = 2


def test_legacy_hybird_spelling_is_refused_as_mindformers_does():
    """MindFormers 1.9 refuses 'hybird_cp' (not a valid ContextParallelAlgo), so the same YAML would die under its
    Trainer: refused here by name, with the right spelling as the fix."""
    with pytest.raises(ValueError, match=r"^parallel_config\.context_parallel_algo = 'hybird_cp': is the old "
                                         r"spelling, which MindFormers 1\.9 refuses .*Fix: write "
                                         r"parallel_config\.context_parallel_algo: hybrid_cp\.$"):
        make(context_parallel=4, context_parallel_algo="hybird_cp", ulysses_degree_in_cp=2)


@pytest.mark.parametrize("kw, match", [
    (dict(context_parallel_algo="ring_cp"),
     r"parallel_config\.context_parallel_algo = 'ring_cp': unknown algorithm\. Fix: use one of"),
    (dict(context_parallel_algo="ulyses_cp"), r"did you mean 'ulysses_cp'"),
    (dict(context_parallel=0), r"parallel_config\.context_parallel = 0: must be a positive integer"),
    (dict(context_parallel=2, model_parallel=2, use_seq_parallel=True, seq_length=4098, layout="contiguous"),
     r"model\.model_config\.seq_length = 4098: parallel_config\.use_seq_parallel splits .* divisible by "
     r"context_parallel x model_parallel = 4\. Fix: use a seq_length divisible by 4, or set "
     r"parallel_config\.use_seq_parallel: False"),
    (dict(context_parallel=2, device_target="Ascend", use_flash_attention=False),
     r"model\.model_config\.use_flash_attention = False: .*Fix: set model\.model_config\.use_flash_attention: True"),
    (dict(context_parallel=4, device_num=8),
     r"long_seq\.device_num = 8: device_num must equal .* 1 x 1 x 4 x 1 = 4"),
    (dict(context_parallel=4, context_parallel_algo="hybrid_cp", ulysses_degree_in_cp=3),
     r"parallel_config\.ulysses_degree_in_cp = 3: must divide parallel_config\.context_parallel = 4\. "
     r"Fix: use one of \[1, 2, 4\]"),
    (dict(num_heads=6, num_kv_heads=6, model_parallel=2, context_parallel=4, context_parallel_algo="ulysses_cp"),
     r"parallel_config\.context_parallel = 4: the Ulysses degree 4 exceeds the query heads per model-parallel "
     r"rank, .* = 6 / 2 = 3, .*Fix: use a Ulysses degree of at most 3"),
    (dict(num_kv_heads=3), r"model\.model_config\.n_kv_heads = 3: must divide model\.model_config\.num_heads = 8"),
    (dict(model_parallel=3), r"parallel_config\.model_parallel = 3: must divide model\.model_config\.num_heads"),
    (dict(seq_length=4100, context_parallel=4),
     r"model\.model_config\.seq_length = 4100: the zigzag layout with context_parallel = 4 splits the sequence "
     r"into 8 equal parts\. Fix: use a seq_length divisible by 8"),
    (dict(seq_length=4098, context_parallel=4, layout="contiguous"), r"divisible by 4"),
    (dict(layout="striped"), r"long_seq\.layout = 'striped': unknown sequence layout"),
    (dict(pipeline_stage=2, micro_batch_num=1, num_layers=4),
     r"parallel_config\.micro_batch_num = 1: must be >= parallel_config\.pipeline_stage = 2"),
    (dict(pipeline_stage=4, micro_batch_num=4, num_layers=2),
     r"parallel_config\.pipeline_stage = 4: more stages than model\.model_config\.num_layers = 2"),
    (dict(use_seq_parallel="yes"), r"parallel_config\.use_seq_parallel = 'yes': must be True or False"),
])
def test_rule_messages(kw, match):
    with pytest.raises(ValueError, match=match):
        make(**kw)


def test_pure_ulysses_zigzag_needs_only_cp_divisibility():
    make(seq_length=4100, num_heads=4, num_kv_heads=4, context_parallel=4, context_parallel_algo="ulysses_cp")


def test_from_mindformers_reads_standard_keys_and_own_section():
    tree = {
        "context": {"device_target": "CPU"},
        "parallel": {"enable_alltoall": True},
        "parallel_config": {"data_parallel": 2, "context_parallel": 4, "context_parallel_algo": "hybrid_cp",
                            "ulysses_degree_in_cp": 2, "use_seq_parallel": False},
        "model": {"model_config": {"seq_length": 8192, "num_heads": 8, "n_kv_heads": 2, "num_layers": 2,
                                   "use_flash_attention": True, "use_attn_mask_compression": True}},
        "long_seq": {"layout": "contiguous", "block_size": 1024},
    }
    cfg = LongSeqConfig.from_mindformers(tree)
    model = model_config_from(tree)                       # the model's facts: their one home
    assert (cfg.world_size, cfg.ulysses_degree, cfg.ring_degree) == (8, 2, 2)
    assert cfg.enable_alltoall and model.use_attn_mask_compression
    assert (cfg.layout, cfg.block_size, model.n_kv_heads) == ("contiguous", 1024, 2)


def test_unknown_own_key_has_did_you_mean():
    tree = {"model": {"model_config": {"seq_length": 64, "num_heads": 2}}, "long_seq": {"layuot": "zigzag"}}
    with pytest.raises(ValueError, match=r"long_seq\.layuot = 'zigzag': unknown key\. Fix: did you mean long_seq\.layout"):
        LongSeqConfig.from_mindformers(tree)


def test_missing_required_key():
    with pytest.raises(ValueError, match=r"model\.model_config\.seq_length = None: is required"):
        LongSeqConfig.from_mindformers({"model": {"model_config": {"num_heads": 2}}})


def test_the_model_facts_have_one_home():
    """LongSeqConfig holds the parallel settings only; the model's facts live in model.model_config
    (LongSeqModelConfig) and reach the rules through check_model, so no second copy can drift."""
    from dataclasses import fields
    from mf_longseq.config import MODEL_FACTS
    names = {f.name for f in fields(LongSeqConfig)}
    assert not names & {*MODEL_FACTS, "num_kv_heads", "use_attn_mask_compression"}
    with pytest.raises(TypeError):
        LongSeqConfig(seq_length=4096)


def test_check_model_reads_a_model_config_as_the_yaml_section():
    """The same rule fires on a LongSeqModelConfig and on the YAML's model.model_config mapping."""
    from mf_longseq.models import LlamaLongSeqConfig
    cfg = LongSeqConfig(context_parallel=4)
    message = r"^model\.model_config\.seq_length = 4100: the zigzag layout with context_parallel = 4"
    with pytest.raises(ValueError, match=message):
        cfg.check_model(LlamaLongSeqConfig.from_preset("tiny", seq_length=4100))
    with pytest.raises(ValueError, match=message):
        cfg.check_model({"seq_length": 4100, "num_heads": 4})
