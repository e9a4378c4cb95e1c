"""The evidentiary PDF: read a finished case folder, build each copy's context, render, check.

    render_report(case_dir)
        read       manifest.json, metrics.json, comparison.json (optional), and the [report] and
                   [expert] tables of the case folder's case.toml
        check      every image in the manifest is in the case folder with its recorded sha256
        draw       figures/*.svg (matplotlib), figures/sheets/*.jpg (thumbnails, one per prompt),
                   figures/display/<px>/*.png (body images, downscaled when large)
        render     templates/report.html.j2 and its sections/*.html.j2 (Jinja2, autoescape,
                   headings numbered by outline.py) -> HTML -> PDF (weasyprint), twice:
                   report-archive.pdf   PDF/A-3b, tagged, the JSON files embedded
                   report.pdf           filing copy: PDF/A-2u, tagged, nothing embedded, no
                                        JavaScript or forms; prints the sha256 of each JSON file
                                        and of the archive copy; declares PDF/UA-1 when the
                                        structure checks pass (pdftags.py)
        write      both PDFs and their .sha256 files (sha256sum format)
        preflight  report.pdf against the filing rules (preflight.py); a failure is an AuditError
                   after the files are written

Nothing is generated and torch is never imported: the report is a pure function of the stored
results, so re-rendering the same case folder gives the same bytes. The document date is the
run's recorded start (manifest run.source_date_epoch), never the time of rendering.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from carlos_audit.case.casefile import parse_report_settings
from carlos_audit.casefolder import CaseFolder
from carlos_audit.errors import AuditError
from carlos_audit.fileio import write_bytes_atomic, write_text_atomic
from carlos_audit.hashing import sha256_bytes, sha256_file
from carlos_audit.records import Comparison, Manifest, Metrics
from carlos_audit.report import ARCHIVE_PDF, FILING_PDF, figures
from carlos_audit.report.comparison import head_to_head
from carlos_audit.report.context import ReportInputs, build_context
from carlos_audit.report.image_evidence import image_evidence, select_body_pairs
from carlos_audit.report.fetcher import (
    CASE_URL,
    STYLESHEET,
    TEMPLATES_URL,
    fetcher_classes,
    make_url_fetcher,
)
from carlos_audit.report.figures import DISPLAY_MAX_PX
from carlos_audit.report.templating import render_html

VARIANTS = {"archive": "pdf/a-3b", "filing": "pdf/a-2u"}
PAGE_CSS = {"a4": "@page { size: A4; }", "letter": "@page { size: letter; }"}
COMPANIONS = ("manifest.json", "metrics.json", "comparison.json")
DESCRIPTIONS = {"manifest.json": "the run's manifest: protocol, inputs, every pair and its hashes",
                "metrics.json": "the CARLoS metrics and their confidence intervals",
                "comparison.json": "the comparison with the reference corpus and the head-to-head comparisons",
                "reproduction.json": "the reproduction's record: every comparison"}


def read_results(case_dir: Path) -> tuple[CaseFolder, Manifest, Metrics, Comparison | None]:
    """The finished case folder (casefolder.CaseFolder, the one door) and its result records."""
    folder = CaseFolder(case_dir).require_finished(Manifest, Metrics)
    manifest = folder.manifest
    if "source_date_epoch" not in manifest.run:
        raise AuditError(f"{case_dir}/manifest.json lacks run.source_date_epoch")
    return folder, manifest, folder.metrics, folder.comparison


def load_inputs(case_dir: Path, integrity_failures: tuple[str, ...] = ()) -> ReportInputs:
    """Read and check a finished case folder; draw the figures and the image evidence.
    ``integrity_failures``: what verify's integrity checks found (``report
    --render-despite-integrity-failure``), printed on the cover."""
    case_dir = Path(case_dir).resolve()
    folder, manifest, metrics, comparison = read_results(case_dir)

    casefile = case_dir / "case.toml"
    text = casefile.read_text("utf-8") if casefile.is_file() else ""
    report, expert = parse_report_settings(text, str(casefile))
    as_run = next((i.sha256 for i in manifest.inputs if i.role == "casefile"), None)
    edited = bool(text) and as_run is not None and sha256_file(casefile) != as_run

    body = {"archive": select_body_pairs(manifest, metrics),
            "filing": select_body_pairs(manifest, metrics, report.max_pairs_in_body)}
    px = {"archive": DISPLAY_MAX_PX, "filing": min(DISPLAY_MAX_PX, report.filing_image_px)}
    evidence = image_evidence(case_dir, manifest, metrics, {i for ids in body["archive"] for i in ids}, px)
    figs = figures.write_result_figures(case_dir, metrics, comparison)
    prompt_text = {p.id: p.text for p in manifest.prompts}
    # head-to-head triptychs are hash-checked too: their mismatches join the evidence's
    h2h = head_to_head(case_dir, manifest, comparison, figs, prompt_text, evidence["mismatches"])
    companions = []
    for name in COMPANIONS:
        if folder.has(name):
            companions.append({"name": name, "size": len(folder.raw(name)), "sha256": folder.digest(name),
                               "description": DESCRIPTIONS[name]})
    return ReportInputs(case_dir=case_dir, manifest=manifest, metrics=metrics, comparison=comparison, report=report,
                        expert=expert, casefile_edited=edited, figures=figs, evidence=evidence, companions=companions,
                        head_to_head=h2h, body=body, folder=folder, integrity_failures=tuple(integrity_failures))


def report_html(case_dir: Path, copy: str = "archive") -> str:
    """The HTML of one copy, without making a PDF (to inspect what the templates produce)."""
    return render_html(build_context(load_inputs(case_dir), copy))


def render_copies(case_dir: Path, integrity_failures: tuple[str, ...] = ()) -> dict:
    """Render both copies and run the pre-flight check on the filing copy; ``integrity_failures``
    (verify.require_intact's, rendered despite them) go on the cover of both.

    Returns {"filing": Path, "archive": Path, "filing_sha256", "archive_sha256", "preflight": dict}."""
    from carlos_audit.report.preflight import preflight

    inp = load_inputs(case_dir, integrity_failures)
    case_dir = inp.case_dir
    epoch = int(inp.manifest.run["source_date_epoch"])
    paper = inp.report.paper
    ident = inp.folder.digest(Manifest.FILE)

    archive = write_pdf(render_html(build_context(inp, "archive")), case_dir, epoch,
                        PdfCopy(VARIANTS["archive"], paper, ident[:32],
                                attachments={c["name"]: inp.folder.raw(c["name"]) for c in inp.companions}))
    archive_sha256 = sha256_bytes(archive)
    filing = write_pdf(render_html(build_context(inp, "filing", archive_sha256)), case_dir, epoch,
                       PdfCopy(VARIANTS["filing"], paper, ident[32:], declare_ua=True))
    out = {}
    for copy, name, data in (("archive", ARCHIVE_PDF, archive), ("filing", FILING_PDF, filing)):
        write_bytes_atomic(case_dir / name, data)
        write_text_atomic(case_dir / f"{name}.sha256", f"{sha256_bytes(data)}  {name}\n")
        out[copy], out[f"{copy}_sha256"] = case_dir / name, sha256_bytes(data)
    out["preflight"] = preflight(case_dir / FILING_PDF, max_mb=inp.report.max_mb, paper=paper)
    return out


def render_report(case_dir: Path, check: bool = True) -> Path:
    """Render ``report.pdf`` (filing copy) and ``report-archive.pdf`` with their ``.sha256``
    files from a finished case folder's stored results; returns the filing copy's path.
    Raises AuditError for a folder that is not a finished case, and (with ``check``) when the
    filing copy fails the pre-flight check (the files are written first)."""
    from carlos_audit.report.preflight import summary

    result = render_copies(case_dir)
    if check and not result["preflight"]["ok"]:
        raise AuditError(f"wrote {result['filing']}, but it fails the pre-flight check: {summary(result['preflight'])}")
    return result["filing"]


@dataclass(frozen=True)
class PdfCopy:
    """How one PDF is written: its PDF/A ``variant``, the ``paper`` (None: the stylesheet's page
    size), the files embedded (``attachments`` {name: bytes}; PDF/A-3 only), the document
    ``identifier`` (the /ID's first part) and whether to declare PDF/UA-1 (``declare_ua``)."""

    variant: str
    paper: str | None
    identifier: str
    attachments: dict = field(default_factory=dict)
    declare_ua: bool = False


def write_pdf(html: str, case_dir: Path, epoch: int, copy: PdfCopy) -> bytes:
    """HTML -> PDF bytes (tagged, the copy's PDF/A variant), fetching only from the case and
    templates folders. The one PDF writer: the report's two copies and the reproduction PDF
    (kit/document.py). The tag tree then gets the table scopes weasyprint drops and, with
    ``copy.declare_ua``, the PDF/UA-1 identification when the structure checks pass (pdftags.py)."""
    from carlos_audit.report.pdftags import post_process

    import logging

    from weasyprint import CSS, HTML, Attachment

    logging.getLogger("weasyprint").setLevel(logging.ERROR)
    logging.getLogger("fontTools").setLevel(logging.ERROR)
    _, RefusedFetch = fetcher_classes()
    fetcher = make_url_fetcher(case_dir)
    when = datetime.fromtimestamp(epoch, tz=timezone.utc).replace(tzinfo=None)
    try:
        css = [CSS(url=TEMPLATES_URL + STYLESHEET, url_fetcher=fetcher)] + ([CSS(string=PAGE_CSS[copy.paper])] if copy.paper else [])
        doc = HTML(string=html, base_url=CASE_URL, url_fetcher=fetcher)
        # a weasyprint Attachment cannot serve two write_pdf calls: new objects every time
        files = [Attachment(string=data, name=name, description=DESCRIPTIONS.get(name, name),
                            created=when, modified=when, relationship="Data", url_fetcher=fetcher)
                 for name, data in copy.attachments.items()]
        data = doc.write_pdf(stylesheets=css, attachments=files, pdf_variant=copy.variant, pdf_tags=True,
                             pdf_identifier=copy.identifier.encode(), uncompressed_pdf=False)
    except RefusedFetch as e:
        raise AuditError(f"report rendering stopped: {e}") from None
    return post_process(data, html, declare_ua=copy.declare_ua)
