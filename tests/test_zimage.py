"""Z-Image base models: the family entry, the embedded tiny Z-Image pipeline, Turbo vs Base from a
folder's configs, Z-Image case-file fields and defaults, the signature, `init` and `check`, and
casefiles/demo-zimage.toml through `carlos-audit demo` to both report copies."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from flux_lora_writers import flux_case_text

from carlos_audit.errors import AuditError

REPO = Path(__file__).resolve().parents[1]
ZIMAGE_CASE = REPO / "casefiles" / "demo-zimage.toml"


@pytest.fixture(scope="module")
def zimage_assets(carlos_home):
    from carlos_audit.demo import prepare_family_demo

    return prepare_family_demo("embedded:tiny-zimage")


@pytest.fixture(scope="module")
def zimage_demo_dir(zimage_assets, carlos_home, tmp_path_factory):
    """casefiles/demo-zimage.toml through the CLI's `demo` command, as a user runs it."""
    out = tmp_path_factory.mktemp("cases") / "demo-zimage"
    env = dict(os.environ, CARLOS_AUDIT_HOME=str(carlos_home), PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-m", "carlos_audit.cli", "demo", "--casefile", str(ZIMAGE_CASE),
                           "--out", str(out)], capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    return out


def _parse(tmp_path, text):
    from carlos_audit.case.casefile import parse_case

    return parse_case(text, tmp_path / "c.toml")


def _folder(tmp_path, variant: str) -> Path:
    """A diffusers Z-Image folder's configs (the carried ones of ``variant``)."""
    folder = tmp_path / variant
    src = REPO / "carlos_audit" / "models" / "configs" / variant
    for rel in ("model_index.json", "scheduler/scheduler_config.json", "transformer/config.json"):
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes((src / rel).read_bytes())
    return folder


def test_the_registry_entry_names_the_pipeline_variants_and_embedded_model():
    from carlos_audit.models.families import EMBEDDED_SOURCES, FAMILIES, family_of_embedded, family_of_variant

    fam = FAMILIES["zimage"]
    assert fam.pipeline == "ZImagePipeline" and set(fam.variants) == {"zimage-turbo", "zimage-base"}
    assert family_of_variant("zimage-base") is fam and family_of_embedded("embedded:tiny-zimage") is fam
    assert "embedded:tiny-zimage" in EMBEDDED_SOURCES and "embedded:tiny-flux" in EMBEDDED_SOURCES
    for variant in fam.variants:  # carried full-size configs, one folder per variant
        cfg = json.loads((REPO / "carlos_audit" / "models" / "configs" / variant / "transformer" / "config.json").read_text())
        assert (cfg["dim"], cfg["n_layers"], cfg["cap_feat_dim"]) == (3840, 30, 2560)


def test_rebuilding_the_tiny_zimage_pipeline_is_byte_identical(zimage_assets, tmp_path):
    from carlos_audit.hashing import tree_sha256
    from carlos_audit.models.zimage import ensure_tiny_zimage

    again = ensure_tiny_zimage(home=tmp_path)
    assert tree_sha256(again) == tree_sha256(Path(zimage_assets["tiny_zimage"]))
    index = json.loads((again / "model_index.json").read_text())
    assert index["_class_name"] == "ZImagePipeline"
    assert (index["transformer"][1], index["text_encoder"][1]) == ("ZImageTransformer2DModel", "Qwen3Model")
    vae = json.loads((again / "vae" / "config.json").read_text())
    assert vae["latent_channels"] == 16 and vae["shift_factor"] == 0.1159


def test_tiny_zimage_loads_as_turbo_and_its_qwen_tokenizer_works_offline(zimage_assets):
    from carlos_audit.models.loading import load_base_pipeline

    lp = load_base_pipeline("embedded:tiny-zimage", dtype="float32", device="cpu")
    assert (lp.architecture, lp.variant_family, type(lp.pipe).__name__) == ("zimage", "zimage-turbo", "ZImagePipeline")
    text = lp.pipe.tokenizer.apply_chat_template([{"role": "user", "content": "a red cat"}], tokenize=False,
                                                 add_generation_prompt=True, enable_thinking=True)
    assert text == "<|im_start|>user\na red cat<|im_end|>\n<|im_start|>assistant\n"
    ids = lp.pipe.tokenizer(text).input_ids
    assert lp.pipe.tokenizer.convert_tokens_to_ids("<|im_start|>") in ids and lp.pipe.tokenizer.decode(ids) == text
    assert {"transformer/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors",
            "tokenizer/tokenizer.json", "scheduler/scheduler_config.json"} <= {f["name"] for f in lp.files}


