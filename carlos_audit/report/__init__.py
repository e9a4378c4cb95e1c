"""The evidentiary PDF report of a case run, in two copies: ``report.pdf`` for filing (PDF/A-2u,
tagged, nothing embedded) and ``report-archive.pdf`` (PDF/A-3b, tagged, the JSON files
embedded). Figures with matplotlib, HTML from the templates folder, PDF with weasyprint;
rendering reads only stored results. Also: the pre-flight check and the signature.

    from carlos_audit.report import render_report
    render_report(Path("reports/demo"))   # -> reports/demo/report.pdf (+ report-archive.pdf, .sha256 files)
"""

from __future__ import annotations

from pathlib import Path

from carlos_audit.records import ARCHIVE_PDF, FILING_PDF, REPORT_FILES, SIGNED_PDF  # the case folder's file names


def render_report(case_dir: Path, check: bool = True) -> Path:
    from carlos_audit.report.render import render_report as render

    return render(case_dir, check=check)


__all__ = ["render_report", "FILING_PDF", "ARCHIVE_PDF", "SIGNED_PDF", "REPORT_FILES"]
