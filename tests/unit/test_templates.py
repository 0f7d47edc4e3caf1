"""YAML templates: each loads with MindFormerConfig, passes LongSeqConfig, matches its file name and the published
shape; the tiny ones build through MindFormers' own builder (and the auto_register route) and train a step."""
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor

from mf_longseq.config import LongSeqConfig
from mf_longseq.models import CONFIG_CLASSES, build_model, model_config_from

ROOT = Path(__file__).resolve().parents[2]
TEMPLATES = ROOT / "yaml_templates"
ALL = sorted(TEMPLATES.glob("*/*.yaml"))
NAME = re.compile(r"(?P<size>\w+?)_(?P<seq>\d+k?)_cp(?P<cp>\d+)_(?P<algo>\w+_cp)\.yaml")
TINY_NAME = re.compile(r"(?P<family>\w+?)_tiny_s(?P<seq>\d+)_cp(?P<cp>\d+)_(?P<algo>\w+_cp)\.yaml")


def load(path):
    from mindformers import MindFormerConfig
    return MindFormerConfig(str(path))


def test_templates_exist_for_every_family_and_size():
    names = {f"{p.parent.name}/{p.name.split('_')[0]}" for p in ALL}
    for family, sizes in (("llama2", ("7b", "13b", "70b")), ("qwen", ("7b", "14b", "72b")),
                          ("qwen1_5", ("7b", "14b", "72b"))):
        assert {f"{family}/{s}" for s in sizes} <= names
    llama7 = {p.name for p in (TEMPLATES / "llama2").glob("7b_*.yaml")}
    for seq, cp in (("32k", 2), ("64k", 4), ("128k", 8)):
        assert any(n.startswith(f"7b_{seq}_cp{cp}_") for n in llama7)
    assert {n.rsplit("_", 2)[-2] + "_cp" for n in llama7} >= {"colossalai_cp", "ulysses_cp", "hybrid_cp"}


