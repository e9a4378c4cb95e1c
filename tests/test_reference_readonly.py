"""Reference data is read-only: a case's run, analysis and verification never write into the
reference corpus. Its known error rates are stored by the commands that write corpora (import,
build, add, validate); a corpus without them is validated into the tool's home, keyed by its
file hashes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from conftest import write_case

from carlos_audit.analysis.case_analysis import reanalyse
from carlos_audit.case.casefile import load_case
from carlos_audit.corpus.store import META_FILE, TABLES_FILE, WHITENING_FILE
from carlos_audit.fileio import read_json
from carlos_audit.hashing import sha256_file
from carlos_audit.pipeline import run_case
from carlos_audit.verify import verify_case


def _snapshot(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): (p.stat().st_mtime_ns, sha256_file(p))
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_run_analyse_and_verify_leave_the_corpus_untouched(demo_assets, carlos_home, tmp_path):
    corpus = tmp_path / "corpus"
    shutil.copytree(demo_assets["corpus"], corpus, ignore=shutil.ignore_patterns("cases"))
    assert read_json(corpus / META_FILE).get("validation"), "corpus build stores the error rates"
    # a corpus written before the error rates were stored with it: no validation
    meta = read_json(corpus / META_FILE)
    meta.pop("validation")
    (corpus / META_FILE).write_text(json.dumps(meta))
    for name in (TABLES_FILE, WHITENING_FILE):
        (corpus / name).unlink(missing_ok=True)
    before = _snapshot(corpus)

    cf = write_case(tmp_path, demo_assets, case_id="ro", extra=f'[reference]\ncorpus = "{corpus}"\nallow_incompatible = true\n')
    out = tmp_path / "out"
    run_case(load_case(cf), out, progress=False)
    assert _snapshot(corpus) == before
    rates = read_json(out / "comparison.json")["corpus"]["error_rates"]
    assert rates["stored"] is False  # not stored with the corpus: cached in the tool's home
    assert any((carlos_home / "validation").rglob("validation.json"))

    assert reanalyse(out)["identical"]  # the second time from the home cache, same bytes
    assert verify_case(out, sample=1)["ok"]
    assert _snapshot(corpus) == before
