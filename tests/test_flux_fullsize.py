"""FLUX.1 LoRA layouts at full size without the 24 GB of weights.

A full-size FluxTransformer2DModel is instantiated on the meta device from the carried
FLUX.1-dev config (and CLIP-L from its carried config); LoRA files in each layout are written
with the full-size key names and shapes generated from those modules (rank 1; see
``flux_lora_writers.py`` for the trainers' code each layout follows). Each file must map key for
key onto real modules with the right shapes three ways, and the three must agree: the tool's key
maps (``flux_keys.map_modules``, every module mapped or skipped with a reason), diffusers' own
conversion (``FluxPipeline.lora_state_dict``), and the modules peft wraps when diffusers loads
the converted state dict into the meta transformer (``load_lora_adapter``). What is not run at
full size (no weights): the value match of the accounting and generation; see
docs/TESTING-REAL.md.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
from flux_lora_writers import linears, write_flux_lora

CONFIGS = Path(__file__).resolve().parents[1] / "carlos_audit" / "models" / "configs" / "flux-dev"


@pytest.fixture
def meta_models():
    """Fresh each test: loading an adapter wraps the meta model's layers."""
    import torch
    from diffusers import FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        transformer = FluxTransformer2DModel.from_config(json.loads((CONFIGS / "transformer" / "config.json").read_text()))
        te = CLIPTextModel(CLIPTextConfig(**json.loads((CONFIGS / "text_encoder" / "config.json").read_text())))
    return transformer, te


# layout -> (writer options, modules in the file, of which text encoder)
FULL = {
    "kohya_flux": ({"text_encoder": True}, 19 * 10 + 38 * 3 + 12 * 6, 72),
    "xlabs": ({}, 19 * 4 + 38 * 2, 0),
    "diffusers_peft": ({"text_encoder": True}, 19 * 12 + 38 * 3 + 12 * 6, 72),
    "ai_toolkit": ({}, 19 * 14 + 38 * 6, 0),  # every Linear of the double (14) and single (6) blocks
}


