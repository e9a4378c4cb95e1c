"""A whole case run, step by step: profile -> comparison -> report.

Each step reads what the previous one wrote into the case folder, so any step can be re-run
alone (``carlos-audit report CASE_DIR`` re-renders from stored results).
"""

from __future__ import annotations

from pathlib import Path

from .casefile import Case


def run_full(case: Case, out: Path, **kwargs) -> dict:
    from .profile import run_case

    result = run_case(case, out, **kwargs)
    result.setdefault("written", [])
    return result
