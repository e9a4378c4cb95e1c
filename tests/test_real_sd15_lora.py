"""Full-size SD 1.5 (published configs, random weights built tensor by tensor, cached once per
machine in $CARLOS_AUDIT_FIXTURES) with real LoRA layouts: kohya's default module set with the
text encoder, diffusers/peft files, LyCORIS LoHa/LoKr; an fp16-variant folder. Each test names the
defect of issue #11 it guards."""

from __future__ import annotations

import pytest

from carlos_audit.errors import AuditError
from carlos_audit.lora.inspection import inspect_lora
from fullsize_fixtures import (
    ensure_random_pipeline,
    write_kohya_lora,
    write_lycoris_lora,
    write_peft_lora,
)
from carlos_audit.run.load import load_lora


@pytest.fixture(scope="module")
def sd15(carlos_home):
    return ensure_random_pipeline("sd15")


@pytest.fixture(scope="module")
def sd15_pipe(sd15):
    from carlos_audit.models.loading import load_base_pipeline

    lp = load_base_pipeline(str(sd15), dtype="float32", device="cpu")
    yield lp
    del lp


def _load(pipe, path, adapter, allow_partial=False):
    from carlos_audit.run.patch import unload

    try:
        return load_lora(pipe, path, adapter, inspect_lora(path), allow_partial)
    finally:
        unload(pipe)  # a weight-patch adapter (LyCORIS families)
        if adapter in (pipe.get_list_adapters().get("unet", []) + pipe.get_list_adapters().get("text_encoder", [])):
            pipe.delete_adapters(adapter)


def test_kohya_default_set_with_text_encoder_is_fully_applied(sd15_pipe, tmp_path):
    """Defect 1: "72 of 264 modules were not applied" although peft wrapped all 264."""
    f = write_kohya_lora("sd15", tmp_path / "kohya.safetensors")
    state = _load(sd15_pipe.pipe, f, "k")
    assert state["partial"] is False and state["skipped"] == []
    assert state["applied"] == state["in_file"] == 264
    assert state["by_component"] == {"text_encoder": 72, "unet": 192}


def test_peft_files_with_text_encoder_are_fully_applied(sd15_pipe, tmp_path):
    for prefix in (True, False):
        f = write_peft_lora("sd15", tmp_path / f"peft{prefix}.safetensors", text_model_prefix=prefix)
        state = _load(sd15_pipe.pipe, f, f"p{int(prefix)}")
        assert state["partial"] is False and state["applied"] == state["in_file"] == 64 + 48, state  # attn2 q,k,v,out of 16 blocks; 12 layers x q,k,v,out


def test_unapplied_module_is_counted_once_with_its_reason(sd15_pipe, tmp_path):
    """Defect 2: with --allow-partial the counts contradicted each other ("264 of 264")."""
    from safetensors.torch import load_file, save_file

    f = write_kohya_lora("sd15", tmp_path / "k.safetensors")
    t = load_file(str(f))
    bogus = "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn2_to_nowhere"
    t[bogus + ".lora_down.weight"] = t["lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"] * 2
    t[bogus + ".lora_up.weight"] = t["lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight"] * 2
    save_file(t, str(tmp_path / "partial.safetensors"))
    with pytest.raises(AuditError, match=r"1 of 265 modules in the file were not applied.*to.nowhere.*--allow-partial"):
        _load(sd15_pipe.pipe, tmp_path / "partial.safetensors", "x")
    state = _load(sd15_pipe.pipe, tmp_path / "partial.safetensors", "y", allow_partial=True)
    assert state["partial"] and state["applied"] == 264 and state["in_file"] == 265
    assert [s["module"] for s in state["skipped"]] == ["unet.up_blocks.1.attentions.0.transformer_blocks.0.attn2.to.nowhere"]
    assert "no module of the base model took it" in state["skipped"][0]["reason"]


@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_lycoris_files_are_applied_by_weight_patch(sd15_pipe, tmp_path, kind):
    """kohya-named LyCORIS LoHa/LoKr for SD 1.5 (diffusers does not load them) are applied by
    weight patch, every module accounted for (the library-made files: test_real_sd15_lycoris.py)."""
    f = write_lycoris_lora("sd15", tmp_path / f"{kind}.safetensors", kind)
    state = _load(sd15_pipe.pipe, f, kind)
    assert state["applied"] == state["in_file"] == 8 and state["application"]["method"] == "weight_patch"


def test_fp16_variant_folder_gives_the_same_images(sd15_pipe, tmp_path):
    """Defect 6 on the full-size layout: [base_model] variant loads *.fp16.safetensors."""
    from carlos_audit.hashing import sha256_bytes
    from carlos_audit.models.loading import load_base_pipeline
    from carlos_audit.run.generate import GenerationParams, generate_batch
    from carlos_audit.casefolder.unit_store import png_bytes

    params = GenerationParams(2, 5.0, 64, 64, "PNDMScheduler", "")
    want = [sha256_bytes(png_bytes(i)) for i in generate_batch(sd15_pipe.pipe, ["a red car"], [0], params)]
    folder = ensure_random_pipeline("sd15", variant="fp16")
    with pytest.raises(AuditError, match='variant = "fp16"'):
        load_base_pipeline(str(folder), dtype="float32", device="cpu")
    lp = load_base_pipeline(str(folder), dtype="float32", device="cpu", variant="fp16")
    assert [sha256_bytes(png_bytes(i)) for i in generate_batch(lp.pipe, ["a red car"], [0], params)] == want
