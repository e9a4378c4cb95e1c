"""The report's arms table (2.5), further indicators (3A) and head-to-head comparison (5A)."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
from pathlib import Path

import pytest
from conftest import copy_case

from carlos_audit.report.render import render_report, report_html
from carlos_audit.report.templating import jinja_env


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def pdftext(pdf: Path, *args: str) -> str:
    out = subprocess.run(["pdftotext", *args, str(pdf), "-"], capture_output=True, text=True, check=True).stdout
    return " ".join(out.split())  # one line: values wrapped across lines still match


def read(case: Path, name: str) -> dict:
    return json.loads((case / name).read_text())


@pytest.fixture(scope="module")
def demo_text(demo_case_dir) -> str:
    return pdftext(demo_case_dir / "report.pdf")


@pytest.fixture(scope="module")
def demo_raw(demo_case_dir) -> str:
    return pdftext(demo_case_dir / "report.pdf", "-raw")


def test_sections_in_order_and_in_contents(demo_text):
    headings = ["2.5 Arms generated and the profiles that use them", "3 Results",
                "3A Further indicators (beyond the CARLoS paper)", "4 Image evidence",
                "5 Nearest-neighbour LoRAs in the reference corpus", "5A Head-to-head comparison",
                "6 Limitations and validity"]
    positions = [demo_text.rfind(h) for h in headings]  # the last occurrence: the heading, not the contents entry
    assert all(p >= 0 for p in positions), [h for h, p in zip(headings, positions) if p < 0]
    assert positions == sorted(positions)
    contents = demo_text[demo_text.find("Contents"):demo_text.rfind("1 Summary of findings")]
    for h in ("3A Further indicators (beyond the CARLoS paper)", "5A Head-to-head comparison"):
        assert h in contents, h


def test_arms_and_profiles_table(demo_case_dir, demo_text):
    proto = read(demo_case_dir, "manifest.json")["protocol"]
    for arm in proto["arms"]:
        assert arm in demo_text, arm
    for profile in proto["profiles"]:
        assert profile in demo_text, profile
    assert "Used by profiles" in demo_text


def test_indicators_values_and_readings(demo_case_dir, demo_text):
    ind = read(demo_case_dir, "metrics.json")["indicators"]
    sig = jinja_env().filters["sig"]

    dose = ind["dose_response"]
    for p in dose["points"]:
        assert f"{p['strength']:.4f} [{p['strength_ci'][0]:.4f}, {p['strength_ci'][1]:.4f}]" in demo_text, p
        assert f"{p['consistency']:.4f} [{p['consistency_ci'][0]:.4f}, {p['consistency_ci'][1]:.4f}]" in demo_text, p
    assert "0 (exact, by construction)" in demo_text
    if dose["half_strength_scale"] is not None:
        assert f"Half-strength scale: {dose['half_strength_scale']:.2f}" in demo_text

    tr = ind["trigger_dependence"]
    assert f"{tr['ratio']:.3f} [{tr['ratio_ci'][0]:.3f}, {tr['ratio_ci'][1]:.3f}]" in demo_text
    assert "invoked by the user's choice" in demo_text and "imposed regardless" in demo_text
    if tr.get("note"):
        assert tr["note"] in demo_text

    po = ind["prompt_override"]
    assert f"{sig(po['mean'])} {sig(po['ci'][0])} to {sig(po['ci'][1])}" in demo_text
    assert "pulls images away from what the user asked for" in demo_text

    sc = ind["scope"]
    assert f"Concentration: {sc['concentration']:.3f}" in demo_text
    for cat, s in sc["per_category_strength"].items():
        assert f"{cat} {s:.4f}" in demo_text, cat
    if sc.get("note"):
        assert " ".join(sc["note"].split()) in demo_text

    el = ind["effect_labels"]
    assert "descriptive aids chosen from a fixed vocabulary" in demo_text and "not findings" in demo_text
    for i, r in enumerate(el["top"][:10], start=1):
        assert f"{i} {r['label']} {r['group']} {r['score']:.3f}" in demo_text, r

    # the summary names the trigger ratio and the dose-response in plain words
    summary = demo_text[demo_text.rfind("1 Summary of findings"):demo_text.rfind("2 Method")]
    assert f"Trigger dependence: ratio {tr['ratio']:.3f}" in summary
    assert "Dose-response: strength" in summary


def test_head_to_head_values(demo_case_dir, demo_text, demo_raw):
    h2h = read(demo_case_dir, "comparison.json")["head_to_head"]
    assert h2h, "the demo case compares against the derivative LoRA"
    summary = demo_text[demo_text.rfind("1 Summary of findings"):demo_text.rfind("2 Method")]
    for h in h2h:
        b, w = h["behaviour"], h["weights"]
        assert h["lora"]["sha256"] in demo_raw
        assert f"Against {h['lora']['file_name']}: behaviour: direction cosine {b['direction_cosine']:.3f}" in summary
        assert (f"{b['direction_cosine']:.3f} (95% confidence interval {b['direction_cosine_ci'][0]:.3f} "
                f"to {b['direction_cosine_ci'][1]:.3f})") in demo_text
        q = b["per_pair_cosine"]["quantiles"]
        assert " ".join(f"{q[k]:.3f}" for k in ("p05", "p25", "p50", "p75", "p95")) in demo_text
        for cat, c in b["per_category_cosine"].items():
            assert f"{cat} {c:.3f}" in demo_text, cat
        assert f"Strength {b['strength']['target']:.4f} {b['strength']['comparison']:.4f}" in demo_text
        assert f"Weight cosine {w['cosine']:.3f}" in demo_text
        assert f"Norm ratio {w['norm_ratio']:.3f}" in demo_text
        assert f"Tensor payload identical {'yes' if w['payload_identical'] else 'no'}" in demo_text
        assert f"Modules compared {w['modules_compared']}" in demo_text
        assert w["reading"] in demo_text
    for s in ("How to read the two analyses side by side", "re-upload", "rescaled copy",
              "a merge with other weights, or continued training", "independent training",
              "These are indicators, not conclusions", "Pairs where the two LoRAs agree most",
              "Pairs where the two LoRAs agree least"):
        assert s in demo_text, s


def test_triptychs_show_the_comparison_arm(demo_case_dir, tmp_path):
    case = copy_case(demo_case_dir, tmp_path / "c")
    manifest, h2h = read(case, "manifest.json"), read(case, "comparison.json")["head_to_head"]
    html = report_html(case)
    rows = {r["pair_id"]: r for r in manifest["pairs"]}
    for h in h2h:
        shown = h["behaviour"]["agree_most"] + h["behaviour"]["agree_least"]
        assert shown
        srcs = re.findall(r'<img src="images/' + re.escape(h["arm"]) + r'/([^"]+)\.png"', html)
        assert sorted(srcs) == sorted(shown)
        for pid in shown:
            for arm in ("base", "lora", h["arm"]):
                assert f'src="{rows[pid]["arms"][arm]["image"]}"' in html, (pid, arm)
            assert rows[pid]["arms"][h["arm"]]["image_sha256"][:12] in html
    # the triptych images are checked against the manifest too
    text_before = pdftext(render_report(case))
    assert "comparison LoRA images shown in section 5A" in text_before
    pid = h2h[0]["behaviour"]["agree_most"][0]
    img = case / rows[pid]["arms"][h2h[0]["arm"]]["image"]
    img.write_bytes(img.read_bytes() + b"\0")
    text = pdftext(render_report(case))
    assert "do not match the sha256 recorded" in text and h2h[0]["arm"] in text


def test_rerender_is_byte_identical(demo_case_dir, tmp_path):
    case = copy_case(demo_case_dir, tmp_path / "c")
    first = sha256(render_report(case))
    second = sha256(render_report(case))
    assert first == second == sha256(demo_case_dir / "report.pdf")


def test_case_without_indicators_or_head_to_head_renders(demo_case_dir, tmp_path):
    case = copy_case(demo_case_dir, tmp_path / "old")
    metrics = read(case, "metrics.json")
    metrics.pop("indicators")
    (case / "metrics.json").write_text(json.dumps(metrics))
    comparison = read(case, "comparison.json")
    comparison.pop("head_to_head")
    (case / "comparison.json").write_text(json.dumps(comparison))
    text = pdftext(render_report(case))  # the manifest's results hashes now mismatch: flagged, still rendered
    for s in ("3A Further indicators", "5A Head-to-head comparison", "Further indicators (sections", "descriptive aids"):
        assert s not in text, s
    for s in ("3 Results", "4 Image evidence", "5 Nearest-neighbour LoRAs in the reference corpus", "6 Limitations and validity"):
        assert s in text, s
    assert "No reference corpus configured" not in text


def test_head_to_head_without_corpus(demo_case_dir, tmp_path):
    """comparison.json holding only ``head_to_head`` (no reference corpus): 5A, and no corpus claimed."""
    case = copy_case(demo_case_dir, tmp_path / "h2h")
    comparison = read(case, "comparison.json")
    (case / "comparison.json").write_text(json.dumps({"head_to_head": comparison["head_to_head"]}))
    text = pdftext(render_report(case))
    assert "No reference corpus configured" in text
    assert "5A Head-to-head comparison" in text


def test_head_to_head_text_is_escaped(demo_case_dir, tmp_path):
    case = copy_case(demo_case_dir, tmp_path / "hostile")
    comparison = read(case, "comparison.json")
    hostile = '<img src="http://127.0.0.1:9/x.png">evil<script>'
    comparison["head_to_head"][0]["lora"]["file_name"] = hostile
    comparison["head_to_head"][0]["weights"]["reading"] = hostile
    comparison["head_to_head"][0]["weights"]["modules_only_in_b"] = [hostile]
    (case / "comparison.json").write_text(json.dumps(comparison))
    html = report_html(case)
    assert hostile not in html and "&lt;img src=&#34;http://127.0.0.1:9/x.png&#34;&gt;evil&lt;script&gt;" in html
    assert hostile in pdftext(render_report(case))  # shown as literal text; the fetcher was asked for nothing outside
