"""The expert-report rules as the rules say them (report/rules.py), where the rules put them, and
the filing copy an independent PDF/UA checker (pdfua) passes.

Each printed rule text is compared with the stored entry in the filing copy's text (pdftotext);
the UK declarations are checked to come last, after the appendices; the § 1746 form word for word.
"""

from __future__ import annotations

import io
import re
import subprocess
from pathlib import Path

import pikepdf
import pytest
from conftest import REPO, copy_case

from carlos_audit.errors import AuditError
from carlos_audit.report import FILING_PDF, ARCHIVE_PDF, render_report
from carlos_audit.report import rules
from carlos_audit.report.expert import LAYOUTS
from carlos_audit.report.outline import Outline
from carlos_audit.report.pdftags import check_header_scopes, post_process, struct_elements

EXPERT = {
    "uk-cpr35": '[expert]\nname = "Dr A. Example"\nrole = "independent expert"\n'
                'instructions = "Say whether the LoRA changes images systematically."\njurisdiction = "uk-cpr35"\n',
    "us-frcp26": '[expert]\nname = "J. Doe"\nrole = "retained expert"\njurisdiction = "us-frcp26"\n',
}
FURNITURE = re.compile(r"^(Case demo · Exhibit D-1 page \d+ of \d+|Case demo · Exhibit D-1|page \d+ of \d+|"
                       r"CARLoS audit report\. Technical indicators, not legal conclusions\.)$")


def pages_of(pdf: Path) -> list[str]:
    """The text of each page (pdftotext -raw), without the running header and footer lines."""
    out = subprocess.run(["pdftotext", "-raw", str(pdf), "-"], capture_output=True, text=True, check=True).stdout
    return [" ".join(l for l in page.split("\n") if l.strip() and not FURNITURE.match(l.strip())) for page in out.split("\f")]


