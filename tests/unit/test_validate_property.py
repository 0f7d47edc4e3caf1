"""Property test of issue 11: mutate every template (delete keys, wrong types, constraint violations, huge / zero /
negative / nan values, aliases, sections that are not mappings) and check what ``check_run`` says:

- it raises nothing but the project's refusal (``ConfigError``), and every refusal names a key (one in the file,
  the parent of a missing key, or ``<top level>``) with a value and a fix;
- every configuration it accepts builds the model of the shapes the YAML names, read here independently of the
  package (aliases, family defaults): tiny templates are built for real on rank 0's mesh in this process, large
  ones are compared through the parameter shapes computed from the config;
- every configuration it accepts passes MindFormers' own ``build_parallel_config``.

Deterministic (derandomized, no example database) so CI sees the same examples each run; the profile
``mf_longseq_mutations`` sets the example count (MF_LONGSEQ_MUTATIONS overrides it, e.g. for a longer local run).
"""
import copy
import os
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from mf_longseq.config import ConfigError, ConfigErrors
from mf_longseq.models.model_config import llama_ffn_size, parameter_shapes
from mf_longseq.train.validation import check_run

ROOT = Path(__file__).resolve().parents[2]
TEMPLATES = {str(p.relative_to(ROOT)): yaml.safe_load(p.read_text())
             for p in sorted((ROOT / "yaml_templates").glob("*/*.yaml"))}

settings.register_profile("mf_longseq_mutations", max_examples=int(os.environ.get("MF_LONGSEQ_MUTATIONS", 3000)),
                          derandomize=True, database=None, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# The test's own reading of a YAML (the oracle): aliases and the family defaults, as the model documents them.
ALIASES = {"num_heads": "num_attention_heads", "n_kv_heads": "num_key_value_heads", "num_layers": "num_hidden_layers",
           "theta": "rope_theta"}
FAMILY_DEFAULTS = {
    "LlamaLongSeqConfig": dict(vocab_size=32000, qkv_has_bias=False, intermediate_size=None),
    "QwenLongSeqConfig": dict(vocab_size=151936, qkv_has_bias=True, intermediate_size=22016),
    "Qwen2LongSeqConfig": dict(vocab_size=151936, qkv_has_bias=True, intermediate_size=None),
}
# Keys a mutation may add although no template has them (aliases and run keys the run reads).
EXTRA_PATHS = [("model", "model_config", a) for a in ALIASES.values()] + [
    ("seed",), ("runner_config", "epochs"), ("recompute_config", "recompute"), ("parallel_config", "vocab_emb_dp"),
    ("long_seq", "device_num"), ("model", "model_config", "type"), ("model", "arch", "type"),
    ("model", "model_config", "n_kv_head"), ("optimizer", "betas"), ("swap_config",)]

ODD_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 70),
    st.sampled_from([0, -1, 1, 2, 3, 4, 8, 65, 10 ** 9 + 7, 2 ** 31, 10 ** 200, 10 ** 200 + 1]),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([float("nan"), float("inf"), -float("inf"), 2.5]),
    st.text(max_size=6), st.sampled_from(["abc", "hybird_cp", "ulysses_cp", "float64", "bf16", "other.yaml",
                                          "LlamaForCausalLM", "QwenLongSeqConfig", "1e-5", "zigzag", "Ascend"]),
    st.lists(st.integers(-2, 4), max_size=2), st.dictionaries(st.text(max_size=3), st.integers(), max_size=1))


def _leaves(node, prefix=()):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _leaves(value, prefix + (key,))
    if prefix:
        yield prefix


def _get(tree, path):
    node = tree
    for part in path:
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _set(tree, path, value):
    node = tree
    for part in path[:-1]:
        if not isinstance(node, dict):
            return
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    if isinstance(node, dict):
        node[path[-1]] = value


