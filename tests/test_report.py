"""The evidentiary PDF report: contents, attachments, determinism, hostile metadata, custody."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, copy_case, write_case

from carlos_audit.case.casefile import load_case
from carlos_audit.errors import AuditError
from carlos_audit.pipeline import run_full
from carlos_audit.report.fetcher import make_url_fetcher
from carlos_audit.report.render import render_report

SECTIONS = [
    "1 Summary of findings",
    "2 Method",
    "3 Results",
    "4 Image evidence",
    "5 Nearest-neighbour LoRAs in the reference corpus",
    "6 Limitations and validity",
    "Appendix A: Seed manifest and every image pair",
    "Appendix B: Chain of custody",
    "Appendix C: Environment",
    "Appendix D: Reproducing this run",
]


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def pdftext(pdf: Path) -> str:
    return subprocess.run(["pdftotext", "-layout", str(pdf), "-"], capture_output=True, text=True, check=True).stdout


def pdftext_raw(pdf: Path) -> str:
    """Text in reading order without layout padding (long strings stay on one line)."""
    return subprocess.run(["pdftotext", "-raw", str(pdf), "-"], capture_output=True, text=True, check=True).stdout


class Listener:
    """A TCP server on 127.0.0.1 that counts connection attempts (the 'remote' host of a hostile LoRA)."""

    def __init__(self):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            conn.close()

    def close(self):
        self._stop.set()
        self.thread.join(timeout=2)
        self.sock.close()


@pytest.fixture(scope="module")
def demo_report(demo_case_dir) -> Path:
    pdf = demo_case_dir / "report.pdf"
    assert pdf.is_file(), "run_full did not render the report"
    return pdf


# ----------------------------------------------------------------------------- contents


def test_demo_report_has_every_section_in_order(demo_case_dir, demo_report):
    text = pdftext(demo_report)
    # each heading appears in the contents list on the cover and again as a heading: use the last
    positions = [text.rfind(s) for s in SECTIONS]
    assert all(p >= 0 for p in positions), [s for s, p in zip(SECTIONS, positions) if p < 0]
    assert positions == sorted(positions)

    manifest = json.loads((demo_case_dir / "manifest.json").read_text())
    metrics = json.loads((demo_case_dir / "metrics.json").read_text())
    # cover
    for s in ("Exhibit D-1", "Case demo", manifest["case"]["title"], "carlos-audit demo", manifest["lora"]["file_name"],
              manifest["run"]["started_utc"], manifest["tool"]["version"]):
        assert s in text, s
    raw = pdftext_raw(demo_report)
    assert manifest["lora"]["sha256"] in raw
    # summary: values with CIs, indicators, no corpus, not legal conclusions
    assert f"Strength: {metrics['strength']:.4f}" in text
    assert f"{metrics['ci']['strength'][0]:.4f} to {metrics['ci']['strength'][1]:.4f}" in text
    assert f"Consistency: {metrics['consistency']:.4f}" in text
    for s in ("substantiality", "volition", "not legal conclusions", "SELF-REPORTED", "Custody check passed",
              "page 1 of", "Seed manifest"):
        assert s in text, s
    # the demo case configures the demo corpus: percentiles, scatter, neighbours
    if (demo_case_dir / "comparison.json").is_file():
        comparison = json.loads((demo_case_dir / "comparison.json").read_text())
        assert "No reference corpus configured" not in text
        assert "percentile" in text and "3.4 Against the reference corpus" in text
        for n in comparison["target"]["neighbours"]:
            assert n["id"] in text
    else:
        assert "No reference corpus configured" in text
    # method: protocol and prompt hash
    assert manifest["protocol"]["prompts_sha256"] in raw
    assert "DDIMScheduler" in text and "64 × 64 pixels" in text
    # every pair in the seed manifest, with both full image hashes
    for row in manifest["pairs"]:
        assert row["pair_id"] in raw
        assert row["arms"]["base"]["image_sha256"] in raw
        assert row["arms"]["lora"]["image_sha256"] in raw
    # the reproducing command
    # Appendix D shows the recorded command with paths reduced to file names (portable.py)
    from carlos_audit.paths import portable_command

    assert " ".join(portable_command(manifest["run"]["command"])) in raw
    # page X of Y on every page
    n_pages = int(next(ln.split()[-1] for ln in subprocess.run(["pdfinfo", str(demo_report)], capture_output=True, text=True).stdout.splitlines() if ln.startswith("Pages:")))
    for i in range(1, n_pages + 1):
        assert f"page {i} of {n_pages}" in text


def test_pdfa_metadata_and_attachments_equal_case_files(demo_case_dir, tmp_path):
    archive = demo_case_dir / "report-archive.pdf"
    meta = subprocess.run(["pdfinfo", "-meta", str(archive)], capture_output=True, text=True, check=True).stdout
    assert 'pdfaid:part="3"' in meta and "pdfaid:conformance" in meta
    subprocess.run(["pdfdetach", "-saveall", "-o", str(tmp_path), str(archive)], check=True)
    names = ["manifest.json", "metrics.json"] + (["comparison.json"] if (demo_case_dir / "comparison.json").is_file() else [])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names)
    for name in names:
        assert (tmp_path / name).read_bytes() == (demo_case_dir / name).read_bytes()


def test_rerender_is_byte_identical(demo_case_dir, demo_report, tmp_path):
    original = sha256(demo_report)
    case = copy_case(demo_case_dir, tmp_path / "copy")
    first = render_report(case)
    assert sha256(first) == original  # another folder, a later time: the same bytes
    render_report(case)
    assert sha256(first) == original
    assert (case / "report.pdf.sha256").read_text() == f"{original}  report.pdf\n"
    assert (demo_case_dir / "report.pdf.sha256").read_text() == f"{original}  report.pdf\n"
    subprocess.run(["sha256sum", "-c", "--quiet", "report.pdf.sha256"], cwd=case, check=True)


def test_report_command_imports_no_torch(demo_case_dir, tmp_path):
    case = copy_case(demo_case_dir, tmp_path / "c")
    code = ("import sys; from carlos_audit.cli import main\n"
            "try:\n    main(['report', sys.argv[1]])\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    r = subprocess.run([sys.executable, "-c", code, str(case)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stdout and sha256(case / "report.pdf") in r.stdout


def test_not_a_case_folder(tmp_path):
    with pytest.raises(AuditError, match="not a finished case folder: it has no manifest.json"):
        render_report(tmp_path)


def test_comparison_is_rendered_and_incompatible_corpus_flagged(demo_case_dir, tmp_path):
    case = copy_case(demo_case_dir, tmp_path / "c")
    comparison = {
        "corpus": {"name": "ref-corpus <b>x</b>", "signature": {"embedder": "other"}, "compatible": False,
                   "differing_fields": ["embedder", "seeds"]},
        "target": {"strength_percentile": 87.5, "consistency_percentile": None,
                   "neighbours": [{"id": "civitai:1", "name": "<img src=\"http://127.0.0.1:9/n.png\">evil", "similarity": 0.93,
                                   "strength": 0.2, "consistency": 0.1}]},
        "corpus_points": {"strength": [0.1, 0.2, 0.3], "consistency": [0.05, None, 0.2]},
    }
    (case / "comparison.json").write_text(json.dumps(comparison))
    pdf = render_report(case)
    text = pdftext(pdf)
    assert "NOT comparable" in text and "embedder, seeds" in text
    assert "87.5th percentile" in text
    assert '<img src="http://127.0.0.1:9/n.png">evil' in pdftext_raw(pdf)
    assert "3.4 Against the reference corpus" in text
    assert "No reference corpus configured" not in text
    out = tmp_path / "att"
    out.mkdir()
    subprocess.run(["pdfdetach", "-saveall", "-o", str(out), str(case / "report-archive.pdf")], check=True)
    assert (out / "comparison.json").read_bytes() == (case / "comparison.json").read_bytes()


def test_without_corpus_says_so(demo_case_dir, tmp_path):
    case = copy_case(demo_case_dir, tmp_path / "c")
    (case / "comparison.json").unlink(missing_ok=True)
    pdf = render_report(case)
    text = pdftext(pdf)
    assert "No reference corpus configured." in text
    assert "No reference corpus configured for this case" in text
    assert "3.4 Against the reference corpus" not in text and "3.4 Prompts where the effect is largest" in text
    out = tmp_path / "att"
    out.mkdir()
    subprocess.run(["pdfdetach", "-saveall", "-o", str(out), str(case / "report-archive.pdf")], check=True)
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "metrics.json"]


def test_undefined_consistency_renders(demo_case_dir, tmp_path):
    """A LoRA with no measurable effect (e.g. scale 0): consistency is null with a note."""
    case = copy_case(demo_case_dir, tmp_path / "c")
    metrics = json.loads((case / "metrics.json").read_text())
    note = "every diff is exactly zero (no measurable effect), so directions and their cosines are undefined"
    metrics.update(consistency=None, consistency_note=note, strength=0.0)
    metrics["ci"]["consistency"] = None
    metrics["ci"]["strength"] = [0.0, 0.0]
    for c in list(metrics["per_category"].values()) + list(metrics["per_prompt"].values()):
        c.update(consistency=None, strength=0.0)
    for p in metrics["per_pair"]:
        p["diff_norm"] = 0.0
    (case / "metrics.json").write_text(json.dumps(metrics))
    (case / "comparison.json").unlink(missing_ok=True)
    text = " ".join(pdftext(render_report(case)).split())
    assert "Consistency: undefined" in text and note in text
    assert "does not match the sha256 recorded in the manifest" in text  # metrics.json was edited after the run


# ----------------------------------------------------------------------------- hostile input


def test_url_fetcher_serves_only_case_and_templates(demo_case_dir, tmp_path):
    from carlos_audit.report.fetcher import CASE_URL, TEMPLATES_URL

    case = copy_case(demo_case_dir, tmp_path / "c")
    outside = tmp_path / "secret.png"
    outside.write_bytes((case / "images" / "base" / "p001_s0.png").read_bytes())
    (case / "link.png").symlink_to(outside)
    f = make_url_fetcher(case)
    assert f.fetch(CASE_URL + "images/base/p001_s0.png").read()[:4] == b"\x89PNG"
    assert f.fetch(TEMPLATES_URL + "report.css").read()
    refused = ["http://127.0.0.1:9/x.png", "https://example.com/x.css", "ftp://example.com/x",
               outside.as_uri(), (case / "images" / "base" / "p001_s0.png").as_uri(),  # real paths are never served
               CASE_URL + "link.png", CASE_URL + "../secret.png", CASE_URL + "images/../../secret.png",
               CASE_URL + "manifest.json", TEMPLATES_URL + "report.html.j2"]
    for url in refused:
        with pytest.raises(BaseException, match="refused"):
            f.fetch(url)
    assert f.refused == refused


@pytest.fixture(scope="module")
def listener():
    srv = Listener()
    yield srv
    srv.close()


def hostile_lora(demo_assets, dst: Path, port: int) -> Path:
    from safetensors.numpy import load_file, save_file

    tensors = load_file(demo_assets["loras"]["hostile"])
    url = f"http://127.0.0.1:{port}"
    metadata = {
        "ss_output_name": f'<img src="{url}/pwn.png"><style>@import url("{url}/x.css");</style><b>bold</b>',
        "modelspec.title": f'</td><script>alert(1)</script><link rel="stylesheet" href="{url}/y.css">',
        "ss_tag_frequency": json.dumps({"x": {f"<a href='{url}/'>link</a>": 3, f"url({url}/bg.png)": 1}}),
        "ss_network_dim": "4", "ss_network_alpha": "4", "ss_base_model_version": "embedded:tiny-sd",
        "format": "pt",
    }
    save_file(tensors, str(dst), metadata=metadata)
    return dst


def small_case(tmp_path: Path, demo_assets, lora: Path, case_id: str) -> Path:
    """A two-pair case (2 prompts x 1 seed, 2 steps): enough for the report, quick on a CPU."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red bicycle leaning on a wall\na bowl of soup on a table\n")
    return write_case(tmp_path, demo_assets, lora=str(lora), case_id=case_id, prompts=str(prompts),
                      seeds="{ count = 1, start = 0 }", steps=2)


