"""Pre-flight check of a PDF against what courts' e-filing systems accept, and of its tagged
structure (accessibility). Reads the PDF with pikepdf; changes nothing.

    carlos-audit preflight reports/demo/report.pdf [--max-mb 35] [--paper a4|letter] [--json]

Filing (US NextGen CM/ECF and others reject these): no embedded files, no JavaScript or
automatic actions, no form fields, not encrypted, no links out of the document, text extractable
on every page, every font embedded, every page of the configured size, the file under the size
limit (MB = 1,000,000 bytes). When the file is too large the check says which chapters hold the
bytes, so the filing copy can be made smaller (``[report] max_pairs_in_body``,
``[report] filing_image_px``; the archive copy keeps everything).

Structure (what PDF/UA checkers look at first): tagged (a structure tree, /MarkInfo), document
language, headings that never skip a level, every figure with alternative text, every table
with header cells that carry their scope and are linked to its data cells.

``render_report`` runs this on report.pdf after each rendering.
"""

from __future__ import annotations

from pathlib import Path

from carlos_audit.errors import AuditError

PAPER_POINTS = {"a4": (595.28, 841.89), "letter": (612.0, 792.0)}
MB = 1_000_000
TEXT_OPERATORS = {"Tj", "TJ", "'", '"'}
BAD_ACTIONS = {"/JavaScript", "/Launch", "/SubmitForm", "/ImportData", "/ResetForm", "/Rendition", "/Sound", "/Movie"}


def _check(name: str, ok: bool, detail: str) -> dict:
    return {"check": name, "ok": bool(ok), "detail": detail}


def _walk_objects(pdf):
    """Every dictionary object of the file (direct ones inside arrays and dicts too)."""
    import pikepdf

    seen = set()
    stack = list(pdf.objects)
    while stack:
        obj = stack.pop()
        if isinstance(obj, pikepdf.Stream):
            obj = obj.stream_dict
        if isinstance(obj, pikepdf.Dictionary):
            if obj.is_indirect:
                key = obj.objgen
                if key in seen:
                    continue
                seen.add(key)
            yield obj
            for k in obj.keys():
                v = obj.get(k)
                if isinstance(v, (pikepdf.Dictionary, pikepdf.Array)) and not v.is_indirect:
                    stack.append(v)
        elif isinstance(obj, pikepdf.Array):
            for v in obj:
                if isinstance(v, (pikepdf.Dictionary, pikepdf.Array)) and not v.is_indirect:
                    stack.append(v)


def active_content(pdf) -> dict:
    """Embedded files, scripts and actions, form fields, outbound links: lists of findings."""
    root = pdf.Root
    names = root.get("/Names") or {}
    found = {"embedded": [], "scripts": [], "forms": [], "links": []}
    if "/EmbeddedFiles" in names:
        found["embedded"].append("/EmbeddedFiles name tree")
    if "/AF" in root:
        found["embedded"].append("/AF (associated files) in the catalog")
    if "/JavaScript" in names:
        found["scripts"].append("/JavaScript name tree")
    for key in ("/OpenAction", "/AA"):
        if key in root:
            found["scripts"].append(f"{key} in the catalog")
    if "/AcroForm" in root:
        found["forms"].append("/AcroForm in the catalog")
    for obj in _walk_objects(pdf):
        t, s = obj.get("/Type"), obj.get("/S")
        if t == "/Filespec" and "/EF" in obj:
            found["embedded"].append("a file specification with an embedded file")
        if "/JS" in obj or (s is not None and str(s) in BAD_ACTIONS):
            found["scripts"].append(f"an action {s}" if s is not None else "a /JS entry")
        if obj.get("/Subtype") == "/FileAttachment":
            found["embedded"].append("a file attachment annotation")
        if obj.get("/Subtype") == "/Widget" or obj.get("/FT") is not None:
            found["forms"].append("a form field")
        if s == "/URI" or s == "/GoToR" or s == "/GoToE":
            found["links"].append(f"a link {s}: {str(obj.get('/URI', ''))[:80]}")
    for page in pdf.pages:
        if "/AA" in page.obj:
            found["scripts"].append("/AA (automatic actions) on a page")
    return {k: sorted(set(v)) for k, v in found.items()}


