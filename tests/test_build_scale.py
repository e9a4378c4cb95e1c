"""Corpus builds that scale (issue 24): a driver without a GPU plans a CUDA build, the shared
base arm is stored once per build (hard links: case folders stay self-contained), a GPU worker
keeps its own thread count."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from conftest import write_case

from carlos_audit.case.casefile import load_case
from carlos_audit.fileio import read_json
from carlos_audit.hashing import sha256_file

LORAS = ("strong", "target", "weak")


def _no_gpu(*a, **k):
    raise RuntimeError("Found no NVIDIA driver on your system")


def test_a_driver_without_a_gpu_plans_a_cuda_build(lite_assets, tmp_path, monkeypatch):
    from carlos_audit.engines.build_plan import plan_build
    from carlos_audit.engines.units import unit_threads

    for name in ("get_device_name", "get_device_properties", "get_device_capability", "current_device"):
        monkeypatch.setattr(torch.cuda, name, _no_gpu)
    text = write_case(tmp_path, lite_assets, case_id="tmpl").read_text().replace('device = "cpu"', 'device = "cuda"')
    (tmp_path / "tmpl.toml").write_text(text)
    case = load_case(tmp_path / "tmpl.toml")
    lora = lite_assets["loras"]["target"]
    plan = plan_build(tmp_path / "dest", [("target", lora, case)], threads=2)
    assert plan.shared and plan.arm_units and plan.finalize_units
    assert unit_threads(plan.arm_units[0], 2) is None  # a GPU worker keeps its own thread count
    cpu_case = load_case(write_case(tmp_path, lite_assets, case_id="cpu"))
    cpu_plan = plan_build(tmp_path / "dest-cpu", [("target", lora, cpu_case)], threads=2)
    assert unit_threads(cpu_plan.arm_units[0], 2) == 2


def test_a_build_stores_the_base_png_bytes_once(lite_assets, carlos_home, tmp_path):
    from carlos_audit.engines.corpus_build import build_corpus

    loras = tmp_path / "loras"
    loras.mkdir()
    for k in LORAS:
        shutil.copy(lite_assets["loras"][k], loras / f"{k}.safetensors")
    template = write_case(tmp_path, lite_assets, case_id="tmpl", steps=2, seeds="{ count = 1, start = 0 }")
    shutil.rmtree(carlos_home / "base-cache", ignore_errors=True)
    dest = tmp_path / "dest"
    build_corpus(loras, template, dest, threads=1, progress=False)
    cases = dest / "cases"
    (shared,) = [p for p in (cases / "_shared").iterdir() if p.name.startswith("base-")]
    shared_pngs = sorted((shared / "images" / "base").glob("*.png"))
    assert len(shared_pngs) == 8
    inodes, per_case_bytes = set(), 0
    for k in LORAS:
        case_dir = cases / k
        m = read_json(case_dir / "manifest.json")
        for row in m["pairs"]:  # the case folder is self-contained: every recorded file is there, intact
            e = row["arms"]["base"]
            assert sha256_file(case_dir / e["image"]) == e["image_sha256"]
        for png in sorted((case_dir / "images" / "base").glob("*.png")):
            st = png.stat()
            inodes.add((st.st_dev, st.st_ino))
            per_case_bytes += st.st_size
    shared_inodes = {(p.stat().st_dev, p.stat().st_ino) for p in shared_pngs}
    assert inodes == shared_inodes  # every case's base image is the shared file itself
    assert all(p.stat().st_nlink == len(LORAS) + 1 for p in shared_pngs)
    stored = sum(p.stat().st_size for p in shared_pngs)
    assert per_case_bytes == len(LORAS) * stored  # what a copy per case would have cost
    unique = {}
    for p in dest.rglob("*.png"):
        st = p.stat()
        if "/base/" in p.as_posix():
            unique[(st.st_dev, st.st_ino)] = st.st_blocks * 512
    assert len(unique) == 8 and sum(unique.values()) <= stored + 8 * os.statvfs(dest).f_bsize