def plain(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture(scope="module")
def expert_copies(demo_case_dir, tmp_path_factory) -> dict:
    """The demo case rendered with each jurisdiction's [expert] table: {jurisdiction: report.pdf}."""
    out = {}
    for jurisdiction, table in EXPERT.items():
        case = copy_case(demo_case_dir, tmp_path_factory.mktemp(jurisdiction) / "c")
        (case / "case.toml").write_text((case / "case.toml").read_text() + "\n" + table)
        out[jurisdiction] = render_report(case)
    return out


@pytest.fixture(scope="module")
def printed(expert_copies) -> dict:
    return {j: plain(" ".join(pages_of(p))) for j, p in expert_copies.items()}


def layout_keys(jurisdiction: str) -> list[str]:
    layout = LAYOUTS[jurisdiction]
    keys = ([layout["intro"]] if layout["intro"] else []) + [k for _, ks, _ in layout["items"] for k in ks]
    for c in layout["closing"]:
        keys += [c["lead"], *c.get("also", []), *c["form"]]
    return keys


FORM_KEYS = {k for layout in LAYOUTS.values() for c in layout["closing"] for k in c["form"]}
ITEMS = [(j, k) for j in LAYOUTS for k in dict.fromkeys(layout_keys(j))]


@pytest.mark.parametrize("jurisdiction, key", ITEMS, ids=[f"{j}:{k}" for j, k in ITEMS])
def test_each_rule_text_is_printed_as_stored_and_labelled(printed, jurisdiction, key):
    entry = rules.text(key)
    text = printed[jurisdiction]
    want = plain(entry.text)
    assert want in text, f"{key}: stored text not printed word for word"
    if key in FORM_KEYS:
        cites = [rules.text(k).cite for c in LAYOUTS[jurisdiction]["closing"] for k in c["form"] if key in c["form"]]
        assert f"The form above is quoted word for word ({'; '.join(cites)};" in text
        return
    before = text[:text.index(want)][-90:]
    label = "quoted" if entry.quoted else "paraphrase, not the rule's words"
    assert before.lower().replace(")", "").endswith(f"{label}: "), (key, before)
    if entry.note:
        assert plain(entry.note) in text
    # the sources table names the copy and the version of every printed entry
    assert plain(entry.version) in text and plain(entry.source).replace(" ", "") in text.replace(" ", "")


def test_rule_table_entries_are_complete():
    assert len({t.key for t in rules.TEXTS}) == len(rules.TEXTS)
    for t in rules.TEXTS:
        assert t.rule and t.text and t.version and t.source, t.key
        if not t.quoted:
            assert t.note, f"{t.key}: a paraphrase says why it is one"
    for j in LAYOUTS:
        for key in layout_keys(j):
            assert key in rules.BY_KEY


def test_us_intro_is_the_rule_s_lead_in_and_1746_form_is_the_statute_s(printed):
    text = printed["us-frcp26"]
    assert ("FRCP 26(a)(2)(B) lead-in (quoted): Unless otherwise stipulated or ordered by the court, this disclosure must be "
            "accompanied by a written report—prepared and signed by the witness—if the witness is one retained or specially "
            "employed to provide expert testimony in the case or one whose duties as the party's employee regularly involve "
            "giving expert testimony.") in text
    assert "text of the rule as published" not in text
    assert "wording is for the expert and counsel to choose" not in text and "Some courts also expect" not in text
    form = ("in substantially the following form: If executed without the United States: “I declare (or certify, verify, or "
            "state) under penalty of perjury under the laws of the United States of America that the foregoing is true and "
            "correct. Executed on (date). (Signature)”. If executed within the United States, its territories, possessions, "
            "or commonwealths: “I declare (or certify, verify, or state) under penalty of perjury that the foregoing is true "
            "and correct. Executed on (date). (Signature)”.")
    assert form in text
    after = text[text.index(form):]
    assert "TO BE COMPLETED BY THE EXPERT: if the report is to be verified by an unsworn declaration" in after
    assert "TO BE COMPLETED BY THE EXPERT: the witness's signature" in after


def test_hints_ask_for_what_the_rule_asks_and_leave_the_statement_to_the_expert(printed):
    uk = printed["uk-cpr35"]

    def item(cite: str, next_cite: str) -> str:
        return uk[uk.index(f"PD 35 {cite} Quoted:") if f"PD 35 {cite} Quoted:" in uk else uk.index(f"PD 35 {cite} Paraphrase"):
                  uk.index(f"PD 35 {next_cite} ")]

    relied = item("3.2(2)", "3.2(3)")
    assert "That is not a list of what the expert relied on" in relied and "they relied on in making the report" in relied
    instructions = item("3.2(3)", "3.2(4)")
    assert "CPR 35.10(3) (quoted): The expert's report must state the substance of all material instructions, whether " \
           "written or oral" in instructions
    assert "Say whether the LoRA changes images systematically." in instructions
    assert "(instructions given orally included)" in instructions and "not a complete record" in instructions
    operator = item("3.2(5)", "3.2(6)")
    assert "does not record that person's qualifications, nor whether the measurement was carried out under the " \
           "expert's supervision: the expert states both" in operator
    assert "addressed to the court and not to the party" in item("3.1", "3.2")
    for part in (relied, instructions, operator):
        assert part.rstrip().endswith("TO BE COMPLETED BY THE EXPERT"), part[-200:]   # an empty box, never filled in
    us = printed["us-frcp26"]
    assert "The facts and data the measurement considered are listed, with sha256, in section" in us


def test_uk_declarations_come_last_after_the_appendices(expert_copies):
    pdf_path = expert_copies["uk-cpr35"]
    with pikepdf.open(pdf_path) as pdf, pdf.open_outline() as outline:
        top = [(item.title, pdf.pages.index(pikepdf.Page(item.destination[0]))) for item in outline.root]
    titles = [t for t, _ in top]
    assert titles[-1] == "Declarations", titles
    appendices = [(t, p) for t, p in top if t.startswith("Appendix ")]
    assert len(appendices) >= 4
    closing_page = top[-1][1]
    assert closing_page >= max(p for _, p in appendices)
    pages = pages_of(pdf_path)
    text = plain(" ".join(pages))
    last_appendix = plain(appendices[-1][0])
    body_from = text.index(last_appendix, text.index(last_appendix) + 1)   # the heading, not the contents entry
    duty = plain(rules.text("cpr35.10-2").text)
    truth = plain(rules.text("pd35-3.3-form-2").text)
    assert body_from < text.index(duty) < text.index(truth)
    # nothing follows the statement of truth but the signature box
    tail = text[text.index(truth) + len(truth):]
    assert tail.startswith(" The form above is quoted word for word") and tail.rstrip().endswith(
        "TO BE COMPLETED BY THE EXPERT: the expert's signature under the statement of truth, name (Dr A. Example) and date")
    assert "Appendix" not in tail and duty in plain(pages[closing_page])


def test_validation_doc_states_fre_702_and_daubert_correctly():
    doc = plain((REPO / "docs" / "VALIDATION.md").read_text())
    assert plain(rules.text("fre702").text) in doc
    assert "one of the non-exclusive factors" in doc and "it is not in the rule's text" in doc
    assert "judged on its known or potential error rate (Daubert; FRE 702)" not in doc


# ----------------------------------------------------------------------------- PDF/UA


def pdfua_report(path: Path):
    """pdfua's report, and the findings of UA-14-001 run with pdfua's number test fixed: pdfua
    0.1.3 asks a pikepdf Array for ``is_integer``, which raises ValueError (pikepdf refuses
    attribute access on arrays), so the rule cannot evaluate any heading whose /K is an array."""
    import pdfua.rules.structure as ua_structure
    from pdfua import validate
    from pdfua.document import PdfDocument

    report = validate(str(path))
    original = ua_structure.as_integer

    def number(value):
        return None if isinstance(value, (pikepdf.Array, pikepdf.Dictionary)) else original(value)

    ua_structure.as_integer = number
    try:
        with PdfDocument.open(str(path)) as doc:
            ua14 = list(ua_structure.EmptyHeadingRule().check(doc))
    finally:
        ua_structure.as_integer = original
    return report, ua14


@pytest.mark.parametrize("which", ["demo", "uk-cpr35", "us-frcp26"])
def test_independent_checker_passes_the_filing_copy(demo_case_dir, expert_copies, which):
    path = demo_case_dir / FILING_PDF if which == "demo" else expert_copies[which]
    report, ua14 = pdfua_report(path)
    findings = [f for o in report.outcomes for f in o.findings]
    assert findings == [], [(f.rule_id, f.message) for f in findings]
    skipped = {o.rule_id: o.skipped_reason for o in report.outcomes if o.skipped_reason}
    assert set(skipped) <= {"UA-14-001"} and all("is_integer" in r for r in skipped.values()), skipped
    assert ua14 == []
    meta = subprocess.run(["pdfinfo", "-meta", str(path)], capture_output=True, text=True, check=True).stdout
    assert "<pdfuaid:part>1</pdfuaid:part>" in meta and 'pdfaid:part="2"' in meta
    assert "<pdfaSchema:prefix>pdfuaid</pdfaSchema:prefix>" in meta   # the PDF/A extension schema for it


def test_every_header_cell_carries_its_scope(demo_case_dir):
    with pikepdf.open(demo_case_dir / FILING_PDF) as pdf:
        scopes = []
        for th in struct_elements(pdf, "/TH"):
            a = th.A
            assert a.O == "/Table" and "/ID" in th
            scopes.append(str(a.Scope))
    assert {"/Column", "/Row"} == set(scopes)
    with pikepdf.open(demo_case_dir / ARCHIVE_PDF) as pdf:
        assert all("/Scope" in th.A for th in struct_elements(pdf, "/TH"))
        assert "pdfuaid" not in pdf.Root.Metadata.read_bytes().decode()   # only the checked filing copy declares


def _tiny_pdf(html: str) -> bytes:
    from weasyprint import HTML

    return HTML(string=html).write_pdf(pdf_variant="pdf/a-2u", pdf_tags=True, pdf_identifier=b"0" * 32)


def test_pdfua_is_declared_only_when_the_checks_pass():
    table = ('<table><thead><tr><th scope="col">A</th></tr></thead><tbody><tr><td>1</td></tr></tbody></table>'
             '<table><tr><th scope="row">K</th><td>v</td></tr></table>')
    good = f'<html lang="en"><head><title>t</title></head><body><h1>T</h1>{table}</body></html>'
    out = post_process(_tiny_pdf(good), good, declare_ua=True)
    assert out == post_process(_tiny_pdf(good), good, declare_ua=True)   # deterministic
    with pikepdf.open(io.BytesIO(out)) as pdf:
        assert [str(th.A.Scope) for th in struct_elements(pdf, "/TH")] == ["/Column", "/Row"]
        assert b"<pdfuaid:part>1</pdfuaid:part>" in pdf.Root.Metadata.read_bytes()
        assert bytes(pdf.trailer.ID[0]) == b"0" * 32   # weasyprint's identifier kept
    bad = good.replace("<h1>T</h1>", '<h1>T</h1><h3>skipped a level</h3><img alt="" src="data:image/png;base64,'
                       'iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR4nGNgYGD4DwABBAEAwS2OUAAAAABJRU5ErkJggg==">')
    with pikepdf.open(io.BytesIO(post_process(_tiny_pdf(bad), bad, declare_ua=True))) as pdf:
        assert b"pdfuaid" not in pdf.Root.Metadata.read_bytes()
    with pytest.raises(AuditError, match="scope='col' outside <thead>"):
        check_header_scopes('<table><tr><th scope="col">A</th></tr></table>')


def test_outline_closing_part_is_unnumbered_last_and_referable():
    first = Outline()
    first.chapter("a", "Results")
    first.appendix("app", "Custody")
    first.closing("end", "Declarations")
    first.section("Statement of truth")
    with pytest.raises(AuditError, match="after the closing part"):
        first.appendix("late", "Too late")
    second = Outline(first.headings)
    assert second.ref("end") == "“Declarations” at the end of the report" and second.ref("app") == "Appendix A"
    assert [(h.number, h.label) for h in first.headings[-2:]] == [("", "Declarations"), ("", "Statement of truth")]


def test_preflight_fails_a_header_cell_without_its_scope(tmp_path):
    from carlos_audit.report.preflight import preflight

    html = ('<html lang="en"><head><title>t</title></head><body><h1>T</h1><table><thead><tr><th scope="col">A</th></tr>'
            '</thead><tbody><tr><td>1</td></tr></tbody></table></body></html>')
    raw, fixed = tmp_path / "raw.pdf", tmp_path / "fixed.pdf"
    raw.write_bytes(_tiny_pdf(html))                       # as weasyprint writes it: no /Scope
    fixed.write_bytes(post_process(raw.read_bytes(), html, declare_ua=False))
    tables = {c["check"]: c for c in preflight(raw)["checks"]}["tables have header cells"]
    assert not tables["ok"] and "1 header cell(s) without a scope" in tables["detail"]
    assert {c["check"]: c for c in preflight(fixed)["checks"]}["tables have header cells"]["ok"]
