"""Every LyCORIS family, made by the real LyCORIS library on the tiny SD pipeline, applied by
carlos-audit exactly as the library's own forward applies it (the oracle): UNet and text-encoder
outputs equal to float32 round-off, the base arm's weights restored bit for bit, every module
accounted for."""

from __future__ import annotations

import pytest
import torch

from lycoris_files import FAMILIES, make_lycoris_file

from carlos_audit.lora.intake import inspect_lora
from carlos_audit.run.generate import set_adapter_state
from carlos_audit.run.load import load_lora
from carlos_audit.run.patch import patched_layers, unload

#: float32 round-off: the tool computes each weight in float64 and casts it once; the library
#: computes in float32 (max |difference| over the output, relative to max |output|)
TOLERANCE = 2e-5


@pytest.fixture(scope="module")
def tiny(carlos_home):
    from carlos_audit.models.loading import load_base_pipeline

    return load_base_pipeline("embedded:tiny-sd", dtype="float32", device="cpu").pipe


@pytest.fixture(scope="module")
def made(tiny, tmp_path_factory):
    """family -> MadeFile (the file, and the library's network that saved it, applied to copies
    of the models); all made once, from the pristine pipeline, before any is loaded."""
    folder = tmp_path_factory.mktemp("lycoris")
    return {family: make_lycoris_file(tiny, family, folder / f"{family}.safetensors", seed=i + 1)
            for i, family in enumerate(sorted(FAMILIES))}


def inputs():
    g = torch.Generator().manual_seed(7)
    return (torch.randn(2, 4, 32, 32, generator=g), torch.tensor([10, 600]), torch.randn(2, 9, 32, generator=g),
            torch.randint(0, 49407, (2, 12), generator=g))


@torch.no_grad()
def outputs(unet, te):
    x, t, enc, ids = inputs()
    return unet(x, t, encoder_hidden_states=enc).sample, te(ids).last_hidden_state


def rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


def base_state(pipe):
    return {c: {k: v.clone() for k, v in getattr(pipe, c).state_dict().items()} for c in ("unet", "text_encoder")}


def base_weights(model) -> dict:
    """The model's own tensors (peft's ``base_layer`` under the layer's name; adapters left out)."""
    return {k.replace(".base_layer.", "."): v for k, v in model.state_dict().items() if ".lora_" not in k}


def assert_bitwise(pipe, before):
    for c, sd in before.items():
        now = base_weights(getattr(pipe, c))
        assert set(now) == set(sd)
        bad = [k for k, v in sd.items() if not torch.equal(now[k].view(torch.uint8) if now[k].dim() else now[k], v.view(torch.uint8) if v.dim() else v)]
        assert not bad, f"{c}: {len(bad)} tensors differ after restoring, e.g. {bad[:3]}"


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_matches_the_library_forward(tiny, made, family):
    made_file = made[family]
    before = base_state(tiny)
    base_unet, _ = outputs(tiny.unet, tiny.text_encoder)
    insp = inspect_lora(made_file.path)
    try:
        state = load_lora(tiny, made_file.path, "t", insp, allow_partial=False)
        assert state["partial"] is False and state["applied"] == state["in_file"] == insp["module_count"]
        assert state["by_component"] == made_file.by_component
        method = state["application"]["method"]
        assert method == ("diffusers_peft" if family == "locon" else "weight_patch")
        for scale in (1.0, 0.5):
            made_file.set_multiplier(scale)
            want_unet, want_te = outputs(made_file.unet, made_file.text_encoder)
            set_adapter_state(tiny, "t", scale)
            got_unet, got_te = outputs(tiny.unet, tiny.text_encoder)
            assert rel(want_unet, base_unet) > 1e-3  # the LoRA changes the output: the check can fail
            assert rel(got_unet, want_unet) < TOLERANCE, (family, scale, rel(got_unet, want_unet))
            assert rel(got_te, want_te) < TOLERANCE, (family, scale, rel(got_te, want_te))
        set_adapter_state(tiny, None)
        assert_bitwise(tiny, before)
    finally:
        made_file.set_multiplier(1.0)
        unload(tiny)
        tiny.unload_lora_weights()
    assert_bitwise(tiny, before)
