"""The pipelined host chain (run/hostchain.py): batch k is written while batch k+1 generates,
images are embedded from memory with the same features as from their PNGs, and a failure in the
pool is one line with no half-written unit (issue 24)."""

from __future__ import annotations

import io
import shutil
import threading

import numpy as np
import pytest
from conftest import write_case
from PIL import Image

from carlos_audit.case.casefile import load_case
from carlos_audit.errors import AuditError
from carlos_audit.fileio import read_json
from carlos_audit.hashing import sha256_file
from carlos_audit.run import embed as embed_mod
from carlos_audit.run import profile as profile_mod
from carlos_audit.pipeline import run_case
from carlos_audit.casefolder.unit_store import CaseStore, png_bytes

SEEDS = "{ count = 1, start = 0 }"  # 8 pairs: 2 batches of 4 per arm


def _files(case_dir):
    return {p.relative_to(case_dir).as_posix(): sha256_file(p) for p in sorted(case_dir.rglob("*"))
            if p.is_file() and p.name not in ("manifest.json", "manifest.json.sha256", "run.json")}


@pytest.fixture(scope="module")
def reference(lite_assets, carlos_home, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostchain")
    cf = write_case(tmp, lite_assets, case_id="chain", seeds=SEEDS)
    shutil.rmtree(carlos_home / "base-cache", ignore_errors=True)
    run_case(load_case(cf), tmp / "ref", progress=False)
    return cf, tmp / "ref"


@pytest.mark.parametrize("model", ["embedded:tiny-clip", "embedded:tiny-hf-clip"])
def test_features_from_memory_equal_features_from_the_png(carlos_home, model):
    from carlos_audit.models.embedders import load_embedder
    from carlos_audit.models.loading import load_base_pipeline
    from carlos_audit.run.generate import GenerationParams, generate_batch

    lp = load_base_pipeline("embedded:tiny-sd", dtype="float32", device="cpu")
    images = generate_batch(lp.pipe, ["a red car", "a cat on a sofa", "a castle"], [0, 1, 2],
                            GenerationParams(2, 5.0, 64, 64, "PNDMScheduler", ""))
    decoded = [Image.open(io.BytesIO(png_bytes(im))).convert("RGB") for im in images]
    emb = load_embedder(model, None)
    a, b = embed_mod.image_features(emb, images), embed_mod.image_features(emb, decoded)
    assert a.dtype == np.float32 and a.shape[0] == 3 and np.abs(a).sum() > 0
    assert a.tobytes() == b.tobytes()


def test_batch_k_is_written_while_batch_k_plus_1_generates(reference, carlos_home, tmp_path, monkeypatch):
    """Writing the first base unit waits until the second base batch is generating: a serial
    chain writes each unit before the next generation, so there the wait times out."""
    cf, ref = reference
    shutil.rmtree(carlos_home / "base-cache", ignore_errors=True)
    real_gen, real_write = profile_mod.generate_batch, CaseStore.write_unit
    generations, overlapped = [], []

    def gen(pipe, prompts, seeds, params):
        generations.append(tuple(seeds))
        return real_gen(pipe, prompts, seeds, params)

    def write_unit(self, arm, batch, *args, **kwargs):
        if arm == "base" and batch == 0:
            overlapped.append(_wait_until(lambda: len(generations) >= 2))
        return real_write(self, arm, batch, *args, **kwargs)

    monkeypatch.setattr(profile_mod, "generate_batch", gen)
    monkeypatch.setattr(CaseStore, "write_unit", write_unit)
    out = tmp_path / "case"
    run_case(load_case(cf), out, progress=False)
    assert overlapped == [True]
    assert _files(out) == _files(ref)


def _wait_until(condition, timeout: float = 60.0) -> bool:
    import time

    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if condition():
            return True
        time.sleep(0.01)
    return False


def test_a_failure_in_the_pool_is_one_line_and_leaves_no_half_written_unit(reference, carlos_home, tmp_path,
                                                                          monkeypatch):
    cf, ref = reference
    shutil.rmtree(carlos_home / "base-cache", ignore_errors=True)
    real, calls, generated = embed_mod.image_features, [], []

    def failing(embedder, images):
        calls.append(len(images))
        if len(calls) == 2:
            raise RuntimeError("simulated fault\nsecond line")
        return real(embedder, images)

    real_gen = profile_mod.generate_batch
    monkeypatch.setattr(profile_mod, "generate_batch", lambda *a: generated.append(1) or real_gen(*a))
    monkeypatch.setattr(embed_mod, "image_features", failing)
    out = tmp_path / "case"
    with pytest.raises(AuditError) as info:
        run_case(load_case(cf), out, progress=False)
    msg = str(info.value)
    assert "host chain failed" in msg and "simulated fault" in msg and "second line" not in msg
    assert len(generated) <= 4  # the run stopped: the LoRA arms were not generated to the end
    assert not list(out.rglob(".*.tmp"))
    records = sorted((out / "units").rglob("*.json"))
    assert [p.relative_to(out).as_posix() for p in records] == ["units/base/b00000.json"]
    for e in read_json(records[0])["pairs"]:
        assert sha256_file(out / e["image"]) == e["image_sha256"]
    monkeypatch.setattr(embed_mod, "image_features", real)
    run_case(load_case(cf), out, progress=False)
    got, want = _files(out), _files(ref)
    assert {k: v for k, v in got.items() if not k.startswith("units/")} == \
           {k: v for k, v in want.items() if not k.startswith("units/")}
