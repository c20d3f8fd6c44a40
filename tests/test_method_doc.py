"""docs/method.md: the section numbers code cites exist, and every citation of it points at a real section."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
METHOD = ROOT / "docs" / "method.md"
SOURCES = [p for d in ("imta_fast", "kernels", "tests", "benchmarks", "docs") for p in sorted((ROOT / d).rglob("*"))
           if p.suffix in (".py", ".md", ".sh") and p not in (METHOD, Path(__file__).resolve())
           and ".venv" not in p.parts] + \
          [ROOT / f for f in ("train.py", "eval.py", "demo.py", "README.md") if (ROOT / f).is_file()]


def _sections():
    return {m.group(1) for m in re.finditer(r"^#{2,4}\s+(\d+(?:\.\d+)*)\.?\s", METHOD.read_text(encoding="utf-8"), re.M)}


def _items_9_1() -> int:
    text = METHOD.read_text(encoding="utf-8")
    body = text.split("### 9.1", 1)[1].split("\n### ", 1)[0]
    return len(re.findall(r"^\d+\. ", body, re.M))


def test_the_fixed_numbering_exists():
    secs = _sections()
    expected = {str(n) for n in range(16)} | {f"1.{i}" for i in range(1, 9)} | {f"10.{i}" for i in range(1, 8)} \
        | {f"11.{i}" for i in range(1, 11)} | {"9.1", "9.2", "9.3", "9.4"} | {f"7.{i}" for i in range(1, 6)}
    assert expected <= secs, sorted(expected - secs)
    assert _items_9_1() == 19  # code cites "§9.1 item N" with the numbering of the earlier notes


def _citations(text: str):
    """(section, item numbers or None) for every ``method.md §...`` citation list in ``text``."""
    for m in re.finditer(r"method\.md`{0,2}(?P<tail>[^()\n]{0,80})", text):
        tail = m.group("tail")
        if not tail.lstrip().startswith("§"):
            continue
        for ref in re.finditer(r"§(?P<num>\d+(?:\.\d+)*)(?:\s+items?\s+(?P<items>\d+(?:/\d+)*))?", tail):
            yield ref.group("num"), ref.group("items")


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_citation_points_at_an_existing_section(path):
    secs, n_items = _sections(), _items_9_1()
    bad = []
    for num, items in _citations(path.read_text(encoding="utf-8")):
        if num not in secs:
            bad.append(f"§{num}")
        if items and num == "9.1" and any(not 1 <= int(i) <= n_items for i in items.split("/")):
            bad.append(f"§9.1 items {items}")
    assert not bad, f"{path.relative_to(ROOT)} cites missing parts of docs/method.md: {bad}"


def test_citation_parser_catches_a_missing_section():
    cites = list(_citations("see docs/method.md §3–§5, §9.1 items 9/14, §42 (x); not §77"))
    assert cites == [("3", None), ("5", None), ("9.1", "9/14"), ("42", None)]
    assert "42" not in _sections()
