"""Parity with Hugging Face transformers: tiny random LLaMA and Qwen2 models (torch, CPU, float32) are converted
with ``mf-longseq convert`` and must give the same logits (within 1e-4) and loss in mf_longseq; converting back
must give a folder transformers loads to the same model.  Qwen v1 (fused c_attn) is checked by synthesising a
v1 state dict from a Qwen2 model with as many kv heads as heads, which is the same network.

Needs the ``parity`` extra (torch, transformers, safetensors); without it every test here skips.
"""
import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="parity extra not installed: pip install -e .[parity]")
transformers = pytest.importorskip("transformers", reason="parity extra not installed: pip install -e .[parity]")
safetensors_numpy = pytest.importorskip("safetensors.numpy", reason="parity extra not installed")

import mindspore as ms  # noqa: E402
from mindspore import Tensor  # noqa: E402

from mf_longseq.cli import main as cli  # noqa: E402
from mf_longseq.models import build_model  # noqa: E402
from mf_longseq.models.safetensors_io import read_file  # noqa: E402

S, B, TOL = 32, 2, 1e-4
TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=S, tie_word_embeddings=False)


def hf_model(kind: str, **overrides):
    """A tiny transformers model with every weight random (norms around 1, biases non-zero)."""
    torch.manual_seed(0)
    if kind == "llama":
        cfg = transformers.LlamaConfig(**{**TINY, "num_key_value_heads": 2, "rms_norm_eps": 1e-5,
                                          "rope_theta": 10000.0, **overrides})
        model = transformers.LlamaForCausalLM(cfg)
    else:
        cfg = transformers.Qwen2Config(**{**TINY, "num_key_value_heads": 2, "rms_norm_eps": 1e-6,
                                          "rope_theta": 1e6, "use_sliding_window": False, **overrides})
        model = transformers.Qwen2ForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_((0.3 if p.dim() == 2 else 0.1) * torch.randn_like(p))
    model.config._attn_implementation = "eager"
    return model.eval()


def batch(seed=1):
    rng = np.random.default_rng(seed)
    return rng.integers(0, TINY["vocab_size"], (B, S)).astype(np.int64)


def hf_logits_and_loss(model, ids):
    with torch.no_grad():
        out = model(torch.tensor(ids), labels=torch.tensor(ids))
    return out.logits.float().numpy(), float(out.loss)


def ours_from(ckpt, yaml_path):
    """Our CP = 1 model with the converted weights loaded (every parameter must be loaded)."""
    import yaml
    with open(yaml_path, encoding="utf-8") as handle:
        tree = yaml.safe_load(handle)
    model = build_model(tree)
    not_loaded, _ = ms.load_param_into_net(model, ms.load_checkpoint(str(ckpt)), strict_load=True)
    assert not not_loaded, not_loaded
    return model


def ours_logits_and_loss(model, ids):
    """Logits, and the mean next-token loss with labels shifted globally (the last position masked)."""
    labels = np.concatenate([ids[:, 1:], np.zeros((B, 1), np.int64)], axis=1)
    mask = np.ones((B, S), np.float32)
    mask[:, -1] = 0.0
    logits = np.array(model.logits(Tensor(ids.astype(np.int32))).asnumpy())
    loss_sum, count = model(Tensor(ids.astype(np.int32)), Tensor(labels.astype(np.int32)), Tensor(mask))
    return logits, float(loss_sum.asnumpy()) / float(count.asnumpy())


def convert_to_ours(src, tmp_path):
    ckpt, yaml_path = tmp_path / "ours.ckpt", tmp_path / "model.yaml"
    assert cli(["convert", "hf-to-ours", "--src", str(src), "--dst", str(ckpt), "--yaml", str(yaml_path),
                "--seq-length", str(S)]) == 0
    return ckpt, yaml_path


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_converted_model_gives_transformers_logits(kind, tmp_path):
    torch.set_num_threads(1)
    ref = hf_model(kind)
    ref.save_pretrained(tmp_path / "hf", safe_serialization=True)
    ckpt, yaml_path = convert_to_ours(tmp_path / "hf", tmp_path)
    ours = ours_from(ckpt, yaml_path)
    ids = batch()
    want_logits, want_loss = hf_logits_and_loss(ref, ids)
    logits, loss = ours_logits_and_loss(ours, ids)
    assert np.abs(want_logits).max() > 1.0                      # random weights: logits far from uniform
    assert np.abs(logits - want_logits).max() < TOL
    assert abs(loss - want_loss) < 1e-5 * want_loss


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_ours_to_hf_round_trip_loads_in_transformers(kind, tmp_path):
    torch.set_num_threads(1)
    ref = hf_model(kind)
    ref.save_pretrained(tmp_path / "hf", safe_serialization=True)
    ckpt, yaml_path = convert_to_ours(tmp_path / "hf", tmp_path)
    assert cli(["convert", "ours-to-hf", "--src", str(ckpt), "--config", str(yaml_path), "--dst",
                str(tmp_path / "back"), "--dtype", "float32"]) == 0
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back", attn_implementation="eager").eval()
    assert type(back) is type(ref)
    ids = batch(2)
    np.testing.assert_array_equal(hf_logits_and_loss(back, ids)[0], hf_logits_and_loss(ref, ids)[0])
    # bfloat16 output rounds exactly like torch's float32 -> bfloat16 cast
    assert cli(["convert", "ours-to-hf", "--src", str(ckpt), "--config", str(yaml_path), "--dst",
                str(tmp_path / "bf16")]) == 0
    stored = read_file(str(tmp_path / "bf16" / "model.safetensors"))
    for name, p in ref.state_dict().items():
        np.testing.assert_array_equal(stored[name], p.to(torch.bfloat16).float().numpy(), err_msg=name)


