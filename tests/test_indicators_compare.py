"""Indicators beyond the paper (issue 6) and behavioural head-to-head (issue 7), tiny models."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import write_case

from carlos_audit.case.casefile import load_case
from carlos_audit.fileio import read_json
from carlos_audit.run import profile as profile_mod
from carlos_audit.pipeline import run_case


class _Count:
    def __init__(self, real):
        self.real, self.calls = real, []

    def __call__(self, pipe, prompts, seeds, params):
        m = next((m for m in pipe.unet.modules() if hasattr(m, "lora_A")), None)
        state = () if m is None or m.disable_adapters else tuple((a, float(m.scaling[a])) for a in m.active_adapters)
        self.calls.append((tuple(prompts), tuple(seeds), state))
        return self.real(pipe, prompts, seeds, params)


def test_demo_case_indicators(demo_case_dir):
    m = read_json(demo_case_dir / "metrics.json")
    ind = m["indicators"]
    dr = ind["dose_response"]
    assert [p["scale"] for p in dr["points"]] == [0.5, 1.0, 2.0]
    assert dr["strength_strictly_increasing"] is True
    assert 0 < dr["half_strength_scale"] < 1.0
    td = ind["trigger_dependence"]
    assert td["trigger_words"] == ["tgtstyle"] and td["ratio"] == td["strength_without"] / td["strength_with"]
    assert td["ratio_ci"][0] <= td["ratio"] <= td["ratio_ci"][1]
    assert 0.0 <= ind["scope"]["concentration"] <= 1.0
    assert len(ind["effect_labels"]["top"]) == 5
    assert ind["prompt_override"]["ci"][0] <= ind["prompt_override"]["mean"] <= ind["prompt_override"]["ci"][1]


def test_prompt_override_equals_an_independent_computation(demo_case_dir):
    manifest = read_json(demo_case_dir / "manifest.json")
    m = read_json(demo_case_dir / "metrics.json")
    vals = []
    for row in manifest["pairs"]:
        t = np.load(demo_case_dir / manifest["text_features"][row["prompt_id"]]["path"]).astype(float)
        b = np.load(demo_case_dir / row["arms"]["base"]["embedding"]).astype(float)
        l = np.load(demo_case_dir / row["arms"]["lora"]["embedding"]).astype(float)
        cos = lambda x, y: float(x @ y / np.linalg.norm(x) / np.linalg.norm(y))
        vals.append(cos(t, l) - cos(t, b))
    assert m["indicators"]["prompt_override"]["mean"] == pytest.approx(np.mean(vals), abs=1e-12)
    assert m["indicators"]["prompt_override"]["per_pair"] == pytest.approx(vals, abs=1e-12)


def test_no_pair_is_generated_twice(demo_assets, tmp_path, monkeypatch):
    """Scales (one equal to the main scale), trigger variants and a comparison LoRA: every
    distinct arm once, every batch once, the base arm shared."""
    counter = _Count(profile_mod.generate_batch)
    monkeypatch.setattr(profile_mod, "generate_batch", counter)
    monkeypatch.setattr(profile_mod.BaseImageCache, "get", lambda self, key, n: None)  # count base arms too
    extra = 'scales = [0.5, 1.0]\n\n[comparison]\nloras = ["%s"]\n' % demo_assets["loras"]["weak"]
    cf = write_case(tmp_path, demo_assets, seeds="[0]", batch_size=4, extra=extra)
    res = run_case(load_case(cf), tmp_path / "out", progress=False)
    arms = res.manifest.protocol["arms"]
    # base, lora, lora-s0.5, base-notrig, lora-notrig, cmp1 (scale 1.0 is the main LoRA arm)
    assert sorted(arms) == ["base", "base-notrig", "cmp1", "lora", "lora-notrig", "lora-s0.5"]
    assert res.manifest.protocol["arm_aliases"]["lora-s1"] == "lora"
    assert len(counter.calls) == len(arms) * 2  # 8 pairs in batches of 4
    assert len(set(counter.calls)) == len(counter.calls)


def test_empty_trigger_list_gives_trigger_dependence_one_from_stored_variants(demo_assets, tmp_path, monkeypatch):
    counter = _Count(profile_mod.generate_batch)
    monkeypatch.setattr(profile_mod, "generate_batch", counter)
    cf = write_case(tmp_path, demo_assets, seeds="[0]", trigger_words="[]")
    res = run_case(load_case(cf), tmp_path / "out", progress=False)
    td = res.metrics.indicators["trigger_dependence"]
    assert td["ratio"] == 1.0 and td["ratio_ci"] == [1.0, 1.0]
    assert td["strength_with"] == td["strength_without"] == res.metrics.strength
    prof = res.manifest.protocol["profiles"]
    assert prof["trigger:with"] == prof["trigger:without"] == ["base", "lora"]
    # one LoRA arm (2 batches) and at most one base arm (it may come from the shared cache)
    assert [c[2] for c in counter.calls].count((("target", 1.0),)) == 2
    assert len(counter.calls) <= 4 and {c[2] for c in counter.calls} <= {(), (("target", 1.0),)}


def test_head_to_head_with_itself_is_exactly_one_and_shares_every_image(demo_assets, tmp_path, monkeypatch):
    counter = _Count(profile_mod.generate_batch)
    monkeypatch.setattr(profile_mod, "generate_batch", counter)
    extra = '\n[comparison]\nloras = ["%s"]\n' % demo_assets["loras"]["target"]
    cf = write_case(tmp_path, demo_assets, seeds="[0]", extra=extra, trigger_words="[]")
    res = run_case(load_case(cf), tmp_path / "out", progress=False)
    h2h = read_json(tmp_path / "out" / "comparison.json")["head_to_head"][0]
    assert h2h["arm"] == "lora"
    b = h2h["behaviour"]
    assert b["direction_cosine"] == 1.0 and b["direction_cosine_ci"] == [1.0, 1.0]
    assert set(b["per_pair_cosine"]["values"].values()) == {1.0}
    assert h2h["weights"]["payload_identical"] is True and h2h["weights"]["cosine"] == pytest.approx(1.0, abs=1e-9)
    assert sorted(res.manifest.protocol["arms"]) == ["base", "lora"]
    assert len(counter.calls) <= 2 * 2  # at most base + lora, 2 batches each: nothing for the comparison


def test_demo_head_to_head_reads_a_merge(demo_case_dir):
    h2h = read_json(demo_case_dir / "comparison.json")["head_to_head"]
    assert len(h2h) == 1
    w, b = h2h[0]["weights"], h2h[0]["behaviour"]
    assert 0.5 < w["cosine"] < 0.999 and not w["payload_identical"]
    assert "merge" in w["reading"]
    assert -1.0 <= b["direction_cosine"] <= 1.0
    lo, hi = b["direction_cosine_ci"]
    assert lo <= b["direction_cosine"] <= hi
    assert len(b["agree_most"]) == 3 and len(b["agree_least"]) == 3
    assert set(b["per_category_cosine"]) == set(read_json(demo_case_dir / "metrics.json")["per_category"])


def test_compare_with_writes_nothing_beside_the_case_file_and_records_a_reproducing_command(demo_assets, tmp_path):
    import os
    from pathlib import Path

    from click.testing import CliRunner

    from carlos_audit.cli import main
    from carlos_audit.verify import verify_case

    folder = tmp_path / "mine"
    folder.mkdir()
    cf = write_case(folder, demo_assets, case_id="withcmp", seeds="[0]", steps=2)
    before = sorted(p.name for p in folder.iterdir())
    out = tmp_path / "out"
    cmd = ["compare", str(cf), "--with", demo_assets["loras"]["weak"], "--out", str(out), "--no-progress"]
    r = CliRunner().invoke(main, cmd)
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in folder.iterdir()) == before
    m = read_json(out / "manifest.json")
    assert m["run"]["command"] == ["carlos-audit"] + cmd[:-1]
    casefile = next(i for i in m["inputs"] if i["role"] == "casefile")["path"]
    assert Path(casefile).parent == Path(os.environ["CARLOS_AUDIT_HOME"]) / "derived-cases"
    assert [h["lora"]["sha256"] for h in read_json(out / "comparison.json")["head_to_head"]] == \
        [next(i for i in m["inputs"] if i["role"] == "comparison_lora_1")["sha256"]]
    assert verify_case(out, sample=0)["ok"]
    # the recorded command reproduces the run: it resumes the same case, nothing to generate
    r = CliRunner().invoke(main, m["run"]["command"][1:] + ["--no-progress"])
    assert r.exit_code == 0, r.output
    again = read_json(out / "manifest.json")
    assert again["results"] == m["results"]
    assert all(s["generated_batches"] == 0 and s["cached_batches"] == 0 for s in again["run"]["stats"].values())
