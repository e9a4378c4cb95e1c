"""A whole case run, step by step: profile -> comparison -> report.

Each step reads what the previous one wrote into the case folder, so any step can be re-run
alone (``carlos-audit report CASE_DIR`` re-renders from stored results).
"""

from __future__ import annotations

from pathlib import Path

from carlos_audit.case.casefile import Case


def run_full(case: Case, out: Path, *, allow_incompatible: bool = False, **kwargs) -> dict:
    """profile, indicators, head-to-head and corpus comparison (run_case) -> report."""
    from carlos_audit.errors import AuditError
    from carlos_audit.report import ARCHIVE_PDF, render_report
    from carlos_audit.run.lock import case_lock
    from carlos_audit.run.profile import run_case

    with case_lock(out):  # held through the report
        try:
            result = run_case(case, out, allow_incompatible=allow_incompatible, **kwargs)
        except AuditError:
            # an input changed during the run: the manifest is written (custody_ok false) and the
            # exhibit is still rendered, marked invalid, before the error reaches the user
            if _custody_failed(out):
                render_report(out, check=False)
            raise
        result.setdefault("written", [])
        if result["comparison"] is not None:
            result["written"].append(str(Path(out) / "comparison.json"))
        result["written"].append(str(render_report(out)))           # filing copy, pre-flight checked
        result["written"].append(str(Path(out) / ARCHIVE_PDF))
    return result


def _custody_failed(out: Path) -> bool:
    from carlos_audit.fileio import read_json

    manifest = Path(out) / "manifest.json"
    return manifest.is_file() and (Path(out) / "metrics.json").is_file() and read_json(manifest).get("custody_ok") is False