def _fonts(resources, seen: set) -> list:
    """The font dictionaries reachable from a resource dictionary (form XObjects included)."""
    import pikepdf

    out = []
    if not isinstance(resources, pikepdf.Dictionary):
        return out
    for f in (resources.get("/Font") or {}).values():
        if f.objgen not in seen:
            seen.add(f.objgen)
            out.append(f)
    for x in (resources.get("/XObject") or {}).values():
        if x.get("/Subtype") == "/Form" and x.objgen not in seen:
            seen.add(x.objgen)
            out += _fonts(x.get("/Resources"), seen)
    return out


def font_problems(font) -> list[str]:
    name = str(font.get("/BaseFont", font.get("/Subtype", "?")))
    if font.get("/Subtype") == "/Type3":
        return []  # glyphs drawn by content streams: nothing to embed
    desc_font = font.DescendantFonts[0] if font.get("/Subtype") == "/Type0" else font
    desc = desc_font.get("/FontDescriptor")
    problems = []
    if desc is None or not any(k in desc for k in ("/FontFile", "/FontFile2", "/FontFile3")):
        problems.append(f"font {name} is not embedded")
    if "/ToUnicode" not in font and font.get("/Encoding") not in ("/WinAnsiEncoding", "/MacRomanEncoding", "/StandardEncoding"):
        problems.append(f"font {name} has no Unicode mapping (its text cannot be extracted)")
    return problems


def pages_and_fonts(pdf, paper: str | None) -> tuple[list[str], list[str], list[str]]:
    """(pages without extractable text, font problems, page size problems)."""
    import pikepdf

    no_text, fonts, sizes, seen = [], [], [], set()
    want = PAPER_POINTS.get(paper) if paper else None
    first = None
    for i, page in enumerate(pdf.pages, start=1):
        for f in _fonts(page.obj.get("/Resources"), seen):
            fonts += font_problems(f)
        ops = {str(op) for _, op in pikepdf.parse_content_stream(page)}
        if not ops & TEXT_OPERATORS:
            no_text.append(str(i))
        box = [float(v) for v in page.mediabox]
        w, h = box[2] - box[0], box[3] - box[1]
        first = first or (w, h)
        ref = want or first
        if abs(w - ref[0]) > 1 or abs(h - ref[1]) > 1:
            sizes.append(f"page {i} is {w:.0f} x {h:.0f} pt")
    if want is None and first and not any(abs(first[0] - a) <= 1 and abs(first[1] - b) <= 1 for a, b in PAPER_POINTS.values()):
        sizes.append(f"pages are {first[0]:.0f} x {first[1]:.0f} pt, neither A4 nor US letter")
    return no_text, sorted(set(fonts)), sizes


