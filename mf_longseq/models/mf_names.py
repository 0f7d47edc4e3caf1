"""MindFormers' own checkpoint layout <-> ours, for LLaMA2, Qwen1.5 and Qwen v1 (no torch needed).

Ours: the weights of ``LongSeqForCausalLM`` under Hugging Face LLaMA / Qwen2 names (``parameter_shapes``).

MindFormers' layouts (the names its model zoo distributes and its trainer saves):

* LLaMA2 and Qwen1.5 (``mindformers.models.llama.LlamaForCausalLM``; research/qwen1_5 builds the same class and its
  converter writes the same names): ``mindformers.models.llama.convert_weight.name_replace`` maps our names to
  theirs and ``convert_reversed.name_replace`` back: ``model.tok_embeddings.embedding_weight``,
  ``model.layers.{i}.attention.{wq,wk,wv,wo}.{weight,bias}``, ``attention_norm``, ``ffn_norm``,
  ``feed_forward.w1`` (gate) / ``w2`` (down) / ``w3`` (up), ``model.norm_out.weight``, ``lm_head.weight``.
  With ``qkv_concat: True`` the model holds fused tensors instead (``convert_weight.convert_qkv_concat_weight``):
  ``attention.w_qkv.{weight,bias}``, rows per kv head group ``[n_rep q heads; 1 k head; 1 v head]``
  (``mindformers.utils.convert_utils.qkv_concat_hf2mg``; the attention splits its output that way, bias
  included), and ``feed_forward.w_gate_hidden.weight``, rows interleaved ``gate_0, up_0, gate_1, up_1, ...``
  (``ffn_concat_hf2mg``; the feed-forward reshapes its output to (..., ffn, 2)).
* Qwen v1 (research/qwen ``QwenForCausalLM``, research/qwen/convert_weight.py): ``transformer.wte.embedding_weight``,
  ``transformer.layers.{i}.attention.{wq,wk,wv,wo}.*`` (Hugging Face's fused ``c_attn`` split in three),
  ``attention_norm``, ``ffn_norm``, ``feed_forward.w1`` = Hugging Face ``mlp.w1`` (our up_proj),
  ``feed_forward.w3`` = ``mlp.w2`` (our gate_proj: ``QwenFeedForward`` applies SiLU to w3), ``feed_forward.w2``
  (down), ``transformer.ln_f.weight``, ``lm_head.weight``.  MindFormers 1.9.0 no longer ships research/qwen, so this
  table follows that converter's ``_name_replace``.

A MindFormers training checkpoint also holds optimizer state (``adam_m.*``, ``adam_v.*``, step counters):
``mf_to_ours`` skips it.
"""
from typing import Dict, Iterable

import numpy as np

from mf_longseq.models.model_config import LongSeqModelConfig, check_weights, parameter_shapes

# optimizer / runner state MindFormers' trainer writes beside the weights (not model weights)
_STATE_PREFIXES = ("adam_m.", "adam_v.", "moment1.", "moment2.", "accu_grads.", "accumulate_grads.")
_STATE_NAMES = {"global_step", "learning_rate", "scale_sense", "epoch_num", "step_num", "loss_scale",
                "current_iterator_step", "last_overflow_iterator_step", "beta1_power", "beta2_power"}
_QWEN_V1_LAYER = {"input_layernorm.weight": "attention_norm.weight",
                  "post_attention_layernorm.weight": "ffn_norm.weight",
                  "self_attn.q_proj.": "attention.wq.", "self_attn.k_proj.": "attention.wk.",
                  "self_attn.v_proj.": "attention.wv.", "self_attn.o_proj.": "attention.wo.",
                  "mlp.up_proj.": "feed_forward.w1.", "mlp.gate_proj.": "feed_forward.w3.",
                  "mlp.down_proj.": "feed_forward.w2."}
_QWEN_V1_TOP = {"model.embed_tokens.weight": "transformer.wte.embedding_weight",
                "model.norm.weight": "transformer.ln_f.weight", "lm_head.weight": "lm_head.weight"}


def _qwen_v1_name(ours: str) -> str:
    if ours in _QWEN_V1_TOP:
        return _QWEN_V1_TOP[ours]
    name = ours.replace("model.layers.", "transformer.layers.", 1)
    for theirs_part, mf_part in _QWEN_V1_LAYER.items():
        name = name.replace("." + theirs_part, "." + mf_part)
    return name


def mf_names(config: LongSeqModelConfig) -> Dict[str, str]:
    """Our weight name -> MindFormers' name (split layout), for every weight of the model ``config`` describes."""
    if config.family == "qwen":
        table = {ours: _qwen_v1_name(ours) for ours in parameter_shapes(config)}
    else:
        from mindformers.models.llama.convert_weight import name_replace       # Hugging Face -> MindFormers
        table = {ours: name_replace(ours) for ours in parameter_shapes(config)}
    if len(set(table.values())) != len(table):
        raise AssertionError(f"mf_names: two weights map to one MindFormers name ({config.family})")
    return table


def is_state(name: str) -> bool:
    """True for optimizer / runner state a MindFormers checkpoint holds beside the weights."""
    return name.startswith(_STATE_PREFIXES) or name in _STATE_NAMES


def looks_like_mindformers(names: Iterable[str]) -> bool:
    """True when a checkpoint uses MindFormers' names (LLaMA2 / Qwen1.5 / Qwen v1), not ours."""
    marks = ("tok_embeddings.embedding_weight", "wte.embedding_weight", ".attention.", ".feed_forward.",
             "norm_out.weight", "ln_f.weight")
    return any(mark in name for name in names if not is_state(name) for mark in marks)


