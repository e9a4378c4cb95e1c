"""The opposing expert's kit: export (deterministic, no machine path), reproduce (refusals,
identical on the same machine, differences under another thread count, a kit whose results
were not what the LoRA gives), the reproduction PDF."""

from __future__ import annotations

import json
import subprocess
import zipfile
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import REPO

from carlos_audit.case.casefile import parse_case
from carlos_audit.case.protocol import load_prompts
from carlos_audit.cli import main
from carlos_audit.fileio import read_json
from carlos_audit.hashing import sha256_bytes
from carlos_audit.kit.export import export_case, zip_bytes
from carlos_audit.paths import portable_command


def pdftext(pdf: Path) -> str:
    return subprocess.run(["pdftotext", "-layout", str(pdf), "-"], capture_output=True, text=True, check=True).stdout


@pytest.fixture(scope="module")
def kit(demo_case_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("kit") / "demo-kit.zip"
    r = CliRunner().invoke(main, ["export", str(demo_case_dir), "--out", str(out)])
    assert r.exit_code == 0, r.output
    return out


def machine_paths(demo_case_dir: Path) -> list[str]:
    import os

    return sorted({str(demo_case_dir), str(demo_case_dir.parent), os.environ["CARLOS_AUDIT_HOME"], str(Path.home()), str(REPO)})


def test_export_twice_gives_the_same_bytes_and_no_machine_path(kit, demo_case_dir, tmp_path):
    again = tmp_path / "again.zip"
    r = CliRunner().invoke(main, ["export", str(demo_case_dir), "--out", str(again)])
    assert r.exit_code == 0, r.output
    assert again.read_bytes() == kit.read_bytes()

    with zipfile.ZipFile(kit) as zf:
        infos = zf.infolist()
        names = [i.filename for i in infos]
        assert names == sorted(names)
        assert len({i.date_time for i in infos}) == 1
        assert {(i.external_attr >> 16) & 0o777 for i in infos} == {0o644}
        texts = {n: zf.read(n).decode() for n in names if n.endswith((".json", ".toml", ".md", ".lock"))}
        kit_json = json.loads(zf.read("kit.json"))
        for n in names:
            if n != "kit.json":
                assert sha256_bytes(zf.read(n)) == kit_json["files"][n], n
    for name, text in texts.items():
        for p in machine_paths(demo_case_dir):
            assert p not in text, (name, p)

    # the case file points into the kit, pins the LoRA's hash and reads the prompt suite as run
    extracted = tmp_path / "x"
    zipfile.ZipFile(kit).extractall(extracted)
    case = parse_case(texts["case.toml"], extracted / "case.toml")
    manifest = read_json(demo_case_dir / "manifest.json")
    assert case.lora["path"] == "inputs/lora/target.safetensors"
    assert case.lora["sha256"] == manifest["lora"]["sha256"]
    prompts, _ = load_prompts(case.protocol["prompts"], case.base_dir)
    assert [p.text for p in prompts] == [p["text"] for p in manifest["prompts"]]
    for name in ("report.pdf", "report-archive.pdf"):
        assert kit_json["report"]["copies"][name] == (demo_case_dir / f"{name}.sha256").read_text().split()[0]
    assert kit_json["report"]["sha256"] == kit_json["report"]["copies"]["report.pdf"]
    assert kit_json["originals"]["metrics.json"] == manifest["results"]["metrics.json"]
    assert texts["results/metrics.json"] == (demo_case_dir / "metrics.json").read_text()
    roles = {i["role"]: i for i in kit_json["inputs"]}
    assert roles["lora"]["included"] is False and roles["lora"]["size"] > 0
    assert "inputs/lora/target.safetensors" not in names
    lock = texts["environment.lock"].splitlines()
    names_in_lock = [line.split("==")[0] for line in lock]
    assert "torch" in names_in_lock and names_in_lock == sorted(names_in_lock)


def test_export_include_inputs_and_refuse_a_modified_case(demo_case_dir, tmp_path):
    import shutil

    kit = export_case(demo_case_dir, tmp_path / "k.zip", include_inputs=True, images=False)
    with zipfile.ZipFile(tmp_path / "k.zip") as zf:
        names = zf.namelist()
        lora = zf.read("inputs/lora/target.safetensors")
    assert sha256_bytes(lora) == next(i["sha256"] for i in kit["inputs"] if i["role"] == "lora")
    assert not any(n.startswith("results/images/") for n in names)
    assert any(n.startswith("results/embeddings/") for n in names)

    case = shutil.copytree(demo_case_dir, tmp_path / "case")
    m = read_json(case / "manifest.json")
    m["case"]["examiner"] = "someone else"
    (case / "manifest.json").write_text(json.dumps(m))
    r = CliRunner().invoke(main, ["export", str(case), "--out", str(tmp_path / "bad.zip")])
    assert r.exit_code == 1 and "manifest.json.sha256" in r.output and len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "bad.zip").exists()