def structure(pdf) -> dict:
    """The tagged structure: language, the heading sequence, figures, tables."""
    import pikepdf

    root = pdf.Root
    out = {"tagged": bool("/StructTreeRoot" in root and (root.get("/MarkInfo") or {}).get("/Marked")),
           "lang": str(root.get("/Lang", "")), "headings": [], "figures": 0, "figures_without_alt": 0,
           "tables": 0, "tables_without_headers": 0, "cells_without_headers": 0, "headers_without_scope": 0}
    if not out["tagged"]:
        return out
    stack = [(root.StructTreeRoot.get("/K"), None)]
    while stack:
        node, table = stack.pop()
        if isinstance(node, pikepdf.Array):
            stack.extend((k, table) for k in reversed(list(node)))
            continue
        if not isinstance(node, pikepdf.Dictionary) or node.get("/Type", "/StructElem") != "/StructElem" or "/S" not in node:
            continue
        s = str(node.S)[1:]
        if len(s) == 2 and s[0] == "H" and s[1].isdigit():
            out["headings"].append(int(s[1]))
        elif s == "Figure":
            out["figures"] += 1
            out["figures_without_alt"] += not str(node.get("/Alt", "")).strip()
        elif s == "Table":
            out["tables"] += 1
            table = {"th": 0}
            out["_tables"] = out.get("_tables", []) + [table]
        elif s == "TH" and table is not None:
            table["th"] += 1
            attrs = node.get("/A")
            attrs = list(attrs) if isinstance(attrs, pikepdf.Array) else [attrs] if attrs is not None else []
            out["headers_without_scope"] += not any(isinstance(a, pikepdf.Dictionary) and "/Scope" in a for a in attrs)
        elif s == "TD" and table is not None:
            attrs = node.get("/A") or {}
            table["td_missing"] = table.get("td_missing", 0) + (not len(attrs.get("/Headers", [])))
        kids = node.get("/K")
        if kids is not None:
            stack.append((kids, table))
    for t in out.pop("_tables", []):
        out["tables_without_headers"] += t["th"] == 0
        out["cells_without_headers"] += t.get("td_missing", 0) if t["th"] else 0
    return out


def heading_skips(levels: list[int]) -> list[str]:
    skips, prev = [], 0
    for i, lvl in enumerate(levels):
        if lvl > prev + 1:
            skips.append(f"heading {i + 1} is H{lvl} after H{prev or '(none)'}")
        prev = lvl
    return skips


def section_sizes(pdf) -> list[dict]:
    """Bytes of images and page content per chapter (outline entries at the top level),
    largest first: where the file's size comes from."""
    import pikepdf

    starts = []
    with pdf.open_outline() as outline:
        for item in outline.root:
            try:  # weasyprint writes explicit destinations: [page /XYZ left top zoom]
                starts.append((pdf.pages.index(pikepdf.Page(item.destination[0])), item.title))
            except (TypeError, IndexError, ValueError, AttributeError):
                continue
    starts.sort()
    counted: set = set()

    def drawn(obj, resources) -> int:
        """Bytes of the XObjects a content stream draws (each counted once in the file)."""
        n = 0
        xobjects = (resources or {}).get("/XObject") or {}
        for operands, _ in pikepdf.parse_content_stream(obj, "Do"):
            x = xobjects.get(str(operands[0])) if operands else None
            if x is None or x.objgen in counted:
                continue
            counted.add(x.objgen)
            n += len(x.read_raw_bytes())
            if x.get("/Subtype") == "/Form":
                n += drawn(x, x.get("/Resources") or resources)
        return n

    per_page = []
    for page in pdf.pages:
        contents = page.obj.get("/Contents")
        streams = [contents] if isinstance(contents, pikepdf.Stream) else list(contents or [])
        per_page.append(sum(len(c.read_raw_bytes()) for c in streams) + drawn(page, page.obj.get("/Resources")))
    bounds = starts + [(len(per_page), None)]
    sections = [{"title": "cover and contents", "bytes": sum(per_page[:bounds[0][0]])}] if starts else []
    for (start, title), (end, _) in zip(bounds, bounds[1:]):
        sections.append({"title": title, "bytes": sum(per_page[start:end]), "pages": f"{start + 1}-{end}"})
    return sorted(sections, key=lambda s: -s["bytes"])


