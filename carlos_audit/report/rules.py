"""The text of the rules on expert reports that the report prints, one entry per item.

Every entry records the rule and paragraph, the text, whether that text is **quoted** verbatim
from a published copy of the official text or is a **paraphrase** (the report labels it so), the
version it reflects and the address of the copy it was taken from. The report prints as "the
rule's text" only what is quoted here, word for word; the tests compare the printed report with
this table.

The official pages were not reachable when these were recorded (late 2026); each entry names the
copy it was checked against (../shared/notes/expert-rules-checked.md has the item-by-item check).
Check the current text of a rule before relying on it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RuleText:
    key: str          # stable identifier, used by the report and the tests
    rule: str         # "FRCP 26(a)(2)(B)", "CPR 35.10", "PD 35", "28 U.S.C. § 1746"
    paragraph: str    # "(i)", "3.2(5)", "(2)", "lead-in"
    text: str         # the words as the copy gives them (quoted) or the paraphrase
    quoted: bool      # True: verbatim from ``source``; False: a paraphrase, printed as one
    version: str      # the version the text reflects
    source: str       # the address of the copy
    note: str = ""    # what the reader must know about this entry (e.g. a newer text not retrieved)

    @property
    def cite(self) -> str:
        if not self.paragraph:
            return self.rule
        return f"{self.rule}{'' if self.paragraph.startswith('(') else ' '}{self.paragraph}"


FRCP_SRC = ("https://www.uscourts.gov/file/78323/download (as copied in github.com/ctiblier/federal-rules, "
            "src/content/civil/rule-26/current.md)")
FRCP_VER = "as amended to 1 December 2024"
USC_SRC = "http://uscode.elaws.us/law/28usc1746 (corroborated by conservapedia.com, 28 U.S.C. § 1746)"
USC_VER = "Pub. L. 94-550, § 1(a), 18 October 1976 (unamended)"
CPR_SRC = ("[2025] EWHC 2536 (KB) at [98] (juristeca.com copy); CPR Part 35 page of accaglobal.com")
CPR_VER = "as quoted in October 2025"
PD_SRC_CURRENT = "https://bondsolon.com/insight/expert-witness-cpr-35-is-gospel"
PD_SRC_2011 = "https://www.articles.scopulus.co.uk/Expert%20Reports.htm"
PD_SRC_OLD = "https://www.taylorfrancis.com/books/9781135332457/chapters/10.4324/9781843147107-43"
SOT_SRC = ("https://www.yourexpertwitness.co.uk/expert-witness-home/news-2; "
           "https://medico-legalminder.net/2020/08/19/stating-the-bleeding-obvious/ (the 2020 sentence)")


def _frcp(paragraph: str, text: str) -> RuleText:
    return RuleText(f"frcp26-{paragraph.strip('()')}", "FRCP 26(a)(2)(B)", paragraph, text, True, FRCP_VER, FRCP_SRC)


def _pd(paragraph: str, text: str, quoted: bool = True, version: str = "2022 copy of the current text",
        source: str = PD_SRC_CURRENT, note: str = "", key: str = "") -> RuleText:
    return RuleText(key or f"pd35-{paragraph}", "PD 35", paragraph, text, quoted, version, source, note)


TEXTS: tuple[RuleText, ...] = (
    # ---------------------------------------------------------------- US
    RuleText("frcp26-lead", "FRCP 26(a)(2)(B)", "lead-in",
             "Unless otherwise stipulated or ordered by the court, this disclosure must be accompanied by a written "
             "report—prepared and signed by the witness—if the witness is one retained or specially employed to provide "
             "expert testimony in the case or one whose duties as the party's employee regularly involve giving expert "
             "testimony. The report must contain:", True, FRCP_VER, FRCP_SRC),
    _frcp("(i)", "a complete statement of all opinions the witness will express and the basis and reasons for them;"),
    _frcp("(ii)", "the facts or data considered by the witness in forming them;"),
    _frcp("(iii)", "any exhibits that will be used to summarize or support them;"),
    _frcp("(iv)", "the witness's qualifications, including a list of all publications authored in the previous 10 years;"),
    _frcp("(v)", "a list of all other cases in which, during the previous 4 years, the witness testified as an expert "
                 "at trial or by deposition; and"),
    _frcp("(vi)", "a statement of the compensation to be paid for the study and testimony in the case."),
    RuleText("usc1746-lead", "28 U.S.C. § 1746", "",
             "such matter may, with like force and effect, be supported, evidenced, established, or proved by the unsworn "
             "declaration, certificate, verification, or statement, in writing of such person which is subscribed by him, "
             "as true under penalty of perjury, and dated, in substantially the following form:", True, USC_VER, USC_SRC,
             "Quoted from the middle of the section's single sentence, which begins \"Wherever, under any law of the "
             "United States or under any rule, regulation, order, or requirement made pursuant to law, any matter is "
             "required or permitted to be supported ... by the sworn declaration ...\"."),
    RuleText("usc1746-1", "28 U.S.C. § 1746", "(1)",
             "If executed without the United States: “I declare (or certify, verify, or state) under penalty of perjury "
             "under the laws of the United States of America that the foregoing is true and correct. Executed on (date). "
             "(Signature)”.", True, USC_VER, USC_SRC),
    RuleText("usc1746-2", "28 U.S.C. § 1746", "(2)",
             "If executed within the United States, its territories, possessions, or commonwealths: “I declare (or "
             "certify, verify, or state) under penalty of perjury that the foregoing is true and correct. Executed on "
             "(date). (Signature)”.", True, USC_VER, USC_SRC),
    RuleText("fre702", "FRE 702", "",
             "A witness who is qualified as an expert by knowledge, skill, experience, training, or education may testify "
             "in the form of an opinion or otherwise if the proponent demonstrates to the court that it is more likely than "
             "not that: (a) the expert's scientific, technical, or other specialized knowledge will help the trier of fact to "
             "understand the evidence or to determine a fact in issue; (b) the testimony is based on sufficient facts or "
             "data; (c) the testimony is the product of reliable principles and methods; and (d) the expert's opinion "
             "reflects a reliable application of the principles and methods to the facts of the case.", True,
             "as amended 24 April 2023, in force 1 December 2023",
             "https://marshalldennehey.com/articles/rule-702-revamped-once-again; https://www.courtrules.net/blog/"
             "rule-702-expert-testimony-after-the-2023-amendments-what-changed-and-why-it-matters",
             "Not printed in the report (not a rule on a report's contents); quoted in docs/VALIDATION.md."),
    # ---------------------------------------------------------------- England and Wales
    RuleText("cpr35.10-2", "CPR 35.10", "(2)",
             "At the end of an expert's report there must be a statement that the expert understands and has complied "
             "with their duty to the court.", True, CPR_VER, CPR_SRC),
    RuleText("cpr35.10-3", "CPR 35.10", "(3)",
             "The expert's report must state the substance of all material instructions, whether written or oral, on the "
             "basis of which the report was written.", True, CPR_VER, CPR_SRC),
    _pd("3.1", "An expert's report should be addressed to the court and not to the party from whom the expert has "
               "received his instructions", version="PD 35 before 1 October 2009 (then paragraph 2.1)", source=PD_SRC_OLD,
        note="The current wording of paragraph 3.1 could not be retrieved; this is the newest copy found (the paragraph "
             "was renumbered 3.1 when the practice direction was substituted on 1 October 2009)."),
    _pd("3.2", "An expert's report must:"),
    _pd("3.2(1)", "give details of the expert's qualifications;"),
    _pd("3.2(2)", "give details of any literature or other material which has been relied on in making the report;"),
    _pd("3.2(3)", "contain a statement setting out the substance of all facts and instructions which are material to the "
                  "opinions expressed in the report or upon which those opinions are based;"),
    _pd("3.2(4)", "make clear which of the facts stated in the report are within the expert's own knowledge;"),
    _pd("3.2(5)", "say who carried out any examination, measurement, test or experiment which the expert has used for the "
                  "report, give the qualifications of that person, and say whether or not the test or experiment has been "
                  "carried out under the expert's supervision;"),
    _pd("3.2(6)", "where there is a range of opinion on the matters dealt with in the report, summarise the range of opinion "
                  "and give reasons for the expert's own opinion", quoted=False, version="current (wording not retrieved)",
        source=PD_SRC_2011,
        note="Paraphrase: the current wording was not retrieved. The newest copy found (7 February 2011) reads: "
             "“(6) where there is a range of opinion on the matters dealt with in the report: (a) summarise the range of "
             "opinion, and (b) give reasons for his own opinion;”."),
    _pd("3.2(7)", "contain a summary of the conclusions reached;", version="2011 copy", source=PD_SRC_2011),
    _pd("3.2(8)", "if the expert is not able to give an opinion without qualification, state the qualification",
        quoted=False, version="current (wording not retrieved)", source=PD_SRC_2011,
        note="Paraphrase: the current wording was not retrieved. The newest copy found (7 February 2011) reads: "
             "“(8) if the expert is not able to give his opinion without qualification, state the qualification; and”."),
    _pd("3.2(9)", "contain a statement that the expert understands their duty to the court and has complied with it, and is "
                  "aware of the requirements of Part 35, this practice direction and the Guidance for the Instruction of "
                  "Experts in Civil Claims 2014", quoted=False, version="current (wording seen only in summary)",
        source="https://www.maps-medical.co.uk/insights/all-change-with-the-declaration-and-statement-of-truth/",
        note="Paraphrase: the current wording was found only in summary (“Understands their duty to the court and has "
             "complied with it; Is aware of the requirements of Part 35, the Practice Direction and the Guidance.”)."),
    _pd("3.3", "The report must be verified by a statement of truth in the form that follows.", quoted=False,
        version="current", source=SOT_SRC,
        note="Paraphrase of paragraph 3.3's lead-in (its verbatim wording was not found); the form's two paragraphs "
             "are quoted."),
    _pd("3.3 form, paragraph 1", key="pd35-3.3-form-1", version="in force since 1 October 2009", source=SOT_SRC,
        text="I confirm that I have made clear which facts and matters referred to in this report are within my own "
             "knowledge and which are not. Those that are within my own knowledge I confirm to be true. The opinions I "
             "have expressed represent my true and complete professional opinions on the matters to which they refer."),
    _pd("3.3 form, paragraph 2", key="pd35-3.3-form-2", version="added from 1 October 2020", source=SOT_SRC,
        text="I understand that proceedings for contempt of court may be brought against anyone who makes, or causes to be "
             "made, a false statement in a document verified by a statement of truth without an honest belief in its "
             "truth."),
)

BY_KEY = {t.key: t for t in TEXTS}
if len(BY_KEY) != len(TEXTS):
    raise RuntimeError("report/rules.py: two entries share a key")


def text(key: str) -> RuleText:
    return BY_KEY[key]
