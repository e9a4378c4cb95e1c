"""Full-size SD 1.5 cases end to end (published configs, random weights cached once per machine in
$CARLOS_AUDIT_FIXTURES): an LDM single file offline with a kohya LoRA that trains the text encoder,
the same weights through a hub-cache layout, an edited config named by verify. 64 px, 2 steps,
1 pair; one full-size pipeline in memory at a time (~5-7 GB peak RSS)."""

from __future__ import annotations

import json
import shutil
import sys

import pytest

from fullsize_fixtures import ensure_random_pipeline, ensure_sd15_single_file, write_kohya_lora
from carlos_audit.run import load as load_mod
from conftest import full_size_case, hub_layout


@pytest.fixture(scope="module")
def sd15(carlos_home):
    return ensure_random_pipeline("sd15")


@pytest.fixture
def one_case_at_a_time():
    load_mod.process_models().clear()
    yield
    load_mod.process_models().clear()


def test_single_file_runs_offline_and_matches_the_hub_cache_folder(sd15, carlos_home, tmp_path, monkeypatch,
                                                                   one_case_at_a_time):
    """Defects 1, 3, 4, 7 end to end: a kohya LoRA with text encoder on an LDM single file, empty
    Hugging Face cache, zero network attempts; the claim is checked; images equal the hub-cache
    folder's; the manifest lists the configs used; verify reproduces the sample bit for bit."""
    from carlos_audit.hashing import sha256_file
    from carlos_audit.pipeline import run_case
    from carlos_audit.verify import verify_case

    single = ensure_sd15_single_file()
    lora = write_kohya_lora("sd15", tmp_path / "k.safetensors",
                            metadata={"ss_new_sd_model_hash": sha256_file(single), "ss_tag_frequency": json.dumps({"10_sks": {"x": 1}})})
    attempts = []
    sys.addaudithook(lambda event, args: attempts.append(event) if event in ("socket.connect", "socket.getaddrinfo") else None)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    (tmp_path / "a").mkdir()
    res = run_case(full_size_case(tmp_path / "a", single, lora), tmp_path / "out-single", progress=False)
    m = res.manifest.to_json()
    assert attempts == []
    assert m["lora"]["load"]["partial"] is False and m["lora"]["load"]["applied"] == 264
    assert m["lora"]["inspection"]["base_model_hash_check"] == "match"
    assert m["base_model"]["config_source"] == "carried:sd15"
    names = {f["name"] for f in m["base_model"]["files"]}
    assert {"config/scheduler/scheduler_config.json", "config/tokenizer/vocab.json", "config/unet/config.json"} <= names
    report = verify_case(tmp_path / "out-single", sample=1)
    assert report["ok"], report

    load_mod.process_models().clear()
    hub = tmp_path / "hub"
    hub_layout(ensure_random_pipeline("sd15"), hub, "someorg/sd15")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    (tmp_path / "b").mkdir()
    res2 = run_case(full_size_case(tmp_path / "b", "someorg/sd15", lora), tmp_path / "out-hub", progress=False)
    m2 = res2.manifest.to_json()
    assert m2["lora"]["inspection"]["base_model_hash_check"] == "not_comparable"
    for r1, r2 in zip(m["pairs"], m2["pairs"]):
        assert {a: e["image_sha256"] for a, e in r1["arms"].items()} == {a: e["image_sha256"] for a, e in r2["arms"].items()}


def test_edited_config_is_named_by_verify(sd15, carlos_home, tmp_path, one_case_at_a_time):
    """Defect 4: an edited scheduler config made verify say only "image hash differs"."""
    from carlos_audit.models.loading import carried_config_dir
    from carlos_audit.pipeline import run_case
    from carlos_audit.verify import verify_case

    cfg = tmp_path / "cfg"
    shutil.copytree(carried_config_dir("sd15"), cfg)
    lora = write_kohya_lora("sd15", tmp_path / "u.safetensors", only="unet")
    run_case(full_size_case(tmp_path, ensure_sd15_single_file(), lora, extra_base=f'config = "{cfg}"'), tmp_path / "out", progress=False)
    sched = cfg / "scheduler" / "scheduler_config.json"
    data = json.loads(sched.read_text())
    data["beta_end"] = 0.02
    sched.write_text(json.dumps(data))
    report = verify_case(tmp_path / "out", sample=1)
    failed = [c for c in report["checks"] if not c["ok"]]
    assert failed and failed[0]["check"] == "base model files"
    assert "changed: config/scheduler/scheduler_config.json" in failed[0]["detail"]
