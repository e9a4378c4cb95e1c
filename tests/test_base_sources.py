"""Base-model identity and offline resolution, with the tiny model: folder hashes that follow links
(hub-cache layout), `variant`, configs-only caches, unknown single files, the claimed-hash check
and the report's wording of it. Each names the defect of issue #11 it guards."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

from carlos_audit.errors import AuditError
from carlos_audit.models.loading import load_base_pipeline, resolve_base_source
from carlos_audit.models.tiny import ensure_tiny_sd
from conftest import hub_layout


def test_folder_hash_follows_links_and_sees_a_repointed_component(carlos_home, tmp_path):
    """Defect 5: re-pointing a linked component (hub-cache layout) must change the recorded hash."""
    snap = hub_layout(ensure_tiny_sd(), tmp_path / "hub")
    before = resolve_base_source(str(snap))
    assert before.sha256 == resolve_base_source(str(ensure_tiny_sd())).sha256
    assert any(f["name"] == "unet/diffusion_pytorch_model.safetensors" for f in before.files)
    other = tmp_path / "other_unet.safetensors"
    shutil.copy(ensure_tiny_sd() / "unet" / "diffusion_pytorch_model.safetensors", other)
    with open(other, "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\x00\x00\x80\x3f")
    link = snap / "unet" / "diffusion_pytorch_model.safetensors"
    link.unlink()
    link.symlink_to(other)
    after = resolve_base_source(str(snap))
    assert after.sha256 != before.sha256
    # a whole component folder that is a link is followed too
    linked = tmp_path / "linked"
    linked.mkdir()
    for p in ensure_tiny_sd().iterdir():
        (linked / p.name).symlink_to(p, target_is_directory=p.is_dir())
    assert resolve_base_source(str(linked)).sha256 == resolve_base_source(str(ensure_tiny_sd())).sha256


def _variant_only_copy(tmp_path: Path) -> Path:
    folder = tmp_path / "fp16only"
    shutil.copytree(ensure_tiny_sd(), folder)
    for f in list(folder.rglob("*.safetensors")):
        f.rename(f.with_name(f.name.replace(".safetensors", ".fp16.safetensors")))
    return folder


def test_variant_only_folder_is_one_line_naming_the_key(carlos_home, tmp_path):
    """Defect 6: a folder of *.fp16.safetensors only was a raw OSError traceback."""
    folder = _variant_only_copy(tmp_path)
    with pytest.raises(AuditError, match=r'component (text_encoder|unet|vae) has no weights with no variant .*variant = "fp16"'):
        load_base_pipeline(str(folder), dtype="float32", device="cpu")
    lp = load_base_pipeline(str(folder), dtype="float32", device="cpu", variant="fp16")
    assert lp.variant == "fp16" and any(f["name"].endswith(".fp16.safetensors") for f in lp.files)


def test_hub_cache_with_configs_only_is_one_line(carlos_home, tmp_path, monkeypatch):
    """Defect 6: a hub id whose cache holds configs only was a raw traceback."""
    configs_only = tmp_path / "cfg"
    shutil.copytree(ensure_tiny_sd(), configs_only, ignore=shutil.ignore_patterns("*.safetensors"))
    hub_layout(configs_only, tmp_path / "hub", "someorg/cfg-only")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(AuditError, match="holds no weight files .*--allow-download"):
        load_base_pipeline("someorg/cfg-only", dtype="float32", device="cpu")


def test_unknown_single_file_needs_a_config_and_never_goes_online(carlos_home, tmp_path, monkeypatch):
    """Defect 3: offline, a single file must say what is missing, with zero network attempts."""
    import numpy as np
    from safetensors.numpy import save_file

    attempts = []

    def hook(event, args):
        if event.startswith("socket.") and event != "socket.__new__":
            attempts.append(event)

    sys.addaudithook(hook)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    f = tmp_path / "mystery.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": np.zeros((320, 9, 3, 3), np.float32)}, str(f))
    with pytest.raises(AuditError, match=r"not an SD 1.5 or SDXL base checkpoint .*\[base_model\] config"):
        load_base_pipeline(str(f), dtype="float32", device="cpu")
    with pytest.raises(AuditError, match="config applies to single-file checkpoints only"):
        load_base_pipeline(str(ensure_tiny_sd()), dtype="float32", device="cpu", config=str(tmp_path))
    assert attempts == []


class _Loaded:
    def __init__(self, identity, sha256):
        self.identity, self.sha256 = identity, sha256


def test_claimed_base_hash_is_checked_when_comparable():
    """Defect 7: the claim was never checked during run."""
    from carlos_audit.run.load import claimed_base_hash_check

    digest = "ab" * 32
    claim = {"claimed_base_model_hash": {"value": digest, "source": "ss_new_sd_model_hash", "legacy": False}}
    assert claimed_base_hash_check(claim, _Loaded("file:base.safetensors", digest))["base_model_hash_check"] == "match"
    assert claimed_base_hash_check(claim, _Loaded("file:base.safetensors", "cd" * 32))["base_model_hash_check"] == "mismatch"
    folder = claimed_base_hash_check(claim, _Loaded("dir:base", digest))
    assert folder["base_model_hash_check"] == "not_comparable" and "folder" in folder["base_model_hash_check_detail"]
    legacy = {"claimed_base_model_hash": {"value": "1234abcd", "source": "ss_sd_model_hash", "legacy": True}}
    assert claimed_base_hash_check(legacy, _Loaded("file:x.safetensors", digest))["base_model_hash_check"] == "not_comparable"
    assert claimed_base_hash_check({}, _Loaded("file:x.safetensors", digest))["base_model_hash_check"] == "absent"


def test_report_prints_the_claim_as_text_and_hints_without_count():
    """Defect 7: the claim showed as a Python dict; hints without a count showed "?x"."""
    from carlos_audit.records import Lora
    from carlos_audit.report.method import self_reported

    inspection = {"metadata": {"ss_new_sd_model_hash": "ab" * 32},
                  "claimed_base_model_hash": {"value": "ab" * 32, "source": "ss_new_sd_model_hash", "legacy": False},
                  "base_model_hash_check": "mismatch", "base_model_hash_check_detail": "the claimed ... differs",
                  "trigger_word_hints": [{"text": "sks dog", "source": "ss_tag_frequency dataset folder"},
                                         {"text": "dog", "source": "ss_tag_frequency", "count": 3}]}
    facts = dict(self_reported(Lora.from_json({"inspection": inspection}))["facts"])  # report/ takes records
    claim = facts["claimed base model hash (SELF-REPORTED)"]
    assert claim.startswith("abab") and "{" not in claim and "ss_new_sd_model_hash" in claim
    assert facts["base model hash check"].startswith("differs")
    hints = facts["trigger word hints (SELF-REPORTED)"]
    assert "?" not in hints and "3× in ss_tag_frequency" in hints


def test_case_paths_are_normalised(tmp_path):
    """Defect 7: report paths showed as cases/../single/..."""
    from carlos_audit.paths import expand_path

    assert expand_path("../single/x.safetensors", tmp_path / "cases") == tmp_path / "single" / "x.safetensors"
