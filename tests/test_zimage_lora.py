"""Z-Image LoRAs in every layout their trainers write, applied natively by the tool's weight
patch and checked against each format's reference: the dense merge of the peft source, diffusers'
own loader where it loads the file, the LyCORIS library's forward for its families; the
full-size key maps on the meta device; the wrong-family refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from zimage_lora_writers import (PEFT_LAYOUTS, diffusers_changes, layout_alpha, library_forward_error, lycoris_file,
                                peft_weight_changes, rel_error, tool_changes, write_layout)

from carlos_audit.errors import AuditError

REPO = Path(__file__).resolve().parents[1]
TOL = 1e-5  # relative to the largest weight change; the files are float32


@pytest.fixture(scope="module")
def tiny(carlos_home):
    from carlos_audit.models.loading import load_base_pipeline

    return load_base_pipeline("embedded:tiny-zimage", dtype="float32", device="cpu")


@pytest.mark.parametrize("layout", PEFT_LAYOUTS)
def test_every_trainer_layout_is_applied_whole_and_equals_its_references(tiny, tmp_path, layout):
    path = write_layout(tmp_path / f"{layout}.safetensors", tiny.pipe.transformer, layout)
    state, inspection, changes = tool_changes(tiny.pipe, path)
    assert inspection["architecture"] == "zimage" and inspection["layout"] == layout
    assert (state["partial"], state["skipped"], state["applied"]) == (False, [], inspection["module_count"])
    assert state["application"]["method"] == "weight_patch"
    source = peft_weight_changes(tiny.pipe.transformer, alpha=layout_alpha(layout))
    if layout in ("kohya_zimage", "comfyui"):  # musubi-tuner leaves the modulation and the refiners out
        source = {n: d for n, d in source.items() if "modulation" not in n and "refiner" not in n}
    assert rel_error(changes, source) < TOL  # the dense merge of the peft LoRA every file came from
    if layout == "comfyui":  # one fused attention.qkv per block, split over to_q / to_k / to_v
        qkv = [r for r in inspection["modules"] if r["name"].endswith(".attention.qkv")]
        assert len(qkv) == 2 and all(r["out_features"] == 96 for r in qkv)
    reference = diffusers_changes(path)
    if isinstance(reference, dict) and reference:
        assert rel_error(changes, reference) < TOL


LYCORIS_ALGOS = {"lora": {}, "lokr": {"factor": 4}, "loha": {}, "dora": {"algo": "lora", "dora_wd": True}}


@pytest.mark.parametrize("family", sorted(LYCORIS_ALGOS))
def test_lycoris_families_on_the_z_image_transformer_equal_the_library_forward(tiny, tmp_path, family):
    kwargs = dict(LYCORIS_ALGOS[family])
    algo = kwargs.pop("algo", family)
    path, net, model = lycoris_file(tmp_path / f"{family}.safetensors", tiny.pipe.transformer, algo, **kwargs)
    state, inspection, changes = tool_changes(tiny.pipe, path)
    assert inspection["architecture"] == "zimage" and inspection["layout"] == "lycoris"
    assert (state["partial"], state["skipped"]) == (False, [])
    assert state["applied"] == inspection["module_count"] == len(net.loras)
    assert library_forward_error(net, model, tiny.pipe, changes) < TOL


def test_full_size_key_maps_cover_every_targetable_module_of_the_meta_transformer():
    from carlos_audit.lora.zimage_keys import diffusers_name, parse_zimage_key, targets, transformer_linears

    for variant in ("zimage-turbo", "zimage-base"):
        config = json.loads((REPO / "carlos_audit" / "models" / "configs" / variant / "transformer" / "config.json").read_text())
        linears = transformer_linears(config)
        assert len(linears) == 30 * 8 + 2 * 8 + 2 * 7 + 2 + 1 + 1 + 2  # layers, noise and context refiners, embedders, final layer
        for name in linears:
            body = name.removeprefix("transformer.")
            for key in (f"diffusion_model.{body}.lora_A.weight", f"lora_unet_{body.replace('.', '_')}.lora_down.weight",
                        f"{name}.lora_B.weight", f"base_model.model.{body}.lora_A.weight",
                        f"{body}.lora_A.default.weight", f"lycoris_{body.replace('.', '_')}.lokr_w1"):
                assert parse_zimage_key(key)[1] == name, key
        for i in range(30):  # the original names: fused qkv split in thirds of 3840 rows, out, embedders
            rows = targets(f"transformer.layers.{i}.attention.qkv", 3 * 3840)
            assert [(t, b - a) for t, a, b in rows] == [(f"transformer.layers.{i}.attention.{p}", 3840) for p in ("to_q", "to_k", "to_v")]
            assert all(t in linears for t, _, _ in rows)
            assert "transformer." + diffusers_name(f"layers.{i}.attention.out") in linears
        assert "transformer." + diffusers_name("x_embedder") in linears
        assert "transformer." + diffusers_name("final_layer.linear") in linears
        assert linears["transformer.layers.0.attention.to_q"] == (3840, 3840)


def _case(tmp_path, source: str, lora: Path) -> Path:
    from flux_lora_writers import flux_case_text

    path = tmp_path / "case.toml"
    path.write_text(flux_case_text(source, "steps = 1\nwidth = 64\nheight = 64\nmax_sequence_length = 16", lora=str(lora)))
    return path


def test_a_flux_lora_on_z_image_and_a_z_image_lora_on_flux_are_refused_in_one_line(tiny, tmp_path, carlos_home):
    from flux_lora_writers import write_flux_lora

    from carlos_audit.case.casefile import load_case
    from carlos_audit.models.loading import load_base_pipeline
    from carlos_audit.run.load import load_models

    flux = load_base_pipeline("embedded:tiny-flux", dtype="float32", device="cpu")
    flux_lora = tmp_path / "flux.safetensors"
    write_flux_lora(flux_lora, flux.pipe.transformer, "diffusers_peft")
    zimage_lora = write_layout(tmp_path / "z.safetensors", tiny.pipe.transformer, "ai_toolkit")
    from carlos_audit.lora.inspection import inspect_lora

    for source, lora, arch, base in (("embedded:tiny-zimage", flux_lora, "flux", "zimage"),
                                     ("embedded:tiny-flux", zimage_lora, "zimage", "flux")):
        case = load_case(_case(tmp_path, source, lora))
        with pytest.raises(AuditError) as e:
            load_models(case, {"lora": lora}, inspect_lora(lora))
        msg = str(e.value)
        assert "\n" not in msg and f"targets {arch} but the base model {source} is {base}" in msg


def test_a_z_image_lora_wider_than_the_base_is_refused_naming_both(tiny, tmp_path):
    """A full-width (3840) Z-Image LoRA on the tiny (32) transformer: refused before any generation
    with both named; the weight patch alone would refuse it too, with the layer's shape."""
    from safetensors.torch import save_file

    from carlos_audit.case.casefile import load_case
    from carlos_audit.lora.inspection import inspect_lora
    from carlos_audit.run.load import load_lora, load_models

    path = tmp_path / "wide.safetensors"
    save_file({"diffusion_model.layers.0.attention.to_q.lora_A.weight": torch.ones(4, 3840),
               "diffusion_model.layers.0.attention.to_q.lora_B.weight": torch.ones(3840, 4)}, str(path))
    inspection = inspect_lora(path)
    assert inspection["architecture_evidence"]["width"] == 3840
    with pytest.raises(AuditError) as e:
        load_models(load_case(_case(tmp_path, "embedded:tiny-zimage", path)), {"lora": path}, inspect_lora(path))
    msg = str(e.value)
    assert "\n" not in msg
    assert ("LoRA wide.safetensors is a Z-Image LoRA of width 3840 but the base model embedded:tiny-zimage "
            "(zimage-turbo) has width 32; refusing before any generation") == msg
    with pytest.raises(AuditError) as e:
        load_lora(tiny.pipe, path, "w", inspection, allow_partial=False)
    msg = str(e.value)
    assert "\n" not in msg and "transformer.layers.0.attention.to_q" in msg and "(32, 32)" in msg


@pytest.mark.parametrize("metadata, variant", [
    ({"ss_dit": "/models/z_image_turbo_bf16.safetensors"}, "zimage-turbo"),
    ({"config": '{"model": {"name_or_path": "Tongyi-MAI/Z-Image"}}'}, "zimage-base"),
    ({"modelspec.title": "my Z-Image Base LoRA"}, "zimage-base"),
    ({"ss_base_model_version": "zimage"}, None),
])
def test_the_declared_base_variant_is_read_from_the_metadata(tiny, tmp_path, metadata, variant):
    from carlos_audit.lora.inspection import inspect_lora

    path = write_layout(tmp_path / "m.safetensors", tiny.pipe.transformer, "peft", metadata=metadata)
    evidence = inspect_lora(path)["architecture_evidence"]
    assert evidence.get("declared_variant") == variant
