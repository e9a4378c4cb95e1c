"""`report` and `analyse` refuse edited results (issue 33, items 4, 5, 6): both run verify's
integrity checks first; `report` renders from a failing folder only on request, with the failure
on the cover; `analyse` compares its recomputation with the files on disk and names an edited
one; a damaged image or a deleted feature file is one line, not a traceback.
The cases are the rows of docs/hostile/integrity.md."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest
from click.testing import CliRunner

from carlos_audit.cli import main
from carlos_audit.hashing import sha256_bytes, sha256_file


def _copy(demo_case_dir, tmp_path):
    return shutil.copytree(demo_case_dir, tmp_path / "case")


def _reseal(case, manifest: dict | None = None):
    """Rewrite manifest.json (when given) and manifest.json.sha256 as a forger fixing up hashes would."""
    if manifest is not None:
        (case / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    (case / "manifest.json.sha256").write_text(f"{sha256_file(case / 'manifest.json')}  manifest.json\n")


def _one_line_refusal(r, *names):
    assert r.exit_code != 0, r.output
    assert r.exception is None or isinstance(r.exception, SystemExit), r.exception
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.output, r.output
    for name in names:
        assert name in lines[0], lines[0]
    return lines[0]


def _pdf_text(pdf) -> str:
    return subprocess.run(["pdftotext", "-raw", str(pdf), "-"], capture_output=True, text=True, check=True).stdout


def _report(case, *extra):
    return CliRunner().invoke(main, ["report", str(case), *extra])


def _analyse(case):
    return CliRunner().invoke(main, ["analyse", str(case)])


def _a_neighbour(comparison: dict) -> dict:
    """A neighbour row of comparison.json (corpus placement) whose similarity is below 0.99."""
    return next(row for row in comparison["target"]["neighbours"] if row["similarity"] < 0.99)


def test_report_refuses_an_edited_manifest_and_renders_it_on_request(demo_case_dir, tmp_path):
    case = _copy(demo_case_dir, tmp_path)
    before = sha256_file(case / "report.pdf")
    text = (case / "manifest.json").read_text()
    edited, n = re.subn(r'"steps": 10\b', '"steps": 25', text)
    assert n >= 1
    (case / "manifest.json").write_text(edited)
    line = _one_line_refusal(_report(case), "manifest.json", "--render-despite-integrity-failure")
    assert "modified after the run" in line
    assert sha256_file(case / "report.pdf") == before  # nothing rendered
    r = _report(case, "--render-despite-integrity-failure")
    assert r.exit_code == 0, r.output
    assert "integrity check failed" in r.stderr and "manifest.json" in r.stderr
    for pdf in ("report.pdf", "report-archive.pdf"):
        page1 = subprocess.run(["pdftotext", "-raw", "-f", "1", "-l", "1", str(case / pdf), "-"],
                               capture_output=True, text=True, check=True).stdout.replace("\n", " ")
        assert "INTEGRITY CHECK FAILED: manifest.json was modified after the run" in page1, pdf
    assert "Denoising steps 25" in _pdf_text(case / "report.pdf")  # what the edited manifest says, under the warning


def test_an_edited_comparison_similarity_is_refused_by_report_and_named_by_analyse(demo_case_dir, tmp_path):
    case = _copy(demo_case_dir, tmp_path)
    comparison = json.loads((case / "comparison.json").read_text())
    _a_neighbour(comparison)["similarity"] = 0.999
    (case / "comparison.json").write_text(json.dumps(comparison, indent=2) + "\n")
    _one_line_refusal(_report(case), "comparison.json")
    r = _analyse(case)
    assert r.exit_code == 3, r.output
    assert "EDITED  comparison.json" in r.output and "SAME  metrics.json" in r.output
    assert "SAME  comparison.json" not in r.output
    assert "FAIL" in r.output and "comparison.json was modified" in r.output


def test_an_edited_metrics_file_is_named_even_with_its_hashes_fixed_up(demo_case_dir, tmp_path):
    case = _copy(demo_case_dir, tmp_path)
    metrics = json.loads((case / "metrics.json").read_text())
    metrics["strength"] = metrics["strength"] * 3.0
    data = (json.dumps(metrics, indent=2) + "\n").encode()
    (case / "metrics.json").write_bytes(data)
    # without a fix-up: report names the file, analyse says EDITED
    _one_line_refusal(_report(case), "metrics.json")
    r = _analyse(case)
    assert r.exit_code == 3 and "EDITED  metrics.json" in r.output, r.output
    # the forger fixes the manifest's record and manifest.json.sha256: every hash agrees again,
    # but metrics.json does not follow from the stored embeddings
    manifest = json.loads((case / "manifest.json").read_text())
    manifest["results"]["metrics.json"] = sha256_bytes(data)
    _reseal(case, manifest)
    r = CliRunner().invoke(main, ["verify", str(case), "--sample", "0", "--json"])
    checks = {c["check"]: c["ok"] for c in json.loads(r.stdout)["checks"]}
    assert checks["manifest.json"] and checks["metrics.json"]  # the hashes are consistent
    line = _one_line_refusal(_report(case), "metrics.json")
    assert "metrics recomputed from embeddings" in line and "strength" in line
    r = _analyse(case)
    assert r.exit_code == 3 and "SAME  metrics.json" not in r.output and "DIFF  metrics.json" in r.output, r.output


def test_report_and_analyse_on_an_untouched_case(demo_case_dir, tmp_path):
    case = _copy(demo_case_dir, tmp_path)
    r = _analyse(case)
    assert r.exit_code == 0, r.output
    assert "SAME  metrics.json" in r.output and "SAME  comparison.json" in r.output and "FAIL" not in r.output
    r = _report(case)
    assert r.exit_code == 0, r.output
    assert "integrity" not in r.output.lower()
    assert sha256_file(case / "report.pdf") == sha256_file(demo_case_dir / "report.pdf")  # same bytes as the run's
    assert "INTEGRITY CHECK FAILED" not in _pdf_text(case / "report.pdf")


def test_a_damaged_png_is_one_line_at_report(demo_case_dir, tmp_path):
    case = _copy(demo_case_dir, tmp_path)
    manifest = json.loads((case / "manifest.json").read_text())
    rel = manifest["pairs"][0]["arms"]["lora"]["image"]
    data = (case / rel).read_bytes()
    (case / rel).write_bytes(data[: len(data) // 2])  # truncated
    _one_line_refusal(_report(case), rel)
    line = _one_line_refusal(_report(case, "--render-despite-integrity-failure"), rel)
    assert "cannot be decoded as an image" in line
    (case / rel).write_bytes(b"not a png at all")
    line = _one_line_refusal(_report(case, "--render-despite-integrity-failure"), rel)
    assert "cannot be decoded as an image" in line


@pytest.mark.parametrize("which", ["embedding", "label signatures"])
def test_a_deleted_feature_file_is_one_line_at_analyse(demo_case_dir, tmp_path, which):
    case = _copy(demo_case_dir, tmp_path)
    manifest = json.loads((case / "manifest.json").read_text())
    rel = (manifest["pairs"][0]["arms"]["lora"]["embedding"] if which == "embedding"
           else manifest["label_signatures"]["path"])
    (case / rel).unlink()
    line = _one_line_refusal(_analyse(case), rel)
    assert "is missing" in line
    # a damaged one (not a .npy file) is one line too
    (case / rel).write_bytes(b"garbage")
    line = _one_line_refusal(_analyse(case), rel)
    assert "cannot be read" in line


def test_a_truncated_png_is_refused_even_after_weasyprint_allowed_them(tmp_path):
    """weasyprint sets Pillow's LOAD_TRUNCATED_IMAGES when imported (any earlier rendering in the
    process): the report's image reading refuses a truncated file all the same, and leaves the
    global as it was."""
    import io

    from PIL import Image, ImageFile

    from carlos_audit.errors import AuditError
    from carlos_audit.report.figures import contact_sheet, display_copy

    buf = io.BytesIO()
    Image.effect_noise((300, 300), 64).convert("RGB").save(buf, format="PNG")
    good, cut = buf.getvalue(), buf.getvalue()[: len(buf.getvalue()) // 2]
    saved = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = True
    try:
        assert display_copy(good, 256, "images/lora/x.png") is not None
        with pytest.raises(AuditError, match=r"images/lora/x\.png cannot be decoded as an image \(OSError"):
            display_copy(cut, 256, "images/lora/x.png")
        with pytest.raises(AuditError, match=r"images/base/y\.png cannot be decoded"):
            contact_sheet([(cut, good)], [("images/base/y.png", "images/lora/y.png")])
        assert ImageFile.LOAD_TRUNCATED_IMAGES is True
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = saved