def test_a_zimage_hub_id_resolves_from_the_local_cache_with_its_variant(zimage_assets, tmp_path, monkeypatch):
    from conftest import hub_layout

    from carlos_audit.models.loading import load_base_pipeline

    hub_layout(Path(zimage_assets["tiny_zimage"]), tmp_path / "hub", repo="someorg/tiny-zimage")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    case = _parse(tmp_path, flux_case_text("someorg/tiny-zimage"))
    assert case.base_model["family"] == "zimage-turbo" and case.protocol["steps"] == 9
    lp = load_base_pipeline("someorg/tiny-zimage", dtype="float32", device="cpu")
    assert (lp.identity, lp.architecture, lp.variant_family) == ("hf:someorg/tiny-zimage", "zimage", "zimage-turbo")


def test_zimage_protocol_defaults_follow_the_variant(zimage_assets, tmp_path):
    keys = ("steps", "guidance_scale", "width", "height", "max_sequence_length", "scheduler")
    turbo = _parse(tmp_path, flux_case_text("embedded:tiny-zimage"))
    assert turbo.base_model["family"] == "zimage-turbo"
    assert {k: turbo.protocol[k] for k in keys} == {"steps": 9, "guidance_scale": 0.0, "width": 1024, "height": 1024,
                                                   "max_sequence_length": 512, "scheduler": "FlowMatchEulerDiscreteScheduler"}
    base = _parse(tmp_path, flux_case_text(str(_folder(tmp_path, "zimage-base"))))
    assert base.base_model["family"] == "zimage-base"
    assert (base.protocol["steps"], base.protocol["guidance_scale"], base.protocol["max_sequence_length"]) == (50, 4.0, 512)
    assert _parse(tmp_path, flux_case_text(str(_folder(tmp_path, "zimage-turbo")))).base_model["family"] == "zimage-turbo"
    with_cfg = _parse(tmp_path, flux_case_text(str(_folder(tmp_path, "zimage-base")), 'negative_prompt = "blurry"'))
    assert with_cfg.protocol["negative_prompt"] == "blurry"  # Base runs real classifier-free guidance


@pytest.mark.parametrize("protocol, message", [
    ('negative_prompt = "blurry"', "not used by Z-Image \\(guidance_scale 0: no classifier-free guidance\\)"),
    ("max_sequence_length = 600", "must be 1..512 \\(Qwen tokens\\)"),
    ("width = 72", "multiple of 16 for Z-Image"),
])
def test_bad_zimage_protocol_values_are_one_line_errors(zimage_assets, tmp_path, protocol, message):
    with pytest.raises(AuditError, match=message):
        _parse(tmp_path, flux_case_text("embedded:tiny-zimage", protocol))


def test_zimage_signature_never_matches_an_sdxl_or_flux_corpus(zimage_assets, tmp_path):
    from carlos_audit.case.protocol import load_prompts
    from carlos_audit.case.signature import case_signature, check_compatible, preset_signature, require_compatible

    prompts, _ = load_prompts("builtin:demo", tmp_path)

    def signature(source, protocol):
        case = _parse(tmp_path, flux_case_text(source, protocol))
        return case_signature(case, prompts, base_model=source, base_model_sha256=None, embedder="embedded:tiny-clip",
                              embedder_sha256=None, scheduler="FlowMatchEulerDiscreteScheduler")

    small = "steps = 4\nwidth = 64\nheight = 64\nmax_sequence_length = 32"
    turbo = signature("embedded:tiny-zimage", small)
    assert (turbo["family"], turbo["guidance"], turbo["max_sequence_length"]) == ("zimage-turbo", "none", 32)
    base = signature(str(_folder(tmp_path, "zimage-base")), small + "\nguidance_scale = 4.0")
    assert (base["family"], base["guidance"]) == ("zimage-base", "cfg")
    assert {"family", "guidance"} <= set(check_compatible(turbo, base))
    flux = signature("embedded:tiny-flux", small + "\nguidance_scale = 0.0")
    assert "family" in check_compatible(flux, turbo) and "family" in check_compatible(turbo, flux)
    sdxl = preset_signature("carlos-sdxl-vitb32")
    assert "family" in check_compatible(sdxl, turbo)
    with pytest.raises(AuditError, match="family"):
        require_compatible({k: None for k in sdxl}, turbo)


