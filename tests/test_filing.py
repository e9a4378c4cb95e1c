"""The two copies of the report (filing, archive), the pre-flight check, the tagged structure,
the expert-report sections, the signature, and rendering from an installed wheel."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pikepdf
import pytest
from conftest import REPO, copy_case
from pki import make_key_and_cert

from carlos_audit.errors import AuditError
from carlos_audit.report import ARCHIVE_PDF, FILING_PDF, SIGNED_PDF, render_report
from carlos_audit.report.preflight import preflight
from carlos_audit.verify import verify_case


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def text_of(pdf: Path) -> str:
    return subprocess.run(["pdftotext", "-raw", str(pdf), "-"], capture_output=True, text=True, check=True).stdout


def flat(pdf: Path) -> str:
    """The text with line breaks removed (long hashes wrap in table cells)."""
    return text_of(pdf).replace("\n", "")


def cli(*args, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "carlos_audit.cli", *map(str, args)], capture_output=True, text=True, env=env, cwd=cwd)


def with_case_toml(case: Path, extra: str) -> Path:
    (case / "case.toml").write_text((case / "case.toml").read_text() + "\n" + extra)
    return case


# ----------------------------------------------------------------------------- two copies


def test_demo_writes_both_copies_filing_has_nothing_embedded(demo_case_dir, tmp_path):
    filing, archive = demo_case_dir / FILING_PDF, demo_case_dir / ARCHIVE_PDF
    assert filing.is_file() and archive.is_file()
    assert subprocess.run(["pdfdetach", "-list", str(filing)], capture_output=True, text=True, check=True).stdout.startswith("0 embedded files")
    info = subprocess.run(["pdfinfo", str(filing)], capture_output=True, text=True, check=True).stdout
    assert "Tagged:          yes" in info and "(A4)" in info
    meta = subprocess.run(["pdfinfo", "-meta", str(filing)], capture_output=True, text=True, check=True).stdout
    assert 'pdfaid:part="2"' in meta and 'pdfaid:conformance="U"' in meta
    meta = subprocess.run(["pdfinfo", "-meta", str(archive)], capture_output=True, text=True, check=True).stdout
    assert 'pdfaid:part="3"' in meta
    # the archive copy embeds the JSON files byte for byte
    subprocess.run(["pdfdetach", "-saveall", "-o", str(tmp_path), str(archive)], check=True)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted(n for n in ("manifest.json", "metrics.json", "comparison.json") if (demo_case_dir / n).is_file())
    for n in names:
        assert (tmp_path / n).read_bytes() == (demo_case_dir / n).read_bytes()
    # the filing copy prints the sha256 of every companion file and of the archive copy
    text = flat(filing)
    for n in names:
        assert sha256(demo_case_dir / n) in text, n
    assert sha256(archive) in text
    for name in (FILING_PDF, ARCHIVE_PDF):
        assert (demo_case_dir / f"{name}.sha256").read_text() == f"{sha256(demo_case_dir / name)}  {name}\n"


def test_both_copies_rerender_byte_identically(demo_case_dir, tmp_path):
    case = copy_case(demo_case_dir, tmp_path / "c")
    render_report(case)
    for name in (FILING_PDF, ARCHIVE_PDF):
        assert sha256(case / name) == sha256(demo_case_dir / name), name


def test_preflight_passes_on_the_filing_copy_and_fails_on_the_archive_copy(demo_case_dir):
    r = cli("preflight", demo_case_dir / FILING_PDF, "--paper", "a4")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "FAIL" not in r.stdout and "PASS  no embedded files" in r.stdout
    r = cli("preflight", demo_case_dir / ARCHIVE_PDF, "--json")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    checks = {c["check"]: c for c in json.loads(r.stdout)["checks"]}
    assert not checks["no embedded files"]["ok"] and "/EmbeddedFiles" in checks["no embedded files"]["detail"]
    assert checks["tagged (accessibility)"]["ok"]


def test_preflight_finds_scripts_forms_wrong_paper_and_names_the_large_section(demo_case_dir, tmp_path):
    bad = tmp_path / "bad.pdf"
    with pikepdf.open(demo_case_dir / FILING_PDF) as pdf:
        pdf.Root.OpenAction = pdf.make_indirect(pikepdf.Dictionary(S=pikepdf.Name.JavaScript, JS=pikepdf.String("app.alert(1)")))
        pdf.Root.AcroForm = pikepdf.Dictionary(Fields=pikepdf.Array())
        pdf.save(bad)
    r = preflight(bad, max_mb=0.1, paper="letter")
    failed = {c["check"] for c in r["checks"] if not c["ok"]}
    assert failed == {"no JavaScript or automatic actions", "no form fields", "page size", "size"}
    assert r["sections"][0]["title"] in {"4 Image evidence", "Appendix A: Seed manifest and every image pair", "5A Head-to-head comparison"}
    assert sum(s["bytes"] for s in r["sections"]) <= r["size_bytes"]
    assert "max_pairs_in_body" in r["advice"] and r["sections"][0]["title"] in r["advice"]


# ----------------------------------------------------------------------------- structure


def structure_elements(pdf_path: Path) -> list[pikepdf.Dictionary]:
    out = []
    with pikepdf.open(pdf_path) as pdf:
        stack = [pdf.Root.StructTreeRoot.K]
        while stack:
            node = stack.pop()
            if isinstance(node, pikepdf.Array):
                stack.extend(reversed(list(node)))
            elif isinstance(node, pikepdf.Dictionary) and "/S" in node:
                out.append((str(node.S), str(node.get("/Alt", "")), node.get("/A")))
                if "/K" in node:
                    stack.append(node.K)
        lang = str(pdf.Root.Lang)
    return out, lang


def test_tagged_structure_headings_figures_tables(demo_case_dir):
    elems, lang = structure_elements(demo_case_dir / FILING_PDF)
    assert lang == "en"
    levels = [int(s[2]) for s, _, _ in elems if len(s) == 3 and s[1] == "H"]
    assert levels[0] == 1 and all(b <= a + 1 for a, b in zip(levels, levels[1:]))
    alts = [alt for s, alt, _ in elems if s == "/Figure"]
    assert alts and all(alts)
    manifest = json.loads((demo_case_dir / "manifest.json").read_text())
    first = manifest["pairs"][0]
    assert any(f"pair {first['pair_id']}" in a and f"seed {first['seed']}" in a and "Base image" in a for a in alts)
    assert any("Image with the LoRA" in a for a in alts)
    # header cells carry an id, data cells name their headers (weasyprint maps th scope to these)
    ths = [a for s, _, a in elems if s == "/TH"]
    tds = [a for s, _, a in elems if s == "/TD"]
    assert ths and tds
    assert sum(1 for a in tds if a is not None and len(a.get("/Headers", []))) > 0.9 * len(tds)


# ----------------------------------------------------------------------------- [report] and [expert]


def test_letter_paper_fewer_body_pairs_and_uk_expert_sections(demo_case_dir, tmp_path):
    case = with_case_toml(copy_case(demo_case_dir, tmp_path / "c"), '''
[report]
paper = "letter"
max_pairs_in_body = 2

[expert]
name = "Dr A. Example"
role = "independent expert instructed jointly"
instructions = "Say whether the LoRA changes images systematically."
materials_provided = ["letter of instruction dated 1 May 2026"]
jurisdiction = "uk-cpr35"
''')
    render_report(case)
    filing, archive = case / FILING_PDF, case / ARCHIVE_PDF
    assert "(letter)" in subprocess.run(["pdfinfo", str(filing)], capture_output=True, text=True).stdout
    assert preflight(filing, paper="letter")["ok"]
    text = " ".join(text_of(filing).split())
    for s in ("Materials considered", "Exhibit index", "Dr A. Example", "letter of instruction dated 1 May 2026",
              "Practice Direction 35", "3.2(1)", "3.2(9)", "give details of the expert's qualifications",
              "summarise the range of opinion", "TO BE COMPLETED BY THE EXPERT",
              "I understand that proceedings for contempt of court may be brought against anyone who makes, or causes to be made, "
              "a false statement in a document verified by a statement of truth without an honest belief in its truth.",
              "differs from the case file as run"):
        assert s in text, s
    manifest = json.loads((case / "manifest.json").read_text())
    assert manifest["lora"]["sha256"] in flat(filing)   # materials considered: every input with its sha256
    # the body of the filing copy shows 2 pairs; the archive copy keeps all of them
    n_figures = lambda p: sum(1 for s, _, _ in structure_elements(p)[0] if s == "/Figure")  # noqa: E731
    assert n_figures(archive) - n_figures(filing) >= 2 * 10
    assert "max_pairs_in_body" in text


def test_us_expert_items_and_without_expert_nothing(demo_case_dir, tmp_path):
    case = with_case_toml(copy_case(demo_case_dir, tmp_path / "c"), '[expert]\nname = "J. Doe"\njurisdiction = "us-frcp26"\n')
    text = "".join(text_of(render_report(case)).split())  # no whitespace: "26(a)(2)(B)" may wrap anywhere
    for s in ("Rule of Civil Procedure 26(a)(2)(B)", "(iv)", "publications authored in the previous 10 years",
              "during the previous 4 years", "compensation", "TO BE COMPLETED BY THE EXPERT"):
        assert "".join(s.split()) in text, s
    plain = " ".join(text_of(demo_case_dir / FILING_PDF).split())
    assert "Materials considered" not in plain and "TO BE COMPLETED" not in plain


@pytest.mark.parametrize("extra, message", [
    ('[report]\npaper = "a5"', "report.paper 'a5'; allowed: a4, letter"),
    ('[expert]\nname = "X"\njurisdiction = "fr"', "expert.jurisdiction 'fr'"),
    ('[expert]\njurisdiction = "uk-cpr35"', "needs expert.name"),
    ('[report]\nmax_pairs_in_body = -1', "max_pairs_in_body must be >= 0"),
])
def test_bad_report_settings_are_one_line_errors(demo_case_dir, tmp_path, extra, message):
    case = with_case_toml(copy_case(demo_case_dir, tmp_path / "c"), extra)
    before = sha256(case / FILING_PDF)
    with pytest.raises(AuditError, match=message.replace("(", r"\(").replace(")", r"\)")):
        render_report(case)
    assert sha256(case / FILING_PDF) == before


# ----------------------------------------------------------------------------- signature


def test_sign_and_verify_round_trip(demo_case_dir, tmp_path):
    case = copy_case(demo_case_dir, tmp_path / "c")
    key, cert = make_key_and_cert(tmp_path / "pki")
    _, other = make_key_and_cert(tmp_path / "pki", "Someone Else")
    r = cli("sign", case, "--key", key, "--cert", cert)
    assert r.returncode == 0, r.stderr
    signed = case / SIGNED_PDF
    assert signed.read_bytes()[:(case / ARCHIVE_PDF).stat().st_size] == (case / ARCHIVE_PDF).read_bytes()
    assert preflight(case / FILING_PDF)["ok"]  # the filing copy stays unsigned: no form field
    result = verify_case(case, sample=0, trust=[cert])
    checks = {c["check"]: c for c in result["checks"]}
    assert result["ok"], [c for c in result["checks"] if not c["ok"]]
    assert checks["signature"]["ok"] and "Test Expert" in checks["signature"]["detail"]
    assert checks["signer certificate"]["ok"] and checks["filing copy bound to the archive copy"]["ok"]
    assert not {c["check"]: c for c in verify_case(case, sample=0, trust=[other])["checks"]}["signer certificate"]["ok"]
    # one byte of the signed document changed: the signature no longer holds
    data = bytearray(signed.read_bytes())
    data[(case / ARCHIVE_PDF).stat().st_size // 2] ^= 0x01
    signed.write_bytes(bytes(data))
    (case / f"{SIGNED_PDF}.sha256").write_text(f"{sha256(signed)}  {SIGNED_PDF}\n")
    r = cli("verify", case, "--sample", "0", "--trust", cert)
    assert r.returncode != 0 and "FAIL  signature" in r.stdout and "Traceback" not in r.stderr


def test_sign_without_archive_copy_is_an_error(tmp_path):
    key, cert = make_key_and_cert(tmp_path / "pki")
    r = cli("sign", tmp_path, "--key", key, "--cert", cert)
    assert r.returncode != 0 and r.stderr.count("\n") == 1 and "report-archive.pdf" in r.stderr


# ----------------------------------------------------------------------------- installed wheel


def test_installed_wheel_renders_a_report(demo_case_dir, tmp_path):
    """Build the wheel, install it (no dependencies) into a fresh venv that borrows this
    environment's libraries, and render a report from outside the checkout: the templates ship
    inside the wheel, and rendering imports no torch."""
    src = tmp_path / "src"  # build from a copy: the build writes build/ and *.egg-info beside the sources
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".git", ".venv", "reports", "build", "*.egg-info", "__pycache__"))
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(src)],
                   check=True, capture_output=True)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(site),
                    str(next(wheels.glob("carlos_audit-*.whl")))], check=True, capture_output=True)
    (site / "borrowed.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")  # dependencies only: .pth files there are not run
    case = copy_case(demo_case_dir, tmp_path / "case")
    (case / FILING_PDF).unlink()
    code = ("import sys, carlos_audit; from pathlib import Path; from carlos_audit.report import render_report\n"
            f"assert carlos_audit.__file__.startswith({str(venv)!r}), carlos_audit.__file__\n"
            "print(render_report(Path(sys.argv[1])))\n"
            "assert 'torch' not in sys.modules\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([str(py), "-c", code, str(case)], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert sha256(case / FILING_PDF) == sha256(demo_case_dir / FILING_PDF)


def test_library_warnings_stay_off_the_terminal_unless_verbose(capsys):
    """A library's warning (pyhanko's CryptographyDeprecationWarning with cryptography 51, say) must
    not turn a one-line error into three: it goes to the py.warnings logger, printed with --verbose."""
    import logging
    import warnings

    from carlos_audit.cli.common import route_warnings

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # what quiet_libraries() does in a command that ran before
    try:
        for verbose in (False, True):
            route_warnings(verbose)
            with warnings.catch_warnings():
                warnings.simplefilter("always")
                warnings.warn("a library deprecation", DeprecationWarning)
            err = capsys.readouterr().err
            assert ("a library deprecation" in err) is verbose
    finally:
        logging.captureWarnings(False)
        root.setLevel(level)
