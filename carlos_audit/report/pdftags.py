"""What the tag tree weasyprint writes lacks, added after it writes the PDF (render.write_pdf).

weasyprint (``pdf_tags=True``) writes a /TH structure element for every HTML ``<th>``, with an
/ID that its data cells' /Headers name, but it drops the HTML ``scope``. PDF/UA checkers that
look for the association on the header cell itself (ISO 14289-1 7.5; ``pdfua`` rule UA-15-003)
then find none. ``add_table_scopes`` gives each /TH the standard table attribute
``/A << /O /Table /Scope /Column >>`` (or ``/Row``): the HTML's ``scope``, which the templates
give by place (column headers in ``<thead>``, row headers in the body; checked).

``declare_pdfua`` adds the PDF/UA-1 identification (``pdfuaid:part`` 1, with the PDF/A extension
schema that PDF/A requires for a property outside its own schemas) to the XMP metadata, only when
the structure checks that can be run here pass (``ua_problems``: tagged, document language, title
shown, headings without a skipped level, every figure with alternative text, every table with
header cells that carry a scope and data cells that name them). Those checks are a subset of
PDF/UA-1; docs/ARCHITECTURE.md says which were run and which not.

Both are pure functions of the bytes: the same input gives the same output.
"""

from __future__ import annotations

import io
from html.parser import HTMLParser

from carlos_audit.errors import AuditError

SCOPES = {"col": "/Column", "colgroup": "/Column", "row": "/Row", "rowgroup": "/Row"}
PDFUAID = "http://www.aiim.org/pdfua/ns/id/"
RDF = "http://www.w3.org/1999/02/22-rdf-syntax-ns#"
PDFA_EXT = "http://www.aiim.org/pdfa/ns/extension/"
PDFA_SCHEMA = "http://www.aiim.org/pdfa/ns/schema#"
PDFA_PROPERTY = "http://www.aiim.org/pdfa/ns/property#"


class _HeaderScopes(HTMLParser):
    """Every ``<th>`` of an HTML document: (inside ``<thead>``, its ``scope`` or "")."""

    def __init__(self):
        super().__init__()
        self.cells: list[tuple[bool, str]] = []
        self.thead = 0

    def handle_starttag(self, tag, attrs):
        if tag == "thead":
            self.thead += 1
        elif tag == "th":
            self.cells.append((bool(self.thead), (dict(attrs).get("scope") or "").strip().lower()))

    def handle_endtag(self, tag):
        if tag == "thead" and self.thead:
            self.thead -= 1


def check_header_scopes(html: str) -> None:
    """The HTML's scopes follow the one convention the tag tree can carry them by: ``scope="col"``
    in ``<thead>``, ``scope="row"`` in the body (a ``<th>`` without scope takes its place's)."""
    parser = _HeaderScopes()
    parser.feed(html)
    parser.close()
    for i, (in_head, scope) in enumerate(parser.cells, start=1):
        if scope and SCOPES.get(scope) is None or SCOPES.get(scope, "/Column" if in_head else "/Row") != (
                "/Column" if in_head else "/Row"):
            raise AuditError(f"report template: table header cell {i} has scope={scope!r} "
                             f"{'inside' if in_head else 'outside'} <thead>; column headers go in <thead>, row headers in the body")


def struct_elements(pdf, role: str) -> list:
    """The structure elements with the given role (e.g. "/TH"), in document order."""
    return [n for n, _ in _walk(pdf) if n.S == role]


def _walk(pdf):
    """(structure element, inside a /THead) for every element, in document order."""
    import pikepdf

    root = pdf.Root.get("/StructTreeRoot")
    stack = [(root.get("/K"), False)] if root is not None else []
    while stack:
        node, in_head = stack.pop()
        if isinstance(node, pikepdf.Array):
            stack.extend((k, in_head) for k in reversed(list(node)))
        elif isinstance(node, pikepdf.Dictionary) and "/S" in node:
            yield node, in_head
            if "/K" in node:
                stack.append((node.K, in_head or node.S == "/THead"))


def _table_attributes(th):
    """The /A dictionary of a /TH with owner /Table (made when absent)."""
    import pikepdf

    attrs = th.get("/A")
    if isinstance(attrs, pikepdf.Dictionary) and attrs.get("/O") == "/Table":
        return attrs
    table = pikepdf.Dictionary(O=pikepdf.Name.Table)
    if attrs is None:
        th.A = table
    elif isinstance(attrs, pikepdf.Array):
        found = [a for a in attrs if isinstance(a, pikepdf.Dictionary) and a.get("/O") == "/Table"]
        if found:
            return found[0]
        attrs.append(table)
    else:
        th.A = pikepdf.Array([attrs, table])
    return table


