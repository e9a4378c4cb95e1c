"""FLUX.1 base models: the embedded tiny Flux pipeline, Flux case-file fields and defaults, the
signature, and the demo-sized Flux case end to end to both report copies."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from flux_lora_writers import flux_case_text

from carlos_audit.errors import AuditError

REPO = Path(__file__).resolve().parents[1]
FLUX_CASE = REPO / "casefiles" / "demo-flux.toml"


@pytest.fixture(scope="module")
def flux_assets(carlos_home):
    from carlos_audit.demo import prepare_flux_demo

    return prepare_flux_demo()


@pytest.fixture(scope="module")
def flux_demo_dir(flux_assets, tmp_path_factory):
    from carlos_audit.case.casefile import load_case
    from carlos_audit.pipeline import run_full

    out = tmp_path_factory.mktemp("cases") / "demo-flux"
    run_full(load_case(FLUX_CASE), out, progress=False)
    return out


def _parse(tmp_path, text):
    from carlos_audit.case.casefile import parse_case

    return parse_case(text, tmp_path / "c.toml")


def _schnell_folder(tmp_path) -> Path:
    folder = tmp_path / "FLUX.1-schnell"
    src = REPO / "carlos_audit" / "models" / "configs" / "flux-schnell"
    (folder / "transformer").mkdir(parents=True)
    (folder / "model_index.json").write_bytes((src / "model_index.json").read_bytes())
    (folder / "transformer" / "config.json").write_bytes((src / "transformer" / "config.json").read_bytes())
    return folder


def test_rebuilding_the_tiny_flux_pipeline_is_byte_identical(flux_assets, tmp_path):
    from carlos_audit.models.flux import ensure_tiny_flux
    from carlos_audit.hashing import tree_sha256

    again = ensure_tiny_flux(home=tmp_path)
    assert tree_sha256(again) == tree_sha256(Path(flux_assets["tiny_flux"]))
    index = json.loads((again / "model_index.json").read_text())
    assert index["_class_name"] == "FluxPipeline"
    assert index["tokenizer_2"][1] in ("T5Tokenizer", "T5TokenizerFast")  # transformers 5 names the fast one T5Tokenizer
    vae = json.loads((again / "vae" / "config.json").read_text())
    assert vae["latent_channels"] == 16 and vae["shift_factor"] == 0.1159


def test_tiny_flux_loads_as_flux_dev_and_its_t5_tokenizer_works_offline(flux_assets):
    from carlos_audit.models.loading import load_base_pipeline

    lp = load_base_pipeline("embedded:tiny-flux", dtype="float32", device="cpu")
    assert (lp.architecture, lp.variant_family, type(lp.pipe).__name__) == ("flux", "flux-dev", "FluxPipeline")
    ids = lp.pipe.tokenizer_2("a red cat").input_ids
    assert ids[-1] == 1 and 2 not in ids  # ends with </s>, no <unk>
    names = {f["name"] for f in lp.files}
    assert {"transformer/diffusion_pytorch_model.safetensors", "text_encoder_2/model.safetensors",
            "tokenizer_2/tokenizer.json", "scheduler/scheduler_config.json"} <= names


def test_a_flux_hub_id_resolves_from_the_local_cache_with_its_variant(flux_assets, tmp_path, monkeypatch):
    from conftest import hub_layout

    from carlos_audit.models.loading import load_base_pipeline

    hub_layout(Path(flux_assets["tiny_flux"]), tmp_path / "hub", repo="someorg/tiny-flux")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    case = _parse(tmp_path, flux_case_text("someorg/tiny-flux"))
    assert case.base_model["family"] == "flux-dev" and case.protocol["steps"] == 28
    lp = load_base_pipeline("someorg/tiny-flux", dtype="float32", device="cpu")
    assert (lp.identity, lp.architecture, lp.variant_family) == ("hf:someorg/tiny-flux", "flux", "flux-dev")
    assert {"transformer/diffusion_pytorch_model.safetensors", "tokenizer_2/tokenizer.json"} <= {f["name"] for f in lp.files}


def test_flux_protocol_defaults_follow_the_variant(flux_assets, tmp_path):
    dev = _parse(tmp_path, flux_case_text("embedded:tiny-flux"))
    assert dev.base_model["family"] == "flux-dev"
    assert {k: dev.protocol[k] for k in ("steps", "guidance_scale", "width", "height", "max_sequence_length", "scheduler")} == {
        "steps": 28, "guidance_scale": 3.5, "width": 1024, "height": 1024, "max_sequence_length": 512,
        "scheduler": "FlowMatchEulerDiscreteScheduler"}
    folder = _schnell_folder(tmp_path)
    schnell = _parse(tmp_path, flux_case_text(str(folder)))
    assert schnell.base_model["family"] == "flux-schnell"
    assert (schnell.protocol["steps"], schnell.protocol["guidance_scale"], schnell.protocol["max_sequence_length"]) == (4, 0.0, 256)
    given = _parse(tmp_path, flux_case_text("embedded:tiny-flux", "steps = 3\nmax_sequence_length = 64\nwidth = 64\nheight = 64"))
    assert (given.protocol["steps"], given.protocol["max_sequence_length"], given.protocol["width"]) == (3, 64, 64)
    sd = _parse(tmp_path, flux_case_text("embedded:tiny-sd"))
    assert sd.base_model["family"] is None and sd.protocol["steps"] == 25 and sd.protocol["max_sequence_length"] is None


@pytest.mark.parametrize("protocol, source, message", [
    ("guidance_scale = 3.5", "schnell", "must be 0 for FLUX.1-schnell"),
    ("max_sequence_length = 600", "embedded:tiny-flux", "must be 1..512"),
    ("max_sequence_length = 64", "embedded:tiny-sd", "applies to FLUX.1 base models only"),
    ('negative_prompt = "blurry"', "embedded:tiny-flux", "not used by FLUX.1"),
    ("width = 72", "embedded:tiny-flux", "multiple of 16"),
])
def test_bad_flux_protocol_values_are_one_line_errors(flux_assets, tmp_path, protocol, source, message):
    if source == "schnell":
        source = str(_schnell_folder(tmp_path))
    with pytest.raises(AuditError, match=message):
        _parse(tmp_path, flux_case_text(source, protocol))


def test_flux_signature_records_its_parameters_and_never_matches_an_sdxl_corpus(flux_assets, tmp_path):
    from carlos_audit.case.protocol import load_prompts
    from carlos_audit.case.signature import check_compatible, preset_signature, require_compatible

    case = _parse(tmp_path, flux_case_text("embedded:tiny-flux", "steps = 4\nwidth = 64\nheight = 64\nmax_sequence_length = 32"))
    prompts, _ = load_prompts("builtin:demo", tmp_path)
    from carlos_audit.case.signature import case_signature

    sig = case_signature(case, prompts, base_model="embedded:tiny-flux", base_model_sha256=None,
                         embedder="embedded:tiny-clip", embedder_sha256=None, scheduler="FlowMatchEulerDiscreteScheduler")
    assert (sig["family"], sig["guidance"], sig["max_sequence_length"], sig["guidance_scale"]) == ("flux-dev", "embedded", 32, 3.5)
    sdxl = preset_signature("carlos-sdxl-vitb32")
    assert "family" in check_compatible(sdxl, sig)
    # even a corpus that left everything else unrecorded is a Stable Diffusion corpus
    bare = {k: None for k in sdxl}
    assert check_compatible(bare, sig) == ["family"]
    with pytest.raises(AuditError, match="family"):
        require_compatible(bare, sig)
    other = dict(sig, max_sequence_length=512)
    assert check_compatible(sig, other) == ["max_sequence_length"]
    schnell = _parse(tmp_path, flux_case_text(str(_schnell_folder(tmp_path)), "width = 64\nheight = 64"))
    sig_s = case_signature(schnell, prompts, base_model="dir:FLUX.1-schnell", base_model_sha256=None,
                           embedder="embedded:tiny-clip", embedder_sha256=None, scheduler="FlowMatchEulerDiscreteScheduler")
    assert (sig_s["family"], sig_s["guidance"], sig_s["max_sequence_length"]) == ("flux-schnell", "none", 256)
    assert {"family", "guidance", "max_sequence_length"} <= set(check_compatible(sig, sig_s))


def test_demo_flux_case_runs_end_to_end_with_exact_module_accounting(flux_demo_dir):
    manifest = json.loads((flux_demo_dir / "manifest.json").read_text())
    assert (flux_demo_dir / "report.pdf").is_file() and (flux_demo_dir / "report-archive.pdf").is_file()
    load = manifest["lora"]["load"]
    assert (load["applied"], load["in_file"], load["skipped"], load["partial"]) == (11, 11, [], False)
    assert load["by_component"] == {"transformer": 11}
    assert manifest["base_model"]["architecture"] == "flux"
    assert manifest["base_model"]["pipeline"] == "FluxPipeline"
    assert manifest["signature"]["family"] == "flux-dev" and manifest["signature"]["max_sequence_length"] == 32
    assert manifest["protocol"]["max_sequence_length"] == 32
    assert manifest["lora"]["inspection"]["layout"] == "diffusers_peft"
    metrics = json.loads((flux_demo_dir / "metrics.json").read_text())
    assert metrics["strength"] > 0
    base_cost = manifest["cost"]["arms"]["base"]  # the transformer counted as the denoiser: batches x steps
    assert (base_cost["unet_forward_calls"], base_cost["unet_image_steps"]) == (4 * 4, 16 * 4)
    text = subprocess.run(["pdftotext", str(flux_demo_dir / "report.pdf"), "-"], capture_output=True, text=True,
                          check=True).stdout
    for s in ("embedded:tiny-flux (FluxPipeline", "T5 sequence length", "FLUX.1 layout", "11 applied of 11 in the file"):
        assert s in text, s


def test_demo_flux_images_differ_between_the_arms(flux_demo_dir):
    import numpy as np
    from PIL import Image

    manifest = json.loads((flux_demo_dir / "manifest.json").read_text())
    pair = manifest["pairs"][0]
    base = np.asarray(Image.open(flux_demo_dir / pair["arms"]["base"]["image"]), dtype=np.int16)
    lora = np.asarray(Image.open(flux_demo_dir / pair["arms"]["lora"]["image"]), dtype=np.int16)
    assert base.shape == (64, 64, 3) and np.abs(base - lora).mean() > 1.0


# ----------------------------------------------------------------------------- init, check, single files


def test_init_picks_the_flux_preset_for_a_flux_lora(flux_assets, tmp_path, monkeypatch):
    from carlos_audit.case.casefile import load_case
    from carlos_audit.check import check_case
    from carlos_audit.case.init import init_case

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    lora = Path(flux_assets["loras"]["target"])
    r = init_case(lora, out=tmp_path / "case.toml")
    assert (r["preset"], r["architecture"]) == ("flux-dev", "flux")
    case = load_case(tmp_path / "case.toml")
    assert case.base_model["family"] == "flux-dev" and case.base_model["source"] == "black-forest-labs/FLUX.1-dev"
    assert (case.protocol["steps"], case.protocol["guidance_scale"], case.protocol["max_sequence_length"]) == (28, 3.5, 512)
    with pytest.raises(AuditError, match="is a flux LoRA; preset carlos-sdxl is for sdxl"):
        init_case(lora, preset="carlos-sdxl", out=tmp_path / "other.toml")
    report = check_case(tmp_path / "case.toml")
    base = next(i for i in report["inputs"] if i["role"] == "base_model")
    assert base["status"] == "missing" and "transformer/*.safetensors" in base["detail"]
    assert "text_encoder_2/*.safetensors" in base["detail"] and "gated" in base["supply"]


def _bfl_checkpoint(path: Path, guidance: bool = True, dtype=None) -> Path:
    """A header-true Black Forest Labs transformer file (marker tensors only, float8 stored)."""
    import torch
    from safetensors.torch import save_file

    dtype = dtype or torch.float8_e4m3fn
    names = ["double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight", "img_in.weight"]
    names += ["guidance_in.in_layer.weight"] if guidance else []
    save_file({n: torch.zeros(4, 4).to(dtype) for n in names}, str(path))
    return path


def test_a_flux_transformer_file_is_recognised_hashed_and_needs_its_components(flux_assets, tmp_path):
    from carlos_audit.models.loading import resolve_base_source

    dev = _bfl_checkpoint(tmp_path / "flux1-dev-fp8.safetensors")
    with pytest.raises(AuditError, match="flux-dev transformer checkpoint only; set \\[base_model\\] config"):
        resolve_base_source(str(dev))
    src = resolve_base_source(str(dev), config=flux_assets["tiny_flux"])
    assert (src.kind, src.architecture, src.stored_dtypes) == ("file", "flux", ["F8_E4M3"])
    assert src.config_source == "carried:flux-dev+components:dir:tiny-flux-v1"
    names = {f["name"] for f in src.files}
    assert "checkpoint/flux1-dev-fp8.safetensors" in names
    assert "config/transformer/config.json" in names and "components/text_encoder_2/model.safetensors" in names
    assert not any(n.startswith("components/transformer/") for n in names)
    carried = json.loads((src.config_dir / "transformer" / "config.json").read_text())
    assert (carried["num_layers"], carried["num_single_layers"], carried["guidance_embeds"]) == (19, 38, True)
    schnell = resolve_base_source(str(_bfl_checkpoint(tmp_path / "flux1-schnell.safetensors", guidance=False)),
                                  config=flux_assets["tiny_flux"])
    assert schnell.config_source.startswith("carried:flux-schnell")
    assert json.loads((schnell.config_dir / "transformer" / "config.json").read_text())["guidance_embeds"] is False


def test_check_lists_the_components_a_flux_transformer_file_needs(flux_assets, tmp_path):
    from carlos_audit.check import check_case

    _bfl_checkpoint(tmp_path / "flux1-dev.safetensors")
    (tmp_path / "x.safetensors").write_bytes(Path(flux_assets["loras"]["target"]).read_bytes())
    (tmp_path / "c.toml").write_text(flux_case_text("flux1-dev.safetensors", "width = 64\nheight = 64"))
    report = check_case(tmp_path / "c.toml")
    comp = next(i for i in report["inputs"] if i["role"] == "base_model_components")
    assert comp["status"] == "missing" and "VAE, CLIP-L and T5-XXL" in comp["supply"]
    assert report["signature"]["family"] == "flux-dev"


def test_a_case_naming_the_wrong_flux_variant_is_refused(flux_assets, tmp_path):
    from carlos_audit.case.casefile import parse_case
    from carlos_audit.lora.inspection import inspect_lora
    from carlos_audit.run.load import load_models

    lora = Path(flux_assets["loras"]["target"])
    text = flux_case_text("embedded:tiny-flux", "steps = 2\nwidth = 64\nheight = 64", lora=str(lora))
    case = parse_case(text.replace('device = "cpu"', 'device = "cpu"\nfamily = "flux-schnell"'), tmp_path / "c.toml")
    assert case.protocol["guidance_scale"] == 0.0 and case.protocol["steps"] == 2
    with pytest.raises(AuditError, match="is flux-dev but the case says base_model.family = 'flux-schnell'"):
        load_models(case, {"lora": lora}, inspect_lora(lora))


def test_verify_regenerates_a_flux_pair_bit_identically(flux_demo_dir):
    from carlos_audit.verify import verify_case

    r = verify_case(flux_demo_dir, sample=1)
    assert r["ok"], [c for c in r["checks"] if not c["ok"]]
    regen = [c for c in r["checks"] if c["check"].startswith("regenerate")]
    assert len(regen) == 2 and all(c["detail"] == "image hash identical" for c in regen)