def test_generator_and_files_agree():
    spec = importlib.util.spec_from_file_location("generate_templates", TEMPLATES / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--check"]) == 0, "run: python yaml_templates/generate.py"
    assert sorted(module.all_templates()) == sorted(str(p.relative_to(TEMPLATES)) for p in ALL)


@pytest.mark.parametrize("path", ALL, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_template_loads_validates_and_matches_its_name(path):
    cfg = load(path)
    ls = LongSeqConfig.from_mindformers(cfg)                 # every rule of the plugin
    assert ls.device_num == ls.world_size
    tiny = path.parent.name == "tiny"
    match = (TINY_NAME if tiny else NAME).fullmatch(path.name)
    assert match, path.name
    seq = match["seq"]
    model_config = model_config_from(cfg)
    assert model_config.seq_length == (int(seq[:-1]) * 1024 if seq.endswith("k") else int(seq))
    assert (ls.context_parallel, ls.context_parallel_algo) == (int(match["cp"]), match["algo"])
    family = match["family"] if tiny else path.parent.name
    assert type(model_config) is CONFIG_CLASSES[family]
    preset = CONFIG_CLASSES[family].from_preset("tiny" if tiny else match["size"], seq_length=model_config.seq_length)
    for key in ("vocab_size", "hidden_size", "num_layers", "num_heads", "n_kv_heads", "ffn_hidden_size",
                "rms_norm_eps", "theta", "qkv_has_bias", "tie_word_embeddings"):
        assert getattr(model_config, key) == getattr(preset, key), key
    assert cfg.model.arch.type == CONFIG_CLASSES[family].__name__.replace("Config", "ForCausalLM")
    assert cfg.context.mode == 1                              # PyNative
    assert cfg.context.device_target == ("CPU" if tiny else "Ascend")
    if not tiny:
        assert model_config.use_flash_attention and model_config.use_attn_mask_compression
        assert model_config.compute_dtype == "bfloat16"


def one_step(net, seq_len, seed=0):
    """Loss and gradient norm of one forward/backward on a random batch (CP = 1), through the plain model's form
    (``forward_batch``: the registered class's ``construct`` takes MindFormers' columns)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 256, (1, seq_len + 1))
    ids, labels = Tensor(tokens[:, :-1].astype(np.int32)), Tensor(tokens[:, 1:].astype(np.int32))
    mask = Tensor(np.ones((1, seq_len), np.float32))
    params = net.trainable_params()
    loss, count = net.forward_batch(net.make_batch(ids, labels, mask))
    grads = ms.grad(lambda a, b, c: net.forward_batch(net.make_batch(a, b, c))[0], None, params)(ids, labels, mask)
    return float(loss.asnumpy()) / float(count.asnumpy()), [np.array(g.asnumpy()) for g in grads]   # copies


@pytest.mark.parametrize("name", ["llama2_tiny_s256_cp1_colossalai_cp.yaml",
                                  "qwen1_5_tiny_s256_cp1_colossalai_cp.yaml"])
def test_tiny_template_builds_through_mindformers_builder_and_steps(name):
    from mindformers.models.build_model import build_network
    cfg = load(TEMPLATES / "tiny" / name)
    net = build_network(cfg.model, default_args={"parallel_config": cfg.parallel_config})    # as MF's trainer
    assert type(net).__name__ == cfg.model.arch.type
    ours = build_model(str(TEMPLATES / "tiny" / name))
    loss, grads = one_step(net, 256)
    want_loss, want_grads = one_step(ours, 256)
    assert np.isfinite(loss) and abs(loss - np.log(256)) < 0.1            # freshly initialised: near uniform
    # same seed, same weights; only the kernel tiling differs (the builder does not see the top-level long_seq:)
    assert abs(loss - want_loss) < 1e-6
    assert all(np.abs(a - b).max() <= 1e-5 * np.abs(b).max() for a, b in zip(grads, want_grads))
    assert any(np.abs(g).max() > 0 for g in grads)


def test_recompute_config_is_applied_and_keeps_gradients():
    path = str(TEMPLATES / "tiny" / "llama2_tiny_s256_cp1_colossalai_cp.yaml")
    tree = {**load(path).to_dict()}
    plain = build_model(tree)
    tree["recompute_config"] = {**tree["recompute_config"], "recompute": True}
    recomputed = build_model(tree)
    loss, grads = one_step(plain, 256)
    loss_rc, grads_rc = one_step(recomputed, 256)
    assert loss == loss_rc
    assert all(np.abs(a - b).max() <= 1e-6 * np.abs(b).max() for a, b in zip(grads, grads_rc))
    tree["recompute_config"]["recompute"] = [1, 1]
    with pytest.raises(ValueError, match=r"recompute_config.recompute = \[1, 1\]: mf_longseq takes True or False"):
        build_model(tree)


def test_unknown_or_foreign_class_names_are_refused():
    tree = load(TEMPLATES / "tiny" / "llama2_tiny_s256_cp1_colossalai_cp.yaml").to_dict()
    tree["model"]["model_config"]["type"] = "LlamaLongSeqConfg"
    with pytest.raises(ValueError, match=r"model.model_config.type = 'LlamaLongSeqConfg': not registered"):
        build_model(tree)
    tree["model"]["model_config"]["type"] = "LlamaLongSeqConfig"
    tree["model"]["arch"]["type"] = "LlamaForCausalLM"                    # MindFormers' own LLaMA
    with pytest.raises(ValueError, match=r"model.arch.type = 'LlamaForCausalLM': a MindFormers class, not one"):
        build_model(tree)


AUTO_REGISTER = """
import sys
import mindspore as ms
ms.set_device("CPU")
from mindformers import MindFormerConfig
from mindformers.models.build_model import build_network
cfg = MindFormerConfig(sys.argv[1])
cfg.model.model_config.auto_register = "registry.Qwen2LongSeqConfig"
cfg.model.arch.auto_register = "registry.Qwen2LongSeqForCausalLM"
before = "mf_longseq" in sys.modules
net = build_network(cfg.model)
print("RESULT", before, type(net).__name__, sum(p.size for p in net.trainable_params()))
"""


def test_auto_register_route_needs_no_import_of_mf_longseq(tmp_path):
    """run_mindformer.py --register_path <mf_longseq package dir> sets REGISTER_PATH; the YAML's auto_register
    entries then load ``registry.py`` from there (MindFormers copies it into its modules cache)."""
    script = tmp_path / "auto_register.py"
    script.write_text(AUTO_REGISTER)
    env = dict(os.environ, REGISTER_PATH=str(ROOT / "mf_longseq"), OM_MODULES_CACHE=str(tmp_path / "om"),
               PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    path = TEMPLATES / "tiny" / "qwen1_5_tiny_s256_cp1_colossalai_cp.yaml"
    proc = subprocess.run([sys.executable, str(script), str(path)], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    from mf_longseq.models import Qwen2LongSeqConfig, count_parameters
    expected = count_parameters(Qwen2LongSeqConfig.from_preset("tiny", seq_length=256))
    assert lines[0].split()[1:] == ["False", "Qwen2LongSeqForCausalLM", str(expected)]


def test_builder_route_reads_alltoall_from_mindspore_and_long_seq_from_model_config():
    """MindFormers applies ``parallel:`` to MindSpore before building; ``long_seq`` may sit in model_config."""
    from mindformers.models.build_model import build_network
    cfg = load(TEMPLATES / "tiny" / "llama2_tiny_s256_cp1_colossalai_cp.yaml")
    cfg.model.model_config.long_seq = {"layout": "contiguous", "block_size": 32}
    ms.set_auto_parallel_context(enable_alltoall=True)
    try:
        net = build_network(cfg.model, default_args={"parallel_config": cfg.parallel_config})
    finally:
        ms.set_auto_parallel_context(enable_alltoall=False)
    assert (net.long_seq.enable_alltoall, net.long_seq.layout, net.long_seq.block_size) == (True, "contiguous", 32)
