"""A path written in a case file, resolved: ``${CARLOS_AUDIT_HOME}`` expanded, ``~`` expanded,
relative paths taken from the case file's folder."""

from __future__ import annotations

import os
from pathlib import Path


def expand_path(value: str, base_dir: Path) -> Path:
    from carlos_audit.models.tiny import carlos_home

    value = value.replace("${CARLOS_AUDIT_HOME}", str(carlos_home()))
    p = Path(value).expanduser()
    return Path(os.path.normpath(p if p.is_absolute() else base_dir / p))


def reference_corpus(case) -> Path | None:
    """The case's ``[reference] corpus`` folder resolved, or None when it names none."""
    corpus = case.reference.corpus
    return expand_path(corpus, case.base_dir) if corpus else None
