"""Checkpoint conversion between Hugging Face safetensors and mf_longseq (no torch needed).

    mf-longseq convert hf-to-ours --src HF_MODEL_DIR --dst model.ckpt [--yaml model_config.yaml]
    mf-longseq convert ours-to-hf --src model.ckpt|STEP_DIR --config run.yaml --dst HF_DIR [--dtype bfloat16]
    mf-longseq convert mf-to-ours --src mindformers.ckpt --config run.yaml --dst model.ckpt
    mf-longseq convert ours-to-mf --src model.ckpt|STEP_DIR --config run.yaml --dst mindformers.ckpt [--qkv-concat]

MindFormers' own LLaMA2 / Qwen1.5 / Qwen v1 names (split or fused): ``mf_names.py``.  Our models also load them
directly (``load_checkpoint:`` / ``mf-longseq train --load-checkpoint``, ``start_weights.py``).

Ours: the weights of ``LongSeqForCausalLM`` (Hugging Face LLaMA / Qwen2 names, see ``parameter_shapes``) in a
MindSpore ``.ckpt`` (what ``mindspore.load_checkpoint`` / the training runner read) or a ``.safetensors`` file.

Hugging Face layouts:

* LLaMA2 (``LlamaForCausalLM``) and Qwen1.5 (``Qwen2ForCausalLM``): the same names as ours, one to one.
* Qwen v1 (``QWenLMHeadModel``): ``transformer.wte`` (embedding), per layer ``ln_1`` / ``ln_2`` (norms),
  ``attn.c_attn`` = rows [q; k; v] of one fused (3H, H) weight and (3H,) bias, ``attn.c_proj`` (o),
  ``mlp.w2`` = gate (the SiLU input), ``mlp.w1`` = up, ``mlp.c_proj`` = down; ``transformer.ln_f``; ``lm_head``.
"""
import json
import os
from typing import Dict, Optional

import numpy as np

from mf_longseq.families import FAMILIES
from mf_longseq.models import safetensors_io as st
from mf_longseq.models.model_config import LongSeqModelConfig, check_weights, parameter_shapes

ARCHITECTURES = {f.hf_architecture: f.name for f in FAMILIES.values()}      # config.json architectures -> family
_MODEL_TYPES = {f.hf_model_type: f.name for f in FAMILIES.values()}         # config.json model_type -> family
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)             # buffers some old LLaMA checkpoints carry


# --------------------------------------------------------------------------------------------------- configs
def family_of(hf_config: dict) -> str:
    archs = hf_config.get("architectures") or []
    for arch in archs:
        if arch in ARCHITECTURES:
            return ARCHITECTURES[arch]
    model_type = _MODEL_TYPES.get(hf_config.get("model_type"))
    if model_type:
        return model_type
    raise ValueError(f"config.json architectures = {archs!r}: not a model mf_longseq converts. "
                     f"Fix: use one of {', '.join(ARCHITECTURES)}.")


def _require(hf_config: dict, key: str, ok, what: str) -> None:
    value = hf_config.get(key)
    if not ok(value):
        raise ValueError(f"config.json {key} = {value!r}: {what} is not supported by the mf_longseq decoder. "
                         f"Fix: convert a model without it.")


