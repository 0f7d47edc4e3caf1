"""Checkpoint conversion without torch: the safetensors reader/writer, the three layouts, configs, errors, CLI."""
import json
import struct

import numpy as np
import pytest

from mf_longseq.cli import main as cli
from mf_longseq.models import (LlamaLongSeqConfig, Qwen2LongSeqConfig, QwenLongSeqConfig, count_parameters,
                               parameter_shapes)
from mf_longseq.models import convert
from mf_longseq.models import safetensors_io as st

FAMILIES = [LlamaLongSeqConfig, Qwen2LongSeqConfig, QwenLongSeqConfig]


def random_weights(config, seed=0):
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in parameter_shapes(config).items()}


def test_bfloat16_rounds_to_nearest_even():
    x = np.array([1.0, -2.5, 1 + 2 ** -8, 1 + 3 * 2 ** -8, 1 + 2 ** -8 + 2 ** -20, np.inf, -np.inf, np.nan],
                 np.float32)
    bits = st.float32_to_bf16(x)
    assert [hex(b) for b in bits] == ["0x3f80", "0xc020", "0x3f80", "0x3f82", "0x3f81", "0x7f80", "0xff80",
                                      "0x7fc0"]
    back = st.bf16_to_float32(bits)
    assert back[0] == 1.0 and back[1] == -2.5 and back[3] == 1 + 2 ** -6 and np.isnan(back[-1])


