"""Seed mode carlos-batch: the CARLoS reference's noise (one CPU generator per batch of 4)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import write_case

from carlos_audit.cli import main
from carlos_audit.fileio import read_json


def _latents_of(pipe, call):
    """Run the pipeline for 1 step and return the initial latents prepare_latents produced."""
    seen = []
    real = pipe.prepare_latents

    def spy(*a, **k):
        out = real(*a, **k)
        seen.append(out.detach().clone())
        return out

    pipe.prepare_latents = spy
    try:
        images = call()
    finally:
        pipe.prepare_latents = real
    return seen[0], images


@pytest.fixture(scope="module")
def tiny_pipe(carlos_home):
    from carlos_audit.models.loading import load_base_pipeline

    return load_base_pipeline("embedded:tiny-sd", dtype="float32", device="cpu").pipe


def test_carlos_batch_latents_equal_the_reference_call(tiny_pipe):
    import torch

    from carlos_audit.run.generate import GenerationParams, generate_batch

    pipe = tiny_pipe
    prompt = "a watercolor fox"
    params = GenerationParams(2, 5.0, 64, 64, type(pipe.scheduler).__name__, "", "carlos-batch")
    per_image = GenerationParams(2, 5.0, 64, 64, type(pipe.scheduler).__name__, "", "per-image")
    for s in (42, 46):
        ours, our_images = _latents_of(pipe, lambda: generate_batch(pipe, [prompt] * 4, list(range(s, s + 4)), params))
        # the reference's own call convention (carlos/index.py; guidance 5.0 is SDXL's default, named here
        # because the tiny SD 1.x-style pipeline's default is 7.5)
        ref, ref_out = _latents_of(pipe, lambda: pipe(prompt, num_inference_steps=2, width=64, height=64, guidance_scale=5.0,
                                                      generator=torch.manual_seed(s), num_images_per_prompt=4))
        assert ours.shape == ref.shape and ours.shape[0] == 4
        assert torch.equal(ours, ref)
        assert [np.asarray(a).tobytes() == np.asarray(b.convert("RGB")).tobytes()
                for a, b in zip(our_images, ref_out.images)] == [True] * 4
        # per-image generators give other noise: the mode matters
        other, _ = _latents_of(pipe, lambda: generate_batch(pipe, [prompt] * 4, list(range(s, s + 4)), per_image))
        assert not torch.equal(other, ref)


def test_carlos_batch_refuses_mixed_batches(tiny_pipe):
    from carlos_audit.errors import AuditError
    from carlos_audit.run.generate import GenerationParams, generate_batch

    params = GenerationParams(1, 5.0, 64, 64, "DDIMScheduler", "", "carlos-batch")
    with pytest.raises(AuditError, match="one prompt with consecutive seeds"):
        generate_batch(tiny_pipe, ["a", "b"], [42, 43], params)


@pytest.mark.parametrize("seeds, batch, ok", [("{ count = 8, start = 42 }", 4, True), ("[42, 43, 45, 46]", 4, False),
                                             ("{ count = 6, start = 42 }", 4, False)])
def test_casefile_checks_carlos_batch_layout(demo_assets, tmp_path, seeds, batch, ok):
    from carlos_audit.case.casefile import load_case
    from carlos_audit.errors import AuditError

    cf = write_case(tmp_path, demo_assets, seeds=seeds, batch_size=batch, extra='seed_mode = "carlos-batch"')
    if ok:
        assert load_case(cf).protocol["seed_mode"] == "carlos-batch"
    else:
        with pytest.raises(AuditError, match="carlos-batch"):
            load_case(cf)


def test_run_records_carlos_batch_and_verify_regenerates_it(demo_assets, tmp_path):
    extra = 'seed_mode = "carlos-batch"\n[indicators]\ntrigger_dependence = false\nprompt_override = false\neffect_labels = false'
    cf = write_case(tmp_path, demo_assets, seeds="{ count = 4, start = 42 }", batch_size=4, steps=2,
                    trigger_policy="lora_only", extra=extra)
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["run", str(cf), "--out", str(out), "--no-progress"])
    assert r.exit_code == 0, r.output
    m = read_json(out / "manifest.json")
    assert m["protocol"]["seed_mode"] == "carlos-batch"
    assert m["signature"]["seed_mode"] == "carlos-batch/4"
    assert m["signature"]["seeds"] == [42, 43, 44, 45]
    assert {(p["batch"], p["position"], p["seed"]) for p in m["pairs"] if p["prompt_id"] == "p002"} == \
        {(1, i, 42 + i) for i in range(4)}
    r = CliRunner().invoke(main, ["verify", str(out), "--sample", "2", "--json"])
    assert r.exit_code == 0, r.output
    checks = json.loads(r.output)["checks"]
    regen = [c for c in checks if c["check"].startswith("regenerate")]
    assert regen and all(c["ok"] for c in regen)
