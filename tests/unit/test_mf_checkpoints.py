"""Checkpoints in MindFormers' own layout (issue 22): MindFormers' tiny ``LlamaForCausalLM`` (the class of its
LLaMA2 and research/qwen1_5 models) saved with ``mindspore.save_checkpoint`` loads into our model and gives the
same first loss; fused (qkv_concat) and split layouts; Qwen v1 names from research/qwen's converter (MindFormers
1.9.0 ships no Qwen v1 class); round trips; a missing weight is an error; ``mf-longseq convert`` both ways."""
import numpy as np
import pytest

import mindspore as ms
from mindspore import Tensor

from mf_longseq.cli import main as cli
from mf_longseq.config import LongSeqConfig
from mf_longseq.models import LlamaLongSeqConfig, Qwen2LongSeqConfig, QwenLongSeqConfig, build_model, parameter_shapes
from mf_longseq.models import mf_names
from mf_longseq.models.start_weights import load_start_weights, read_start_weights
from mf_longseq.parallel import Mesh

S, V = 16, 64
DIMS = dict(seq_length=S, vocab_size=V, hidden_size=32, num_layers=2, num_heads=4, n_kv_heads=2,
            intermediate_size=48)


def mf_llama(theta, qkv_concat, qkv_has_bias, seed=0):
    """MindFormers' own LlamaForCausalLM (tiny, float32, CPU kernels), every weight random."""
    from mindformers.models.llama import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(batch_size=1, **DIMS, rms_norm_eps=1e-5, theta=theta, compute_dtype="float32",
                      param_init_type="float32", layernorm_compute_type="float32", softmax_compute_type="float32",
                      rotary_dtype="float32", use_flash_attention=False, qkv_concat=qkv_concat,
                      qkv_has_bias=qkv_has_bias, fused_rms_norm=False, use_rope_slice=True)
    model = LlamaForCausalLM(cfg)
    rng = np.random.default_rng(seed)
    for p in model.get_parameters():
        base = 1.0 if "norm" in p.name else 0.0
        p.set_data(Tensor((base + 0.2 * rng.standard_normal(p.shape)).astype(np.float32)))
    return model


def tokens(seed=1):
    return np.random.default_rng(seed).integers(1, V, (2, S + 1)).astype(np.int32)    # no pad id (0)


def ours(cfg):
    return build_model(cfg, mesh=Mesh(rank=0), long_seq_config=LongSeqConfig(block_size=8),
                       registered=True)                  # the class MindFormers builds: its pretraining column


def first_loss(model, ids) -> float:
    model.set_train(True)
    out = model(Tensor(ids))
    return float((out[0] if isinstance(out, tuple) else out).asnumpy().reshape(-1)[0])


CASES = [  # (our config class, theta, qkv_concat, bias): LLaMA2; Qwen1.5 = LlamaForCausalLM with q/k/v bias
    (LlamaLongSeqConfig, 10000.0, False, False),
    (LlamaLongSeqConfig, 10000.0, True, False),
    (Qwen2LongSeqConfig, 1e6, False, True),
    (Qwen2LongSeqConfig, 1e6, True, True),
]


@pytest.mark.parametrize("cls, theta, fused, bias", CASES)
def test_mindformers_checkpoint_gives_mindformers_first_loss(cls, theta, fused, bias, tmp_path):
    ms.set_context(mode=ms.PYNATIVE_MODE)
    mf = mf_llama(theta, fused, bias)
    path = str(tmp_path / "mf.ckpt")
    ms.save_checkpoint(mf, path)
    ids = tokens()
    want = first_loss(mf, ids)
    cfg = cls(**DIMS, rms_norm_eps=1e-5, theta=theta, qkv_has_bias=bias, tie_word_embeddings=False)
    model = ours(cfg)
    assert load_start_weights(model, path) == len(parameter_shapes(cfg))
    got = first_loss(model, ids)
    assert abs(got - want) < 1e-5, (got, want)


@pytest.mark.parametrize("cls", [LlamaLongSeqConfig, Qwen2LongSeqConfig, QwenLongSeqConfig])
@pytest.mark.parametrize("fused", [False, True])
def test_round_trip_ours_to_mindformers_to_ours(cls, fused):
    if fused and cls is QwenLongSeqConfig:
        pytest.skip("Qwen v1 has no fused layout in MindFormers")
    cfg = cls.from_preset("tiny", seq_length=S)
    rng = np.random.default_rng(0)
    weights = {k: rng.standard_normal(s).astype(np.float32) for k, s in parameter_shapes(cfg).items()}
    theirs = mf_names.ours_to_mf(weights, cfg, qkv_concat=fused)
    assert not set(theirs) & set(weights) - {"lm_head.weight"}        # every other name is MindFormers'
    assert mf_names.looks_like_mindformers(theirs)
    back = mf_names.mf_to_ours({**theirs, "adam_m.x": np.zeros(1), "global_step": np.zeros(1)}, cfg)
    assert sorted(back) == sorted(weights)
    for name, value in weights.items():
        np.testing.assert_array_equal(back[name], value)


