"""The door to a case folder (carlos_audit/casefolder/): the one answer to "is this a finished
case folder?", each record and unit read once, each file hashed once while unchanged, and no
other module reading the result files by hand."""

from __future__ import annotations

import ast
import os
import re
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from carlos_audit.casefolder import CaseFolder
from carlos_audit.casefolder.unit_store import CaseStore, UnitOutput
from carlos_audit.errors import AuditError
from carlos_audit.hashing import sha256_bytes
from carlos_audit.records import Comparison, Manifest, Metrics

PACKAGE = Path(__file__).resolve().parents[1] / "carlos_audit"
#: where the result files may be parsed: the door itself and the record classes
DOOR = ("casefolder/", "records.py")
#: none: every reader goes through the door
ALLOWED: set[str] = set()
RESULT_NAME = re.compile(r"(?i:manifest|metrics|comparison|units?\b|unit_path|generation)|\.FILE\b")
RECORD_CLASSES = {"Manifest", "Metrics", "Comparison", "RunRecord"}


def hand_reads(source: str) -> list[str]:
    """Calls in ``source`` that parse a result or unit file without the door: ``read_json`` /
    ``json.load(s)`` of a path naming one, and a record class's own ``read`` / ``read_optional``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
        owner = f.value.id if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) else ""
        args = " ".join(ast.get_source_segment(source, a) or "" for a in node.args)
        if (name == "read_json" or (owner == "json" and name in ("load", "loads"))) and RESULT_NAME.search(args):
            found.append(f"line {node.lineno}: {ast.get_source_segment(source, node)}")
        elif name in ("read", "read_optional") and owner in RECORD_CLASSES:
            found.append(f"line {node.lineno}: {ast.get_source_segment(source, node)}")
    return found


def test_result_files_are_read_only_through_the_door():
    offenders = []
    for p in sorted(PACKAGE.rglob("*.py")):
        rel = p.relative_to(PACKAGE).as_posix()
        if rel.startswith(DOOR) or rel in ALLOWED:
            continue
        offenders += [f"{rel} {hit}" for hit in hand_reads(p.read_text("utf-8"))]
    assert not offenders, "result files read outside carlos_audit/casefolder/:\n" + "\n".join(offenders)


def test_the_grep_sees_what_it_checks():
    """The checker flags each kind of hand read (so a pass means something), and not other JSON."""
    bad = ('m = read_json(case_dir / "manifest.json")\n'
           'x = json.loads((out / "metrics.json").read_text())\n'
           'u = read_json(store.unit_path(arm, b))\n'
           'c = Comparison.read_optional(case_dir)\n'
           'r = RunRecord.read(out)\n')
    assert len(hand_reads(bad)) == 5
    assert hand_reads('k = read_json(out / "reproduction.json")\nh = json.loads(header)\n') == []


def _write_finished(d: Path, direction=(1.0, 0.0)) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    Metrics(n_pairs=0, n_prompts=0, n_seeds=0, feature_dim=len(direction), direction=list(direction), strength=1.0,
            consistency=None, consistency_note="n/a", ci={}, per_category={}, per_prompt={}, per_pair=[]).write(d)
    Manifest(case={"id": "c"}, tool={}, run={}, inputs=[], custody_ok=True, base_model={}, embedder={}, lora={},
             protocol={}, comparison_loras=[], text_features=None, cost={}, signature={}, prompts=[], pairs=[],
             results={}, environment={}).write(d)
    return d


def test_a_folder_that_is_not_finished_is_refused_in_one_line(tmp_path):
    with pytest.raises(AuditError) as e:
        CaseFolder(tmp_path / "nowhere").require_finished()
    assert "does not exist" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(AuditError) as e:
        CaseFolder(tmp_path).require_finished()
    msg = str(e.value)
    assert "not a finished case folder" in msg and "no manifest.json and no metrics.json" in msg and "\n" not in msg
    d = _write_finished(tmp_path / "case")
    (d / "metrics.json").unlink()
    with pytest.raises(AuditError, match=r"has no metrics\.json \(run `carlos-audit run` first\)$"):
        CaseFolder(d).require_finished()
    assert CaseFolder(d).require_finished(Manifest).manifest.case == {"id": "c"}  # what verify needs
    _write_finished(d)  # metrics back, then a manifest missing its fields
    (d / "manifest.json").write_text('{"case": {}}')
    with pytest.raises(AuditError) as e:
        CaseFolder(d).require_finished()
    assert "manifest.json" in str(e.value) and "\n" not in str(e.value)
    (d / "manifest.json").write_text("{not json")
    with pytest.raises(AuditError, match="not valid JSON"):
        CaseFolder(d).require_finished()


def test_records_are_read_once_and_comparison_is_optional(tmp_path):
    d = _write_finished(tmp_path / "case")
    folder = CaseFolder(d).require_finished()
    assert folder.comparison is None
    assert folder.manifest is folder.manifest and folder.metrics is folder.metrics
    assert folder.digest("manifest.json") == sha256_bytes((d / "manifest.json").read_bytes())
    assert folder.raw("metrics.json") == (d / "metrics.json").read_bytes()
    assert folder.manifest_intact() is True and folder.sealed()
    Comparison(head_to_head=[]).write(d)
    assert CaseFolder(d).comparison.head_to_head == []
    (d / "manifest.json.sha256").write_text("0" * 64 + "  manifest.json\n")
    assert CaseFolder(d).manifest_intact() is False and not CaseFolder(d).sealed()


def test_digest_is_memoised_by_stat_and_follows_a_change(tmp_path, monkeypatch):
    from carlos_audit.casefolder import folder as folder_mod

    calls = []
    real = folder_mod.sha256_file
    monkeypatch.setattr(folder_mod, "sha256_file", lambda p: calls.append(p) or real(p))
    f = tmp_path / "images" / "a.png"
    f.parent.mkdir()
    f.write_bytes(b"one")
    folder = CaseFolder(tmp_path)
    first = folder.digest("images/a.png")
    assert first == sha256_bytes(b"one") and folder.digest("images/a.png") == first and len(calls) == 1
    f.write_bytes(b"two!")  # another size
    assert folder.digest("images/a.png") == sha256_bytes(b"two!") and len(calls) == 2
    st = f.stat()
    f.write_bytes(b"TWO!")  # the same size: the mtime tells
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert folder.digest("images/a.png") == sha256_bytes(b"TWO!") and len(calls) == 3
    f.unlink()
    assert folder.digest("images/a.png") is None


class Opens:
    """Files opened under ``root`` while active (sys.addaudithook on 'open'; a hook cannot be
    removed, so it only records while ``on``)."""

    def __init__(self, root: Path):
        self.root, self.on, self.count = str(Path(root).resolve()), False, Counter()
        sys.addaudithook(self._hook)

    def _hook(self, event, args):
        if self.on and event == "open" and isinstance(args[0], (str, os.PathLike)):
            p = os.path.realpath(os.fspath(args[0]))
            if p.startswith(self.root + os.sep):
                self.count[os.path.relpath(p, self.root)] += 1

    def __enter__(self):
        self.on = True
        return self

    def __exit__(self, *exc):
        self.on = False


def test_unit_records_and_features_are_read_once_per_store(tmp_path):
    store = CaseStore(tmp_path)
    files, record = store.unit_files("base", 0, UnitOutput([b"png0", b"png1"], np.ones((2, 4), np.float32),
                                                           ["p0", "p1"], ["a", "b"], [0, 1], "generated"))
    store.write_unit_files("base", 0, files, record)
    with Opens(tmp_path) as opens:
        for _ in range(3):
            assert store.unit_done("base", 0) == record  # just written: no read
        fresh = CaseStore(tmp_path)
        for _ in range(3):
            assert fresh.unit_done("base", 0) == record
            assert fresh.features("base", ["p0", "p1"]).shape == (2, 4)
        assert fresh.unit_done("base", 1) is None
    assert opens.count["units/base/b00000.json"] == 1
    assert opens.count["embeddings/base/p0.npy"] == opens.count["embeddings/base/p1.npy"] == 1
    a = fresh.features("base", ["p0"])
    a[0, 0] = 7.0  # a caller's array is its own
    assert fresh.features("base", ["p0"])[0, 0] == 1.0


@pytest.mark.slow
def test_verify_and_export_read_each_record_once(demo_case_dir, tmp_path):
    from carlos_audit.kit.export import export_case
    from carlos_audit.verify import verify_case

    records = [n for n in ("manifest.json", "metrics.json", "comparison.json", "manifest.json.sha256")
               if (demo_case_dir / n).is_file()]
    opens = Opens(demo_case_dir)
    with opens:
        assert verify_case(demo_case_dir, sample=0)["ok"]
    assert {n: opens.count[n] for n in records} == {n: 1 for n in records}
    assert max(opens.count.values()) <= 2, opens.count.most_common(3)  # a feature file: parsed and hashed
    opens.count.clear()
    with opens:
        export_case(demo_case_dir, tmp_path / "kit.zip", images=False)
    assert {n: opens.count[n] for n in records} == {n: 1 for n in records}
    assert max(opens.count.values()) <= 1, opens.count.most_common(3)