def add_table_scopes(pdf, html: str) -> int:
    """Give each /TH its scope: /Column in a /THead, /Row elsewhere, which is the HTML's scope
    (``check_header_scopes``). weasyprint splits a table that crosses a page into one /Table per
    page and repeats its /THead there, so the tag tree can hold more header cells than the HTML:
    the scope is read from the cell's place, never matched by count. Returns how many."""
    import pikepdf

    check_header_scopes(html)
    n = 0
    for node, in_head in _walk(pdf):
        if node.S == "/TH":
            _table_attributes(node).Scope = pikepdf.Name.Column if in_head else pikepdf.Name.Row
            n += 1
    return n


def ua_problems(pdf) -> list[str]:
    """What stops this file from declaring PDF/UA-1, by the checks that can be run here."""
    from carlos_audit.report.preflight import heading_skips, structure

    st = structure(pdf)
    problems = []
    if not st["tagged"]:
        return ["not tagged"]
    if not st["lang"]:
        problems.append("no document language")
    prefs = pdf.Root.get("/ViewerPreferences") or {}
    if not bool(prefs.get("/DisplayDocTitle", False)):
        problems.append("the viewer is not told to show the document title")
    if not pdf.open_metadata().get("dc:title"):
        problems.append("no dc:title in the XMP metadata")
    problems += heading_skips(st["headings"])
    if st["figures_without_alt"]:
        problems.append(f"{st['figures_without_alt']} figure(s) without alternative text")
    if st["tables_without_headers"] or st["cells_without_headers"] or st["headers_without_scope"]:
        problems.append(f"{st['tables_without_headers']} table(s) without header cells, {st['cells_without_headers']} data "
                        f"cell(s) not linked to a header, {st['headers_without_scope']} header cell(s) without a scope")
    return problems


def _pdfuaid_xml() -> bytes:
    """An rdf:Description with pdfuaid:part 1 and the PDF/A extension schema describing it."""
    return (f'<rdf:Description xmlns:rdf="{RDF}" xmlns:pdfuaid="{PDFUAID}" xmlns:pdfaExtension="{PDFA_EXT}" '
            f'xmlns:pdfaSchema="{PDFA_SCHEMA}" xmlns:pdfaProperty="{PDFA_PROPERTY}" rdf:about="">'
            '<pdfuaid:part>1</pdfuaid:part>'
            '<pdfaExtension:schemas><rdf:Bag><rdf:li rdf:parseType="Resource">'
            '<pdfaSchema:schema>PDF/UA Universal Accessibility Schema</pdfaSchema:schema>'
            f'<pdfaSchema:namespaceURI>{PDFUAID}</pdfaSchema:namespaceURI>'
            '<pdfaSchema:prefix>pdfuaid</pdfaSchema:prefix>'
            '<pdfaSchema:property><rdf:Seq><rdf:li rdf:parseType="Resource">'
            '<pdfaProperty:name>part</pdfaProperty:name><pdfaProperty:valueType>Integer</pdfaProperty:valueType>'
            '<pdfaProperty:category>internal</pdfaProperty:category>'
            '<pdfaProperty:description>Indicates, which part of ISO 14289 standard is followed</pdfaProperty:description>'
            '</rdf:li></rdf:Seq></pdfaSchema:property>'
            '</rdf:li></rdf:Bag></pdfaExtension:schemas></rdf:Description>').encode()


def declare_pdfua(pdf) -> list[str]:
    """Add the PDF/UA-1 identification to the XMP metadata when ``ua_problems`` finds nothing;
    returns the problems (empty: declared)."""
    from lxml import etree

    problems = ua_problems(pdf)
    if problems:
        return problems
    meta = pdf.Root.Metadata
    tree = etree.fromstring(meta.read_bytes(), etree.XMLParser(remove_blank_text=False, resolve_entities=False))
    rdf = tree if tree.tag == f"{{{RDF}}}RDF" else tree.find(f".//{{{RDF}}}RDF")
    if rdf is None:
        raise AuditError("report rendering: the XMP metadata has no rdf:RDF element")
    rdf.append(etree.fromstring(_pdfuaid_xml()))
    meta.write(etree.tostring(tree.getroottree(), encoding="utf-8", xml_declaration=False))  # the xpacket PIs kept
    return []


def post_process(data: bytes, html: str, *, declare_ua: bool) -> bytes:
    """The PDF with its table scopes written (and, with ``declare_ua``, PDF/UA-1 declared when the
    checks pass), saved keeping its PDF version, the first part of its /ID and uncompressed XMP."""
    import pikepdf

    with pikepdf.open(io.BytesIO(data)) as pdf:
        add_table_scopes(pdf, html)
        if declare_ua:
            declare_pdfua(pdf)
        out = io.BytesIO()
        pdf.save(out, deterministic_id=True, compress_streams=True, object_stream_mode=pikepdf.ObjectStreamMode.preserve,
                 min_version=pdf.pdf_version)
    return out.getvalue()