def test_init_picks_the_zimage_preset_of_the_declared_variant_and_check_lists_the_hub_files(zimage_assets, tmp_path,
                                                                                            monkeypatch):
    from zimage_lora_writers import write_layout

    from carlos_audit.case.casefile import load_case
    from carlos_audit.case.init import init_case
    from carlos_audit.check import check_case
    from carlos_audit.models.loading import load_base_pipeline

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    r = init_case(Path(zimage_assets["loras"]["target"]), out=tmp_path / "turbo.toml")
    assert (r["preset"], r["architecture"]) == ("zimage-turbo", "zimage")
    case = load_case(tmp_path / "turbo.toml")
    assert (case.base_model["source"], case.base_model["family"]) == ("Tongyi-MAI/Z-Image-Turbo", "zimage-turbo")
    assert (case.protocol["steps"], case.protocol["guidance_scale"], case.protocol["max_sequence_length"]) == (9, 0.0, 512)
    transformer = load_base_pipeline("embedded:tiny-zimage", dtype="float32", device="cpu").pipe.transformer
    base_lora = write_layout(tmp_path / "base.safetensors", transformer, "ai_toolkit",
                             metadata={"config": '{"model": {"name_or_path": "Tongyi-MAI/Z-Image"}}'})
    r = init_case(base_lora, out=tmp_path / "base.toml")
    assert r["preset"] == "zimage-base"
    assert load_case(tmp_path / "base.toml").protocol["steps"] == 50
    with pytest.raises(AuditError, match="is a zimage LoRA; preset flux-dev is for flux"):
        init_case(base_lora, preset="flux-dev", out=tmp_path / "other.toml")
    report = check_case(tmp_path / "turbo.toml")
    base = next(i for i in report["inputs"] if i["role"] == "base_model")
    assert base["status"] == "missing" and "transformer/*.safetensors" in base["detail"]
    assert "text_encoder/*.safetensors" in base["detail"] and "Tongyi-MAI/Z-Image-Turbo" in base["supply"]


def test_demo_zimage_case_runs_end_to_end_with_every_module_applied(zimage_demo_dir):
    manifest = json.loads((zimage_demo_dir / "manifest.json").read_text())
    assert (zimage_demo_dir / "report.pdf").is_file() and (zimage_demo_dir / "report-archive.pdf").is_file()
    load = manifest["lora"]["load"]
    assert (load["applied"], load["in_file"], load["skipped"], load["partial"]) == (28, 28, [], False)
    assert load["by_component"] == {"transformer": 28} and load["application"]["method"] == "weight_patch"
    assert (manifest["base_model"]["architecture"], manifest["base_model"]["pipeline"]) == ("zimage", "ZImagePipeline")
    assert manifest["signature"]["family"] == "zimage-turbo" and manifest["signature"]["guidance"] == "none"
    inspection = manifest["lora"]["inspection"]
    assert (inspection["layout"], inspection["architecture_evidence"]["declared_variant"]) == ("ai_toolkit", "zimage-turbo")
    metrics = json.loads((zimage_demo_dir / "metrics.json").read_text())
    assert metrics["strength"] > 0
    text = subprocess.run(["pdftotext", str(zimage_demo_dir / "report.pdf"), "-"], capture_output=True, text=True,
                          check=True).stdout
    for s in ("embedded:tiny-zimage (ZImagePipeline", "Z-Image layout", "28 applied of 28 in the file",
              "declared base variant", "the base model as run is that variant"):
        assert s in " ".join(text.split()), s


def test_demo_zimage_images_differ_between_the_arms(zimage_demo_dir):
    import numpy as np
    from PIL import Image

    manifest = json.loads((zimage_demo_dir / "manifest.json").read_text())
    pair = manifest["pairs"][0]
    base = np.asarray(Image.open(zimage_demo_dir / pair["arms"]["base"]["image"]), dtype=np.int16)
    lora = np.asarray(Image.open(zimage_demo_dir / pair["arms"]["lora"]["image"]), dtype=np.int16)
    assert base.shape == (64, 64, 3) and np.abs(base - lora).mean() > 1.0


def test_a_base_lora_on_turbo_is_stated_in_the_method_section():
    from carlos_audit.record_sections import Inspection
    from carlos_audit.report.method import declared_variant_facts

    inspection = Inspection.from_json({"architecture": "zimage", "architecture_evidence": {
        "rule": "r", "declared_variant": "zimage-base", "declared_by": "ss_dit"}})
    [(label, text)] = declared_variant_facts(inspection, "zimage-turbo")
    assert label == "declared base variant (SELF-REPORTED)"
    assert text.startswith("zimage-base (metadata ss_dit); the base model as run is zimage-turbo")
    assert "sibling variant" in text
    assert declared_variant_facts(Inspection.from_json({"architecture": "flux", "architecture_evidence": {"rule": "r"}}),
                                  "flux-dev") == []