def test_safetensors_file_layout_and_round_trip(tmp_path):
    tensors = {"b": np.arange(6, dtype=np.float32).reshape(2, 3), "a": np.array([1, -2], np.int64),
               "h": np.array([0.5, 3.0], np.float16)}
    path = str(tmp_path / "x.safetensors")
    st.write_file(path, tensors, metadata={"note": "t"})
    raw = open(path, "rb").read()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + length])
    assert (8 + length) % 8 == 0 and header["__metadata__"]["note"] == "t"
    assert header["b"] == {"dtype": "F32", "shape": [2, 3], "data_offsets": [header["b"]["data_offsets"][0],
                                                                            header["b"]["data_offsets"][0] + 24]}
    assert len(raw) == 8 + length + max(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__")
    back = st.read_file(path)
    for name, value in tensors.items():
        assert back[name].dtype == value.dtype
        np.testing.assert_array_equal(back[name], value)
    st.write_file(path, {"w": np.array([1.0, 1 + 3 * 2 ** -8], np.float32)}, dtype="bfloat16")
    assert st.read_header(path)[0]["w"]["dtype"] == "BF16"
    np.testing.assert_array_equal(st.read_file(path)["w"], [1.0, 1 + 2 ** -6])


def test_sharded_folder_is_read_through_its_index(tmp_path):
    st.write_file(str(tmp_path / "part1.safetensors"), {"x": np.ones(2, np.float32)})
    st.write_file(str(tmp_path / "part2.safetensors"), {"y": np.zeros(3, np.float32)})
    (tmp_path / st.INDEX).write_text(json.dumps({"weight_map": {"x": "part1.safetensors", "y": "part2.safetensors"}}))
    got = st.read_checkpoint(str(tmp_path))
    assert sorted(got) == ["x", "y"] and got["y"].shape == (3,)
    with pytest.raises(ValueError, match=r"no model.safetensors or model.safetensors.index.json there"):
        st.read_checkpoint(str(tmp_path / "missing"))


@pytest.mark.parametrize("cls", FAMILIES)
def test_weights_round_trip_through_the_hf_layout(cls):
    config = cls.from_preset("tiny")
    ours = random_weights(config)
    hf = convert.ours_to_hf(ours, config)
    back = convert.hf_to_ours(hf, config)
    assert sorted(back) == sorted(ours)
    assert all(np.array_equal(back[k], ours[k]) for k in ours)


def test_qwen_v1_layout_is_fused_qkv_and_swapped_mlp_names():
    config = QwenLongSeqConfig.from_preset("tiny")
    ours = random_weights(config)
    hf = convert.ours_to_hf(ours, config)
    h = config.hidden_size
    p = "model.layers.1."
    fused = hf["transformer.h.1.attn.c_attn.weight"]
    assert fused.shape == (3 * h, h)
    np.testing.assert_array_equal(fused[:h], ours[p + "self_attn.q_proj.weight"])
    np.testing.assert_array_equal(fused[h:2 * h], ours[p + "self_attn.k_proj.weight"])
    np.testing.assert_array_equal(fused[2 * h:], ours[p + "self_attn.v_proj.weight"])
    np.testing.assert_array_equal(hf["transformer.h.1.attn.c_attn.bias"][h:2 * h], ours[p + "self_attn.k_proj.bias"])
    np.testing.assert_array_equal(hf["transformer.h.1.mlp.w2.weight"], ours[p + "mlp.gate_proj.weight"])
    np.testing.assert_array_equal(hf["transformer.h.1.mlp.w1.weight"], ours[p + "mlp.up_proj.weight"])
    assert hf["transformer.h.1.mlp.w1.weight"].shape == (config.intermediate_size // 2, h)
    assert "transformer.wte.weight" in hf and "transformer.ln_f.weight" in hf and "lm_head.weight" in hf


@pytest.mark.parametrize("cls, size", [(LlamaLongSeqConfig, "70b"), (Qwen2LongSeqConfig, "72b"),
                                       (QwenLongSeqConfig, "14b"), (LlamaLongSeqConfig, "tiny")])
def test_configs_round_trip_through_config_json(cls, size):
    config = cls.from_preset(size)
    hf = convert.config_to_hf(config)
    back = convert.config_from_hf(hf)
    assert type(back) is cls
    for key in ("vocab_size", "hidden_size", "num_layers", "num_heads", "n_kv_heads", "ffn_hidden_size",
                "rms_norm_eps", "theta", "qkv_has_bias", "tie_word_embeddings"):
        assert getattr(back, key) == getattr(config, key), key
    assert count_parameters(back) == count_parameters(config)


@pytest.mark.parametrize("change, match", [
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, r"config.json rope_scaling = .*RoPE scaling is not"),
    ({"hidden_act": "gelu"}, r"config.json hidden_act = 'gelu'"),
    ({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}, r"architectures = \['GPT2LMHeadModel'\]"),
])
def test_unsupported_hf_configs_are_refused(change, match):
    hf = {**convert.config_to_hf(LlamaLongSeqConfig.from_preset("tiny")), **change}
    with pytest.raises(ValueError, match=match):
        convert.config_from_hf(hf)


def test_weight_errors_name_the_tensor():
    config = LlamaLongSeqConfig.from_preset("tiny")
    weights = random_weights(config)
    missing = dict(weights)
    del missing["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(ValueError, match=r"1 weights of the model are missing \(first: model.layers.1.mlp.up_proj"):
        convert.hf_to_ours(missing, config)
    wrong = {**weights, "model.norm.weight": np.ones(3, np.float32)}
    with pytest.raises(ValueError, match=r"model.norm.weight has shape \(3,\), the model expects \(64,\)"):
        convert.hf_to_ours(wrong, config)
    with pytest.raises(ValueError, match=r"1 tensors the model does not have \(first: extra\)"):
        convert.hf_to_ours({**weights, "extra": np.ones(1)}, config)
    old = {**weights, "model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(8, np.float32)}
    assert sorted(convert.hf_to_ours(old, config)) == sorted(weights)        # old LLaMA buffers are dropped
    v1 = QwenLongSeqConfig.from_preset("tiny")
    hf = convert.ours_to_hf(random_weights(v1), v1)
    hf["transformer.h.0.attn.c_attn.weight"] = hf["transformer.h.0.attn.c_attn.weight"][:100]
    with pytest.raises(ValueError, match=r"c_attn.weight has 100 rows; Qwen v1 fuses q, k, v of 64 rows each"):
        convert.hf_to_ours(hf, v1)


def test_tied_embeddings_drop_the_head():
    config = LlamaLongSeqConfig.from_preset("tiny", tie_word_embeddings=True)
    weights = random_weights(config)
    hf = {**convert.ours_to_hf(weights, config), "lm_head.weight": weights["model.embed_tokens.weight"]}
    assert "lm_head.weight" not in convert.hf_to_ours(hf, config)


@pytest.mark.parametrize("cls, fmt", [(QwenLongSeqConfig, "ckpt"), (Qwen2LongSeqConfig, "safetensors")])
def test_cli_converts_both_ways(cls, fmt, tmp_path):
    config = cls.from_preset("tiny", seq_length=64)
    weights = random_weights(config, seed=4)
    convert.write_hf(str(tmp_path / "hf"), weights, config, dtype="float32")
    dst = tmp_path / f"ours.{fmt}"
    assert cli(["convert", "hf-to-ours", "--src", str(tmp_path / "hf"), "--dst", str(dst), "--yaml",
                str(tmp_path / "m.yaml"), "--seq-length", "64"]) == 0
    back = convert.read_ours(str(dst), config)
    assert all(np.array_equal(back[k], weights[k]) for k in weights)
    assert cli(["convert", "ours-to-hf", "--src", str(dst), "--config", str(tmp_path / "m.yaml"), "--dst",
                str(tmp_path / "hf2"), "--dtype", "float32"]) == 0
    a, b = st.read_checkpoint(str(tmp_path / "hf")), st.read_checkpoint(str(tmp_path / "hf2"))
    assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)


def test_step_folder_with_model_parallel_is_refused(tmp_path):
    (tmp_path / "meta.json").write_text(json.dumps({"layout": {"mp": 2, "pp": 1}}))
    with pytest.raises(ValueError, match=r"written with model_parallel = 2, pipeline_stage = 1"):
        convert.read_ours(str(tmp_path), LlamaLongSeqConfig.from_preset("tiny"))


def test_cli_reports_missing_config(tmp_path, capsys):
    assert cli(["convert", "ours-to-hf", "--src", str(tmp_path / "x.ckpt"), "--dst", str(tmp_path / "o")]) == 1
    assert "--config None: the model's YAML is needed" in capsys.readouterr().err