def test_llama_names_are_mindformers_converters():
    cfg = Qwen2LongSeqConfig.from_preset("tiny", seq_length=S)
    table = mf_names.mf_names(cfg)
    assert table["model.embed_tokens.weight"] == "model.tok_embeddings.embedding_weight"
    assert table["model.layers.1.self_attn.k_proj.bias"] == "model.layers.1.attention.wk.bias"
    assert table["model.layers.0.mlp.gate_proj.weight"] == "model.layers.0.feed_forward.w1.weight"
    assert table["model.norm.weight"] == "model.norm_out.weight"
    pytest.importorskip("torch")                                     # convert_reversed imports torch
    from mindformers.models.llama.convert_reversed import name_replace
    hf_from_mf = {mf: name_replace(mf) for mf in table.values()}     # MindFormers' own reverse map
    assert {v: k for k, v in hf_from_mf.items()} == {ours_name: mf for ours_name, mf in table.items()}


def test_qwen_v1_names_follow_research_qwen_converter():
    """research/qwen/convert_weight.py: Hugging Face v1 -> MindFormers by name replacement, c_attn split in 3."""
    from mf_longseq.models.convert import ours_to_hf
    cfg = QwenLongSeqConfig.from_preset("tiny", seq_length=S)
    rng = np.random.default_rng(0)
    weights = {k: rng.standard_normal(s).astype(np.float32) for k, s in parameter_shapes(cfg).items()}
    replaces = [(".h.", ".layers."), (".wte.weight", ".wte.embedding_weight"), ("attn.c_proj.", "attention.wo."),
                ("ln_1.", "attention_norm."), ("ln_2.", "ffn_norm."), ("mlp.w1.", "feed_forward.w1."),
                ("mlp.w2.", "feed_forward.w3."), ("mlp.c_proj.", "feed_forward.w2.")]
    theirs = {}
    for name, value in ours_to_hf(weights, cfg).items():
        for old, new in replaces:
            name = name.replace(old, new)
        if "attn.c_attn." in name:
            for part, piece in zip(("wq", "wk", "wv"), np.array_split(value, 3)):
                theirs[name.replace("attn.c_attn.", f"attention.{part}.")] = piece
        else:
            theirs[name] = value
    back = mf_names.mf_to_ours(theirs, cfg)
    for name, value in weights.items():
        np.testing.assert_array_equal(back[name], value)


def test_a_missing_weight_is_an_error_naming_it(tmp_path):
    cfg = LlamaLongSeqConfig.from_preset("tiny", seq_length=S)
    weights = {k: np.zeros(s, np.float32) for k, s in parameter_shapes(cfg).items()}
    theirs = mf_names.ours_to_mf(weights, cfg)
    del theirs["model.layers.1.feed_forward.w3.weight"]
    path = str(tmp_path / "partial.ckpt")
    ms.save_checkpoint([{"name": k, "data": Tensor(v)} for k, v in theirs.items()], path)
    with pytest.raises(ValueError, match=r"1 weights of the model are missing \(first: model.layers.1.mlp.up_proj"):
        read_start_weights(path, cfg)
    with pytest.raises(ValueError, match=r"no such file"):
        read_start_weights(str(tmp_path / "none.ckpt"), cfg)


def test_cli_converts_mindformers_checkpoints_both_ways(tmp_path, capsys):
    tree = {"model": {"model_config": {"type": "Qwen2LongSeqConfig", **DIMS, "qkv_has_bias": True}}}
    import yaml
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(tree))
    from mf_longseq.models.build import model_config_from
    cfg = model_config_from(str(config))
    rng = np.random.default_rng(0)
    weights = {k: rng.standard_normal(s).astype(np.float32) for k, s in parameter_shapes(cfg).items()}
    theirs = mf_names.ours_to_mf(weights, cfg, qkv_concat=True)
    src = str(tmp_path / "mf.ckpt")
    ms.save_checkpoint([{"name": k, "data": Tensor(v)} for k, v in theirs.items()], src)
    dst = str(tmp_path / "ours.safetensors")
    assert cli(["convert", "mf-to-ours", "--src", src, "--config", str(config), "--dst", dst]) == 0
    loaded = read_start_weights(dst, cfg)
    for name, value in weights.items():
        np.testing.assert_array_equal(loaded[name], value)
    back = str(tmp_path / "back.ckpt")
    assert cli(["convert", "ours-to-mf", "--src", dst, "--config", str(config), "--dst", back, "--qkv-concat"]) == 0
    again = {k: v.asnumpy() for k, v in ms.load_checkpoint(back).items()}
    assert sorted(again) == sorted(theirs)
    for name, value in theirs.items():
        np.testing.assert_array_equal(again[name], value)
    assert cli(["convert", "mf-to-ours", "--src", src, "--config", str(config),
                "--dst", str(tmp_path / "no" / "such" / "x.ckpt")]) == 1
    assert "--dst" in capsys.readouterr().err


def test_hf_to_ours_yaml_has_auto_register_and_a_missing_dst_folder_is_named(tmp_path, capsys):
    """Issue 22 item 5: the written model section carries the auto_register lines run_mindformer.py needs; --dst
    into a folder that does not exist is a one-line error naming it (was a raw traceback)."""
    from mf_longseq.models import convert
    section = convert._model_section(Qwen2LongSeqConfig.from_preset("tiny", seq_length=S))["model"]
    assert section["model_config"]["auto_register"] == "registry.Qwen2LongSeqConfig"
    assert section["arch"] == {"type": "Qwen2LongSeqForCausalLM", "auto_register": "registry.Qwen2LongSeqForCausalLM"}
    missing = tmp_path / "no" / "such"
    assert cli(["convert", "hf-to-ours", "--src", str(tmp_path), "--dst", str(missing / "m.ckpt")]) == 1
    err = capsys.readouterr().err
    assert f"--dst {missing / 'm.ckpt'}: the folder {missing} does not exist" in err and "mkdir -p" in err