@pytest.mark.parametrize("layout", list(FULL))
def test_full_size_layout_maps_key_for_key_onto_the_meta_model(meta_models, tmp_path, layout):
    from peft.tuners.tuners_utils import BaseTunerLayer
    from safetensors.torch import load_file

    from carlos_audit.lora.flux_keys import map_modules, resolve
    from carlos_audit.lora.inspection import inspect_lora

    transformer, te = meta_models
    options, n_modules, n_te = FULL[layout]
    if options.get("text_encoder"):
        options = dict(options, text_encoder=te)
    path = tmp_path / f"{layout}.safetensors"
    write_flux_lora(path, transformer, layout, rank=1, **options)
    info = inspect_lora(path)
    assert (info["architecture"], info["layout"], info["module_count"]) == ("flux", layout, n_modules)
    assert info["architecture_evidence"]["double"] == list(range(19))
    assert info["architecture_evidence"]["single"] == list(range(38))

    model = {f"transformer.{n}": s for n, s in linears(transformer).items()}
    model |= {f"text_encoder.{n}": s for n, s in linears(te).items()}
    result = map_modules(info["modules"], model, 3072)
    assert result["skipped"] == []
    assert len(result["mapped"]) == n_modules
    ours = {t for ts in result["mapped"].values() for t in ts}

    # diffusers' conversion lands on the same modules, with the modules' shapes
    from diffusers import FluxPipeline

    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft

    converted = FluxPipeline.lora_state_dict(load_file(str(path)))
    # the CLIP-L part, as load_lora_into_text_encoder converts it before handing it to peft
    te_sd = {k: v for k, v in converted.items() if k.startswith("text_encoder.")}
    te_sd = convert_state_dict_to_peft(convert_state_dict_to_diffusers(te_sd)) if te_sd else {}
    factors = {}  # module -> {"down": shape, "up": shape}
    for k, v in {**{k: v for k, v in converted.items() if k.startswith("transformer.")}, **te_sd}.items():
        for suffix, role in ((".lora_A.weight", "down"), (".lora_B.weight", "up")):
            if k.endswith(suffix):
                factors.setdefault(resolve(k[: -len(suffix)], model), {})[role] = tuple(v.shape)
    assert set(factors) == ours
    for module, shapes in factors.items():
        fin, fout = model[module]
        assert (shapes["down"][1], shapes["up"][0]) == (fin, fout), module

    # and peft wraps exactly those transformer modules on the meta model
    transformer_sd = {k: v for k, v in converted.items() if k.startswith("transformer.")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        transformer.load_lora_adapter(transformer_sd, prefix="transformer", adapter_name=layout)
    wrapped = {f"transformer.{n}": m for n, m in transformer.named_modules()
               if isinstance(m, BaseTunerLayer) and layout in m.lora_A}
    assert set(wrapped) == {t for t in ours if t.startswith("transformer.")}
    for name, m in wrapped.items():
        assert (m.lora_A[layout].weight.shape[1], m.lora_B[layout].weight.shape[0]) == model[name]
    assert len(ours) - len(wrapped) == n_te  # the CLIP-L modules go to the text encoder, one each


def test_full_size_kohya_fused_modules_split_as_diffusers_splits_them(meta_models, tmp_path):
    from carlos_audit.lora.flux_keys import map_modules
    from carlos_audit.lora.inspection import inspect_lora

    transformer, _ = meta_models
    path = tmp_path / "k.safetensors"
    write_flux_lora(path, transformer, "kohya_flux", rank=1, double_subs=("img_attn.qkv",), single_subs=("linear1",))
    info = inspect_lora(path)
    model = {f"transformer.{n}": s for n, s in linears(transformer).items()}
    mapped = map_modules(info["modules"], model, 3072)["mapped"]
    assert mapped["transformer.double_blocks.3.img_attn.qkv"] == [
        f"transformer.transformer_blocks.3.attn.to_{x}" for x in "qkv"]
    assert mapped["transformer.single_blocks.37.linear1"] == [
        *(f"transformer.single_transformer_blocks.37.attn.to_{x}" for x in "qkv"),
        "transformer.single_transformer_blocks.37.proj_mlp"]
    linear1 = next(m for m in info["modules"] if m["name"] == "transformer.single_blocks.0.linear1")
    assert (linear1["in_features"], linear1["out_features"]) == (3072, 3 * 3072 + 12288)


def test_a_full_size_module_of_the_wrong_shape_is_skipped_with_its_reason(meta_models, tmp_path):
    import torch
    from safetensors.torch import save_file

    from carlos_audit.lora.flux_keys import map_modules
    from carlos_audit.lora.inspection import inspect_lora

    transformer, _ = meta_models
    k = "lora_unet_double_blocks_0_img_attn_proj"
    path = tmp_path / "bad.safetensors"
    save_file({f"{k}.lora_down.weight": torch.zeros(1, 4096), f"{k}.lora_up.weight": torch.zeros(3072, 1),
               "lora_unet_double_blocks_0_img_attn_norm_x.lora_down.weight": torch.zeros(1, 3072),
               "lora_unet_double_blocks_0_img_attn_norm_x.lora_up.weight": torch.zeros(3072, 1)}, str(path))
    model = {f"transformer.{n}": s for n, s in linears(transformer).items()}
    result = map_modules(inspect_lora(path)["modules"], model, 3072)
    assert result["mapped"] == {}
    assert result["skipped"] == [
        {"module": "transformer.double_blocks.0.img_attn.proj",
         "reason": "maps to transformer.transformer_blocks.0.attn.to_out.0 with 3072 in-features; the file's module has 4096"},
        {"module": "transformer.double_blocks.0.img_attn_norm_x", "reason": "no FLUX.1 module of this name in the key maps"}]