def config_from_hf(hf_config: dict, seq_length: Optional[int] = None) -> LongSeqModelConfig:
    """Our model config from a Hugging Face ``config.json`` dict (LLaMA, Qwen2, Qwen v1)."""
    from mf_longseq.models.build import CONFIG_CLASSES
    family = family_of(hf_config)
    _require(hf_config, "rope_scaling", lambda v: v in (None, {}), "RoPE scaling")
    _require(hf_config, "hidden_act", lambda v: v in (None, "silu"), "an activation other than silu")
    _require(hf_config, "use_sliding_window", lambda v: not v, "sliding-window attention")
    h, heads = hf_config["hidden_size"], hf_config["num_attention_heads"]
    _require(hf_config, "head_dim", lambda v: v in (None, h // heads), "head_dim != hidden_size / heads")
    if family == "qwen":
        _require(hf_config, "kv_channels", lambda v: v in (None, h // heads), "kv_channels != hidden_size / heads")
        values = dict(theta=hf_config.get("rotary_emb_base", 10000.0),
                      rms_norm_eps=hf_config.get("layer_norm_epsilon", 1e-6), n_kv_heads=heads,
                      seq_length=seq_length or hf_config.get("seq_length", 8192))
    else:
        values = dict(theta=hf_config.get("rope_theta", 10000.0), rms_norm_eps=hf_config.get("rms_norm_eps", 1e-6),
                      n_kv_heads=hf_config.get("num_key_value_heads") or heads,
                      seq_length=seq_length or hf_config.get("max_position_embeddings", 4096))
        if family == "llama2":
            values["qkv_has_bias"] = bool(hf_config.get("attention_bias", False))
    values.update(vocab_size=hf_config["vocab_size"], hidden_size=h, num_layers=hf_config["num_hidden_layers"],
                  num_heads=heads, intermediate_size=hf_config["intermediate_size"],
                  tie_word_embeddings=bool(hf_config.get("tie_word_embeddings", False)))
    return CONFIG_CLASSES[family](**values)


def config_to_hf(config: LongSeqModelConfig, dtype: str = "float32") -> dict:
    """A Hugging Face ``config.json`` dict for our model config."""
    common = dict(vocab_size=config.vocab_size, hidden_size=config.hidden_size,
                  num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
                  intermediate_size=config.intermediate_size if config.family == "qwen" else config.ffn_hidden_size,
                  tie_word_embeddings=config.tie_word_embeddings, torch_dtype=dtype, hidden_act="silu",
                  initializer_range=config.initializer_range)
    names = dict(architectures=[FAMILIES[config.family].hf_architecture],
                 model_type=FAMILIES[config.family].hf_model_type)
    if config.family == "qwen":
        return dict(common, **names, kv_channels=config.head_dim,
                    rotary_emb_base=config.theta, layer_norm_epsilon=config.rms_norm_eps, rotary_pct=1.0,
                    seq_length=config.seq_length, max_position_embeddings=config.seq_length, no_bias=True,
                    use_dynamic_ntk=False, use_logn_attn=False)
    out = dict(common, **names, num_key_value_heads=config.n_kv_heads,
               rms_norm_eps=config.rms_norm_eps, rope_theta=config.theta,
               max_position_embeddings=config.seq_length, rope_scaling=None)
    if config.family == "llama2":
        out.update(attention_bias=config.qkv_has_bias, mlp_bias=False)
    else:
        out.update(use_sliding_window=False)
    return out


# --------------------------------------------------------------------------------------------------- weights
_V1_LAYER = {"ln_1.weight": "input_layernorm.weight", "ln_2.weight": "post_attention_layernorm.weight",
             "attn.c_proj.weight": "self_attn.o_proj.weight", "mlp.w2.weight": "mlp.gate_proj.weight",
             "mlp.w1.weight": "mlp.up_proj.weight", "mlp.c_proj.weight": "mlp.down_proj.weight"}
_V1_TOP = {"transformer.wte.weight": "model.embed_tokens.weight", "transformer.ln_f.weight": "model.norm.weight",
           "lm_head.weight": "lm_head.weight"}


def _qwen_v1_to_ours(tensors: Dict[str, np.ndarray], config: LongSeqModelConfig) -> Dict[str, np.ndarray]:
    h = config.hidden_size
    out = {ours: tensors[theirs] for theirs, ours in _V1_TOP.items() if theirs in tensors}
    for i in range(config.num_layers):
        src, dst = f"transformer.h.{i}.", f"model.layers.{i}."
        for theirs, ours in _V1_LAYER.items():
            if src + theirs in tensors:
                out[dst + ours] = tensors[src + theirs]
        for kind in ("weight", "bias"):
            fused = tensors.get(src + f"attn.c_attn.{kind}")
            if fused is None:
                continue
            if fused.shape[0] != 3 * h:
                raise ValueError(f"{src}attn.c_attn.{kind} has {fused.shape[0]} rows; Qwen v1 fuses q, k, v of "
                                 f"{h} rows each (3 x hidden_size = {3 * h}). Fix: check the checkpoint's config.json.")
            for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
                out[dst + f"self_attn.{name}.{kind}"] = fused[j * h:(j + 1) * h]          # rows [q; k; v]
    return out


def _ours_to_qwen_v1(weights: Dict[str, np.ndarray], config: LongSeqModelConfig) -> Dict[str, np.ndarray]:
    out = {theirs: weights[ours] for theirs, ours in _V1_TOP.items() if ours in weights}
    for i in range(config.num_layers):
        src, dst = f"model.layers.{i}.", f"transformer.h.{i}."
        for theirs, ours in _V1_LAYER.items():
            out[dst + theirs] = weights[src + ours]
        for kind in ("weight", "bias"):
            parts = [weights.get(src + f"self_attn.{name}.{kind}") for name in ("q_proj", "k_proj", "v_proj")]
            if all(p is not None for p in parts):
                out[dst + f"attn.c_attn.{kind}"] = np.concatenate(parts, axis=0)          # (3H, ..)
    return out


def hf_to_ours(tensors: Dict[str, np.ndarray], config: LongSeqModelConfig, source: str = "checkpoint"):
    """Hugging Face tensors (name -> array) -> our weights (name -> float32 array), checked against the config."""
    tensors = {k: v for k, v in tensors.items() if not k.endswith(_IGNORED_SUFFIXES)}
    if config.family == "qwen":
        tensors = _qwen_v1_to_ours(tensors, config)
    if config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)                   # tied: the embedding is the head
    weights = {k: np.asarray(v, np.float32) for k, v in tensors.items()}
    check_weights(weights, config, source)
    return weights


def ours_to_hf(weights: Dict[str, np.ndarray], config: LongSeqModelConfig) -> Dict[str, np.ndarray]:
    """Our weights -> Hugging Face tensors of the family's layout."""
    check_weights(weights, config, "our weights")
    return _ours_to_qwen_v1(weights, config) if config.family == "qwen" else dict(weights)


# --------------------------------------------------------------------------------------------------- files
def read_ours(path: str, config: LongSeqModelConfig) -> Dict[str, np.ndarray]:
    """Our weights from a ``.ckpt`` (MindSpore; optimizer moments are skipped), a ``.safetensors`` file, or a
    training step folder (its ``rank_0.ckpt``; weights are replicated over dp x cp)."""
    if os.path.isdir(path):
        meta_path = os.path.join(path, "meta.json")
        if os.path.isfile(meta_path):
            with open(meta_path, encoding="utf-8") as handle:
                layout = json.load(handle).get("layout", {})
            if layout.get("mp", 1) != 1 or layout.get("pp", 1) != 1:
                raise ValueError(f"{path}: written with model_parallel = {layout.get('mp')}, pipeline_stage = "
                                 f"{layout.get('pp')}; conversion reads whole weights. Fix: reshard the checkpoint "
                                 "to model_parallel 1, pipeline_stage 1 first.")
        path = os.path.join(path, "rank_0.ckpt")
    if path.endswith(".safetensors"):
        stored = st.read_file(path)
    else:
        import mindspore as ms
        stored = {k: np.array(v.asnumpy(), np.float32) for k, v in ms.load_checkpoint(path).items()}
    shapes = parameter_shapes(config)
    weights = {k: v.astype(np.float32) for k, v in stored.items() if k in shapes}
    check_weights(weights, config, path)
    return weights


def to_numpy(value) -> np.ndarray:
    """A MindSpore Tensor / Parameter as float32 NumPy (bfloat16 has no NumPy type: cast first)."""
    import mindspore as ms
    if value.dtype == ms.bfloat16:
        value = value.astype(ms.float32)
    return np.asarray(value.asnumpy(), np.float32)


def read_tensors(path: str) -> Dict[str, np.ndarray]:
    """Every tensor of a ``.ckpt`` / ``.safetensors`` file (or a step folder's ``rank_0.ckpt``) as float32."""
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "meta.json")):
            raise ValueError(f"load_checkpoint {path}: a folder, but not a checkpoints/step_NNNNNN folder of "
                             "mf-longseq train. Fix: give one .ckpt / .safetensors file holding the whole model "
                             "(merge a distributed MindFormers checkpoint with MindFormers' transform_ckpt first).")
        path = os.path.join(path, "rank_0.ckpt")
    if not os.path.isfile(path):
        raise ValueError(f"load_checkpoint {path}: no such file. Fix: give the path of a .ckpt or .safetensors "
                         "file (absolute, or relative to the directory you start from).")
    if path.endswith(".safetensors"):
        return {k: np.asarray(v, np.float32) for k, v in st.read_file(path).items()}
    import mindspore as ms
    return {k: to_numpy(v) for k, v in ms.load_checkpoint(path).items()}


def write_ours(path: str, weights: Dict[str, np.ndarray], dtype: str = "float32") -> None:
    """Our weights to ``.ckpt`` (MindSpore) or ``.safetensors``."""
    if path.endswith(".safetensors"):
        st.write_file(path, weights, dtype=dtype, metadata={"format": "mf_longseq"})
        return
    import mindspore as ms
    from mindspore import Parameter, Tensor
    ms_dtype = {"float32": ms.float32, "bfloat16": ms.bfloat16, "float16": ms.float16}[dtype]
    ms.save_checkpoint([{"name": k, "data": Parameter(Tensor(v, ms_dtype), name=k)} for k, v in weights.items()], path)


def write_hf(directory: str, weights: Dict[str, np.ndarray], config: LongSeqModelConfig,
             dtype: str = "bfloat16") -> None:
    """A Hugging Face model folder: ``model.safetensors`` and ``config.json``."""
    os.makedirs(directory, exist_ok=True)
    st.write_file(os.path.join(directory, st.SINGLE), ours_to_hf(weights, config), dtype=dtype)
    with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as handle:
        json.dump(config_to_hf(config, dtype), handle, indent=2)


def read_hf_config(directory: str) -> dict:
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise ValueError(f"{directory}: no config.json. Fix: point --src at a Hugging Face model folder.")
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


# --------------------------------------------------------------------------------------------------- CLI
def _model_section(config: LongSeqModelConfig) -> dict:
    from mf_longseq.models.build import MODEL_CLASSES
    keys = ("seq_length", "vocab_size", "hidden_size", "num_layers", "num_heads", "n_kv_heads", "intermediate_size",
            "rms_norm_eps", "theta", "qkv_has_bias", "tie_word_embeddings")
    config_type, arch_type = type(config).__name__, MODEL_CLASSES[config.family].__name__
    model_config = {"type": config_type, "auto_register": f"registry.{config_type}",
                    **{k: getattr(config, k) for k in keys}}
    return {"model": {"model_config": model_config,
                      "arch": {"type": arch_type, "auto_register": f"registry.{arch_type}"}}}


def check_output_file(flag: str, path: str) -> None:
    """An output file's folder must exist (ValueError naming the flag, the folder and the fix)."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"{flag} {path}: the folder {folder} does not exist. Fix: create it first "
                         f"(mkdir -p {folder}) or write into an existing folder.")


def run_hf_to_ours(args) -> int:
    check_output_file("--dst", args.dst)
    if args.yaml:
        check_output_file("--yaml", args.yaml)
    config = config_from_hf(read_hf_config(args.src), seq_length=args.seq_length)
    weights = hf_to_ours(st.read_checkpoint(args.src), config, source=args.src)
    write_ours(args.dst, weights, dtype=args.dtype)
    if args.yaml:
        import yaml
        with open(args.yaml, "w", encoding="utf-8") as handle:
            yaml.safe_dump(_model_section(config), handle, sort_keys=False)
    total = sum(int(np.prod(v.shape)) for v in weights.values())
    print(f"mf-longseq convert: {args.src} ({config.family}) -> {args.dst}: {len(weights)} tensors, "
          f"{total:,} parameters" + (f"; model section in {args.yaml}" if args.yaml else ""))
    return 0


def _run_model_config(args) -> LongSeqModelConfig:
    from mf_longseq.models.build import model_config_from
    config_path = args.config or (os.path.join(args.src, "config.yaml") if os.path.isdir(args.src) else None)
    if not config_path or not os.path.isfile(config_path):
        raise ValueError(f"--config {config_path!r}: the model's YAML is needed to know its shape. Fix: pass "
                         "--config with the run's YAML (a step folder's config.yaml is used by default).")
    return model_config_from(config_path)


def run_ours_to_hf(args) -> int:
    config = _run_model_config(args)
    write_hf(args.dst, read_ours(args.src, config), config, dtype=args.dtype)
    print(f"mf-longseq convert: {args.src} -> {args.dst} ({config_to_hf(config)['architectures'][0]}, "
          f"{args.dtype})")
    return 0


def run_mf_to_ours(args) -> int:
    from mf_longseq.models.mf_names import mf_to_ours
    check_output_file("--dst", args.dst)
    config = _run_model_config(args)
    weights = mf_to_ours(read_tensors(args.src), config, source=args.src)
    write_ours(args.dst, weights, dtype=args.dtype)
    print(f"mf-longseq convert: {args.src} (MindFormers {config.family}) -> {args.dst}: {len(weights)} tensors")
    return 0


def run_ours_to_mf(args) -> int:
    from mf_longseq.models.mf_names import ours_to_mf
    check_output_file("--dst", args.dst)
    config = _run_model_config(args)
    theirs = ours_to_mf(read_ours(args.src, config), config, qkv_concat=args.qkv_concat)
    write_ours(args.dst, theirs, dtype=args.dtype)
    print(f"mf-longseq convert: {args.src} -> {args.dst} (MindFormers {config.family} names"
          f"{', fused w_qkv / w_gate_hidden' if args.qkv_concat else ''}, {len(theirs)} tensors)")
    return 0


DTYPES = ("float32", "bfloat16", "float16")


def _verb(sub, name: str, help_text: str, func, *, src: str, dst: str, config: str = None, dtype="float32"):
    """One ``convert`` direction: --src, --dst, --dtype and (when ``config`` is a help text) --config."""
    parser = sub.add_parser(name, help=help_text)
    parser.add_argument("--src", required=True, help=src)
    if config:
        parser.add_argument("--config", default=None, help=config)
    parser.add_argument("--dst", required=True, help=dst)
    parser.add_argument("--dtype", default=dtype, choices=DTYPES)
    parser.set_defaults(func=func)
    return parser


def register(subparsers) -> None:
    """``mf-longseq convert {hf-to-ours, ours-to-hf, mf-to-ours, ours-to-mf}``."""
    parser = subparsers.add_parser("convert", help="convert checkpoints between Hugging Face, MindFormers and "
                                   "mf_longseq", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="direction", required=True)
    ours, step = ".ckpt (MindSpore) or .safetensors", ".ckpt, .safetensors or checkpoints/step_NNNNNN folder"
    run_yaml = "the run's YAML (default: the step folder's config.yaml)"
    to_ours = _verb(sub, "hf-to-ours", "Hugging Face model folder -> .ckpt / .safetensors of ours", run_hf_to_ours,
                    src="Hugging Face model folder (config.json + safetensors)", dst="output " + ours)
    to_ours.add_argument("--seq-length", type=int, default=None, help="seq_length of the written model section")
    to_ours.add_argument("--yaml", default=None, help="also write the model: section (auto_register included) here")
    _verb(sub, "ours-to-hf", ".ckpt / .safetensors / training step folder -> Hugging Face", run_ours_to_hf,
          src=step, dst="output Hugging Face model folder", config=run_yaml, dtype="bfloat16")
    _verb(sub, "mf-to-ours", "MindFormers LLaMA2 / Qwen / Qwen1.5 checkpoint -> ours", run_mf_to_ours,
          src="MindFormers .ckpt or .safetensors (one file, whole model)", dst="output " + ours,
          config="a YAML whose model: section describes the model (required)")
    to_mf = _verb(sub, "ours-to-mf", ".ckpt / .safetensors / training step folder -> MindFormers names",
                  run_ours_to_mf, src=step, dst="output .ckpt (what MindFormers' load_checkpoint reads)",
                  config=run_yaml)
    to_mf.add_argument("--qkv-concat", action="store_true", help="fused w_qkv / w_gate_hidden, for MindFormers' "
                       "LlamaForCausalLM with model_config.qkv_concat: True (LLaMA2 / Qwen1.5)")


__all__ = ["config_from_hf", "config_to_hf", "family_of", "hf_to_ours", "ours_to_hf", "check_weights",
           "read_ours", "read_tensors", "write_ours", "write_hf", "read_hf_config", "register", "ARCHITECTURES"]
