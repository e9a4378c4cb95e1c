"""The report's figures, drawn with matplotlib (Agg, no pyplot) into the case folder.

Every figure is an SVG written with fixed settings, so the same stored results always give the
same bytes: ``svg.hashsalt`` fixes the ids matplotlib writes, ``metadata={"Date": None}`` drops
the timestamp, and text is drawn as paths (``svg.fonttype = "path"``), so the PDF needs no
extra font and no text from a prompt or corpus is ever interpreted (``text.parse_math`` off).

Also here: the pictures of the image evidence (display copies of pairs for the body, and one
contact sheet of thumbnails per prompt for the appendix), written as deterministic JPEG/PNG.
"""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

from matplotlib.figure import Figure  # noqa: E402

from carlos_audit.fileio import write_bytes_atomic  # noqa: E402
from carlos_audit.errors import AuditError  # noqa: E402
from carlos_audit.records import Comparison, Metrics  # noqa: E402
from carlos_audit.report.text import visible  # noqa: E402
from carlos_audit.result_sections import CategoryStats, CorpusPoints, DoseResponse  # noqa: E402

RC = {
    "svg.hashsalt": "carlos-audit",
    "svg.fonttype": "path",
    "text.parse_math": False,
    "text.usetex": False,
    "font.family": "DejaVu Sans",
    "font.size": 8,
    "axes.titlesize": 9,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "path.simplify": False,
}
TARGET_COLOUR = "#b2182b"
BAR_COLOUR = "#4a6fa5"
CORPUS_COLOUR = "#9a9a9a"


def svg_bytes(fig: Figure) -> bytes:
    buf = io.BytesIO()
    with matplotlib.rc_context(RC):
        fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": "carlos-audit"})
    return buf.getvalue()


def _new_figure(width_in: float, height_in: float) -> Figure:
    with matplotlib.rc_context(RC):
        return Figure(figsize=(width_in, height_in), layout="constrained")


def _label(text: str, limit: int = 28) -> str:
    """A category name as a tick label: one line, hidden characters made visible (text.visible)."""
    text = visible(" ".join(str(text).split()))
    return text if len(text) <= limit else text[: limit - 1] + "…"


# ----------------------------------------------------------------------------- results figures


def per_category_figure(per_category: dict[str, CategoryStats]) -> Figure:
    """Strength and consistency per prompt category, as two horizontal bar panels."""
    names = sorted(per_category)
    with matplotlib.rc_context(RC):
        fig = _new_figure(6.8, 0.9 + 0.24 * max(len(names), 2))
        ax_s, ax_c = fig.subplots(1, 2, sharey=True)
        y = list(range(len(names)))
        strengths = [per_category[n].strength for n in names]
        cons = [per_category[n].consistency for n in names]
        ax_s.barh(y, strengths, color=BAR_COLOUR, height=0.6)
        ax_s.set_yticks(y, [f"{_label(n)} (n={per_category[n].n_pairs})" for n in names])
        ax_s.invert_yaxis()
        ax_s.set_title("Strength per category")
        ax_s.set_xlabel("mean L2 norm of diffs")
        ax_c.barh(y, [0.0 if c is None else c for c in cons], color=BAR_COLOUR, height=0.6)
        for yi, c in zip(y, cons):
            if c is None:
                ax_c.text(0, yi, " undefined", va="center", fontsize=7)
        ax_c.axvline(0, color="black", linewidth=0.6)
        ax_c.set_title("Consistency per category")
        ax_c.set_xlabel("mean pairwise cosine of diffs")
        for ax in (ax_s, ax_c):
            ax.grid(axis="x", linewidth=0.3, color="#cccccc")
            ax.set_axisbelow(True)
    return fig


