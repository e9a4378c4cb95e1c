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


def _sections() -> list[type]:
    """Every section dataclass of record_sections.py and result_sections.py."""
    import inspect

    from carlos_audit import record_sections, result_sections
    from carlos_audit.record_sections import Section

    return [c for m in (record_sections, result_sections) for _, c in inspect.getmembers(m, inspect.isclass)
            if issubclass(c, Section) and c is not Section and c.__module__ == m.__name__]


def _documented_section(name: str) -> list[str] | None:
    """The field names in the table under ``### `name``` of docs/SCHEMAS.md (None: no such heading)."""
    text = DOCS.read_text("utf-8")
    if f"\n### `{name}`\n" not in text:
        return None
    section = text.split(f"\n### `{name}`\n", 1)[1].split("\n#", 1)[0]
    return re.findall(r"^\| `([a-z_0-9]+)` \|", section, flags=re.M)


def test_the_docs_list_exactly_the_fields_of_each_section():
    sections = _sections()
    assert len(sections) > 40
    for cls in sections:
        assert _documented_section(cls.__name__) == [f.name for f in cls.key_fields()], cls.__name__
    documented = set(re.findall(r"^### `(\w+)`$", DOCS.read_text("utf-8"), flags=re.M))
    assert documented == {c.__name__ for c in sections}


def test_records_built_from_dicts_hold_typed_sections_and_write_the_same_json():
    from carlos_audit.record_sections import Input, LoraLoad, Pair, PairArm
    from carlos_audit.result_sections import CI, Indicators

    pair = {"pair_id": "p1", "prompt_id": "a", "seed": 0, "arms": {"base": {"image": "i.png", "image_sha256": "ab"}}}
    record = RunRecord(inputs=[{"role": "lora", "path": "x.safetensors", "sha256": "cd"}], inspection={"metadata": {"k": "v"}},
                       lora_path="x.safetensors", lora_load={"partial": True, "skipped": [{"module": "m", "reason": "r"}]},
                       prompt_source={}, generation={}, stats={}, comparison_loras=[], base_model={"sha256": "ef"},
                       embedder={"sha256": "01"}, environment={}, signature={}, text_features=None, label_signatures=None)
    assert isinstance(record.inputs[0], Input) and record.inputs[0].role == "lora"
    assert isinstance(record.lora_load, LoraLoad) and record.lora_load.skipped[0].reason == "r"
    assert record.inspection.metadata == {"k": "v"} and type(record.inspection.metadata) is dict  # untrusted: stays a dict
    out = record.to_json()
    assert out["inputs"] == [{"role": "lora", "path": "x.safetensors", "sha256": "cd"}]  # absent keys stay absent
    assert out["lora_load"] == {"partial": True, "skipped": [{"module": "m", "reason": "r"}]}
    assert RunRecord.from_json(out).to_json() == out

    m = Metrics(n_pairs=1, n_prompts=1, n_seeds=1, feature_dim=2, direction=[1.0, 0.0], strength=1.0, consistency=None,
                consistency_note="one pair", ci={"level": 0.95, "strength": [0.5, 1.5], "consistency": None},
                per_category={}, per_prompt={}, per_pair=[])
    assert isinstance(m.ci, CI) and m.ci.strength.low == 0.5 and m.ci.strength.high == 1.5 and m.ci.consistency is None
    assert m.ci.strength == [0.5, 1.5] and m.ci == {"level": 0.95, "strength": [0.5, 1.5], "consistency": None}
    assert isinstance(m.indicators, Indicators) and m.to_json()["indicators"] == {}
    arm = Pair.from_json(pair).arms["base"]
    assert isinstance(arm, PairArm) and arm.image == "i.png" and arm == {"image": "i.png", "image_sha256": "ab"}


def test_a_section_keeps_unknown_keys_and_reads_like_its_dict():
    from carlos_audit.record_sections import Protocol

    data = {"steps": 4, "max_sequence_length": 256, "guidance": "embedded", "arms": {"base": {"adapter": None}}}
    p = Protocol.from_json(data)
    assert p.steps == 4 and p.arms["base"].adapter is None and p.scales is None
    assert p["guidance"] == "embedded" and p.get("scales") is None and "scales" not in p and set(p) == set(data)
    assert {**p} == {**data, "arms": p.arms} and p.to_json() == data and p == data
    with pytest.raises(KeyError):
        p["scales"]
    with pytest.raises(AuditError, match="arms.base: not a JSON object"):
        Protocol.from_json({"arms": {"base": 3}})


def test_the_demo_case_files_round_trip_byte_for_byte(demo_case_dir):
    from carlos_audit.fileio import json_dumps
    from carlos_audit.record_sections import Input, Pair
    from carlos_audit.result_sections import CorpusRef, HeadToHead

    for record in (Manifest, Metrics, Comparison, RunRecord):
        path = demo_case_dir / record.FILE
        r = record.read(demo_case_dir)
        assert json_dumps(r.to_json()).encode("utf-8") == path.read_bytes(), record.FILE
    manifest, comparison = Manifest.read(demo_case_dir), Comparison.read(demo_case_dir)
    assert all(isinstance(i, Input) for i in manifest.inputs) and all(isinstance(p, Pair) for p in manifest.pairs)
    assert manifest.pairs[0].arms["lora"].image_sha256
    assert isinstance(comparison.corpus, CorpusRef) and all(isinstance(h, HeadToHead) for h in comparison.head_to_head)
