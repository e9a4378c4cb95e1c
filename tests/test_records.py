"""The typed records of the result files (records.py): documented fields, reading, refusal."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

import pytest

from carlos_audit.errors import AuditError
from carlos_audit.records import Comparison, Manifest, Metrics, RunRecord

DOCS = Path(__file__).resolve().parents[1] / "docs" / "SCHEMAS.md"


def _documented(file_name: str) -> list[str]:
    """The field names in the table of ``## <file_name>`` in docs/SCHEMAS.md."""
    text = DOCS.read_text("utf-8")
    section = text.split(f"\n## {file_name}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^\| `([a-z_]+)` \|", section, flags=re.M)


@pytest.mark.parametrize("record", [Manifest, Metrics, Comparison, RunRecord])
def test_the_docs_list_exactly_the_fields_of_each_record(record):
    assert sorted(_documented(record.FILE)) == sorted(f.name for f in fields(record))
    assert f"Schema `{record.SCHEMA}`" in DOCS.read_text("utf-8")


def test_optional_parts_are_left_out_and_read_back():
    c = Comparison(head_to_head=[{"arm": "cmp1"}])
    assert c.to_json() == {"head_to_head": [{"arm": "cmp1"}], "schema": "carlos-audit/comparison/1"}
    assert Comparison.from_json(c.to_json()) == c


def test_unknown_fields_and_other_schemas_are_refused(tmp_path):
    with pytest.raises(AuditError, match="unknown field.*surprise"):
        Comparison.from_json({"schema": "carlos-audit/comparison/1", "surprise": 1})
    with pytest.raises(AuditError, match="unsupported schema"):
        Comparison.from_json({"schema": "carlos-audit/comparison/9"})
    (tmp_path / "metrics.json").write_text("{not json")
    with pytest.raises(AuditError, match="not valid JSON"):
        Metrics.read(tmp_path)
    with pytest.raises(AuditError, match="has no manifest.json"):
        Manifest.read(tmp_path)
