"""Imports point down (read from the source with ``ast``; nothing is imported, no MindSpore needed).

Layers, top to bottom::

    cli.py, tools/           the command line, launchers
    mf_route/                MindFormers' Trainer route (registered classes; only registry.py imports it)
    train/                   the training runtime
    models/                  the decoder and its pipeline stage
    batch.py                 the step's ShardedBatch
    attention/               context-parallel attention, kernels
    parallel/, config, ...   exchanges, plan, sharding, RoPE tables

A module may import its own layer or any layer below it, never one above.  Checked here: ``parallel/``,
``attention/`` and ``models/`` import nothing from ``mf_route/``, ``train/``, ``tools/`` or ``cli``;
``batch.py`` nothing from ``models/``, ``mf_route/``, ``train/``, ``tools/`` or ``cli``; ``train/`` nothing from
``mf_route/``, ``tools/`` or ``cli``; ``mf_route/`` nothing from ``tools/`` or ``cli``; ``config.py``,
``documents.py``, ``rope.py`` and ``families.py`` (the bottom) nothing from ``attention/``, ``models/``,
``mf_route/``, ``train/``, ``tools/`` or ``cli``.  Imports inside functions count as much as those at the top of
a file.
"""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "mf_longseq"
ABOVE = {                                     # package folder -> the modules it must never import
    "parallel": ("mf_longseq.mf_route", "mf_longseq.train", "mf_longseq.tools", "mf_longseq.cli"),
    "attention": ("mf_longseq.mf_route", "mf_longseq.train", "mf_longseq.tools", "mf_longseq.cli"),
    "models": ("mf_longseq.mf_route", "mf_longseq.train", "mf_longseq.tools", "mf_longseq.cli"),
    "train": ("mf_longseq.mf_route", "mf_longseq.tools", "mf_longseq.cli"),
    "mf_route": ("mf_longseq.tools", "mf_longseq.cli"),
    "batch.py": ("mf_longseq.models", "mf_longseq.mf_route", "mf_longseq.train", "mf_longseq.tools",
                 "mf_longseq.cli"),
    "config.py": ("mf_longseq.attention", "mf_longseq.models", "mf_longseq.mf_route", "mf_longseq.train",
                  "mf_longseq.tools", "mf_longseq.cli"),
    "documents.py": ("mf_longseq.attention", "mf_longseq.models", "mf_longseq.mf_route", "mf_longseq.train",
                     "mf_longseq.tools", "mf_longseq.cli"),
    "rope.py": ("mf_longseq.attention", "mf_longseq.models", "mf_longseq.mf_route", "mf_longseq.train",
                "mf_longseq.tools", "mf_longseq.cli"),
    "families.py": ("mf_longseq.attention", "mf_longseq.models", "mf_longseq.mf_route", "mf_longseq.train",
                    "mf_longseq.tools", "mf_longseq.cli"),
}
# Known offenders, each a strict xfail until its import is removed (then an XPASS failure until the entry goes).
KNOWN_OFFENDERS: dict = {}                  # file -> reason; empty: every package file follows the rule


def imported_modules(path: Path, root: Path = PACKAGE):
    """(line, absolute module name) of every import in the file, relative imports resolved."""
    package = ["mf_longseq", *path.relative_to(root).parent.parts]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
            yield node.lineno, base
            yield from ((node.lineno, f"{base}.{alias.name}") for alias in node.names)


def upward_imports(path: Path, root: Path = PACKAGE):
    """The imports of ``path`` (a file under ``root``, the mf_longseq folder) that reach a layer above it."""
    banned = ABOVE[path.relative_to(root).parts[0]]
    return sorted({f"line {line}: {name}" for line, name in imported_modules(path, root)
                   if any(name == b or name.startswith(b + ".") for b in banned)})


def checked_files():
    files = sorted(p for folder in ABOVE
                   for p in ([PACKAGE / folder] if folder.endswith(".py") else (PACKAGE / folder).rglob("*.py")))
    cases = []
    for path in files:
        rel = path.relative_to(PACKAGE).as_posix()
        marks = [pytest.mark.xfail(strict=True, reason=KNOWN_OFFENDERS[rel])] if rel in KNOWN_OFFENDERS else []
        cases.append(pytest.param(path, id=rel, marks=marks))
    return cases


@pytest.mark.parametrize("path", checked_files())
def test_imports_point_down(path):
    found = upward_imports(path)
    assert not found, f"mf_longseq/{path.relative_to(PACKAGE).as_posix()} imports a layer above it: {found}"


def test_the_check_sees_an_upward_import(tmp_path):
    """The rule catches absolute, relative, dotted and in-function imports (so it can fail)."""
    fake = tmp_path / "mf_longseq"
    (fake / "parallel").mkdir(parents=True)
    src = ("import mf_longseq.cli\nfrom ..train import runner\ndef f():\n    from mf_longseq.tools.msrun import x\n"
           "from mf_longseq.parallel import comm\nfrom . import plan\n")
    (fake / "parallel" / "bad.py").write_text(src)
    assert upward_imports(fake / "parallel" / "bad.py", fake) == [
        "line 1: mf_longseq.cli", "line 2: mf_longseq.train", "line 2: mf_longseq.train.runner",
        "line 4: mf_longseq.tools.msrun", "line 4: mf_longseq.tools.msrun.x"]


def test_known_offenders_are_checked_files():
    assert set(KNOWN_OFFENDERS) <= {p.values[0].relative_to(PACKAGE).as_posix() for p in checked_files()}


def test_only_registry_and_the_layers_above_import_mf_route():
    """MindFormers' Trainer route is reached from below through registry.py alone (it registers the classes)."""
    above = {"mf_route", "tools", "cli.py", "registry.py"}
    found = {p.relative_to(PACKAGE).as_posix(): lines for p in sorted(PACKAGE.rglob("*.py"))
             if p.relative_to(PACKAGE).parts[0] not in above
             for lines in [[f"line {line}: {name}" for line, name in imported_modules(p)
                            if name == "mf_longseq.mf_route" or name.startswith("mf_longseq.mf_route.")]] if lines}
    assert not found, f"files below mf_route/ import it: {found}"