def diff_norm_figure(diff_norms: list[float], strength: float) -> Figure:
    """Histogram of the per-pair diff norms ||d_i||, with their mean (the Strength) marked."""
    with matplotlib.rc_context(RC):
        fig = _new_figure(6.8, 2.4)
        ax = fig.subplots()
        bins = min(60, max(8, int(len(diff_norms) ** 0.5) * 2))
        ax.hist(diff_norms, bins=bins, color=BAR_COLOUR, edgecolor="white", linewidth=0.4)
        ax.axvline(strength, color=TARGET_COLOUR, linewidth=1.2)
        ax.annotate(f"Strength (mean) = {strength:.4f}", xy=(strength, 1), xycoords=("data", "axes fraction"),
                    xytext=(4, -10), textcoords="offset points", color=TARGET_COLOUR, fontsize=7.5)
        ax.set_xlabel("||d_i||, the size of the LoRA's effect on one pair (same prompt, same seed)")
        ax.set_ylabel("number of pairs")
        ax.set_title(f"Distribution of the effect size over all {len(diff_norms)} pairs")
    return fig


def corpus_scatter_figure(points: CorpusPoints, target_strength: float, target_consistency: float | None) -> Figure:
    """Strength vs consistency of every reference-corpus LoRA, the examined LoRA highlighted."""
    xs, ys = [], []
    for s, c in zip(points.strength or [], points.consistency or []):
        if s is not None and c is not None:
            xs.append(float(s))
            ys.append(float(c))
    with matplotlib.rc_context(RC):
        fig = _new_figure(6.8, 3.4)
        ax = fig.subplots()
        ax.scatter(xs, ys, s=9, color=CORPUS_COLOUR, alpha=0.7, linewidths=0, label=f"reference corpus ({len(xs)} LoRAs)")
        if target_consistency is not None:
            ax.scatter([target_strength], [target_consistency], s=90, marker="*", color=TARGET_COLOUR,
                       edgecolors="black", linewidths=0.5, label="the examined LoRA", zorder=3)
        else:
            ax.axvline(target_strength, color=TARGET_COLOUR, linewidth=1.2, label="the examined LoRA (consistency undefined)")
        ax.set_xlabel("Strength (mean L2 norm of diffs)")
        ax.set_ylabel("Consistency (mean pairwise cosine)")
        ax.set_title("The examined LoRA against the reference corpus")
        ax.grid(linewidth=0.3, color="#dddddd")
        ax.set_axisbelow(True)
        ax.legend(loc="best", fontsize=7, frameon=False)
    return fig


# ----------------------------------------------------------------------------- beyond the paper


def _ci_err(values, cis):
    """(values, yerr) for errorbar: points without a CI get a zero-length bar."""
    lo, hi = [], []
    for v, ci in zip(values, cis):
        if v is None or not ci:
            lo.append(0.0)
            hi.append(0.0)
        else:
            lo.append(max(0.0, v - ci[0]))
            hi.append(max(0.0, ci[1] - v))
    return [lo, hi]


def dose_response_figure(dose: DoseResponse) -> Figure:
    """Strength and consistency against the LoRA scale, 95% CIs as error bars; (0, 0) for strength
    is exact by construction (adapter weight 0 reproduces the base images)."""
    pts = sorted((p for p in dose.points or [] if p.strength is not None), key=lambda p: float(p.scale))
    xs = [float(p.scale) for p in pts]
    ss = [float(p.strength) for p in pts]
    with matplotlib.rc_context(RC):
        fig = _new_figure(6.8, 2.6)
        ax_s, ax_c = fig.subplots(1, 2)
        ax_s.plot([0.0] + xs, [0.0] + ss, color=BAR_COLOUR, linewidth=0.8)
        ax_s.errorbar(xs, ss, yerr=_ci_err(ss, [p.strength_ci for p in pts]), fmt="o", color=BAR_COLOUR,
                      markersize=4, capsize=3, elinewidth=0.8, label="measured (95% CI)")
        ax_s.plot([0.0], [0.0], marker="D", markersize=5, color="black", linestyle="none",
                  label="scale 0: exactly 0 (by construction)")
        s1 = dose.strength_at_scale_1
        half = dose.half_strength_scale
        if s1 and half is not None:
            ax_s.plot([0.0, half, half], [s1 / 2, s1 / 2, 0.0], color=TARGET_COLOUR, linewidth=0.8, linestyle="--",
                      label=f"half of the strength at scale 1: scale {half:.2f}")
        ax_s.set_xlabel("LoRA scale chosen by the user")
        ax_s.set_ylabel("Strength")
        ax_s.set_title("Strength against scale")
        ax_s.set_xlim(left=-0.05 * max(xs + [1.0]))
        ax_s.set_ylim(bottom=0.0)
        ax_s.legend(loc="upper left", fontsize=6.5, frameon=False)
        cp = [p for p in pts if p.consistency is not None]
        cx = [float(p.scale) for p in cp]
        cy = [float(p.consistency) for p in cp]
        ax_c.plot(cx, cy, color=BAR_COLOUR, linewidth=0.8)
        ax_c.errorbar(cx, cy, yerr=_ci_err(cy, [p.consistency_ci for p in cp]), fmt="o", color=BAR_COLOUR,
                      markersize=4, capsize=3, elinewidth=0.8)
        ax_c.set_xlabel("LoRA scale chosen by the user")
        ax_c.set_ylabel("Consistency")
        ax_c.set_title("Consistency against scale (undefined at 0)")
        ax_c.set_xlim(ax_s.get_xlim())
        for ax in (ax_s, ax_c):
            ax.grid(linewidth=0.3, color="#dddddd")
            ax.set_axisbelow(True)
    return fig


