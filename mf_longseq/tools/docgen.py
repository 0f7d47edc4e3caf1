"""Generate ``docs/configuration.md`` from ``mf_longseq/config.py`` itself: every ``LongSeqConfig`` field (its
YAML key path, type, default and docstring) and every rule (each ``_fail(...)`` call: key, problem, fix).

    python -m mf_longseq.tools.docgen > docs/configuration.md     # tests/unit/test_docs.py checks it is current

The source is read with ``ast``, so the reference cannot drift from the code: a new field or a new rule shows up
here (and the docs test fails until the file is regenerated).
"""
import ast
import inspect
import re
import sys
from collections import defaultdict
from typing import Dict, List, Tuple

from mf_longseq import config as config_module

HEADER = """# Configuration reference

Generated from `mf_longseq/config.py` by `python -m mf_longseq.tools.docgen > docs/configuration.md`; do not
edit by hand.  Every setting of `LongSeqConfig` is read from the MindFormers YAML at the key path shown.  The
plugin's own keys live in a top-level `long_seq:` section, because MindFormers rejects unknown keys under
`parallel_config`.  Check a file without devices with `mf-longseq validate FILE.yaml`.

Every broken rule raises `ValueError` (`mf_longseq.config.ConfigError`) with the message
`<key> = <value>: <problem>. Fix: <fix>.`  In the tables, `{...}` stands for values filled in at run time.
See [troubleshooting](en/troubleshooting.md) for what to do about each message.
"""


def _src(node) -> str:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(v.value if isinstance(v, ast.Constant) else "{" + ast.unparse(v.value) + "}"
                       for v in node.values)
    return "{" + ast.unparse(node) + "}"


def fields_with_docs(module: ast.Module) -> List[Tuple[str, str, str, str]]:
    """(name, type, default, docstring) of every LongSeqConfig field, in order."""
    cls = next(n for n in module.body if isinstance(n, ast.ClassDef) and n.name == "LongSeqConfig")
    out, body = [], cls.body
    for i, node in enumerate(body):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            doc = body[i + 1].value.value if i + 1 < len(body) and isinstance(body[i + 1], ast.Expr) else ""
            default = ast.unparse(node.value) if node.value is not None else "(required)"
            out.append((node.target.id, ast.unparse(node.annotation), default, doc.strip()))
    return out


class _Rules(ast.NodeVisitor):
    """Collect ``_fail(key, value, problem, fix)`` calls, resolving ``_KEY_PATHS[name]`` in simple loops."""

    def __init__(self):
        self.by_field: Dict[str, List[Tuple[str, str]]] = defaultdict(list)
        self.other: List[Tuple[str, str, str]] = []
        self.names: Dict[str, List[str]] = {}
        self.tuples: Dict[str, List[str]] = {}

    def visit_Assign(self, node):
        if isinstance(node.value, ast.Tuple) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            self.tuples[node.targets[0].id] = [e.value for e in node.value.elts if isinstance(e, ast.Constant)]
        if isinstance(node.value, ast.IfExp) and isinstance(node.targets[0], ast.Name):
            self.names[node.targets[0].id] = [e.value for e in (node.value.body, node.value.orelse)
                                              if isinstance(e, ast.Constant)]
        self.generic_visit(node)

    def visit_For(self, node):
        if isinstance(node.target, ast.Name):
            if isinstance(node.iter, ast.Name) and node.iter.id in self.tuples:
                self.names[node.target.id] = self.tuples[node.iter.id]
            elif isinstance(node.iter, ast.Tuple):
                self.names[node.target.id] = [e.value for e in node.iter.elts if isinstance(e, ast.Constant)]
        self.generic_visit(node)

    def visit_Call(self, node):
        if isinstance(node.func, ast.Name) and node.func.id == "_fail" and len(node.args) == 4:
            key, _, problem, fix = node.args
            fields = self._fields(key)
            for name in fields:
                self.by_field[name].append((_src(problem), _src(fix)))
            if not fields:
                self.other.append((_src(key), _src(problem), _src(fix)))
        self.generic_visit(node)

    def _fields(self, key) -> List[str]:
        if isinstance(key, ast.Subscript) and isinstance(key.value, ast.Name) and key.value.id == "_KEY_PATHS":
            index = key.slice
            if isinstance(index, ast.Constant):
                return [index.value]
            if isinstance(index, ast.Subscript) and isinstance(index.value, ast.Name):   # _KEY_PATHS[missing[0]]
                return ["seq_length", "num_heads"]
            if isinstance(index, ast.Name):
                return self.names.get(index.id, [])
        return []


def _cell(text: str) -> str:
    return re.sub(r"\s*\n\s*", " ", text.replace("|", "\\|"))


# Type and default of each model fact as the parallel rules read it (``config.model_facts``).
MODEL_KINDS = {"seq_length": ("int", "(required)"), "num_heads": ("int", "(required)"),
               "n_kv_heads": ("int", "num_heads"), "num_layers": ("int", "DEFAULT_NUM_LAYERS = 32"),
               "use_flash_attention": ("bool", "True")}


def generate() -> str:
    """The whole ``docs/configuration.md``."""
    tree = ast.parse(inspect.getsource(config_module))
    rules = _Rules()
    rules.visit(tree)
    lines = [HEADER, "## Settings", "", "| key path | type | default | meaning |", "|---|---|---|---|"]
    fields = fields_with_docs(tree)
    for name, kind, default, doc in fields:
        path = config_module.key_path(name)
        meaning = doc[len(path):].lstrip(":. ") if doc.startswith(path) else doc
        lines.append(f"| `{config_module.key_path(name)}` | `{kind}` | `{default}` | {_cell(meaning)} |")
    lines += ["", "## Model keys the parallel rules read", "",
              "Their one home is `model.model_config` (`LongSeqModelConfig`, which documents them); "
              "`LongSeqConfig.check_model` checks them against the degrees above.", "",
              "| key path | type | default |", "|---|---|---|"]
    model_keys = [(name, MODEL_KINDS[name]) for name in config_module.MODEL_FACTS]
    for name, (kind, default) in model_keys:
        lines.append(f"| `{config_module.key_path(name)}` | `{kind}` | `{default}` |")
    lines += ["", "## Rules and the errors they raise", ""]
    for name in [f[0] for f in fields] + [n for n, _ in model_keys]:
        path = config_module.key_path(name)
        lines.append(f"### `{path}`")
        lines.append("")
        found = rules.by_field.get(name, [])
        if not found:
            lines.append("No rule of its own (it takes part in the rules of other keys).")
        for problem, fix in found:
            problem, fix = (re.sub(r"\{_KEY_PATHS\[.*?\]+\}", path, text) for text in (problem, fix))
            lines.append(f"- `{_cell(problem)}` -- fix: {_cell(fix)}")
        lines.append("")
    lines += ["## Errors about the file's structure", "", "| key | problem | fix |", "|---|---|---|"]
    for key, problem, fix in rules.other:
        lines.append(f"| `{_cell(key)}` | {_cell(problem)} | {_cell(fix)} |")
    lines += ["", "## Notes (advice, never an error)", "",
              "`mf-longseq validate` also prints the advice of `LongSeqConfig.notes()`: compression below 2048 "
              "tokens saves nothing; the dense mask size at long sequences without compression; CP off; the "
              "contiguous layout's causal imbalance; hybrid_cp degenerating to ring or Ulysses; the "
              "AllGather-based Ulysses exchange on Ascend/GPU; use_seq_parallel with model_parallel = 1 (no "
              "effect).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.stdout.write(generate())
