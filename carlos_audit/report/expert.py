"""Expert-report sections, from the optional ``[expert]`` table of the case file.

What the tool can state it fills in: the materials considered (every input with its sha256,
size, role and source as stated), the exhibit index, who ran the measurement on which machine.
What only the expert can write (qualifications, instructions, range of opinion, conclusions,
declarations) gets a clearly marked place, "to be completed by the expert", and is never filled
in. The required contents follow the rules' own words:

- ``us-frcp26``: US Federal Rule of Civil Procedure 26(a)(2)(B)(i)-(vi), signed;
- ``uk-cpr35``: England and Wales CPR Part 35, Practice Direction 35 paragraphs 3.2 (1)-(9) and
  the statement of truth of paragraph 3.3;
- ``none``: the materials and exhibits only.

Check the current text of the rule before relying on these lists (they are recorded here as
published in 2026). Without ``[expert]`` none of this appears and the report is as before.
"""

from __future__ import annotations

from carlos_audit.report.claimed import claimed_materials
from carlos_audit.report.text import ellipsis

TO_COMPLETE = "TO BE COMPLETED BY THE EXPERT"

# (item, what the rule requires, what this report already provides or None)
RULES = {
    "us-frcp26": {
        "title": "US Federal Rule of Civil Procedure 26(a)(2)(B)",
        "intro": "A written report of a retained expert witness must be prepared and signed by the witness and must contain:",
        "items": [
            ("(i)", "a complete statement of all opinions the witness will express and the basis and reasons for them", None),
            ("(ii)", "the facts or data considered by the witness in forming them", "materials"),
            ("(iii)", "any exhibits that will be used to summarize or support them", "exhibits"),
            ("(iv)", "the witness's qualifications, including a list of all publications authored in the previous 10 years", None),
            ("(v)", "a list of all other cases in which, during the previous 4 years, the witness testified as an expert at trial or by deposition", None),
            ("(vi)", "a statement of the compensation to be paid for the study and testimony in the case", None),
        ],
        "declaration": None,
        "declaration_note": "The report must be signed by the witness. (Some courts also expect a declaration under 28 U.S.C. § 1746; "
                            "its wording is for the expert and counsel to choose.)",
    },
    "uk-cpr35": {
        "title": "England and Wales: CPR Part 35, Practice Direction 35 paragraphs 3.2 and 3.3",
        "intro": "PD 35 paragraph 3.2: an expert's report must:",
        "items": [
            ("3.2(1)", "give details of the expert's qualifications", None),
            ("3.2(2)", "give details of any literature or other material which has been relied on in making the report", "materials"),
            ("3.2(3)", "contain a statement setting out the substance of all facts and instructions which are material to the "
                       "opinions expressed in the report or upon which those opinions are based", "instructions"),
            ("3.2(4)", "make clear which of the facts stated in the report are within the expert's own knowledge", None),
            ("3.2(5)", "say who carried out any examination, measurement, test or experiment which the expert has used for the "
                       "report, give the qualifications of that person, and say whether or not the test or experiment has been "
                       "carried out under the expert's supervision", "operator"),
            ("3.2(6)", "where there is a range of opinion on the matters dealt with in the report (a) summarise the range of "
                       "opinions; and (b) give reasons for the expert's own opinion", None),
            ("3.2(7)", "contain a summary of the conclusions reached", None),
            ("3.2(8)", "if the expert is not able to give an opinion without qualification, state the qualification", None),
            ("3.2(9)", "contain a statement that the expert (a) understands their duty to the court, and has complied with that "
                       "duty; and (b) is aware of the requirements of Part 35, this practice direction and the Guidance for the "
                       "Instruction of Experts in Civil Claims 2014", None),
        ],
        "declaration": [
            "I confirm that I have made clear which facts and matters referred to in this report are within my own knowledge and "
            "which are not. Those that are within my own knowledge I confirm to be true. The opinions I have expressed represent "
            "my true and complete professional opinions on the matters to which they refer.",
            "I understand that proceedings for contempt of court may be brought against anyone who makes, or causes to be made, a "
            "false statement in a document verified by a statement of truth without an honest belief in its truth.",
        ],
        "declaration_note": "PD 35 paragraph 3.3: the report must be verified by a statement of truth in this form. The expert "
                            "signs it; the tool does not.",
    },
}


