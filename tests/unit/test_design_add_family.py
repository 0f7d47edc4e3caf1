"""docs/design.md "How to add a model family" stays true: every file it names exists (``<family>`` stands for each
family of ``mf_longseq/families.py``), and the files it says read the families table are exactly those that import
it.  Only that subsection is read (other "How to add ..." subsections have their own tests)."""
import ast
import re
from pathlib import Path

from mf_longseq.families import FAMILIES

ROOT = Path(__file__).resolve().parents[2]
HEADING = "### How to add a model family"


def subsection() -> str:
    """The text of the subsection, up to the next heading."""
    text = (ROOT / "docs" / "design.md").read_text(encoding="utf-8")
    assert text.count(HEADING) == 1, f"docs/design.md must have one '{HEADING}' subsection"
    body = text.split(HEADING, 1)[1]
    following = re.search(r"^#{1,3} ", body, flags=re.M)
    return body[:following.start()] if following else body


def named_files(text: str) -> set:
    """Every `path` in backquotes that names a file (a folder and an extension)."""
    return {p for p in re.findall(r"`([\w./<>-]+)`", text) if "/" in p and re.search(r"\.\w+$", p)}


def test_every_named_file_exists():
    files = named_files(subsection())
    assert len(files) >= 10, sorted(files)
    missing = [name for path in sorted(files)
               for name in ([path.replace("<family>", f) for f in FAMILIES] if "<family>" in path else [path])
               if not (ROOT / name).is_file()]
    assert not missing, f"docs/design.md '{HEADING}' names files that do not exist: {missing}"


def readers_of_the_table() -> set:
    """The files of the package (and the template generator) that import ``mf_longseq.families``."""
    paths = sorted((ROOT / "mf_longseq").rglob("*.py")) + [ROOT / "yaml_templates" / "generate.py"]
    found = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
                     if isinstance(node, ast.ImportFrom) else [])
            if "mf_longseq.families" in names:
                found.add(path.relative_to(ROOT).as_posix())
    return found


def test_the_listed_readers_are_the_files_that_import_the_table():
    text = subsection()
    assert "These read the table" in text
    listed = named_files(text.split("These read the table", 1)[1].split("checks that", 1)[0])
    listed.discard("tests/unit/test_design_add_family.py")
    assert listed == readers_of_the_table()
