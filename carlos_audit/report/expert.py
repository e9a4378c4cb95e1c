"""Expert-report sections, from the optional ``[expert]`` table of the case file.

What the tool can state it fills in: the materials considered (every input with its sha256,
size, role and source as stated), the exhibit index, who ran the measurement on which machine.
What only the expert can write (qualifications, instructions, range of opinion, conclusions,
declarations) gets a clearly marked place, "to be completed by the expert", and is never filled
in. The required contents are printed in the rules' own words, from report/rules.py (each entry
quoted verbatim from a named copy, or labelled a paraphrase):

- ``us-frcp26``: US Federal Rule of Civil Procedure 26(a)(2)(B), its lead-in and (i)-(vi); at the
  end of the report, the signature and the two forms of a 28 U.S.C. § 1746 declaration;
- ``uk-cpr35``: England and Wales PD 35 paragraphs 3.1 and 3.2(1)-(9) with CPR 35.10(3); at the end
  of the report, after the appendices, the CPR 35.10(2) statement of duty and the PD 35 3.3
  statement of truth;
- ``none``: the materials and exhibits only.

Without ``[expert]`` none of this appears and the report is as before.
"""

from __future__ import annotations

from carlos_audit.record_sections import Environment
from carlos_audit.records import CaseInfo, Comparison, Manifest
from carlos_audit.report.claimed_section import claimed_materials
from carlos_audit.report import rules
from carlos_audit.report.text import ellipsis

TO_COMPLETE = "TO BE COMPLETED BY THE EXPERT"

# Each layout names its rule texts by key (report/rules.py holds the words). An item lists the
# texts it prints and what this report provides towards it (a key of ``hints``) or None. The
# closing entries come after the appendices, at the end of the report.
LAYOUTS = {
    "us-frcp26": {
        "title": "US Federal Rule of Civil Procedure 26(a)(2)(B)",
        "intro": "frcp26-lead",
        "items": [
            ("(i)", ["frcp26-i"], None),
            ("(ii)", ["frcp26-ii"], "considered"),
            ("(iii)", ["frcp26-iii"], "exhibits"),
            ("(iv)", ["frcp26-iv"], None),
            ("(v)", ["frcp26-v"], None),
            ("(vi)", ["frcp26-vi"], None),
        ],
        "closing_title": "Signature and declaration",
        "closing": [
            {"title": "Declaration under 28 U.S.C. § 1746", "lead": "usc1746-lead", "form": ["usc1746-1", "usc1746-2"],
             "box": "if the report is to be verified by an unsworn declaration: the form above that applies (executed within "
                    "or outside the United States), in the statute's words or substantially so, with the date"},
        ],
        "signature": "the witness's signature (FRCP 26(a)(2)(B): the report is prepared and signed by the witness), name",
    },
    "uk-cpr35": {
        "title": "England and Wales: CPR 35.10 and Practice Direction 35 paragraphs 3.1 to 3.3",
        "intro": None,
        "items": [
            ("3.1", ["pd35-3.1"], "addressee"),
            ("3.2", ["pd35-3.2"], "lead"),
            ("3.2(1)", ["pd35-3.2(1)"], None),
            ("3.2(2)", ["pd35-3.2(2)"], "relied_on"),
            ("3.2(3)", ["pd35-3.2(3)", "cpr35.10-3"], "instructions"),
            ("3.2(4)", ["pd35-3.2(4)"], None),
            ("3.2(5)", ["pd35-3.2(5)"], "operator"),
            ("3.2(6)", ["pd35-3.2(6)"], None),
            ("3.2(7)", ["pd35-3.2(7)"], None),
            ("3.2(8)", ["pd35-3.2(8)"], None),
            ("3.2(9)", ["pd35-3.2(9)"], "at_end"),
        ],
        "closing_title": "Declarations",
        "closing": [
            {"title": "Statement of the expert's duty to the court", "lead": "cpr35.10-2", "also": ["pd35-3.2(9)"], "form": [],
             "box": "the statement that the expert understands and has complied with their duty to the court (CPR 35.10(2)) "
                    "and the statement required by PD 35 paragraph 3.2(9), in the expert's own words"},
            {"title": "Statement of truth", "lead": "pd35-3.3", "form": ["pd35-3.3-form-1", "pd35-3.3-form-2"], "box": None},
        ],
        "signature": "the expert's signature under the statement of truth, name",
    },
}


def hints(expert: dict, manifest: Manifest) -> dict:
    """What this report provides towards an item, in words that claim no more than it does:
    {key: (text, id of the heading it points to or None)}."""
    env = manifest.environment or Environment.from_json({})
    who = manifest.case.examiner if "examiner" in manifest.case else "?"
    machine = env.machine or env.platform or "the machine in the environment appendix"
    instructions = expert.instructions
    stated = (f"The case file states these instructions: “{ellipsis(instructions, 1500)}”. " if instructions
              else "The case file states no instructions. ")
    return {
        "considered": ("The facts and data the measurement considered are listed, with sha256, in", "materials-considered"),
        "relied_on": ("The materials the measurement considered are listed, with sha256, in", "materials-considered",
                      "That is not a list of what the expert relied on: the expert states which of these, and what other "
                      "literature or material, they relied on in making the report."),
        "instructions": (stated + "The expert states the substance of all material instructions, whether written or oral "
                         "(instructions given orally included); the case file's text is not a complete record of them.", None),
        "operator": (f"The measurement was run with carlos-audit by {who} (the case file's examiner) on {machine}, device "
                     f"{env.device if 'device' in env else '?'}. This report does not record that person's qualifications, nor whether the "
                     "measurement was carried out under the expert's supervision: the expert states both.", None),
        "exhibits": ("The exhibits are listed in", "exhibit-index"),
        "addressee": ("This measurement report is addressed to no one; the expert addresses the report to the court.", None),
        "at_end": ("The expert makes this statement together with the CPR 35.10(2) statement, in", "expert-closing"),
    }