def materials_considered(manifest: dict, comparison: dict | None, provided: list[str]) -> list[dict]:
    """Every input the measurement used, with what identifies it, then the materials the case
    file says were provided (as stated; not read or hashed by the tool)."""
    rows = []
    for i in manifest.get("inputs", []):
        rows.append({"role": str(i.get("role", "?")), "source": str(i.get("path", "")), "size": i.get("size"),
                     "sha256": i.get("sha256"), "kind": i.get("kind", "file"), "hashed": True})
    claimed_materials(manifest, rows)  # claimed works: role and source as stated (report/claimed.py)
    for role, key in (("base model", "base_model"), ("image embedder", "embedder")):
        rec = manifest.get(key) or {}
        if rec and not any(r["sha256"] == rec.get("sha256") for r in rows):
            rows.append({"role": role, "source": str(rec.get("identity", "")), "size": None, "sha256": rec.get("sha256"),
                         "kind": "model", "hashed": bool(rec.get("sha256"))})
    proto = manifest.get("protocol") or {}
    if proto.get("prompts_sha256"):
        rows.append({"role": "prompt suite", "source": str(proto.get("prompts", "")), "size": None,
                     "sha256": proto["prompts_sha256"], "kind": "prompts", "hashed": True})
    corpus = (comparison or {}).get("corpus") or {}
    if corpus:
        hashes = corpus.get("corpus_sha256") if isinstance(corpus.get("corpus_sha256"), dict) else {}
        rows.append({"role": "reference corpus", "source": ellipsis(corpus.get("name") or "(unnamed)", 120), "size": None,
                     "sha256": next((v for _, v in sorted(hashes.items()) if v), None), "kind": "corpus", "hashed": bool(hashes)})
    for text in provided:
        rows.append({"role": "provided to the expert (as stated)", "source": ellipsis(text, 300), "size": None, "sha256": None,
                     "kind": "stated", "hashed": False})
    return rows


def exhibit_index(case: dict, companions: list[dict], archive_sha256: str | None, n_images: int) -> list[dict]:
    """The exhibit and its parts, each with what identifies it."""
    label = case.get("exhibit") or "Exhibit"
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


def expert_context(expert: dict, manifest: dict, comparison: dict | None, companions: list[dict],
                   archive_sha256: str | None, n_images: int) -> dict:
    """The ``expert`` entry of the report context: {"present": False} without [expert]."""
    if not (expert or {}).get("name"):
        return {"present": False}
    rule = RULES.get(expert.get("jurisdiction") or "none")
    env = manifest.get("environment") or {}
    operator = (f"The measurement was run with carlos-audit by {manifest.get('case', {}).get('examiner', '?')} "
                f"(case file examiner) on {env.get('machine') or env.get('platform') or 'the machine in the environment appendix'}, "
                f"device {env.get('device', '?')}.")
    filled = {
        "materials": "The materials considered by the measurement are listed in the table above (with sha256).",
        "instructions": ("Instructions received, as stated in the case file: " + ellipsis(expert["instructions"], 1500))
                        if expert.get("instructions") else None,
        "operator": operator,
        "exhibits": "The exhibits are listed in the exhibit index above.",
    }
    items = []
    for item, text, provides in (rule or {}).get("items", []):
        items.append({"item": item, "text": text, "provided": filled.get(provides) if provides else None})
    return {
        "present": True,
        "name": ellipsis(expert["name"], 200),
        "role": ellipsis(expert.get("role") or "", 300),
        "instructions": ellipsis(expert.get("instructions") or "", 1500),
        "jurisdiction": expert.get("jurisdiction") or "none",
        "rule": rule,
        "rule_items": items,
        "materials": materials_considered(manifest, comparison, expert.get("materials_provided") or []),
        "exhibits": exhibit_index(manifest.get("case") or {}, companions, archive_sha256, n_images),
        "to_complete": TO_COMPLETE,
    }
