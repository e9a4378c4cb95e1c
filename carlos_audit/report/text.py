"""Small text helpers the report's context builders share (no heavy imports)."""

from __future__ import annotations

from collections.abc import Mapping

from datetime import datetime, timezone


def iso(epoch: int) -> str:
    return datetime.fromtimestamp(int(epoch), tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def seeds_text(seeds: list[int]) -> str:
    if not seeds:
        return "none"
    if seeds == list(range(seeds[0], seeds[0] + len(seeds))) and len(seeds) > 2:
        return f"{seeds[0]} to {seeds[-1]} ({len(seeds)} seeds)"
    return ", ".join(str(s) for s in seeds) + f" ({len(seeds)} seed{'s' if len(seeds) != 1 else ''})"


def flatten(obj, prefix: str = "") -> list[tuple[str, str]]:
    """Nested dicts as (dotted key, value text) rows, for key/value tables."""
    rows = []
    if isinstance(obj, Mapping):  # a dict, or a record section
        for k in sorted(obj, key=str):
            rows += flatten(obj[k], f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, list):
        rows.append((prefix, ", ".join(str(x) for x in obj) if obj else "(none)"))
    else:
        rows.append((prefix, "(none)" if obj is None else str(obj)))
    return rows


def short(h: str | None) -> str:
    """The first 12 hexadecimal digits of a hash (captions)."""
    return (h or "")[:12]


def clip(text, limit: int) -> tuple[str, bool]:
    """(text cut to `limit` characters, whether it was cut)."""
    text = str(text)
    return (text, False) if len(text) <= limit else (text[:limit], True)


def ellipsis(text, limit: int) -> str:
    """`text` cut to `limit` characters, with an ellipsis when cut."""
    text, cut = clip(text, limit)
    return text + ("…" if cut else "")


def num_or_none(x):
    try:
        return None if x is None else float(x)
    except (TypeError, ValueError):
        return None


def pair_ci(ci) -> list[float] | None:
    if isinstance(ci, (list, tuple)) and len(ci) == 2 and all(num_or_none(v) is not None for v in ci):
        return [float(ci[0]), float(ci[1])]
    return None
