"""Exact cost accounting (hooks), `carlos-audit plan`, and the GPU fast-path selection (issue 8)."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner
from conftest import write_case

from carlos_audit.case.casefile import load_case
from carlos_audit.cli import main
from carlos_audit.fileio import read_json
from carlos_audit.pipeline import run_case

P, S, STEPS, BATCH = 8, 2, 3, 4  # builtin:demo x 2 seeds
NO_INDICATORS = "[indicators]\ntrigger_dependence = false\nprompt_override = false\neffect_labels = false\n"  # arms: base, lora


# --------------------------------------------------------------------------- hook counts


def test_manifest_cost_equals_images_times_steps(demo_assets, carlos_home, tmp_path):
    from carlos_audit.run.load import process_models
    shutil.rmtree(carlos_home / "base-cache", ignore_errors=True)
    cf = write_case(tmp_path, demo_assets, case_id="cost", steps=STEPS, batch_size=BATCH, extra=NO_INDICATORS)
    before = {"images_generated": process_models().cost.images_generated}
    res = run_case(load_case(cf), tmp_path / "out", progress=False)
    c = res.manifest.cost
    assert sorted(c["arms"]) == ["base", "lora"]
    images = 2 * P * S  # base + LoRA arm, nothing cached
    assert process_models().cost.images_generated - before["images_generated"] == images
    t = c["total"]
    assert t["images_generated"] == images
    assert t["unet_forward_calls"] == 2 * (P * S // BATCH) * STEPS
    assert t["unet_image_steps"] == images * STEPS
    assert t["unet_latent_evaluations"] == 2 * images * STEPS  # CFG: one call, both halves batched
    assert t["vae_decoder_calls"] == 2 * P * S // BATCH and t["vae_decoded_images"] == images
    assert t["clip_forward_calls"] == 2 * P * S // BATCH and t["clip_image_encodings"] == images
    assert c["shared"]["images_generated"] == 0 and c["unmeasured_batches"] == 0
    rec = read_json(tmp_path / "out" / "units" / "lora" / "b00000.json")
    assert rec["cost"]["unet_forward_calls"] == STEPS and rec["cost"]["unet_image_steps"] == BATCH * STEPS

    # a second LoRA takes the base arm from the cache: no generation, only CLIP, for that arm
    cf2 = write_case(tmp_path, demo_assets, case_id="cost2", lora="weak", steps=STEPS, batch_size=BATCH,
                     extra=NO_INDICATORS)
    c2 = run_case(load_case(cf2), tmp_path / "out2", progress=False).manifest.cost
    base = c2["arms"]["base"]
    assert base["sources"] == {"base-cache": P * S // BATCH}
    assert base["images_generated"] == base["unet_forward_calls"] == base["vae_decoded_images"] == 0
    assert base["clip_image_encodings"] == P * S
    assert c2["total"]["images_generated"] == P * S


def test_without_cfg_latent_evaluations_equal_image_steps(demo_assets):
    from carlos_audit.models.loading import load_base_pipeline, set_scheduler
    from carlos_audit.run import cost
    from carlos_audit.run.generate import GenerationParams, generate_batch

    lp = load_base_pipeline("embedded:tiny-sd", dtype="float32", device="cpu")
    set_scheduler(lp.pipe, "DDIMScheduler")
    counter = cost.CostCounter()
    cost.install_pipeline_hooks(lp.pipe, counter)
    cost.install_pipeline_hooks(lp.pipe, counter)  # idempotent: counted once
    before = counter.snapshot()
    generate_batch(lp.pipe, ["a", "b", "c"], [0, 1, 2], GenerationParams(2, 1.0, 64, 64, "DDIMScheduler", ""))
    d = counter.delta(before)
    assert d["unet_forward_calls"] == 2 and d["unet_latent_evaluations"] == d["unet_image_steps"] == 6
    assert d["vae_decoded_images"] == 3


# --------------------------------------------------------------------------- plan


def test_plan_counts_and_measured_estimate(demo_assets, tmp_path):
    cf = write_case(tmp_path, demo_assets, case_id="tmpl", steps=STEPS, batch_size=BATCH)
    r = CliRunner().invoke(main, ["plan", str(cf), "--loras", "740", "--measure-images", "2", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    c = out["counts"]
    assert c["images"] == 741 * P * S and c["images_if_base_per_lora"] == 2 * 740 * P * S
    assert c["unet_forward_calls"] == 741 * (P * S // BATCH) * STEPS
    assert c["unet_image_steps"] == c["images"] * STEPS and c["unet_latent_evaluations"] == 2 * c["images"] * STEPS
    assert c["vae_decoded_images"] == c["clip_image_encodings"] == c["images"]
    m = out["measurement"]
    assert m["device"] == "cpu" and m["images"] == 2 and m["batches"] == 1
    # the timed generation was real: the hooks saw it
    assert m["counted"]["unet_forward_calls"] == STEPS and m["counted"]["unet_image_steps"] == 2 * STEPS
    assert m["counted"]["clip_image_encodings"] == 2 and m["generation_s_per_image"] > 0
    e = out["estimate"]
    per = m["generation_s_per_image"] + m["clip_s_per_image"]
    assert e["device_hours"] == pytest.approx(c["images"] * per / 3600)
    # the full chain is timed too (PNG encode, embedding, hashes, writes: issue 24)
    host = m["host_chain_s_per_image"]
    assert host > 0 and e["wall_hours_serial"] == pytest.approx(c["images"] * (m["generation_s_per_image"] + host) / 3600)
    assert e["wall_hours_pipelined"] == pytest.approx(c["images"] * max(m["generation_s_per_image"], host) / 3600)


def test_plan_text_output_without_measurement(demo_assets, tmp_path):
    cf = write_case(tmp_path, demo_assets, case_id="tmpl", steps=STEPS, batch_size=BATCH)
    r = CliRunner().invoke(main, ["plan", str(cf), "--loras", "740", "--measure-images", "0"])
    assert r.exit_code == 0, r.output
    assert f"{741 * P * S:,}" in r.output and "(L + 1) x P x S" in r.output
    assert f"{741 * (P * S // BATCH) * STEPS:,}" in r.output and "device-hours" not in r.output


# --------------------------------------------------------------------------- fast path


@pytest.mark.parametrize("device,dtype,arch,force,vae,attn", [
    ("cpu", "float32", "sd15", False, "float32", "unchanged"),
    ("cpu", "float32", "sdxl", True, "float32", "unchanged"),
    ("cuda", "float32", "sdxl", True, "float32", "sdpa"),
    ("cuda", "float16", "sdxl", False, "float32", "sdpa"),  # SDXL VAE overflows in fp16
    ("cuda", "bfloat16", "sdxl", False, "float32", "sdpa"),
    ("cuda", "float16", "sd15", False, "float16", "sdpa"),  # SD 1.5 VAE is fine in fp16
    ("cuda", "float16", "sd15", True, "float32", "sdpa"),  # ... unless its config says force_upcast
    ("cuda:1", "float16", "other", False, "float16", "sdpa"),
])
def test_fastpath_selection(device, dtype, arch, force, vae, attn):
    from carlos_audit.models.fastpath import select

    fp = select(device, dtype, arch, vae_force_upcast=force)
    assert fp.unet_dtype == dtype and fp.vae_dtype == vae and fp.attention == attn
    assert fp.clip_device == device and fp.clip_dtype == "float32" and not fp.compile_unet
    assert fp.active == device.startswith("cuda")
    assert fp.reasons


def test_fastpath_compile_flag_and_off_switch():
    from carlos_audit.models.fastpath import select

    assert select("cuda", "float16", "sdxl", compile=True).compile_unet
    assert not select("cpu", "float32", "sd15", compile=True).compile_unet  # never on the CPU
    off = select("cuda", "float16", "sdxl", enabled=False)
    assert not off.active and off.vae_dtype == "float16" and off.attention == "unchanged"
    assert not select("cuda", "float16", "sdxl", sdpa_available=False).attention == "sdpa"


def test_cpu_images_identical_with_fastpath_selector_active(demo_assets, monkeypatch):
    from carlos_audit.models.loading import load_base_pipeline, set_scheduler
    from carlos_audit.run.generate import GenerationParams, generate_batch
    from carlos_audit.casefolder.unit_store import png_bytes

    params = GenerationParams(3, 5.0, 64, 64, "DDIMScheduler", "")

    def images():
        lp = load_base_pipeline("embedded:tiny-sd", dtype="float32", device="cpu")
        set_scheduler(lp.pipe, "DDIMScheduler")
        return lp, [png_bytes(im) for im in generate_batch(lp.pipe, ["a red fox", "a castle"], [0, 1], params)]

    lp_on, on = images()
    assert lp_on.fastpath["active"] is False and lp_on.fastpath["device"] == "cpu"
    monkeypatch.setenv("CARLOS_AUDIT_FASTPATH", "0")
    lp_off, off = images()
    assert lp_off.fastpath["active"] is False
    assert on == off


def test_vae_upcast_keeps_a_half_precision_pipeline_decoding_in_float32(demo_assets):
    """The mechanism the SDXL fp16 path uses, exercised on the CPU in bfloat16."""
    import torch

    from carlos_audit.models.loading import load_base_pipeline, set_scheduler
    from carlos_audit.models.fastpath import apply, select
    from carlos_audit.run.generate import GenerationParams, generate_batch

    lp = load_base_pipeline("embedded:tiny-sd", dtype="float32", device="cpu")
    set_scheduler(lp.pipe, "DDIMScheduler")
    pipe = lp.pipe
    for m in (pipe.unet, pipe.text_encoder, pipe.vae):
        m.to(torch.bfloat16)
    fp = select("cuda", "bfloat16", "sdxl")
    fp = type(fp)(**{**fp.__dict__, "device": "cpu", "attention": "sdpa"})
    rec = apply(pipe, fp)
    assert rec["vae_dtype"] == "float32" and rec["active"]
    assert next(pipe.vae.parameters()).dtype == torch.float32 and pipe.unet.dtype == torch.bfloat16
    assert all(type(p).__name__ == "AttnProcessor2_0" for p in pipe.unet.attn_processors.values())
    seen = []
    pipe.vae.decoder.register_forward_pre_hook(lambda m, a: seen.append(a[0].dtype))
    (im,) = generate_batch(pipe, ["a red fox"], [0], GenerationParams(2, 5.0, 64, 64, "DDIMScheduler", ""))
    assert seen == [torch.float32] and im.size == (64, 64)