def preflight(pdf_path: Path, max_mb: float = 35.0, paper: str | None = None) -> dict:
    """Check one PDF for filing; returns {"pdf", "ok", "size_bytes", "pages", "checks": [...],
    "structure": {...}, "sections": [...] (when over the limit), "advice"}."""
    import pikepdf

    pdf_path = Path(pdf_path)
    if not pdf_path.is_file():
        raise AuditError(f"{pdf_path} does not exist")
    size = pdf_path.stat().st_size
    try:
        pdf = pikepdf.open(pdf_path)
    except pikepdf.PasswordError:
        raise AuditError(f"{pdf_path} is password-protected; courts reject encrypted PDFs") from None
    except pikepdf.PdfError as e:
        raise AuditError(f"{pdf_path} is not a readable PDF: {e}") from None
    with pdf:
        found = active_content(pdf)
        no_text, fonts, sizes = pages_and_fonts(pdf, paper)
        st = structure(pdf)
        meta = pdf.open_metadata()
        pdfa = f"{meta.get('pdfaid:part', '')}{meta.get('pdfaid:conformance', '')}"
        skips = heading_skips(st["headings"])
        checks = [
            _check("no embedded files", not found["embedded"], "; ".join(found["embedded"]) or "none"),
            _check("no JavaScript or automatic actions", not found["scripts"], "; ".join(found["scripts"][:5]) or "none"),
            _check("no form fields", not found["forms"], "; ".join(found["forms"][:5]) or "none (no signature field either)"),
            _check("not encrypted", not pdf.is_encrypted, "encrypted" if pdf.is_encrypted else "no password or permissions set"),
            _check("no links out of the document", not found["links"], "; ".join(found["links"][:3]) or "none"),
            _check("text extractable on every page", not no_text,
                   f"no text on page(s) {', '.join(no_text[:10])}" if no_text else f"text on all {len(pdf.pages)} pages"),
            _check("fonts embedded", not fonts, "; ".join(fonts[:5]) or "every font embedded, with a Unicode mapping"),
            _check("page size", not sizes, "; ".join(sizes[:3]) or f"every page {(paper or 'A4 or letter').upper()}"),
            _check("size", size <= max_mb * MB, f"{size / MB:.2f} MB (limit {max_mb:g} MB)"),
            _check("tagged (accessibility)", st["tagged"] and bool(st["lang"]),
                   f"structure tree present, language {st['lang']!r}" if st["tagged"] and st["lang"]
                   else "no structure tree" if not st["tagged"] else "no document language"),
            _check("headings in order", st["tagged"] and not skips,
                   "; ".join(skips[:3]) or f"{len(st['headings'])} headings, no level skipped"),
            _check("figures have alternative text", st["tagged"] and not st["figures_without_alt"],
                   f"{st['figures_without_alt']} of {st['figures']} figures lack it" if st["figures_without_alt"]
                   else f"all {st['figures']} figures"),
            _check("tables have header cells", st["tagged"] and not (st["tables_without_headers"] or st["cells_without_headers"]
                                                                     or st["headers_without_scope"]),
                   f"{st['tables_without_headers']} table(s) without header cells, {st['cells_without_headers']} data cell(s) "
                   f"not linked to a header, {st['headers_without_scope']} header cell(s) without a scope"
                   if (st["tables_without_headers"] or st["cells_without_headers"] or st["headers_without_scope"])
                   else f"all {st['tables']} tables, every header cell with its scope"),
        ]
        result = {"pdf": str(pdf_path), "ok": all(c["ok"] for c in checks), "size_bytes": size, "pages": len(pdf.pages),
                  "pdfa": pdfa or None, "max_mb": max_mb, "paper": paper, "checks": checks,
                  "structure": {k: v for k, v in st.items() if k != "headings"} | {"n_headings": len(st["headings"])}}
        if size > max_mb * MB:
            result["sections"] = section_sizes(pdf)
            top = result["sections"][0] if result["sections"] else None
            result["advice"] = ((f"largest: {top['title']} ({top['bytes'] / MB:.1f} MB). " if top else "")
                                + "Make the filing copy smaller with [report] max_pairs_in_body = N (fewer pairs shown full size) "
                                "or [report] filing_image_px = N (smaller body images), then `carlos-audit report CASE_DIR`; "
                                "the archive copy keeps everything.")
    return result


def summary(result: dict) -> str:
    """One line: the failed checks (or 'passed')."""
    failed = [f"{c['check']} ({c['detail']})" for c in result["checks"] if not c["ok"]]
    if not failed:
        return f"passed ({result['pages']} pages, {result['size_bytes'] / MB:.2f} MB)"
    return "; ".join(failed) + (f". {result['advice']}" if result.get("advice") else "")