def test_hostile_metadata_renders_escaped_and_fetches_nothing(demo_assets, listener, tmp_path):
    lora = hostile_lora(demo_assets, tmp_path / "hostile_copy.safetensors", listener.port)
    cf = small_case(tmp_path, demo_assets, lora, "hostile")
    out = tmp_path / "case"
    result = run_full(load_case(cf), out, progress=False)
    assert str(out / "report.pdf") in result.written
    assert listener.connections == 0
    raw = pdftext_raw(out / "report.pdf")
    assert "<img src=" in raw and f"127.0.0.1:{listener.port}/pwn.png" in raw
    assert "<script>alert(1)</script>" in raw
    assert "SELF-REPORTED" in raw
    # the renderer refused nothing because it was asked for nothing outside the case
    text = pdftext(out / "report.pdf")
    assert "bold" in text


# ----------------------------------------------------------------------------- custody


def test_input_changed_during_run_fails_custody_and_report_says_so(demo_assets, tmp_path, monkeypatch):
    import carlos_audit.analysis.metrics as metrics_mod

    lora = tmp_path / "lora_copy.safetensors"
    lora.write_bytes(Path(demo_assets["loras"]["target"]).read_bytes())
    original = metrics_mod.compute_metrics

    def tamper_then_compute(*args, **kwargs):
        with open(lora, "ab") as f:  # someone alters the evidence while the run is in progress
            f.write(b"\0" * 16)
        return original(*args, **kwargs)

    monkeypatch.setattr(metrics_mod, "compute_metrics", tamper_then_compute)
    cf = small_case(tmp_path, demo_assets, lora, "custody")
    out = tmp_path / "case"
    with pytest.raises(AuditError, match="changed during the run"):
        run_full(load_case(cf), out, progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["custody_ok"] is False
    assert [i["unchanged"] for i in manifest["inputs"] if i["role"] == "lora"] == [False]
    text = pdftext(out / "report.pdf")
    assert "CHAIN OF CUSTODY FAILED" in text and "CUSTODY CHECK FAILED" in text
    assert "Custody check passed" not in text


def test_image_changed_after_run_is_flagged(demo_case_dir, tmp_path):
    case = copy_case(demo_case_dir, tmp_path / "c")
    img = case / "images" / "lora" / "p002_s1.png"
    from PIL import Image

    im = Image.open(img).convert("RGB")
    arr = np.asarray(im).copy()
    arr[0, 0] = 255 - arr[0, 0]
    Image.fromarray(arr).save(img)
    text = pdftext(render_report(case))
    assert "do not match the sha256 recorded" in text
    assert "p002_s1" in text


def test_missing_image_is_an_error(demo_case_dir, tmp_path):
    case = copy_case(demo_case_dir, tmp_path / "c")
    os.unlink(case / "images" / "base" / "p003_s2.png")
    with pytest.raises(AuditError, match="lacks images/base/p003_s2.png"):
        render_report(case)
