"""Jinja2 for the report: the environment (autoescape, strict), its number filters, and the
two-pass rendering that lets the outline number every heading (see outline.py).

Every value the templates print is escaped, and made visible first (``shown``, the environment's
``finalize``): a hidden or bidirectional format character in any printed value (a title, a prompt,
a trigger word, a label, LoRA metadata, a file name) is printed as its code point, ``<U+202E>``,
so no value can change what the text around it appears to say. Never mark text from a LoRA file,
a prompt suite, a corpus or a case file as safe.
"""

from __future__ import annotations

import math
from pathlib import Path

from carlos_audit.report.fetcher import MAIN_TEMPLATE, templates_dir
from carlos_audit.report.outline import Outline, check_same
from carlos_audit.report.text import hidden, marker, short, visible

#: What the PDF lays out itself: a newline or tab in a printed value is whitespace to HTML (it
#: cannot reorder or hide text), and the expert's paragraphs keep their breaks.
LAYOUT_KEEP = "\n\t"


def num(x, digits: int = 4):
    return "n/a" if x is None else f"{float(x):.{digits}f}"


def trim(x) -> str:
    return f"{float(x):.1f}".rstrip("0").rstrip(".")


def pct(x):
    """A percentile as an ordinal: 40.0 -> '40th', 87.5 -> '87.5th', 1 -> '1st'."""
    if x is None:
        return "n/a"
    text = trim(x)
    if "." in text:
        return text + "th"
    n = int(text)
    return text + ("th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th"))


def sig(x, digits: int = 3):
    """A small number with `digits` significant digits, never in exponent form."""
    if x is None:
        return "n/a"
    x = float(x)
    if x == 0:
        return "0"
    places = max(0, digits - 1 - math.floor(math.log10(abs(x))))
    return f"{x:.{min(places, 12)}f}"


def percent(x):
    return "n/a" if x is None else f"{float(x):.0f}%"


def share(x):
    """A share (0..1) as a percentage with the digits it needs: 0.004 -> '0.4%', 0.5 -> '50%'."""
    if x is None:
        return "n/a"
    v = 100 * float(x)
    if v == 0 or v >= 10:
        return f"{v:.0f}%"
    return f"{v:.1f}%" if v >= 1 else f"{sig(v, 2)}%"


def g(x):
    return "n/a" if x is None else f"{float(x):g}"


def size(n) -> str:
    """A byte count with thousands separators ("1,234 bytes"); '?' when unknown."""
    return "?" if n is None else f"{int(n):,} bytes"


FILTERS = {"num": num, "g": g, "sig": sig, "percent": percent, "share": share, "pct": pct, "trim": trim, "short": short, "size": size}


def shown(value):
    """Every value a template prints, before it is escaped: its text with the hidden characters
    made visible (``text.visible``). Markup (a heading, a joined list: already escaped) gets the
    markers escaped, so that they print as text and are not read as tags."""
    from markupsafe import Markup, escape

    if hasattr(value, "__html__"):
        s = str(value.__html__())
        if not any(hidden(ch) and ch not in LAYOUT_KEEP for ch in s):
            return value
        return Markup("".join(str(escape(marker(ch))) if hidden(ch) and ch not in LAYOUT_KEEP else ch for ch in s))
    if isinstance(value, (bool, int, float)) or value is None:
        return value
    return visible(value, keep=LAYOUT_KEEP)


def jinja_env(folder: Path | None = None):
    """The report's Jinja2 environment over the templates folder (checkout or wheel): autoescaped,
    strict, and every printed value passed through ``shown``."""
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(folder or templates_dir())), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
                             finalize=shown)
    env.filters.update(FILTERS)
    return env


def render_html(context: dict, template: str = MAIN_TEMPLATE) -> str:
    """Render twice: the first pass numbers the headings, the second prints the numbers, the
    references and the contents."""
    tpl = jinja_env().get_template(template)
    first = Outline()
    tpl.render(**context, outline=first)
    second = Outline(previous=first.headings)
    html = tpl.render(**context, outline=second)
    check_same(first.headings, second.headings)
    return html
