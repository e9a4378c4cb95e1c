"""Full-size SDXL base 1.0 (published configs, random weights written tensor by tensor, cached in
$CARLOS_AUDIT_FIXTURES) with kohya's default module set (986 modules: UNet in SGM names,
lora_te1_, lora_te2_). Run by `make test-real` only (13.6 GB of fixtures; see docs/TESTING-REAL.md)."""

from __future__ import annotations

import pytest

from fullsize_fixtures import ensure_random_pipeline, write_kohya_lora
from carlos_audit.run import load as load_mod
from conftest import full_size_case

pytestmark = pytest.mark.real


def test_sdxl_kohya_with_both_text_encoders_is_fully_applied_and_verified(carlos_home, tmp_path):
    """Defect 1 on SDXL: "72 of 986 modules were not applied" (te1)."""
    from carlos_audit.pipeline import run_case
    from carlos_audit.verify import verify_case

    folder = ensure_random_pipeline("sdxl")
    lora = write_kohya_lora("sdxl", tmp_path / "kohya-xl.safetensors")
    load_mod.process_models().clear()
    try:
        m = run_case(full_size_case(tmp_path, folder, lora), tmp_path / "out", progress=False).manifest.to_json()
        load = m["lora"]["load"]
        assert load["partial"] is False and load["applied"] == load["in_file"] == 986
        assert load["by_component"] == {"text_encoder": 72, "text_encoder_2": 192, "unet": 722}
        assert m["base_model"]["architecture"] == "sdxl"
        assert verify_case(tmp_path / "out", sample=1)["ok"]
    finally:
        load_mod.process_models().clear()


def test_sdxl_lora_on_sd15_is_refused_before_generation(carlos_home, tmp_path):
    from carlos_audit.lora.inspection import inspect_lora

    lora = write_kohya_lora("sdxl", tmp_path / "xl.safetensors", only="unet")
    assert inspect_lora(lora)["architecture"] == "sdxl"