def rule_context(jurisdiction: str, expert: dict, manifest: Manifest) -> dict | None:
    """The chosen layout with its texts resolved from report/rules.py, or None."""
    layout = LAYOUTS.get(jurisdiction)
    if layout is None:
        return None
    said = hints(expert, manifest)
    used: list[str] = []

    def texts(keys):
        used.extend(k for k in keys if k not in used)
        return [rules.text(k) for k in keys]

    intro = texts([layout["intro"]])[0] if layout["intro"] else None
    items = []
    for item, keys, h in layout["items"]:
        said_text, ref, after = (said[h] + ("",))[:3] if h in said else (None, None, "")
        items.append({"item": item, "texts": texts(keys), "provided": said_text, "ref": ref, "after": after,
                      "lead": h == "lead", "box": h not in ("at_end", "lead")})
    closing = [{"title": c["title"], "lead": texts([c["lead"]])[0], "also": texts(c.get("also", [])),
                "form": texts(c["form"]), "box": c["box"]} for c in layout["closing"]]
    return {"title": layout["title"], "intro": intro, "entries": items, "closing_title": layout["closing_title"],
            "closing": closing, "signature": layout["signature"], "sources": [rules.text(k) for k in used]}


def materials_considered(manifest: Manifest, comparison: Comparison | None, provided: list[str]) -> list[dict]:
    """Every input the measurement used, with what identifies it, then the materials the case
    file says were provided (as stated; not read or hashed by the tool)."""
    rows = []
    for i in manifest.inputs:
        rows.append({"role": str(i.role if "role" in i else "?"), "source": str(i.path if "path" in i else ""),
                     "size": i.size, "sha256": i.sha256, "kind": i.kind if "kind" in i else "file", "hashed": True})
    claimed_materials(manifest, rows)  # claimed works: role and source as stated (report/claimed_section.py)
    for role, rec in (("base model", manifest.base_model), ("image embedder", manifest.embedder)):
        if rec and not any(r["sha256"] == rec.sha256 for r in rows):
            rows.append({"role": role, "source": str(rec.identity if "identity" in rec else ""), "size": None,
                         "sha256": rec.sha256, "kind": "model", "hashed": bool(rec.sha256)})
    proto = manifest.protocol
    if proto.prompts_sha256:
        rows.append({"role": "prompt suite", "source": str(proto.prompts if "prompts" in proto else ""), "size": None,
                     "sha256": proto.prompts_sha256, "kind": "prompts", "hashed": True})
    corpus = comparison.corpus if comparison is not None else None
    if corpus:
        hashes = corpus.corpus_sha256 if isinstance(corpus.corpus_sha256, dict) else {}
        rows.append({"role": "reference corpus", "source": ellipsis(corpus.name or "(unnamed)", 120), "size": None,
                     "sha256": next((v for _, v in sorted(hashes.items()) if v), None), "kind": "corpus", "hashed": bool(hashes)})
    for text in provided:
        rows.append({"role": "provided to the expert (as stated)", "source": ellipsis(text, 300), "size": None, "sha256": None,
                     "kind": "stated", "hashed": False})
    return rows


def exhibit_index(case: CaseInfo, companions: list[dict], archive_sha256: str | None, n_images: int) -> list[dict]:
    """The exhibit and its parts, each with what identifies it."""
    label = case.exhibit or "Exhibit"
    rows = [{"label": label, "what": "this report (filing copy, report.pdf)", "sha256": None,
             "note": "its sha256 is in report.pdf.sha256 beside it"}]
    if archive_sha256:
        rows.append({"label": f"{label}.1", "what": "archive copy (report-archive.pdf: PDF/A-3 with the JSON files embedded)",
                     "sha256": archive_sha256, "note": ""})
    for k, c in enumerate(companions, start=len(rows)):
        rows.append({"label": f"{label}.{k}", "what": c["name"], "sha256": c["sha256"], "note": f"{c['size']:,} bytes"})
    rows.append({"label": f"{label}.{len(rows)}", "what": f"the {n_images} images of the run (case folder images/)", "sha256": None,
                 "note": "each image's sha256 is in manifest.json and in the seed manifest appendix"})
    return rows


def expert_context(expert, manifest: Manifest, comparison: Comparison | None, companions: list[dict],
                   archive_sha256: str | None, n_images: int) -> dict:
    """The ``expert`` entry of the report context (``expert``: the case's [expert] table,
    case.casefile.ExpertSpec): {"present": False} without [expert]."""
    if expert is None or not expert.name:
        return {"present": False}
    jurisdiction = expert.jurisdiction or "none"
    return {
        "present": True,
        "name": ellipsis(expert.name, 200),
        "role": ellipsis(expert.role or "", 300),
        "instructions": ellipsis(expert.instructions or "", 1500),
        "jurisdiction": jurisdiction,
        "rule": rule_context(jurisdiction, expert, manifest),
        "materials": materials_considered(manifest, comparison, expert.materials_provided or []),
        "exhibits": exhibit_index(manifest.case, companions, archive_sha256, n_images),
        "to_complete": TO_COMPLETE,
    }