def qwen_v1_state(qwen2_state: dict, layers: int) -> dict:
    """Qwen v1 tensors from a Qwen2 state dict (independent of mf_longseq's mapping)."""
    out = {"transformer.wte.weight": qwen2_state["model.embed_tokens.weight"],
           "transformer.ln_f.weight": qwen2_state["model.norm.weight"], "lm_head.weight": qwen2_state["lm_head.weight"]}
    for i in range(layers):
        p, v = f"model.layers.{i}.", f"transformer.h.{i}."
        for kind in ("weight", "bias"):
            out[v + f"attn.c_attn.{kind}"] = np.concatenate(
                [qwen2_state[p + f"self_attn.{n}_proj.{kind}"] for n in "qkv"], axis=0)
        out[v + "attn.c_proj.weight"] = qwen2_state[p + "self_attn.o_proj.weight"]
        out[v + "ln_1.weight"] = qwen2_state[p + "input_layernorm.weight"]
        out[v + "ln_2.weight"] = qwen2_state[p + "post_attention_layernorm.weight"]
        out[v + "mlp.w1.weight"] = qwen2_state[p + "mlp.up_proj.weight"]      # a1 = w1(x)
        out[v + "mlp.w2.weight"] = qwen2_state[p + "mlp.gate_proj.weight"]    # a1 * silu(w2(x))
        out[v + "mlp.c_proj.weight"] = qwen2_state[p + "mlp.down_proj.weight"]
    return {k: np.ascontiguousarray(a) for k, a in out.items()}


def test_qwen_v1_checkpoint_matches_the_equivalent_qwen2_model(tmp_path):
    torch.set_num_threads(1)
    ref = hf_model("qwen2", num_key_value_heads=4, rope_theta=10000.0)       # v1: no GQA, theta 1e4
    state = {k: v.numpy() for k, v in ref.state_dict().items()}
    v1 = qwen_v1_state(state, TINY["num_hidden_layers"])
    folder = tmp_path / "qwen_v1"
    folder.mkdir()
    safetensors_numpy.save_file(v1, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["QWenLMHeadModel"], "model_type": "qwen", "vocab_size": TINY["vocab_size"],
        "hidden_size": TINY["hidden_size"], "num_hidden_layers": TINY["num_hidden_layers"],
        "num_attention_heads": TINY["num_attention_heads"], "kv_channels": 16,
        "intermediate_size": 2 * TINY["intermediate_size"], "layer_norm_epsilon": 1e-6,
        "rotary_emb_base": 10000, "seq_length": S, "no_bias": True}))
    ckpt, yaml_path = convert_to_ours(folder, tmp_path)
    ours = ours_from(ckpt, yaml_path)
    assert type(ours).__name__ == "QwenLongSeqForCausalLM"
    ids = batch(3)
    want_logits, want_loss = hf_logits_and_loss(ref, ids)
    logits, loss = ours_logits_and_loss(ours, ids)
    assert np.abs(logits - want_logits).max() < TOL
    assert abs(loss - want_loss) < 1e-5 * want_loss
    # and back to the v1 layout, tensor for tensor
    assert cli(["convert", "ours-to-hf", "--src", str(ckpt), "--config", str(yaml_path), "--dst",
                str(tmp_path / "v1_back"), "--dtype", "float32"]) == 0
    back = safetensors_numpy.load_file(str(tmp_path / "v1_back" / "model.safetensors"))
    assert sorted(back) == sorted(v1)
    for name in v1:
        np.testing.assert_array_equal(back[name], v1[name], err_msg=name)
    config = json.loads((tmp_path / "v1_back" / "config.json").read_text())
    assert (config["architectures"], config["intermediate_size"]) == (["QWenLMHeadModel"], 256)


def test_parity_extra_is_declared():
    import configparser
    parser = configparser.ConfigParser()
    parser.read(os.path.join(os.path.dirname(__file__), "..", "..", "setup.cfg"))
    extra = parser.get("options.extras_require", "parity")
    assert "torch==2.13.0" in extra and "transformers" in extra and "safetensors" in extra