def values_histogram_figure(values: list[float], *, xlabel: str, title: str, marks: list[tuple[str, float, str]],
                            xlim: tuple[float, float] | None = None, height: float = 2.0) -> Figure:
    """A small histogram of per-pair values with labelled vertical marks (label, x, colour)."""
    with matplotlib.rc_context(RC):
        fig = _new_figure(6.8, height)
        ax = fig.subplots()
        bins = min(40, max(8, int(len(values) ** 0.5) * 2))
        ax.hist(values, bins=bins, range=xlim, color=BAR_COLOUR, edgecolor="white", linewidth=0.4)
        for k, (label, x, colour) in enumerate(marks):
            ax.axvline(x, color=colour, linewidth=1.1, linestyle="-" if k == 0 else "--", label=label)
        if marks:
            ax.legend(loc="upper left", fontsize=7, frameon=False)
        if xlim is not None:
            ax.set_xlim(*xlim)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("number of pairs")
        ax.set_title(title)
    return fig


def _indicator_figures(metrics: Metrics, comparison: Comparison | None) -> dict:
    figs = {}
    ind = metrics.indicators
    dose = ind.dose_response
    if dose is not None and any(p.strength is not None for p in dose.points or []):
        figs["dose_response"] = dose_response_figure(dose)
    po = ind.prompt_override
    if po is not None and po.per_pair and po.mean is not None:
        vals = [float(v) for v in po.per_pair if v is not None]
        figs["prompt_override"] = values_histogram_figure(
            vals, xlabel="cos(prompt, LoRA image) − cos(prompt, base image), one value per pair",
            title=f"Prompt override over {len(vals)} pairs (below 0: the LoRA image matches the prompt less)",
            marks=[(f"mean = {float(po.mean):.3g}", float(po.mean), TARGET_COLOUR), ("0 (no change)", 0.0, "black")])
    for i, h in enumerate((comparison.head_to_head if comparison is not None else None) or [], start=1):
        ppc = h.behaviour.per_pair_cosine if h.behaviour is not None else None
        vals = [float(v) for v in ((ppc.values if ppc is not None else None) or {}).values() if v is not None]
        if not vals:
            continue
        marks = []
        if ppc.mean is not None:
            marks.append((f"mean per-pair cosine = {ppc.mean:.3f}", float(ppc.mean), TARGET_COLOUR))
        if h.behaviour.direction_cosine is not None:
            cos = h.behaviour.direction_cosine
            marks.append((f"direction cosine = {cos:.3f}", float(cos), "black"))
        figs[f"h2h_{i}"] = values_histogram_figure(
            vals, xlabel="cosine between the two LoRAs' changes to the same pair (same prompt, same seed)",
            title=f"Per-pair agreement of the two LoRAs over {len(vals)} pairs", marks=marks, xlim=(-1.0, 1.0))
    return figs


