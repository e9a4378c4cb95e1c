"""FLUX.1 LoRA layouts on the embedded tiny Flux pipeline: each layout (diffusers/peft,
ai-toolkit, kohya with fused qkv and CLIP-L ``lora_te1_``, XLabs) is loaded through diffusers,
accounted module by module from what peft wrapped, and changes the images; ``inspect`` reports
layout, rank, alpha, blocks touched and metadata; cross-architecture pairs are refused before any
generation with both architectures named.

The files are written by ``tests/flux_lora_writers.py`` from the model's own modules; the key
names and shapes follow the trainers' code and diffusers' conversion code cited there
(kohya sd-scripts networks/lora_flux.py; XLabs-AI x-flux src/flux/modules/layers.py; diffusers
examples/dreambooth/train_dreambooth_lora_flux.py; ostris ai-toolkit toolkit/lora_special.py;
diffusers/loaders/lora_conversion_utils.py ``_convert_kohya_flux_lora_to_diffusers`` and
``_convert_xlabs_flux_lora_to_diffusers``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flux_lora_writers import flux_case_text, write_flux_lora

from carlos_audit.errors import AuditError


@pytest.fixture(scope="module")
def flux(carlos_home):
    from carlos_audit.models.loading import load_base_pipeline

    return load_base_pipeline("embedded:tiny-flux", dtype="float32", device="cpu")


def _images(pipe, adapter):
    from carlos_audit.run.generate import GenerationParams, generate_batch, set_adapter_state

    params = GenerationParams(2, 3.5, 64, 64, "FlowMatchEulerDiscreteScheduler", "", "per-image", 16)
    set_adapter_state(pipe, adapter)
    return np.asarray(generate_batch(pipe, ["a red cat"], [0], params)[0], dtype=np.int16)


def _load(flux, path, allow_partial=False):
    from carlos_audit.lora.inspection import inspect_lora
    from carlos_audit.run.load import load_lora

    flux.pipe.unload_lora_weights()
    info = inspect_lora(path)
    return info, load_lora(flux.pipe, path, "t", info, allow_partial)


LAYOUTS = {
    # layout -> (writer options, modules in the file per component, modules peft wraps)
    "diffusers_peft": ({"text_encoder": True}, {"transformer": 15, "text_encoder": 12}, 27),
    "ai_toolkit": ({}, {"transformer": 20}, 20),
    # double blocks only: diffusers' kohya converter hard-codes FLUX.1's widths for single blocks
    "kohya_flux": ({"text_encoder": True, "single_subs": (), "alpha": 2.0}, {"transformer": 10, "text_encoder": 12}, 26),
    "xlabs": ({}, {"transformer": 6}, 12),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_each_flux_layout_is_applied_exactly_and_changes_the_images(flux, tmp_path, layout):
    options, per_component, wrapped = LAYOUTS[layout]
    if options.get("text_encoder"):
        options = dict(options, text_encoder=flux.pipe.text_encoder)
    path = tmp_path / f"{layout}.safetensors"
    write_flux_lora(path, flux.pipe.transformer, layout, **options)
    info, state = _load(flux, path)
    assert info["architecture"] == "flux" and info["layout"] == layout
    assert (state["partial"], state["skipped"]) == (False, [])
    assert state["applied"] == state["in_file"] == sum(per_component.values())
    assert state["by_component"] == per_component
    assert state["wrapped"] == wrapped  # fused qkv / linear1 land on several modules
    base, lora = _images(flux.pipe, None), _images(flux.pipe, "t")
    assert np.abs(base - lora).mean() > 0.5
    flux.pipe.unload_lora_weights()


@pytest.mark.parametrize("alpha", [1.0, 3.0, 16.0])
def test_kohya_alpha_folded_into_the_factors_is_still_matched_by_weight_change(flux, tmp_path, alpha):
    # diffusers multiplies down by alpha/rank (split in powers of two): the tensors peft holds are
    # not the file's; the weight change is, to float32 rounding
    path = tmp_path / "k.safetensors"
    write_flux_lora(path, flux.pipe.transformer, "kohya_flux", single_subs=(), alpha=alpha)
    info, state = _load(flux, path)
    assert info["alpha_summary"]["distinct"] == [alpha]
    assert (state["applied"], state["in_file"], state["skipped"]) == (10, 10, [])
    flux.pipe.unload_lora_weights()


def test_kohya_single_blocks_at_tiny_width_are_refused_loudly(flux, tmp_path):
    path = tmp_path / "k.safetensors"
    write_flux_lora(path, flux.pipe.transformer, "kohya_flux")
    with pytest.raises(AuditError, match="could not be loaded into the base model"):
        _load(flux, path)


def test_a_module_the_base_model_lacks_is_skipped_with_its_reason(flux, tmp_path):
    from safetensors.torch import load_file, save_file

    path = tmp_path / "p.safetensors"
    write_flux_lora(path, flux.pipe.transformer, "diffusers_peft")
    tensors = load_file(str(path))
    tensors["transformer.transformer_blocks.7.attn.to_q.lora_A.weight"] = tensors["transformer.transformer_blocks.0.attn.to_q.lora_A.weight"] * 2
    tensors["transformer.transformer_blocks.7.attn.to_q.lora_B.weight"] = tensors["transformer.transformer_blocks.0.attn.to_q.lora_B.weight"] * 2
    save_file(tensors, str(path))
    with pytest.raises(AuditError, match="1 of 16 modules in the file were not applied"):
        _load(flux, path)
    _, state = _load(flux, path, allow_partial=True)
    assert state["partial"] and state["applied"] == 15
    assert state["skipped"] == [{"module": "transformer.transformer_blocks.7.attn.to_q",
                                 "reason": "converted to transformer.transformer_blocks.7.attn.to_q, but the base model has no such module"}]
    flux.pipe.unload_lora_weights()


def test_inspect_reports_layout_rank_alpha_blocks_and_self_reported_metadata(flux, tmp_path):
    from carlos_audit.lora.inspection import inspect_lora

    path = tmp_path / "k.safetensors"
    write_flux_lora(path, flux.pipe.transformer, "kohya_flux", rank=8, alpha=4.0, text_encoder=flux.pipe.text_encoder,
                    metadata={"ss_output_name": "my-flux-style", "modelspec.trigger_phrase": "flxstyle"})
    info = inspect_lora(path)
    assert (info["architecture"], info["layout"], info["format"]) == ("flux", "kohya_flux", "kohya")
    assert info["rank_summary"]["distinct"] == [8] and info["alpha_summary"]["distinct"] == [4.0]
    ev = info["architecture_evidence"]
    assert (ev["double"], ev["single"]) == ([0], [0]) and ev["other"] == ["text_encoder"]
    assert info["metadata"]["ss_network_module"] == "networks.lora_flux"
    assert {"text": "flxstyle", "source": "modelspec.trigger_phrase"} in info["trigger_word_hints"]
    qkv = next(m for m in info["modules"] if m["name"] == "transformer.double_blocks.0.img_attn.qkv")
    assert (qkv["in_features"], qkv["out_features"], qkv["scale"]) == (32, 96, 0.5)
    xl = tmp_path / "x.safetensors"
    write_flux_lora(xl, flux.pipe.transformer, "xlabs")
    info = inspect_lora(xl)
    assert (info["layout"], info["format"], info["alpha_summary"]["absent"]) == ("xlabs", "xlabs", 6)
    assert "transformer.single_blocks.0.processor.proj_lora" in [m["name"] for m in info["modules"]]


def test_inspect_cli_names_the_flux_layout(flux, tmp_path):
    from click.testing import CliRunner

    from carlos_audit.cli import main

    path = tmp_path / "x.safetensors"
    write_flux_lora(path, flux.pipe.transformer, "xlabs")
    r = CliRunner().invoke(main, ["inspect", str(path), "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert (data["architecture"], data["layout"]) == ("flux", "xlabs")
    r = CliRunner().invoke(main, ["inspect", str(path)])
    assert r.exit_code == 0, r.output
    assert "Flux layout     xlabs; double-stream blocks 0, single-stream blocks 0" in r.output


# ----------------------------------------------------------------------------- cross-architecture refusals


def _sd_lora(path: Path, cross_dim: int) -> Path:
    """A kohya SD LoRA on attn2.to_k: cross-attention dim 768 (SD 1.5) or 2048 (SDXL)."""
    import torch
    from safetensors.torch import save_file

    name = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k" if cross_dim == 2048 else \
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    save_file({f"{name}.lora_down.weight": torch.randn(4, cross_dim), f"{name}.lora_up.weight": torch.randn(640, 4),
               f"{name}.alpha": torch.tensor(4.0)}, str(path))
    return path


def _tiny_sdxl(folder: Path) -> Path:
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from carlos_audit.models.tiny import write_clip_tokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=4, out_channels=4,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                                attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
                                addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
                                projection_class_embeddings_input_dim=80, cross_attention_dim=64)
    vae = AutoencoderKL(block_out_channels=[32, 64], down_block_types=["DownEncoderBlock2D"] * 2,
                        up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=4)
    cfg = CLIPTextConfig(bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, hidden_size=32, intermediate_size=37,
                         num_attention_heads=4, num_hidden_layers=2, vocab_size=49408, projection_dim=32)
    write_clip_tokenizer(folder / "_tok")
    tok = CLIPTokenizer.from_pretrained(folder / "_tok")
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=CLIPTextModel(cfg), text_encoder_2=CLIPTextModelWithProjection(cfg),
                                     tokenizer=tok, tokenizer_2=tok, unet=unet, scheduler=EulerDiscreteScheduler())
    pipe.save_pretrained(folder / "tiny-sdxl", safe_serialization=True)
    return folder / "tiny-sdxl"


def _case(tmp_path: Path, source: str, lora: Path):
    from carlos_audit.case.casefile import load_case

    p = tmp_path / "c.toml"
    p.write_text(flux_case_text(source, "steps = 2\nwidth = 64\nheight = 64", lora=str(lora)))
    return load_case(p)


def _refused(case, lora: Path) -> str:
    from carlos_audit.lora.inspection import inspect_lora
    from carlos_audit.run.load import load_models, process_models

    before = process_models().cost.images_generated
    with pytest.raises(AuditError) as e:
        load_models(case, {"lora": lora}, inspect_lora(lora))
    assert process_models().cost.images_generated == before
    return str(e.value)


@pytest.mark.parametrize("cross_dim, arch", [(768, "sd15"), (2048, "sdxl")])
def test_an_sd_lora_on_a_flux_base_is_refused_naming_both(flux, tmp_path, cross_dim, arch):
    lora = _sd_lora(tmp_path / f"{arch}.safetensors", cross_dim)
    msg = _refused(_case(tmp_path, "embedded:tiny-flux", lora), lora)
    assert f"targets {arch} but the base model embedded:tiny-flux is flux" in msg and "before any generation" in msg


def test_a_flux_lora_on_sdxl_and_sd_bases_is_refused_naming_both(flux, tmp_path):
    lora = tmp_path / "f.safetensors"
    write_flux_lora(lora, flux.pipe.transformer, "kohya_flux", single_subs=())
    sdxl = _tiny_sdxl(tmp_path)
    msg = _refused(_case(tmp_path, str(sdxl), lora), lora)
    assert "targets flux but the base model dir:tiny-sdxl is sdxl" in msg
    msg = _refused(_case(tmp_path, "embedded:tiny-sd", lora), lora)
    assert "targets flux but the base model embedded:tiny-sd is" in msg


# ----------------------------------------------------------------------------- weights and corpora


def test_a_kohya_file_and_its_diffusers_conversion_compare_as_the_same_weights(flux, tmp_path):
    from safetensors.torch import load_file, save_file

    from carlos_audit.lora.weights import compare_weights, weights_class

    kohya = tmp_path / "kohya.safetensors"
    write_flux_lora(kohya, flux.pipe.transformer, "kohya_flux", single_subs=(), alpha=2.0, seed=5)
    from diffusers import FluxPipeline

    converted = tmp_path / "converted.safetensors"  # diffusers' own conversion: q/k/v split, alpha folded
    save_file({k: v.clone().contiguous() for k, v in FluxPipeline.lora_state_dict(load_file(str(kohya))).items()}, str(converted))
    r = compare_weights(kohya, converted)
    assert r["modules_compared"] == 14 and r["modules_only_in_a"] == [] and r["modules_only_in_b"] == []
    assert r["cosine"] == pytest.approx(1.0, abs=1e-6) and r["norm_ratio"] == pytest.approx(1.0, abs=1e-6)
    assert weights_class(r) == "same-weights"
    other = tmp_path / "other.safetensors"
    write_flux_lora(other, flux.pipe.transformer, "kohya_flux", single_subs=(), alpha=2.0, seed=6)
    assert weights_class(compare_weights(kohya, other)) == "unrelated"


def test_flux_demo_derivative_reads_as_merge_like_in_weights(flux, tmp_path):
    from carlos_audit.lora.weights import compare_weights, weights_class
    from carlos_audit.models.flux_demo import build_flux_demo_loras

    loras = build_flux_demo_loras(tmp_path / "demo")
    r = compare_weights(loras["target"], loras["derivative"])
    assert r["modules_compared"] == 11 and weights_class(r) == "merge-like"


def test_corpus_build_with_a_flux_template(flux, tmp_path):
    from carlos_audit.case.casefile import load_case
    from carlos_audit.case.signature import require_compatible
    from carlos_audit.engines.corpus_build import build_corpus
    from carlos_audit.corpus.store import load_corpus
    from carlos_audit.engines.inputs import model_sha256
    from carlos_audit.models.flux import ensure_tiny_flux
    from carlos_audit.hashing import tree_sha256

    folder = tmp_path / "loras"
    folder.mkdir()
    write_flux_lora(folder / "a.safetensors", flux.pipe.transformer, "xlabs", seed=1)
    write_flux_lora(folder / "b.safetensors", flux.pipe.transformer, "ai_toolkit", seed=2)
    template = tmp_path / "template.toml"
    template.write_text(flux_case_text("embedded:tiny-flux", "steps = 2\nwidth = 64\nheight = 64\nmax_sequence_length = 16\n"
                                       "batch_size = 4\nbootstrap_resamples = 100", lora_extra='trigger_policy = "none"'))
    build_corpus(folder, template, tmp_path / "corpus", name="flux corpus", progress=False)
    corpus = load_corpus(tmp_path / "corpus")
    sig = corpus.signature
    assert (sig["family"], sig["guidance"], sig["max_sequence_length"], sig["steps"]) == ("flux-dev", "embedded", 16, 2)
    assert len(corpus.rows) == 2
    # the build checks the tiny Flux pipeline by its tree hash on every worker
    assert model_sha256(load_case(template))["base_model"] == tree_sha256(ensure_tiny_flux())
    sd = dict(sig, family=None, guidance=None, max_sequence_length=None)  # a Stable Diffusion profile
    with pytest.raises(AuditError, match="family"):
        require_compatible(sig, sd)
