"""The documents stay true to the code: every function and test docs/method.md cites exists, and
nothing in the repository points outside it."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
METHOD = (ROOT / "docs" / "method.md").read_text()


def test_cited_tests_exist():
    defined = {p.name: set(re.findall(r"^def (test_\w+)", p.read_text(), re.M))
               for p in (ROOT / "tests").glob("test_*.py")}  # fmt: skip
    current, missing = None, []
    # `tests/<file>::<name>`, and a bare `::<name>` in the file named just before.
    for match in re.finditer(r"(tests/(test_\w+\.py))?::(test_\w+)", METHOD):
        current = match.group(2) or current
        if match.group(3) not in defined.get(current, ()):
            missing.append(f"{current}::{match.group(3)}")
    assert not missing, missing


def test_cited_code_exists():
    missing = []
    for path, name in re.findall(r"`((?:clipsam_jax|conversion)/[\w/]+\.py): (\w+)", METHOD):
        source = (ROOT / path).read_text() if (ROOT / path).is_file() else ""
        if not re.search(rf"^\s*(def|class) {name}\b|^{name} = ", source, re.M):
            missing.append(f"{path}: {name}")
    assert not missing, missing


def test_every_equation_has_its_implementation_and_test():
    rows = re.findall(r"^\| (\d+) \|[^|]+\| `([^`]+)`[^|]*\| `tests/([^`]+)` \|", METHOD, re.M)
    assert sorted(int(eq) for eq, _, _ in rows) == list(range(1, 16))


def test_nothing_points_outside_the_repository():
    texts = [*ROOT.glob("*.md"), *ROOT.glob("docs/*.md"), *ROOT.glob("benchmarks/*.md"),
             *ROOT.glob("clipsam_jax/**/*.py"), *ROOT.glob("*/main.py"), *ROOT.glob("eval/*.py"),
             *ROOT.glob("conversion/*.py")]  # fmt: skip
    for path in texts:
        text = path.read_text()
        assert "../shared" not in text and "SPEC.md" not in text, path
        assert not re.search(r"\bSPEC §", text), path
