"""The core pipeline end to end on the CPU with the tiny models (issue 2 acceptance)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import write_case

from carlos_audit.case.casefile import load_case
from carlos_audit.errors import AuditError
from carlos_audit.fileio import read_json
from carlos_audit.hashing import sha256_file
from carlos_audit.run import profile as profile_mod
from carlos_audit.pipeline import run_case

UNITS_PER_ARM = 4  # builtin:demo = 8 prompts x 2 seeds, batch 4


def _clear_base_cache(home: Path):
    shutil.rmtree(home / "base-cache", ignore_errors=True)


def _files(case_dir: Path) -> dict[str, str]:
    """sha256 of every result file (manifest and run record compared separately, without what
    says how this run went: its run section, the batches it generated)."""
    out = {}
    for p in sorted(case_dir.rglob("*")):
        rel = p.relative_to(case_dir).as_posix()
        if p.is_file() and rel not in ("manifest.json", "manifest.json.sha256", "run.json", "units/generation.json") and not rel.startswith(("report", "figures")):
            out[rel] = sha256_file(p)
    return out


def _manifest_wo_run(case_dir: Path) -> dict:
    m = read_json(case_dir / "manifest.json")
    m.pop("run")
    return m


class _Recorder:
    """Wraps generate_batch: records each call's (prompts, seeds); can raise KeyboardInterrupt
    (as Ctrl-C would) on the k-th call, before generating."""

    def __init__(self, real, interrupt_at: int | None = None):
        self.real, self.interrupt_at, self.calls = real, interrupt_at, []

    def __call__(self, pipe, prompts, seeds, params):
        if self.interrupt_at is not None and len(self.calls) + 1 == self.interrupt_at:
            raise KeyboardInterrupt
        lora_on = any(not m.disable_adapters for m in pipe.unet.modules() if hasattr(m, "lora_A"))
        self.calls.append((tuple(prompts), tuple(seeds), lora_on))
        return self.real(pipe, prompts, seeds, params)


@pytest.fixture(scope="module")
def reference_run(demo_assets, carlos_home, tmp_path_factory):
    """An uninterrupted run of a small case with an empty base cache."""
    tmp = tmp_path_factory.mktemp("ref")
    cf = write_case(tmp, demo_assets, case_id="small")
    _clear_base_cache(carlos_home)
    out = tmp / "out"
    run_case(load_case(cf), out, progress=False)
    return cf, out


def test_run_writes_the_documented_case_folder(reference_run):
    _, out = reference_run
    m = read_json(out / "manifest.json")
    metrics = read_json(out / "metrics.json")
    assert m["schema"] == "carlos-audit/manifest/1" and metrics["schema"] == "carlos-audit/metrics/1"
    assert len(m["pairs"]) == metrics["n_pairs"] == 16
    pair = m["pairs"][0]
    assert pair["arms"]["base"]["prompt"].endswith(", tgtstyle")  # trigger policy "both"
    assert pair["arms"]["lora"]["prompt"] == pair["arms"]["base"]["prompt"]
    for arm in ("base", "lora"):
        e = pair["arms"][arm]
        assert sha256_file(out / e["image"]) == e["image_sha256"]
        assert sha256_file(out / e["embedding"]) == e["embedding_sha256"]
    assert {i["role"] for i in m["inputs"]} >= {"casefile", "lora"}
    assert all(i["unchanged"] for i in m["inputs"]) and m["custody_ok"]
    env = m["environment"]
    for k in ("torch", "diffusers", "transformers", "open_clip_torch", "peft"):
        assert env["packages"][k]
    assert env["torch_threads"] >= 1 and env["device"] == "cpu" and env["dtype"] == "float32"
    assert m["signature"]["prompts_sha256"] == m["protocol"]["prompts_sha256"]
    assert m["base_model"]["identity"] == "embedded:tiny-sd" and len(m["base_model"]["sha256"]) == 64
    assert m["embedder"]["feature_dim"] == len(metrics["direction"]) == 64
    emb = np.load(out / pair["arms"]["lora"]["embedding"])
    assert emb.dtype == np.float32 and emb.shape == (64,) and np.linalg.norm(emb) > 1.0  # raw, not unit-norm
    assert 0 < metrics["strength"] and metrics["ci"]["strength"][0] <= metrics["strength"] <= metrics["ci"]["strength"][1]
    assert set(metrics["per_category"]) == {p["category"] for p in m["pairs"]}


def test_two_runs_give_identical_images_and_embeddings(reference_run, carlos_home, tmp_path):
    cf, out = reference_run
    _clear_base_cache(carlos_home)
    again = tmp_path / "again"
    run_case(load_case(cf), again, progress=False)
    assert _files(again) == _files(out)
    assert _manifest_wo_run(again)["pairs"] == _manifest_wo_run(out)["pairs"]


def test_killed_run_resumes_byte_identical_without_regenerating(reference_run, carlos_home, tmp_path, monkeypatch):
    cf, out = reference_run
    _clear_base_cache(carlos_home)
    real = profile_mod.generate_batch
    first = _Recorder(real, interrupt_at=6)  # dies in the LoRA arm, after 4 base + 1 LoRA batches
    monkeypatch.setattr(profile_mod, "generate_batch", first)
    target = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        run_case(load_case(cf), target, progress=False)
    assert not (target / "metrics.json").exists()
    done_before = {p.relative_to(target).as_posix() for p in (target / "units").rglob("*.json")}
    assert len(done_before) == 5
    second = _Recorder(real)
    monkeypatch.setattr(profile_mod, "generate_batch", second)
    run_case(load_case(cf), target, progress=False)
    n_units = len(list((out / "units").rglob("b*.json")))  # every arm the case plans (indicators add arms)
    assert len(first.calls) == 5 and len(second.calls) == n_units - 5
    assert not set(first.calls) & set(second.calls)  # no completed pair generated twice
    assert _files(target) == _files(out)
    assert _manifest_wo_run(target) == _manifest_wo_run(out) | {"case": _manifest_wo_run(target)["case"]}
    records = [read_json(d / "units" / "generation.json") for d in (target, out)]
    assert records[0] | {"stats": None} == records[1] | {"stats": None}  # the same models, inputs, environment


def test_scale_zero_is_exactly_zero_and_strength_rises_with_scale(demo_assets, tmp_path):
    strengths = {}
    for scale in (0.0, 0.5, 1.0, 2.0):
        cf = write_case(tmp_path, demo_assets, case_id=f"scale{scale}".replace(".", "_"), scale=scale)
        res = run_case(load_case(cf), tmp_path / f"s{scale}", progress=False)
        strengths[scale] = res.metrics.strength
        if scale == 0.0:
            assert res.metrics.consistency is None and res.metrics.consistency_note
            assert res.manifest.run["stats"]["base"]["cached_batches"] == UNITS_PER_ARM  # base arm shared
    assert strengths[0.0] == 0.0
    assert strengths[0.5] < strengths[1.0] < strengths[2.0]


def test_diffusers_and_kohya_files_give_identical_images(reference_run, demo_assets, tmp_path):
    cf = write_case(tmp_path, demo_assets, case_id="kohya", lora="target_kohya")
    res = run_case(load_case(cf), tmp_path / "k", progress=False)
    ref = read_json(reference_run[1] / "manifest.json")
    ours = res.manifest.to_json()
    assert ours["lora"]["sha256"] != ref["lora"]["sha256"]
    assert [p["arms"]["lora"]["image_sha256"] for p in ours["pairs"]] == [p["arms"]["lora"]["image_sha256"] for p in ref["pairs"]]


def test_base_arm_is_bit_identical_to_a_pipeline_that_never_loaded_the_lora(reference_run):
    from carlos_audit.hashing import sha256_bytes
    from carlos_audit.models.loading import load_base_pipeline, set_scheduler
    from carlos_audit.run.generate import GenerationParams, generate_batch
    from carlos_audit.casefolder.unit_store import png_bytes

    _, out = reference_run
    m = read_json(out / "manifest.json")
    lp = load_base_pipeline("embedded:tiny-sd", dtype="float32", device="cpu")
    set_scheduler(lp.pipe, "DDIMScheduler")
    assert not lp.pipe.get_list_adapters()
    p = m["protocol"]
    params = GenerationParams(p["steps"], p["guidance_scale"], p["width"], p["height"], p["scheduler"], p["negative_prompt"])
    batch = [r for r in m["pairs"] if r["batch"] == 0]
    images = generate_batch(lp.pipe, [r["arms"]["base"]["prompt"] for r in batch], [r["seed"] for r in batch], params)
    assert [sha256_bytes(png_bytes(im)) for im in images] == [r["arms"]["base"]["image_sha256"] for r in batch]
    assert any(r["arms"]["base"]["image_sha256"] != r["arms"]["lora"]["image_sha256"] for r in batch)


def test_base_images_are_reused_across_loras(reference_run, demo_assets, tmp_path):
    cf = write_case(tmp_path, demo_assets, case_id="weak", lora="weak")
    res = run_case(load_case(cf), tmp_path / "w", progress=False)
    stats = res.manifest.run["stats"]
    assert stats["base"] == {"generated_batches": 0, "cached_batches": UNITS_PER_ARM, "skipped_batches": 0}
    assert stats["lora"]["generated_batches"] == UNITS_PER_ARM
    ref = read_json(reference_run[1] / "manifest.json")
    assert [p["arms"]["base"]["image_sha256"] for p in res.manifest.pairs] == [p["arms"]["base"]["image_sha256"] for p in ref["pairs"]]


def test_a_thread_count_change_misses_the_base_cache(reference_run, demo_assets, tmp_path):
    """The torch thread count changes CPU results in the last bits: base images cached under one
    count are never paired with LoRA images made under another."""
    import torch

    ref = read_json(reference_run[1] / "manifest.json")
    before = torch.get_num_threads()
    other = before - 1 if before > 1 else 2
    cf = write_case(tmp_path, demo_assets, case_id="threads", lora="weak")
    torch.set_num_threads(other)
    try:
        res = run_case(load_case(cf), tmp_path / "t", progress=False)
    finally:
        torch.set_num_threads(before)
    assert ref["environment"]["torch_threads"] == before
    assert res.manifest.environment["torch_threads"] == other
    assert res.manifest.run["stats"]["base"] == {"generated_batches": UNITS_PER_ARM, "cached_batches": 0,
                                                       "skipped_batches": 0}


def test_a_different_case_is_never_overwritten_without_force(reference_run, demo_assets, tmp_path):
    cf, out = reference_run
    target = tmp_path / "copy"
    shutil.copytree(out, target)
    other = write_case(tmp_path, demo_assets, case_id="other", lora="weak")
    before = _files(target)
    with pytest.raises(AuditError, match="holds a different case; pass --force"):
        run_case(load_case(other), target, progress=False)
    assert _files(target) == before
    res = run_case(load_case(other), target, force=True, progress=False)
    assert res.manifest.case["id"] == "other"
