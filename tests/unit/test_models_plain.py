"""Models take (config, mesh, settings) and read no global context (issue 21 item 4).

The model's constructor used to read MindFormers' parallel_config and MindSpore's context itself
(``builder_settings``) and ``MLP(mesh=None)`` fell back to ``Mesh(rank=0)``; both now belong to MindFormers'
builder route (``mf_route/models.py``, ``mf_route/adapter.py``).
"""
import ast
from pathlib import Path

import pytest

MODELS = Path(__file__).resolve().parents[2] / "mf_longseq" / "models"
GLOBAL_READS = {"get_context", "get_auto_parallel_context", "get_rank", "get_group_size", "GlobalComm",
                "builder_settings", "builder_parallel_config"}


def global_reads(path: Path) -> list:
    """Names of MindSpore's global context / communication state (and MindFormers' adapter) a file uses."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        name = node.attr if isinstance(node, ast.Attribute) else node.id if isinstance(node, ast.Name) else None
        if name in GLOBAL_READS:
            out.append(f"line {node.lineno}: {name}")
        if isinstance(node, ast.ImportFrom) and node.module:
            out += [f"line {node.lineno}: {node.module}.{a.name}" for a in node.names
                    if a.name in GLOBAL_READS or "mf_adapter" in node.module or "mf_route" in node.module]
    return out


@pytest.mark.parametrize("path", sorted(MODELS.glob("*.py")), ids=lambda p: p.name)
def test_models_read_no_global_context(path):
    assert not global_reads(path), f"mf_longseq/models/{path.name} reads global context: {global_reads(path)}"


def test_the_check_sees_a_context_read(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import mindspore as ms\nfrom mindspore.communication import get_rank\n"
                   "x = ms.get_context('device_target')\ny = ms.get_auto_parallel_context('enable_alltoall')\n")
    assert sorted(global_reads(bad)) == ["line 2: mindspore.communication.get_rank", "line 3: get_context",
                                         "line 4: get_auto_parallel_context"]


def test_the_model_without_a_mesh_or_settings_is_refused():
    from mf_longseq.config import LongSeqConfig
    from mf_longseq.models import LlamaLongSeqConfig, LlamaLongSeqForCausalLM
    from mf_longseq.models.decoder import MLP
    from mf_longseq.parallel import Mesh
    cfg = LlamaLongSeqConfig.from_preset("tiny", seq_length=16)
    with pytest.raises(ValueError, match=r"LlamaLongSeqForCausalLM needs this rank's Mesh .* Fix: build the model "
                                         r"with mf_longseq.models.build_model"):
        LlamaLongSeqForCausalLM(cfg, long_seq_config=LongSeqConfig())
    with pytest.raises(ValueError, match=r"needs its parallel settings \(long_seq_config, a LongSeqConfig\)"):
        LlamaLongSeqForCausalLM(cfg, mesh=Mesh(rank=0))
    with pytest.raises(ValueError, match=r"MLP needs this rank's Mesh"):
        MLP(cfg, None)
    model = LlamaLongSeqForCausalLM(cfg, mesh=Mesh(rank=0), long_seq_config=LongSeqConfig())
    assert model.plain_model is None and model.mesh.world_size == 1


def test_the_registered_name_is_the_builder_route_class_over_the_plain_model():
    """MindFormers' registry maps the YAML's model.arch.type to mf_route's class, which extends the plain one."""
    from mindformers.tools.register import MindFormerModuleType, MindFormerRegister
    from mf_longseq.families import FAMILIES
    from mf_longseq.models import MODEL_CLASSES
    from mf_longseq.mf_route.models import MindFormersColumns
    for name, family in FAMILIES.items():
        cls = MindFormerRegister.get_cls(MindFormerModuleType.MODELS, family.model_class)
        assert issubclass(cls, MindFormersColumns) and cls.plain_model is MODEL_CLASSES[name]
        assert issubclass(cls, MODEL_CLASSES[name]) and cls.__name__ == family.model_class
