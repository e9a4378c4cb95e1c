"""Paths, the bottom of the package: the tool's home folder (``carlos_home``), a path written in a
case file resolved (``expand_path``), and machine-independent records: the paths of the
examiner's machine replaced by names that mean the same thing anywhere.

A kit (``export.py``) and the report's reproduction appendix must not carry an absolute path of
the machine that ran the case: it says nothing to the other side, and it may say too much (user
names, folder structure). ``portable_command`` rewrites a recorded command line;
``PathMap`` rewrites every string of a JSON value (longest known prefix first) and
``leaks`` finds what is left.

No heavy import here: the CLI imports this module at start.
"""

from __future__ import annotations

from collections.abc import Mapping

import os
from pathlib import Path, PurePath

def carlos_home() -> Path:
    """The tool's home folder: ``$CARLOS_AUDIT_HOME``, else ``~/.cache/carlos-audit`` (embedded
    models, demo files, caches)."""
    return Path(os.environ.get("CARLOS_AUDIT_HOME", Path.home() / ".cache" / "carlos-audit"))


def expand_path(value: str, base_dir: Path) -> Path:
    """A path written in a case file, resolved: ``${CARLOS_AUDIT_HOME}`` expanded, ``~`` expanded,
    relative paths taken from the case file's folder."""
    value = value.replace("${CARLOS_AUDIT_HOME}", str(carlos_home()))
    p = Path(value).expanduser()
    return Path(os.path.normpath(p if p.is_absolute() else base_dir / p))


#: options whose value is a path on the examiner's machine
#: what an absolute path of this machine that no registered prefix covers becomes (its file name kept)
OTHER_PATH = "<path>"
PATH_OPTIONS = ("--out", "--with", "--casefile", "--lora", "--base", "--embedder", "--corpus", "--comparison")


def portable_command(argv) -> list[str]:
    """The command with every path argument reduced to its file name.

    ``carlos-audit run /home/alice/cases/x.toml --out /evidence/x`` becomes
    ``carlos-audit run x.toml --out x``: run from the folder that holds the case file (its exact
    copy is ``case.toml`` in the case folder). Flags and non-path values are kept.
    """
    argv = [str(a) for a in argv]
    out = argv[:2]
    for i, a in enumerate(argv[2:], start=2):
        if a.startswith("-"):
            out.append(a)
        elif "/" in a or os.sep in a or argv[i - 1] in PATH_OPTIONS:
            out.append(PurePath(a).name or a)
        else:
            out.append(a)
    return out


class PathMap:
    """Replaces known absolute paths (and anything under them) inside strings.

    ``add(path, name)`` registers a prefix; ``apply(obj)`` rewrites every string in a JSON-like
    value. Longer prefixes win, so a file inside a mapped folder gets the file's own name.
    """

    def __init__(self):
        self.prefixes: dict[str, str] = {}

    def add(self, path, name: str) -> None:
        if not path:
            return
        p = str(path).rstrip("/") or "/"
        if p == "/" or not os.path.isabs(p):
            return
        self.prefixes.setdefault(p, name)
        try:
            real = str(Path(p).resolve())
        except OSError:
            return
        self.prefixes.setdefault(real, name)

    def text(self, s: str) -> str:
        for prefix in sorted(self.prefixes, key=len, reverse=True):
            if prefix in s:
                s = _replace_prefix(s, prefix, self.prefixes[prefix])
        if s != "/" and os.path.isabs(s) and "\n" not in s and _exists(s):
            return f"{OTHER_PATH}/{PurePath(s).name}"  # a path no registered prefix covers
        return s

    def apply(self, obj):
        if isinstance(obj, str):
            return self.text(obj)
        if isinstance(obj, Mapping):  # a dict, or a record section
            return {k: self.apply(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [self.apply(v) for v in obj]
        return obj

    def leaks(self, text: str) -> list[str]:
        """The registered prefixes still present in ``text`` (at a path boundary)."""
        return sorted(p for p in self.prefixes if _find_prefix(text, p) >= 0)


def _exists(s: str) -> bool:
    try:
        return Path(s).exists()
    except (OSError, ValueError):
        return False


def _is_boundary(s: str, end: int) -> bool:
    return end == len(s) or not (s[end].isalnum() or s[end] in "._-")


def _find_prefix(s: str, prefix: str, start: int = 0) -> int:
    i = s.find(prefix, start)
    while i >= 0 and not _is_boundary(s, i + len(prefix)):
        i = s.find(prefix, i + 1)
    return i


def _replace_prefix(s: str, prefix: str, name: str) -> str:
    out, pos = [], 0
    while (i := _find_prefix(s, prefix, pos)) >= 0:
        out.append(s[pos:i] + name)
        pos = i + len(prefix)
    out.append(s[pos:])
    return "".join(out)
