"""`make test` needs only the repository (issue 33, item 9): no test, fixture or Makefile rule reads
the folder beside a CI checkout that holds reference copies. The public CARLoS corpus comes from
the pinned carlos wheel, fetched once per machine (conftest.carlos_wheel, carlos_reference)."""

from __future__ import annotations

import re
from pathlib import Path

from conftest import REPO

#: a path into a folder named "shared" beside or above the checkout: "../shared", "parent / 'shared'",
#: "shared/reference", or the constant tests once named it by
OUTSIDE = re.compile(r"\.\./shared\b|/\s*[\"']shared[\"']|[\"']shared/|\bshared/reference\b|\bSHARED\b")


def _offending(paths) -> list[str]:
    me = Path(__file__).resolve()
    found = []
    for path in paths:
        if path.resolve() == me:
            continue
        for n, line in enumerate(path.read_text("utf-8", errors="replace").splitlines(), 1):
            if OUTSIDE.search(line):
                found.append(f"{path.relative_to(REPO)}:{n}: {line.strip()}")
    return found


def test_the_pattern_finds_what_it_must():
    for line in ('SHARED = REPO.parent / "shared"', "data = Path('..') / 'shared'", "cp ../shared/reference/x .",
                 'open("shared/reference/carlos_prompts.json")'):
        assert OUTSIDE.search(line), line
    for line in ("the base arm is shared by every case", 'shared = {n: d for n, (d, _) in a.items()}',
                 '(cases / "_shared").iterdir()'):
        assert not OUTSIDE.search(line), line


def test_no_test_and_no_make_rule_reads_the_shared_folder():
    files = sorted(p for p in (REPO / "tests").rglob("*") if p.is_file() and p.suffix in (".py", ".toml", ".json", ".txt", ".cfg", ".ini"))
    assert len(files) > 50
    files += [REPO / "Makefile", REPO / "pyproject.toml"]
    assert _offending(files) == []
