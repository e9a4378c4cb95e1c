"""The evidentiary PDF report of a case run (figures with matplotlib, HTML from the top-level
``templates/`` folder, PDF/A-3b with weasyprint). Rendering reads only stored results.

    from carlos_audit.report import render_report
    render_report(Path("reports/demo"))   # -> reports/demo/report.pdf (+ report.pdf.sha256)
"""

from __future__ import annotations

from pathlib import Path


def render_report(case_dir: Path) -> Path:
    from carlos_audit.report.render import render_report as _render

    return _render(case_dir)


__all__ = ["render_report"]
