"""docs/ARCHITECTURE.md's module table is drawn from the package: one row per module, and no row
naming a module that is not there (so the document stays true as modules move)."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "carlos_audit"


def table_rows() -> list[str]:
    return re.findall(r"^\| `([^`]+\.py)` \|", (REPO / "docs" / "ARCHITECTURE.md").read_text("utf-8"), re.M)


def modules() -> list[str]:
    return sorted(p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py")
                  if p.name not in ("__init__.py", "__main__.py"))


def test_every_module_has_one_row_and_every_row_a_module():
    rows = table_rows()
    mods = modules()
    missing = [m for m in mods if m not in rows]
    stale = [r for r in rows if r != "__init__.py" and r not in mods]
    assert not missing, f"modules without a row in docs/ARCHITECTURE.md: {missing}"
    assert not stale, f"rows naming no module: {stale}"
    assert len(rows) == len(set(rows)), "a module with two rows"


def test_the_check_sees_a_missing_row():
    assert "check.py" in table_rows() and "pipeline.py" in modules()
    assert "no/such_module.py" not in modules()
