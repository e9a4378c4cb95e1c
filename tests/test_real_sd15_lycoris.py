"""Full-size SD 1.5 (published configs, random weights; fullsize_fixtures.py, built once
per machine in $CARLOS_AUDIT_FIXTURES) with LoHa, LoKr and DoRA files made by the LyCORIS library
on its UNet and text encoder: applied by weight patch exactly as the library's forward applies
them, only the layers in the file touched, the base weights restored bit for bit. Slow (a few
minutes on 2 cores; 5.7 GB RSS measured): run under ``flock /tmp/carlos-heavy.lock``."""

from __future__ import annotations

import hashlib

import pytest
import torch

from lycoris_files import make_lycoris_file

from carlos_audit.lora.inspection import inspect_lora
from fullsize_fixtures import ensure_random_pipeline
from carlos_audit.run.generate import set_adapter_state
from carlos_audit.run.load import load_lora
from carlos_audit.run.patch import patched_layers, unload

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sd15(carlos_home):
    from carlos_audit.models.loading import load_base_pipeline

    lp = load_base_pipeline(str(ensure_random_pipeline("sd15")), dtype="float32", device="cpu")
    yield lp.pipe
    del lp


def digests(pipe) -> dict:
    return {f"{c}.{k}": hashlib.sha256(v.detach().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
            for c in ("unet", "text_encoder") for k, v in getattr(pipe, c).state_dict().items()}


@torch.no_grad()
def outputs(pipe):
    g = torch.Generator().manual_seed(3)
    x, enc = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 7, 768, generator=g)
    ids = torch.randint(0, 49407, (1, 10), generator=g)
    return pipe.unet(x, torch.tensor([400]), encoder_hidden_states=enc).sample, pipe.text_encoder(ids).last_hidden_state


def rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("family", ["loha", "lokr", "dora"])
def test_full_size_sd15_family_matches_the_library(sd15, tmp_path, family):
    before = digests(sd15)
    made = make_lycoris_file(sd15, family, tmp_path / f"{family}.safetensors", dim=8, alpha=4.0, copy=False)
    try:
        want_unet, want_te = outputs(sd15)  # the library's forward
    finally:
        made.detach()
    assert digests(sd15) == before
    insp = inspect_lora(made.path)
    try:
        state = load_lora(sd15, made.path, "t", insp, allow_partial=False)
        assert state["partial"] is False and state["applied"] == state["in_file"] == insp["module_count"]
        assert state["by_component"] == made.by_component
        set_adapter_state(sd15, "t", 1.0)
        got_unet, got_te = outputs(sd15)
        assert rel(got_unet, want_unet) < 2e-5 and rel(got_te, want_te) < 2e-5, (rel(got_unet, want_unet), rel(got_te, want_te))
        now = digests(sd15)  # only the layers in the file were touched
        changed = sorted(k.rsplit(".", 1)[0] for k in now if now[k] != before[k])
        assert sorted(set(changed)) == patched_layers(sd15, "t")
        set_adapter_state(sd15, None)
        assert digests(sd15) == before
    finally:
        unload(sd15)
    assert digests(sd15) == before
