"""The documentation cannot drift from the code: the configuration reference is what the generator writes from
``config.py``, every setting and every rule is in it, every key with a rule has a troubleshooting entry in both
languages, and every relative link points at a file that exists."""
import re
from dataclasses import fields
from pathlib import Path

import pytest

from mf_longseq.config import LongSeqConfig, key_path
from mf_longseq.tools import docgen

DOCS = Path(__file__).resolve().parents[2] / "docs"
GUIDES = [DOCS / "en" / "user_guide.md", DOCS / "zh" / "user_guide.md"]
TROUBLESHOOTING = [DOCS / "en" / "troubleshooting.md", DOCS / "zh" / "troubleshooting.md"]


def test_configuration_reference_is_generated_from_the_code():
    assert (DOCS / "configuration.md").read_text(encoding="utf-8") == docgen.generate(), \
        "docs/configuration.md is stale: run python -m mf_longseq.tools.docgen > docs/configuration.md"


def test_every_setting_is_documented_with_its_default_and_meaning():
    text = (DOCS / "configuration.md").read_text(encoding="utf-8")
    for f in fields(LongSeqConfig):
        row = next((ln for ln in text.splitlines() if ln.startswith(f"| `{key_path(f.name)}` |")), None)
        assert row is not None, f"{key_path(f.name)} missing from docs/configuration.md"
        meaning = row.rstrip("|").rsplit("|", 1)[1].strip()
        assert meaning, f"{key_path(f.name)} has no meaning (add a docstring under the field in config.py)"


def test_every_rule_of_the_config_is_in_the_reference():
    import ast
    import inspect
    from mf_longseq import config
    rules = docgen._Rules()
    rules.visit(ast.parse(inspect.getsource(config)))
    text = (DOCS / "configuration.md").read_text(encoding="utf-8")
    calls = inspect.getsource(config).count("_fail(") - 1                    # minus the definition
    assert sum(len(v) for v in rules.by_field.values()) + len(rules.other) >= calls
    for name, found in rules.by_field.items():
        section = text.split(f"### `{key_path(name)}`", 1)[1].split("###", 1)[0]
        assert section.count("-- fix:") == len(found), name


@pytest.mark.parametrize("path", TROUBLESHOOTING, ids=["en", "zh"])
def test_every_key_with_a_rule_has_a_troubleshooting_entry(path):
    import ast
    import inspect
    from mf_longseq import config
    rules = docgen._Rules()
    rules.visit(ast.parse(inspect.getsource(config)))
    text = path.read_text(encoding="utf-8")
    for name in rules.by_field:
        assert f"`{key_path(name)}`" in text, f"{key_path(name)} has no entry in {path}"
    for prefix in ("long_seq.<key>", "parallel_config.<key>", "<top level>"):
        assert prefix in text


@pytest.mark.parametrize("path", GUIDES, ids=["en", "zh"])
def test_user_guide_follows_the_seed_structure(path):
    text = path.read_text(encoding="utf-8")
    heads = [ln for ln in text.splitlines() if ln.startswith("## ")]
    assert len(heads) >= 7
    for needle in ("LLaMA2", "Qwen", "Qwen1", "context_parallel", "use_seq_parallel", "use_attn_mask_compression",
                   "ulysses_cp", "hybrid_cp", "ulysses_degree_in_cp", "actual_seq_len", "msrun_launcher.sh",
                   "mf-longseq validate", "mf-longseq plan"):
        assert needle in text, f"{needle} missing from {path}"


def test_relative_links_resolve():
    for path in DOCS.rglob("*.md"):
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", path.read_text(encoding="utf-8")):
            if "://" in target:
                continue
            assert (path.parent / target).resolve().exists(), f"{path.relative_to(DOCS)}: broken link {target}"


# ------------------------------------------------------------------ docs/design.md: every file's job, in one line
PACKAGE = DOCS.parent / "mf_longseq"
# Files listed before they land: a strict xfail each until the file exists, then an XPASS failure until the entry
# is deleted.
PENDING_FILES: set = set()                # files listed in design.md before they exist (none)


def design_file_rows():
    """file -> job of every row of the "Every file's job" table of docs/design.md."""
    section = (DOCS / "design.md").read_text(encoding="utf-8").split("## Every file's job", 1)[1].split("\n## ")[0]
    rows = re.findall(r"^\| `(mf_longseq/[\w/]+\.py)` \| (.*?) \|$", section, flags=re.M)
    names = [name for name, _ in rows]
    assert len(names) == len(set(names)), f"listed twice: {sorted({n for n in names if names.count(n) > 1})}"
    return dict(rows)


def package_files():
    return sorted(p.relative_to(DOCS.parent).as_posix() for p in PACKAGE.rglob("*.py"))


def test_every_package_file_has_its_line_in_design():
    rows = design_file_rows()
    missing = [name for name in package_files() if name not in rows]
    assert not missing, f"docs/design.md 'Every file's job' has no line for {missing}"
    assert all(job.strip() for job in rows.values())


@pytest.mark.parametrize("name", [pytest.param(n, marks=[pytest.mark.xfail(
    strict=True, reason=f"{n} comes with the ShardedBatch branch")] if n in PENDING_FILES else [])
    for n in sorted(design_file_rows())])
def test_every_file_listed_in_design_exists(name):
    assert (DOCS.parent / name).is_file(), f"docs/design.md lists {name}, which does not exist"