def write_result_figures(case_dir: Path, metrics: Metrics, comparison: Comparison | None) -> dict:
    """Draw every results figure into ``figures/``; returns {name: path relative to the case}."""
    out = {}
    figs = {
        "per_category": per_category_figure(metrics.per_category or {}),
        "diff_norms": diff_norm_figure([p.diff_norm for p in metrics.per_pair], metrics.strength),
    }
    points = comparison.corpus_points if comparison is not None else None
    if points and points.strength:
        figs["corpus_scatter"] = corpus_scatter_figure(points, metrics.strength, metrics.consistency)
    figs.update(_indicator_figures(metrics, comparison))
    for name, fig in figs.items():
        rel = f"figures/{name}.svg"
        write_bytes_atomic(case_dir / rel, svg_bytes(fig))
        out[name] = rel
    return out


# ----------------------------------------------------------------------------- image evidence

THUMB_PX = 64          # contact-sheet thumbnail edge, pixels
SHEET_MAX_COLUMNS = 16  # seeds per contact sheet row; more seeds -> more sheets
SHEET_GAP = 4
DISPLAY_MAX_PX = 256    # body images larger than this are shown as a downscaled copy


def _open_rgb(data: bytes, name: str):
    """The image of ``data`` in RGB; AuditError in one line naming ``name`` when it does not decode
    (a truncated file too, whatever weasyprint told Pillow: claimed_works.strict_decoding)."""
    from PIL import Image

    from carlos_audit.case.claimed_works import strict_decoding

    try:
        with strict_decoding():
            im = Image.open(io.BytesIO(data))
            im.load()
        return im.convert("RGB")
    except (OSError, SyntaxError, ValueError, EOFError) as e:  # PIL.UnidentifiedImageError is an OSError
        why = "not an image format Pillow reads" if isinstance(e, Image.UnidentifiedImageError) else f"{type(e).__name__}: {e}"
        raise AuditError(f"{name} cannot be decoded as an image ({why}); "
                         "the report cannot show it (`carlos-audit verify` checks it against the manifest)") from None


def thumbnail(data: bytes, px: int = THUMB_PX, name: str = "an image"):
    from PIL import Image

    im = _open_rgb(data, name)
    if im.width == px and im.height == px:
        return im
    im.thumbnail((px, px), Image.Resampling.BICUBIC, reducing_gap=2.0)
    canvas = Image.new("RGB", (px, px), "white")
    canvas.paste(im, ((px - im.width) // 2, (px - im.height) // 2))
    return canvas


def contact_sheet(columns: list[tuple[bytes, bytes]], names: list[tuple[str, str]] | None = None) -> bytes:
    """One JPEG: a column per seed, base thumbnail on top, LoRA thumbnail below (``names``: the
    images' names, for an image that does not decode)."""
    from PIL import Image

    n = len(columns)
    w = n * THUMB_PX + (n - 1) * SHEET_GAP
    h = 2 * THUMB_PX + SHEET_GAP
    sheet = Image.new("RGB", (w, h), "white")
    names = names or [("a base image", "a LoRA image")] * n
    for i, (base, lora) in enumerate(columns):
        x = i * (THUMB_PX + SHEET_GAP)
        sheet.paste(thumbnail(base, name=names[i][0]), (x, 0))
        sheet.paste(thumbnail(lora, name=names[i][1]), (x, THUMB_PX + SHEET_GAP))
    buf = io.BytesIO()
    sheet.save(buf, format="JPEG", quality=85, optimize=False, progressive=False, subsampling=0)
    return buf.getvalue()


def display_copy(data: bytes, px: int = DISPLAY_MAX_PX, name: str = "an image") -> bytes | None:
    """A downscaled PNG for the body when the original is larger than ``px``; else None."""
    from PIL import Image

    im = _open_rgb(data, name)
    if max(im.size) <= px:
        return None
    im.thumbnail((px, px), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=False)
    return buf.getvalue()
