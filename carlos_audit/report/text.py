"""Small text helpers the report's context builders share (no heavy imports)."""

from __future__ import annotations

import unicodedata
from collections.abc import Mapping
from datetime import datetime, timezone

# Characters shown as a marker (``<U+202E>``) wherever text we did not write is printed, on the
# terminal and in the PDF: by category, every control (Cc: C0, DEL, C1), format character (Cf:
# the bidirectional embeddings, overrides and isolates U+202A-202E and U+2066-2069, the marks
# U+200E/U+200F/U+061C, zero-width space/joiners U+200B-200D, word joiner, BOM, soft hyphen, tag
# characters), line and paragraph separator (Zl, Zp), surrogate (Cs: undecodable bytes), private
# use (Co) and unassigned code point (Cn); and the other default-ignorable code points Unicode
# lists outside Cf (combining grapheme joiner, Hangul fillers, Mongolian and other variation
# selectors, Khmer inherent vowels): each draws nothing or reorders what follows.
HIDDEN_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs", "Co", "Cn"})
HIDDEN_RANGES = ((0x034F, 0x034F), (0x115F, 0x1160), (0x17B4, 0x17B5), (0x180B, 0x180F), (0x3164, 0x3164),
                 (0xFE00, 0xFE0F), (0xFFA0, 0xFFA0), (0xE0100, 0xE01EF))


def hidden(ch: str) -> bool:
    """Whether one character is drawn as nothing, or changes how the text around it is drawn."""
    o = ord(ch)
    return unicodedata.category(ch) in HIDDEN_CATEGORIES or any(lo <= o <= hi for lo, hi in HIDDEN_RANGES)


def marker(ch: str) -> str:
    return f"<U+{ord(ch):04X}>"


def visible(text, keep: str = "") -> str:
    """``text`` with every hidden character (``hidden``) replaced by its code point in a visible
    marker, e.g. ``"tgt\\u202eelyts"`` -> ``"tgt<U+202E>elyts"``; the characters in ``keep`` (say
    newline and tab where the context lays text out) are left as they are. The one rule of the
    terminal (cli/common.safe_text) and the PDF (report/templating: every printed value)."""
    s = str(text)
    if s.isascii() and s.isprintable():
        return s
    return "".join(marker(ch) if hidden(ch) and ch not in keep else ch for ch in s)


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