# ------------------------------------------------------------------------------------------- fused tensors
def split_qkv(fused: np.ndarray, config: LongSeqModelConfig, name: str):
    """``attention.w_qkv`` (rows per kv group [n_rep q; k; v] heads, ``qkv_concat_hf2mg``) -> (q, k, v) rows."""
    d, kv, rep = config.head_dim, config.n_kv_heads, config.num_heads // config.n_kv_heads
    rows = (rep + 2) * d * kv
    if fused.shape[0] != rows:
        raise ValueError(f"{name} has {fused.shape[0]} rows; MindFormers fuses q, k, v of {kv} kv head groups x "
                         f"({rep} + 2) heads x {d} = {rows}. Fix: convert with the config the checkpoint was "
                         "trained with (num_heads, n_kv_heads, hidden_size).")
    grouped = fused.reshape((kv, (rep + 2) * d) + fused.shape[1:])
    q = grouped[:, :rep * d].reshape((kv * rep * d,) + fused.shape[1:])
    k = grouped[:, rep * d:(rep + 1) * d].reshape((kv * d,) + fused.shape[1:])
    v = grouped[:, (rep + 1) * d:].reshape((kv * d,) + fused.shape[1:])
    return q, k, v


def fuse_qkv(q: np.ndarray, k: np.ndarray, v: np.ndarray, config: LongSeqModelConfig) -> np.ndarray:
    """Inverse of ``split_qkv``."""
    d, kv, rep = config.head_dim, config.n_kv_heads, config.num_heads // config.n_kv_heads
    tail = q.shape[1:]
    grouped = np.concatenate([q.reshape((kv, rep * d) + tail), k.reshape((kv, d) + tail),
                              v.reshape((kv, d) + tail)], axis=1)
    return grouped.reshape((kv * (rep + 2) * d,) + tail)


def split_gate_hidden(fused: np.ndarray, name: str):
    """``feed_forward.w_gate_hidden`` (rows gate_0, up_0, gate_1, ...; ``ffn_concat_hf2mg``) -> (gate, up)."""
    if fused.shape[0] % 2:
        raise ValueError(f"{name} has {fused.shape[0]} rows: MindFormers interleaves gate and up rows (an even "
                         "count). Fix: check the checkpoint.")
    pairs = fused.reshape((fused.shape[0] // 2, 2) + fused.shape[1:])
    return pairs[:, 0], pairs[:, 1]


def fuse_gate_hidden(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    return np.stack([gate, up], axis=1).reshape((2 * gate.shape[0],) + gate.shape[1:])


def _unfuse(tensors: Dict[str, np.ndarray], config: LongSeqModelConfig) -> Dict[str, np.ndarray]:
    out = {}
    for name, value in tensors.items():
        if ".attention.w_qkv." in name:
            for part, piece in zip(("wq", "wk", "wv"), split_qkv(value, config, name)):
                out[name.replace(".w_qkv.", f".{part}.")] = piece
        elif ".feed_forward.w_gate_hidden." in name:
            gate, up = split_gate_hidden(value, name)
            out[name.replace(".w_gate_hidden.", ".w1.")] = gate
            out[name.replace(".w_gate_hidden.", ".w3.")] = up
        else:
            out[name] = value
    return out


# ------------------------------------------------------------------------------------------- conversion
def mf_to_ours(tensors: Dict[str, np.ndarray], config: LongSeqModelConfig, source: str = "checkpoint"):
    """MindFormers' tensors (split or fused layout; optimizer state skipped) -> our weights (float32), checked:
    every weight of the model present with its shape, and no other tensor (ValueError naming the first)."""
    weights = {k: v for k, v in tensors.items() if not is_state(k)}
    if config.family != "qwen":
        weights = _unfuse(weights, config)
    back = {mf: ours for ours, mf in mf_names(config).items()}
    if config.tie_word_embeddings:
        weights.pop("lm_head.weight", None)                   # tied: the embedding is the head
    out = {back.get(name, name): np.asarray(value, np.float32) for name, value in weights.items()}
    check_weights(out, config, source + " (MindFormers names)")
    return out


def ours_to_mf(weights: Dict[str, np.ndarray], config: LongSeqModelConfig, qkv_concat: bool = False):
    """Our weights -> MindFormers' names; ``qkv_concat``: the fused ``w_qkv`` / ``w_gate_hidden`` tensors of
    ``LlamaForCausalLM(qkv_concat=True)`` (LLaMA2 / Qwen1.5 only)."""
    check_weights(weights, config, "our weights")
    if qkv_concat and config.family == "qwen":
        raise ValueError("--qkv-concat: MindFormers' Qwen v1 (research/qwen) has no fused q/k/v. Fix: drop "
                         "--qkv-concat.")
    table = mf_names(config)
    out = {table[name]: value for name, value in weights.items()}
    if not qkv_concat:
        return out
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        for kind in ("weight", "bias"):
            parts = [out.pop(p + f"attention.{w}.{kind}", None) for w in ("wq", "wk", "wv")]
            if parts[0] is not None:
                out[p + f"attention.w_qkv.{kind}"] = fuse_qkv(*parts, config)
        gate, up = out.pop(p + "feed_forward.w1.weight"), out.pop(p + "feed_forward.w3.weight")
        out[p + "feed_forward.w_gate_hidden.weight"] = fuse_gate_hidden(gate, up)
    return out


__all__ = ["mf_names", "mf_to_ours", "ours_to_mf", "looks_like_mindformers", "is_state", "split_qkv", "fuse_qkv",
           "split_gate_hidden", "fuse_gate_hidden"]