def test_recorded_command_and_appendix_d_carry_no_machine_path(demo_case_dir):
    # the manifest keeps the command as typed (it reproduces the run on this machine, see
    # test_indicators_compare); what is shown to others (Appendix D, the kit) is the portable form
    manifest = read_json(demo_case_dir / "manifest.json")
    assert portable_command(manifest["run"]["command"])[:3] == ["carlos-audit", "run", "demo.toml"]
    assert portable_command(["carlos-audit", "run", "/home/alice/cases/x.toml", "--out", "/evidence/x", "--allow-partial"]) == \
        ["carlos-audit", "run", "x.toml", "--out", "x", "--allow-partial"]
    text = pdftext(demo_case_dir / "report.pdf")
    start = text.index("Reproducing this run", text.index("Reproducing this run") + 1)  # past the contents
    appendix = text[start:]
    assert "carlos-audit run demo.toml" in appendix
    for p in machine_paths(demo_case_dir):
        assert p not in appendix


def test_zip_is_refused_a_path_outside(tmp_path):
    from carlos_audit.errors import AuditError

    with pytest.raises(AuditError, match="refusing"):
        zip_bytes({"../evil": b"x"}, 0)


def test_reproduce_refuses_a_different_lora_or_a_modified_kit_before_generating(kit, demo_assets, tmp_path):
    out = tmp_path / "r"
    r = CliRunner().invoke(main, ["reproduce", str(kit), "--lora", demo_assets["loras"]["weak"], "--out", str(out), "--sample", "1"])
    assert r.exit_code == 1
    assert "refusing to reproduce, nothing generated" in r.output and "lora weak.safetensors" in r.output
    assert len(r.output.strip().splitlines()) == 1
    assert not (out / "case").exists()

    # a kit whose stored results were edited after export is refused as damaged
    bad = tmp_path / "bad.zip"
    with zipfile.ZipFile(kit) as src, zipfile.ZipFile(bad, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename == "results/metrics.json":
                data = data.replace(b'"strength"', b'"strength" ', 1)
            dst.writestr(info, data)
    r = CliRunner().invoke(main, ["reproduce", str(bad), "--lora", demo_assets["loras"]["target"], "--out", str(tmp_path / "r2")])
    assert r.exit_code == 1 and "results/metrics.json does not match its sha256" in r.output
    assert not (tmp_path / "r2" / "case").exists()


def test_reproduce_on_the_same_machine_is_identical_and_writes_the_pdf(kit, demo_assets, tmp_path):
    out = tmp_path / "repro"
    r = CliRunner().invoke(main, ["reproduce", str(kit), "--lora", demo_assets["loras"]["target"], "--out", str(out),
                                  "--sample", "2", "--seed", "3", "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "IDENTICAL" in r.output
    rep = read_json(out / "reproduction.json")
    assert rep["verdict"] == "identical" and rep["environment"]["differences"] == []
    cats = {row["category"] for row in read_json(out / "kit" / "results" / "manifest.json")["pairs"]
            if row["pair_id"] in rep["sample"]["pairs"]}
    assert len(rep["sample"]["pairs"]) == 2 and len(cats) == 2  # stratified: two categories
    assert rep["summary"]["images_identical"] == rep["summary"]["images_compared"] > 0
    assert all(i["feature_cosine"] == pytest.approx(1.0, abs=1e-12) for i in rep["images"])
    main_m = rep["metrics"]["main"]
    assert main_m["strength"]["original"] == main_m["strength"]["reproduction"]
    assert "cmp1" not in rep["summary"]["arms"]  # the comparison LoRA was not given

    pdf = out / "reproduction.pdf"
    text = pdftext(pdf)
    assert "Reproduction of Exhibit D-1" in text and "IDENTICAL" in text
    first = pdf.read_bytes()
    from carlos_audit.kit.document import render_reproduction

    render_reproduction(out)
    assert pdf.read_bytes() == first
    assert (out / "reproduction.pdf.sha256").read_text().split()[0] == sha256_bytes(first)
    # the report's PDF writer and pre-flight check: tagged, in a language, headings in order
    from carlos_audit.report.preflight import preflight

    checks = {c["check"]: c["ok"] for c in preflight(pdf)["checks"]}
    assert checks["tagged (accessibility)"] and checks["headings in order"] and checks["fonts embedded"]
    assert not checks["no embedded files"]  # reproduction.json is embedded on purpose


def test_reproduce_under_another_thread_count_names_the_difference(kit, demo_assets, demo_case_dir, tmp_path):
    import torch

    from carlos_audit.kit.reproduce import reproduce

    before = torch.get_num_threads()
    then = read_json(demo_case_dir / "manifest.json")["environment"]["torch_threads"]
    other = 1 if then != 1 else 2
    rep = reproduce(kit, tmp_path / "t", lora=demo_assets["loras"]["target"], sample=1, threads=other, progress=False,
                    render=False)
    assert torch.get_num_threads() == before
    rows = {d["what"]: d for d in rep["environment"]["differences"]}
    assert rows["torch_threads"] == {"what": "torch_threads", "kit": then, "here": other, "numeric": True}
    all_same = all(i["image_identical"] for i in rep["images"])
    assert (rep["verdict"] == "identical") == all_same
    # measured (docs/REPRODUCIBILITY.md): a thread count changes low bits, never the reading
    assert rep["reasons"] == [] and rep["verdict"] in ("identical", "within tolerance")
    assert all(e["numerically_close"] for m in rep["metrics"].values() for e in (m["strength"], m["consistency"]))
    for i in rep["images"]:
        assert i["feature_cosine"] >= 0.999
        assert i["image_identical"] or i["pixels"]["psnr_db"] > 40


def test_reproduce_reports_different_results(kit, demo_assets, tmp_path):
    """A kit whose stored features are not what the LoRA gives (rebuilt with consistent hashes,
    as a careless or dishonest kit would be): verdict different, exit status 5."""
    import io

    import numpy as np

    src = zipfile.ZipFile(kit)
    entries = {i.filename: src.read(i) for i in src.infolist()}
    kit_json = json.loads(entries["kit.json"])
    for name in [n for n in entries if n.startswith("results/embeddings/lora/")]:
        v = np.load(io.BytesIO(entries[name]))
        buf = io.BytesIO()
        np.save(buf, np.roll(v, 1).astype("<f4"))
        entries[name] = buf.getvalue()
        kit_json["files"][name] = sha256_bytes(entries[name])
    entries["kit.json"] = json.dumps(kit_json).encode()
    forged = tmp_path / "forged.zip"
    forged.write_bytes(zip_bytes(entries, 0))
    out = tmp_path / "f"
    r = CliRunner().invoke(main, ["reproduce", str(forged), "--lora", demo_assets["loras"]["target"], "--out", str(out),
                                  "--sample", "1", "--no-progress"])
    assert r.exit_code == 5, r.output
    rep = read_json(out / "reproduction.json")
    assert rep["verdict"] == "different" and rep["reasons"]
    assert any("feature cosine below" in x for x in rep["reasons"])
    assert "DIFFERENT" in pdftext(out / "reproduction.pdf")
