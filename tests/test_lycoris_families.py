"""Every LyCORIS family, made by the real LyCORIS library on the tiny SD pipeline, applied by
carlos-audit exactly as the library's own forward applies it (the oracle): UNet and text-encoder
outputs equal to float32 round-off, the base arm's weights restored bit for bit, every module
accounted for."""

from __future__ import annotations

import pytest
import torch

from lycoris_files import FAMILIES, make_lycoris_file

from carlos_audit.lora.inspection import inspect_lora
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


#: what ``inspect`` must call each family the library writes, and its own parameters
NAMES = {
    "locon": ("lora", "kohya"), "locon_tucker": ("lora_tucker", "lycoris_locon_mid"), "dora": ("dora", "lycoris_dora"),
    "loha": ("loha", "lycoris_loha"), "loha_tucker": ("loha", "lycoris_loha"), "lokr": ("lokr", "lycoris_lokr"),
    "lokr_full": ("lokr", "lycoris_lokr"), "lokr_tucker": ("lokr", "lycoris_lokr"), "dokr": ("lokr", "lycoris_lokr"),
    "full": ("full", "lycoris_full"), "ia3": ("ia3", "lycoris_ia3"), "glora": ("glora", "lycoris_glora"),
    "diag-oft": ("diag_oft", "lycoris_diag_oft"), "diag-oft_rescaled": ("diag_oft", "lycoris_diag_oft"),
    "boft": ("boft", "lycoris_boft"),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_inspect_names_every_family_with_its_own_parameters(made, family):
    r = inspect_lora(made[family].path)
    kind, fmt = NAMES[family]
    assert r["format"] == fmt
    kinds = {m["kind"] for m in r["modules"]}
    # LoCon-Tucker puts a Tucker core on the 3x3 convs only; the rest are plain LoCon modules
    assert kinds == ({"lora", "lora_tucker"} if family == "locon_tucker" else {kind}) and set(r["families"]) == kinds
    f = r["families"][kind]
    assert sum(x["modules"] for x in r["families"].values()) == r["module_count"] and f["parameter_norm"] > 0
    assert f["weight_decompose"] == (r["module_count"] if family in ("dora", "dokr") else 0)
    if kind in ("ia3", "diag_oft", "boft", "full"):  # no rank, no alpha: never "alpha = rank"
        assert f["ranks"] == f["alphas"] == [] and r["alpha_summary"]["absent"] == 0
    else:
        # full-matrix LoKr ignores alpha; the library stores its dim (4) in its place
        assert f["alphas"] == [4.0] if family == "lokr_full" else 2.0 in f["alphas"]
    if kind in ("diag_oft", "boft"):
        params = r["modules"][0]["family_parameters"]
        assert params["blocks"] * params["block_size"] == r["modules"][0]["out_features"]
        assert params["rescaled"] == (family == "diag-oft_rescaled")
    if kind == "ia3":
        assert {m["family_parameters"]["on_input"] for m in r["modules"]} == {True, False}
    base_free = kind in ("lora", "lora_tucker", "loha", "lokr", "full") and family != "dokr"
    assert (f["delta_norm"] is not None) == base_free


def test_inspect_command_names_ia3_without_alpha(made):
    from click.testing import CliRunner

    from carlos_audit.cli import main

    out = CliRunner().invoke(main, ["inspect", str(made["ia3"].path)]).output
    assert "family          (IA)^3: 45 modules" in out and "alpha = rank" not in out


@pytest.mark.parametrize("family", ["loha", "lokr"])
def test_merge_to_gives_alpha_over_rank_of_the_forward_weight_change(tiny, made, family):
    """lycoris 4.1.3: merge_to (get_merged_weight) applies alpha/rank twice for LoHa/LoKr; the
    forward applies it once. The tool follows the forward (alpha 2, rank 4: merge = half)."""
    from carlos_audit.run.patch import patch_state

    m = made[family]
    load_lora(tiny, m.path, "t", inspect_lora(m.path), allow_partial=False)
    try:
        set_adapter_state(tiny, "t", 1.0)
        layers = {id(t.layer): t for t in patch_state(tiny).adapters["t"]}
        ratios = []
        originals = {k.replace("lora_unet_", ""): v for k, v in
                     ((lo.lora_name, lo) for lo in m.network.unet_loras)}
        for t in patch_state(tiny).adapters["t"]:
            if t.component != "unet":
                continue
            lo = originals[t.layer_name.replace(".", "_")]
            w0 = patch_state(tiny).originals[id(t.layer)][1]
            with torch.no_grad():
                merged = lo.get_merged_weight(1.0, w0.shape, w0.device)[0] - w0
            tool = t.layer.weight.detach() - w0
            ratios.append(float(merged.flatten() @ tool.flatten() / (tool.flatten() @ tool.flatten())))
        assert len(ratios) == len(layers) - len(m.network.text_encoder_loras)
        full = sum(1 for t in patch_state(tiny).adapters["t"]  # both Kronecker halves full: alpha is ignored
                   if t.component == "unet" and "lokr_w1" in t.tensors and "lokr_w2" in t.tensors)
        halves = [r for r in ratios if abs(r - 0.5) < 1e-4]
        assert len(halves) == len(ratios) - full and all(abs(r - 1) < 1e-4 or abs(r - 0.5) < 1e-4 for r in ratios)
    finally:
        unload(tiny)


def test_allow_partial_reports_what_the_pipeline_holds(tiny, made, tmp_path):
    """A DoRA file with one module for no layer and one with a tensor of no family: with
    --allow-partial the report's applied modules are exactly the layers whose weights changed."""
    from safetensors.torch import load_file, save_file

    from carlos_audit.errors import AuditError

    t = load_file(str(made["dora"].path))
    some = next(k for k in t if k.endswith(".lora_down.weight")).rsplit(".", 2)[0]
    for suffix in ("lora_down.weight", "lora_up.weight", "alpha", "dora_scale"):
        t[f"lora_unet_mid_block_attentions_0_nowhere.{suffix}"] = t[f"{some}.{suffix}"].clone()
    t["lora_unet_conv_in.strange_w"] = torch.ones(3)
    save_file(t, str(tmp_path / "partial.safetensors"))
    insp = inspect_lora(tmp_path / "partial.safetensors")
    with pytest.raises(AuditError) as e:
        load_lora(tiny, tmp_path / "partial.safetensors", "p", insp, allow_partial=False)
    msg = str(e.value)
    assert len(msg.splitlines()) == 1 and "2 of 152 modules" in msg and "unet.conv_in (dora module with tensor(s) of no LoRA family" in msg
    before = base_state(tiny)
    try:
        state = load_lora(tiny, tmp_path / "partial.safetensors", "p", insp, allow_partial=True)
        assert state["partial"] and state["applied"] == 150 and state["in_file"] == 152
        set_adapter_state(tiny, "p", 1.0)
        changed = sorted(f"{c}.{k.rsplit('.', 1)[0]}" for c, sd in before.items()
                         for k, v in base_weights(getattr(tiny, c)).items() if not torch.equal(v, sd[k]))
        assert changed == patched_layers(tiny, "p") and len(changed) == state["applied"]
        assert sum(state["by_component"].values()) == state["applied"]
        assert state["application"]["families"]["dora"]["modules"] == 150
    finally:
        unload(tiny)
    assert_bitwise(tiny, before)


def test_run_and_verify_a_lokr_case_through_the_weight_patch(demo_assets, made, tmp_path):
    """run applies a LoKr file by weight patch (scale sweep included), the manifest records how
    and the patched-weight hash; verify --sample regenerates through the same path."""
    import json

    from click.testing import CliRunner
    from conftest import write_case

    from carlos_audit.cli import main
    from carlos_audit.fileio import read_json

    extra = "scales = [0.5]\n[indicators]\ntrigger_dependence = false\nprompt_override = false\neffect_labels = false"
    cf = write_case(tmp_path, demo_assets, lora=str(made["lokr"].path), steps=2, extra=extra)
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["run", str(cf), "--out", str(out), "--no-progress"])
    assert r.exit_code == 0, r.output
    load = read_json(out / "manifest.json")["lora"]["load"]
    assert load["partial"] is False and load["applied"] == load["in_file"] == 151
    fam = load["application"]["families"]["lokr"]
    assert load["application"]["method"] == fam["method"] == "weight_patch" and fam["modules"] == 151
    assert len(fam["patched_weights_sha256"]) == 64 and fam["delta_norm"] > 0
    r = CliRunner().invoke(main, ["verify", str(out), "--sample", "2", "--json"])
    assert r.exit_code == 0, r.output
    checks = {c["check"]: c for c in json.loads(r.output)["checks"]}
    assert checks["LoRA application"]["ok"], checks["LoRA application"]
    regen = [c for name, c in checks.items() if name.startswith("regenerate")]
    assert regen and all(c["ok"] for c in regen), regen
