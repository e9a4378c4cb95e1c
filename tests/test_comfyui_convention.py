"""``[lora] convention = "comfyui"`` end to end: a case applies the file as ComfyUI does, the
manifest records the convention and how the reference would differ, verify regenerates through
the same convention, and the report's method section says which convention was used and how the
other one differs; an (IA)^3 file under ComfyUI's convention is reported as applying nothing."""

from __future__ import annotations

import json
import subprocess

import pytest
from click.testing import CliRunner

from conftest import write_case
from lycoris_files import make_lycoris_file, quiet

from carlos_audit.cli import main
from carlos_audit.fileio import read_json
from carlos_audit.lora.inspection import inspect_lora
from carlos_audit.record_sections import Lora
from carlos_audit.report.method import convention_rows
from carlos_audit.run.load import load_lora
from carlos_audit.run.patch import unload


@pytest.fixture(scope="module")
def tiny(carlos_home):
    from carlos_audit.models.loading import load_base_pipeline

    return load_base_pipeline("embedded:tiny-sd", dtype="float32", device="cpu").pipe


@pytest.fixture(scope="module")
def made(tiny, tmp_path_factory):
    folder = tmp_path_factory.mktemp("conv")
    with quiet():
        return {f: make_lycoris_file(tiny, f, folder / f"{f}.safetensors", seed=3).path for f in ("dora", "ia3", "loha")}


def test_an_unknown_convention_is_refused_in_one_line(demo_assets, tmp_path):
    cf = write_case(tmp_path, demo_assets, extra="")
    cf.write_text(cf.read_text().replace('trigger_policy = "both"', 'trigger_policy = "both"\nconvention = "forge"'))
    r = CliRunner().invoke(main, ["check", str(cf)])
    assert r.exit_code != 0 and "lora.convention 'forge'; allowed: reference, comfyui" in r.output
    assert "Traceback" not in r.output


def test_ia3_under_comfyui_applies_nothing_and_says_so(tiny, made):
    path = made["ia3"]
    state = load_lora(tiny, path, "t", inspect_lora(path), allow_partial=False, convention="comfyui")
    unload(tiny)
    fam = state["application"]["families"]["ia3"]
    assert state["partial"] is False and fam["unchanged"] == fam["modules"] == state["applied"] > 0
    assert fam["delta_norm"] == 0.0
    against = state["application"]["against"]
    assert against["convention"] == "reference" and against["modules_differing"] == fam["modules"]
    rows = dict(convention_rows(Lora.from_json({"convention": "comfyui", "load": state})))
    assert rows["Left unchanged by the convention"].startswith("ComfyUI applies nothing of this file")
    assert "comfyui: ComfyUI's behaviour (Comfy-Org/ComfyUI at commit a125cd84)" == rows["Application convention"]
    assert rows["Under the other convention"] == (f"the reference implementation changes {fam['modules']} modules at scale 1 "
                                                  "that the convention above leaves unchanged")


def test_loha_conventions_agree_and_the_report_says_so(tiny, made):
    path = made["loha"]
    state = load_lora(tiny, path, "t", inspect_lora(path), allow_partial=False, convention="reference", scale=0.5)
    unload(tiny)
    against = state["application"]["against"]
    assert against == {"convention": "comfyui", "scale": 0.5, "modules_differing": 0,
                       "relative_difference": against["relative_difference"], "modules": []}
    assert against["relative_difference"] < 1e-9
    rows = dict(convention_rows(Lora.from_json({"load": state})))
    assert rows["Under the other convention"].startswith("ComfyUI's behaviour (Comfy-Org/ComfyUI at commit a125cd84) "
                                                         "gives the same weights at scale 0.5")


def test_a_dora_case_under_comfyui_runs_verifies_and_reports(demo_assets, made, tmp_path):
    extra = "[indicators]\ntrigger_dependence = false\nprompt_override = false\neffect_labels = false"
    cf = write_case(tmp_path, demo_assets, lora=str(made["dora"]), steps=2, scale=0.5, extra=extra)
    cf.write_text(cf.read_text().replace('trigger_policy = "both"', 'trigger_policy = "both"\nconvention = "comfyui"'))
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["run", str(cf), "--out", str(out), "--no-progress"])
    assert r.exit_code == 0, r.output
    lora = read_json(out / "manifest.json")["lora"]
    assert lora["convention"] == lora["load"]["application"]["convention"] == "comfyui"
    against = lora["load"]["application"]["against"]
    assert against["convention"] == "reference" and against["scale"] == 0.5
    assert against["modules_differing"] == lora["load"]["applied"] == 151 and against["relative_difference"] > 0.1
    assert "lora_convention" in json.dumps(read_json(out / "manifest.json")["signature"])
    r = CliRunner().invoke(main, ["verify", str(out), "--sample", "1", "--json"])
    assert r.exit_code == 0, r.output
    checks = {c["check"]: c for c in json.loads(r.output)["checks"]}
    assert checks["LoRA application"]["ok"] and all(c["ok"] for n, c in checks.items() if n.startswith("regenerate"))
    r = CliRunner().invoke(main, ["report", str(out)])
    assert r.exit_code == 0, r.output
    pdf = out / "report.pdf"
    text = " ".join(subprocess.run(["pdftotext", "-layout", str(pdf), "-"], capture_output=True, text=True, check=True).stdout.split())
    assert "Application convention comfyui: ComfyUI's behaviour (Comfy-Org/ComfyUI at commit a125cd84)" in text
    # the label's cell wraps beside its value (pdftotext -layout interleaves them): the value checked in its parts
    assert "Under the other" in text and "the reference implementation gives different weights at scale 0.5: 151" in text
    assert "modules differ, relative difference" in text