@st.composite
def mutated_templates(draw):
    """(template name, tree): a template with 1-3 mutations."""
    name = draw(st.sampled_from(sorted(TEMPLATES)))
    tree = copy.deepcopy(TEMPLATES[name])
    paths = sorted(set(_leaves(tree)), key=str) + EXTRA_PATHS
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(paths))
        found, old = _get(tree, path)
        kind = draw(st.sampled_from(["delete", "odd", "odd", "scale", "alias", "section", "top"]))
        if kind == "delete" and found:
            _get(tree, path[:-1])[1].pop(path[-1], None) if len(path) > 1 else tree.pop(path[0], None)
        elif kind == "scale" and isinstance(old, int) and not isinstance(old, bool):
            _set(tree, path, draw(st.sampled_from([old + 1, old - 1, old * 2, old // 2, old * 3, 0, -old])))
        elif kind == "alias" and len(path) == 3 and path[-1] in ALIASES:
            value = old if draw(st.booleans()) else draw(st.sampled_from([1, 2, 4, 8, 64]))
            if draw(st.booleans()):
                _get(tree, path[:-1])[1].pop(path[-1], None)
            _set(tree, path[:-1] + (ALIASES[path[-1]],), value)
        elif kind == "section" and len(path) >= 2:
            _set(tree, path[:-1], draw(ODD_VALUES))
        elif kind == "top" and draw(st.integers(0, 9)) == 0:
            tree = draw(ODD_VALUES)
        else:
            _set(tree, path, draw(ODD_VALUES))
    return name, tree


def _names_a_key(tree, key: str) -> bool:
    """The refusal's key is the top level, the command line, or a path whose parent is in the file."""
    if key in ("<top level>", "CONFIG", "--set", "--steps", "--data"):
        return True
    parts = tuple(key.split("."))
    if _get(tree, parts)[0]:
        return True
    parent_found, parent = _get(tree, parts[:-1])
    return (parent_found and (parent is None or isinstance(parent, dict))) or \
        key in ("model.model_config", "model.model_config.seq_length", "model.model_config.num_heads")


def expected_model(tree) -> dict:
    """What the YAML names, read without the package: canonical or alias spelling, else the family default."""
    section = tree["model"]["model_config"]

    def pick(key, default):
        for spelling in (key, ALIASES.get(key)):
            if spelling and section.get(spelling) is not None:
                return section[spelling]
        return default

    family = FAMILY_DEFAULTS[section.get("type", "LlamaLongSeqConfig")]
    heads = pick("num_heads", 32)
    hidden = section.get("hidden_size", 4096)
    inter = section.get("intermediate_size", family["intermediate_size"])
    if section.get("type") == "QwenLongSeqConfig":
        ffn = inter // 2
    else:
        ffn = inter if inter is not None else llama_ffn_size(hidden, section.get("multiple_of", 256),
                                                              section.get("ffn_dim_multiplier"))
    return dict(num_heads=heads, n_kv_heads=pick("n_kv_heads", heads), num_layers=pick("num_layers", 32),
                hidden_size=hidden, head_dim=hidden // heads, ffn=ffn, seq_length=section["seq_length"],
                vocab_size=section.get("vocab_size", family["vocab_size"]),
                bias=section.get("qkv_has_bias", family["qkv_has_bias"]),
                tied=section.get("tie_word_embeddings", False))


def expected_shapes(e: dict, layers: int) -> dict:
    """Hugging Face names and (out, in) shapes of the first ``layers`` layers, from the expected values."""
    h, d = e["hidden_size"], e["head_dim"]
    shapes = {"model.embed_tokens.weight": (e["vocab_size"], h), "model.norm.weight": (h,)}
    for i in range(layers):
        p = f"model.layers.{i}."
        out = {"q_proj": e["num_heads"] * d, "k_proj": e["n_kv_heads"] * d, "v_proj": e["n_kv_heads"] * d}
        for proj, rows in out.items():
            shapes[p + f"self_attn.{proj}.weight"] = (rows, h)
            if e["bias"]:
                shapes[p + f"self_attn.{proj}.bias"] = (rows,)
        shapes.update({p + "self_attn.o_proj.weight": (h, e["num_heads"] * d), p + "input_layernorm.weight": (h,),
                       p + "post_attention_layernorm.weight": (h,), p + "mlp.gate_proj.weight": (e["ffn"], h),
                       p + "mlp.up_proj.weight": (e["ffn"], h), p + "mlp.down_proj.weight": (h, e["ffn"])})
    if not e["tied"]:
        shapes["lm_head.weight"] = (e["vocab_size"], h)
    return shapes


_BUILT = {}            # shape key -> parameter shapes of the model built for real (tiny templates)


def _built_shapes(tree, check) -> dict:
    from mf_longseq.models import build_model
    from mf_longseq.parallel import Mesh
    m = check.model
    key = (type(m).__name__, m.vocab_size, m.hidden_size, m.num_layers, m.num_heads, m.n_kv_heads,
           m.ffn_hidden_size, m.qkv_has_bias, m.tie_word_embeddings, check.long_seq.context_parallel,
           check.long_seq.ulysses_degree)
    if key not in _BUILT:
        model = build_model(tree, mesh=Mesh.from_config(check.long_seq, rank=0))
        _BUILT[key] = {name: tuple(p.shape) for name, p in model.parameters_and_names()}
    return _BUILT[key]


def _check_accepted(name, tree, check, note=lambda text: None) -> None:
    e = expected_model(tree)
    m, ls = check.model, check.long_seq
    assert (m.num_heads, m.n_kv_heads, m.num_layers, m.hidden_size, m.ffn_hidden_size, m.vocab_size) == \
        (e["num_heads"], e["n_kv_heads"], e["num_layers"], e["hidden_size"], e["ffn"], e["vocab_size"])
    assert m.seq_length == e["seq_length"]          # the model's facts have one home (the parallel config has none)
    real = name.startswith("yaml_templates/tiny/") and ls.model_parallel == 1 and ls.pipeline_stage == 1 and \
        e["num_layers"] <= 8 and e["vocab_size"] * e["hidden_size"] + e["num_layers"] * 4 * e["hidden_size"] * \
        (e["hidden_size"] + e["ffn"]) < 4_000_000
    if real:
        note("accepted: built for real")
        assert _built_shapes(tree, check) == expected_shapes(e, e["num_layers"])
    else:
        note("accepted: shapes from the config")
        first = copy.copy(m)
        first.num_layers = min(m.num_layers, 2)               # the layers repeat; two are enough to compare
        assert dict(parameter_shapes(first)) == expected_shapes(e, first.num_layers)
    from mindformers import MindFormerConfig
    from mindformers.core.parallel_config import build_parallel_config
    build_parallel_config(MindFormerConfig(**copy.deepcopy(tree)))


@settings(settings.get_profile("mf_longseq_mutations"))
@given(mutated_templates())
def test_mutated_templates_are_refused_by_name_or_build_what_they_name(case):
    name, tree = case
    original = copy.deepcopy(tree)
    try:
        check = check_run(tree)
    except ConfigError as raised:
        event("refused")
        # several broken rules come together (ConfigErrors, issue 22): each one names its key, value and fix
        errors = raised.errors if isinstance(raised, ConfigErrors) else [raised]
        if isinstance(raised, ConfigErrors):
            assert len(errors) > 1 and str(raised) == (f"{len(errors)} settings must change:\n"
                                                       + "\n".join(f"  - {e}" for e in errors))
        for err in errors:
            assert isinstance(err.key, str) and err.key and err.problem and err.fix
            assert str(err) == f"{err.key} = {err.value!r}: {err.problem}. Fix: {err.fix}."
            assert _names_a_key(tree, err.key), (err.key, str(err))
        return
    assert tree == original                                   # checking never edits the file's tree
    _check_accepted(name, tree, check, note=event)


def test_every_template_is_accepted_and_built_as_named():
    """The unmutated templates: all valid; the tiny ones built for real."""
    for name, tree in TEMPLATES.items():
        _check_accepted(name, tree, check_run(tree))
    assert len(_BUILT) >= 3


@pytest.mark.parametrize("name", ["yaml_templates/tiny/qwen_tiny_s256_cp2_colossalai_cp.yaml"])
def test_oracle_notices_a_model_built_with_other_shapes(name):
    """The oracle is not vacuous: a model config that differs from the YAML fails the comparison."""
    tree = copy.deepcopy(TEMPLATES[name])
    check = check_run(tree)
    tree["model"]["model_config"]["hidden_size"] = 128
    with pytest.raises(AssertionError):
        _check_accepted(name, tree, check)
