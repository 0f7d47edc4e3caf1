"""docs/design.md "How to add a kernel" stays true: every file it names exists, and the optional kernel parts it
lists are the ones the package's callers read."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HEADING = "### How to add a kernel"


def _section() -> str:
    text = (ROOT / "docs" / "design.md").read_text(encoding="utf-8")
    assert HEADING in text, f"docs/design.md has no {HEADING!r} subsection"
    return re.split(r"\n##+ ", text.split(HEADING, 1)[1], maxsplit=1)[0]


def test_every_file_named_exists():
    names = re.findall(r"`((?:mf_longseq|tests)/[\w/.]+\.py)`", _section())
    assert len(names) >= 8, names
    missing = [n for n in names if not (ROOT / n).is_file()]
    assert not missing, f"docs/design.md 'How to add a kernel' names files that do not exist: {missing}"


def test_the_optional_parts_named_are_read_by_their_callers():
    section = _section()
    for part, caller in (("block_size", "mf_longseq/attention/ring.py"),
                         ("block_size", "mf_longseq/attention/kvallgather.py"),
                         ("input_layouts", "mf_longseq/attention/api.py"),
                         ("with_input_layout", "mf_longseq/attention/api.py"),
                         ("forward_into", "mf_longseq/attention/ring.py"),
                         ("backward_into", "mf_longseq/attention/ring.py")):
        assert f"`{part}" in section, f"{part} is not described"
        assert part in (ROOT / caller).read_text(encoding="utf-8"), f"{caller} does not read {part}"
