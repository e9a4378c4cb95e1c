"""Embedded tiny models and the real-checkpoint loading paths, exercised with the tiny models."""

from __future__ import annotations

import json
import shutil

import pytest

from carlos_audit.errors import AuditError
from carlos_audit.hashing import sha256_bytes
from carlos_audit.models.embedders import load_embedder
from carlos_audit.models.loading import load_base_pipeline
from carlos_audit.models.tiny import TINY_CLIP_CONFIG, ensure_tiny_clip, ensure_tiny_sd
from carlos_audit.hashing import tree_sha256
from carlos_audit.run.generate import GenerationParams, generate_batch
from carlos_audit.casefolder.unit_store import png_bytes

PARAMS = GenerationParams(3, 5.0, 64, 64, "DDIMScheduler", "")


def _images(pipe):
    return [sha256_bytes(png_bytes(im)) for im in generate_batch(pipe, ["a red car", "a cat"], [0, 1], PARAMS)]


def test_rebuilding_the_tiny_models_is_byte_identical(carlos_home, tmp_path):
    sd, clip = ensure_tiny_sd(), ensure_tiny_clip()
    other = tmp_path / "other_home"
    assert tree_sha256(ensure_tiny_sd(other)) == tree_sha256(sd)
    assert tree_sha256(ensure_tiny_clip(other)) == tree_sha256(clip)


def test_tiny_tokenizer_matches_open_clip_ids(carlos_home):
    import open_clip
    from transformers import CLIPTokenizer

    hf = CLIPTokenizer.from_pretrained(ensure_tiny_sd() / "tokenizer")
    oc = open_clip.get_tokenizer("ViT-B-32")
    text = "a hyper-realistic portrait of a smiling elderly woman, warm lighting"
    ids_hf = hf(text)["input_ids"]
    ids_oc = [int(i) for i in oc([text])[0] if int(i) != 0]
    assert ids_hf == ids_oc


@pytest.fixture(scope="module")
def embedded_pipe(carlos_home):
    return load_base_pipeline("embedded:tiny-sd", dtype="float32", device="cpu")


def test_local_diffusers_folder_loads_through_the_same_code(embedded_pipe, tmp_path):
    folder = tmp_path / "my-model"
    shutil.copytree(ensure_tiny_sd(), folder)
    lp = load_base_pipeline(str(folder), dtype="float32", device="cpu")
    assert lp.identity == "dir:my-model" and lp.sha256 == embedded_pipe.sha256
    lp.pipe.scheduler = embedded_pipe.pipe.scheduler.__class__.from_config(embedded_pipe.pipe.scheduler.config)
    assert _images(lp.pipe) == _images(embedded_pipe.pipe)


def test_hub_id_resolves_from_the_local_cache_only(embedded_pipe, tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    snap = cache / "models--someorg--tiny-sd" / "snapshots" / "0123abcd"
    shutil.copytree(ensure_tiny_sd(), snap)
    (cache / "models--someorg--tiny-sd" / "refs").mkdir()
    (cache / "models--someorg--tiny-sd" / "refs" / "main").write_text("0123abcd")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    lp = load_base_pipeline("someorg/tiny-sd", dtype="float32", device="cpu")
    assert lp.identity == "hf:someorg/tiny-sd" and lp.sha256 == embedded_pipe.sha256
    with pytest.raises(AuditError, match="not available locally .*--allow-download"):
        load_base_pipeline("someorg/absent-model", dtype="float32", device="cpu")


def test_bad_base_sources_are_one_line_errors(tmp_path):
    (tmp_path / "notdiffusers").mkdir()
    with pytest.raises(AuditError, match="no model_index.json"):
        load_base_pipeline(str(tmp_path / "notdiffusers"), device="cpu")
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"\x80\x02}q\x00.")
    with pytest.raises(AuditError, match="pickle"):
        load_base_pipeline(str(ckpt), device="cpu")
    with pytest.raises(AuditError, match="not supported on the CPU"):
        load_base_pipeline("embedded:tiny-sd", dtype="float16", device="cpu")


def test_open_clip_name_with_a_checkpoint_file(carlos_home, tmp_path):
    """A registered open_clip config + `pretrained` = a local checkpoint file: the path real
    ViT-B-32 checkpoints take, with the tiny weights."""
    import open_clip

    cfg_dir = tmp_path / "cfg"
    cfg_dir.mkdir()
    (cfg_dir / "carlos-test-tiny.json").write_text(json.dumps(TINY_CLIP_CONFIG))
    open_clip.add_model_config(cfg_dir)
    weights = ensure_tiny_clip() / "open_clip_model.safetensors"
    named = load_embedder("carlos-test-tiny", str(weights), device="cpu")
    embedded = load_embedder("embedded:tiny-clip", None, device="cpu")
    assert named.identity == "open_clip:carlos-test-tiny/file:open_clip_model.safetensors"
    import torch

    x = torch.ones(1, 3, 64, 64)
    assert torch.equal(named.model.encode_image(x), embedded.model.encode_image(x))
    pt = tmp_path / "w.pt"
    pt.write_bytes(b"\x80\x02")
    with pytest.raises(AuditError, match="pickle-based"):
        load_embedder("carlos-test-tiny", str(pt), device="cpu")
    with pytest.raises(AuditError, match="not available locally"):
        load_embedder("ViT-B-32", "openai", device="cpu")
