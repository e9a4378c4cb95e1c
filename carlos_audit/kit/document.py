"""The reproduction's PDF: "Reproduction of Exhibit ...", from ``reproduction.json`` alone.

Same style and the same guarantees as the case report: the report's stylesheet, its URL fetcher
(only the output and templates folders, by virtual URLs; anything else stops the rendering),
Jinja2 autoescape, PDF/A-3b with reproduction.json embedded, and the document date taken from
the reproduction's record, so re-rendering gives the same bytes.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

from carlos_audit.errors import AuditError
from carlos_audit.fileio import read_json, write_bytes_atomic, write_text_atomic
from carlos_audit.hashing import sha256_bytes

TEMPLATE = "reproduction.html.j2"
TOLERANCE_FILE = Path(__file__).resolve().parent / "measured_tolerance.json"
N_WORST = 12  # images listed in the document (all of them are in reproduction.json)

VERDICT_TEXT = {
    "identical": "Every regenerated image and feature file is byte-identical to the kit's.",
    "within tolerance": "The regenerated images differ from the kit's in their bytes, but every feature cosine is "
                        "within the tolerance, every metric lies inside the other side's 95% interval and the "
                        "conclusions checked did not change.",
    "different": "The reproduction differs from the kit's results beyond the tolerance (reasons below).",
}


def _fmt(x, digits: int = 6) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, bool):
        return "yes" if x else "NO"
    if isinstance(x, float):
        return f"{x:.{digits}g}"
    return str(x)


def build_context(r: dict) -> dict:
    images = sorted(r["images"], key=lambda i: (i["feature_cosine"], i["pair_id"], i["arm"]))
    measured = read_json(TOLERANCE_FILE) if TOLERANCE_FILE.is_file() else None
    return {
        "r": r,
        "case": r["kit"]["case"],
        "verdict_text": VERDICT_TEXT[r["verdict"]],
        "document_date": datetime.fromtimestamp(int(r["source_date_epoch"]), tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "worst": images[:N_WORST],
        "metric_rows": [{"profile": name, **m} for name, m in r["metrics"].items()],
        "env_rows": [{**d, "kit": _fmt(d["kit"]), "here": _fmt(d["here"])} for d in r["environment"]["differences"]],
        "measured": measured,
        "exit_codes": {"identical": 0, "within tolerance": 4, "different": 5},
    }


def _jinja_env(templates_dir: Path):
    import jinja2

    from carlos_audit.report.templating import shown  # hidden characters made visible, as in the report

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(templates_dir)), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
                             finalize=shown)
    env.filters["f"] = _fmt
    env.filters["cos"] = lambda x: "n/a" if x is None else f"{float(x):.10f}"
    env.filters["json"] = lambda x: json.dumps(x, sort_keys=True)
    return env


def render_reproduction(out: Path) -> Path:
    """Render ``reproduction.pdf`` (and its .sha256) from ``out/reproduction.json``, through the
    report's PDF writer (report/render.write_pdf: PDF/A-3b, tagged, the record embedded) and its
    pre-flight check (every check but "no embedded files": the record is embedded on purpose)."""
    from carlos_audit.report.fetcher import templates_dir
    from carlos_audit.report.render import PdfCopy, write_pdf

    out = Path(out).resolve()
    tdir = templates_dir()
    if not (tdir / TEMPLATE).is_file():
        raise AuditError(f"reproduction template {TEMPLATE} not found in {tdir}: reinstall carlos-audit")
    data = (out / "reproduction.json").read_bytes()
    r = read_json(out / "reproduction.json")
    html = _jinja_env(tdir).get_template(TEMPLATE).render(**build_context(r))
    pdf = write_pdf(html, out, int(r["source_date_epoch"]),
                    PdfCopy("pdf/a-3b", None, sha256_bytes(data)[:32], attachments={"reproduction.json": data}))
    path = out / "reproduction.pdf"
    write_bytes_atomic(path, pdf)
    write_text_atomic(out / "reproduction.pdf.sha256", f"{sha256_bytes(pdf)}  reproduction.pdf\n")
    check_reproduction_pdf(path)
    return path


def check_reproduction_pdf(path: Path) -> dict:
    """The report's pre-flight check of the reproduction PDF; an AuditError when a check other
    than "no embedded files" fails."""
    from carlos_audit.report.preflight import preflight

    result = preflight(path)
    failed = [f"{c['check']} ({c['detail']})" for c in result["checks"] if not c["ok"] and c["check"] != "no embedded files"]
    if failed:
        raise AuditError(f"wrote {path}, but it fails the pre-flight check: {'; '.join(failed)}")
    return result
