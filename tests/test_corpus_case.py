"""A corpus built here with the tiny models, cases against it, and text retrieval (issue 4)."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import write_case

from carlos_audit.case.casefile import load_case
from carlos_audit.cli import main
from carlos_audit.corpus.store import load_corpus
from carlos_audit.errors import AuditError
from carlos_audit.fileio import read_json
from carlos_audit.run import profile as profile_mod
from carlos_audit.pipeline import run_case


def test_demo_corpus_was_built_from_the_demo_loras(demo_assets):
    c = load_corpus(demo_assets["corpus"])
    assert sorted(c.ids) == sorted(demo_assets["loras"])
    s = dict(zip(c.ids, np.asarray(c.strength)))
    assert s["weak"] < s["target"] < s["strong"]
    assert s["target"] == s["target_kohya"]


def test_corpus_build_resumes_without_generating(demo_assets, monkeypatch):
    from carlos_audit.engines.corpus_build import build_corpus
    from carlos_audit.demo import DEMO_CASEFILE
    from carlos_audit.models.demo_loras import demo_dir

    monkeypatch.setattr(profile_mod, "generate_batch", lambda *a: pytest.fail("generated"))
    r = build_corpus(demo_dir(), DEMO_CASEFILE, demo_assets["corpus"], progress=False)
    assert r["added"] == [] and len(r["already_present"]) == len(demo_assets["loras"])


def test_demo_case_comparison_with_corpus(demo_case_dir, demo_assets):
    cmp = read_json(demo_case_dir / "comparison.json")
    metrics = read_json(demo_case_dir / "metrics.json")
    c = load_corpus(demo_assets["corpus"])
    assert cmp["corpus"]["compatible"] is True and cmp["corpus"]["excluded_row"] == "target"
    ids = [i for i in c.ids if i != "target"]
    idx = [c.ids.index(i) for i in ids]
    d = np.asarray(c.directions)[idx].astype(float)
    q = np.array(metrics["direction"])
    sims = d @ q / (np.linalg.norm(d, axis=1) * np.linalg.norm(q))
    expected = sorted(zip(ids, sims), key=lambda t: -t[1])[:5]
    got = cmp["target"]["neighbours"]
    assert [n["id"] for n in got] == [i for i, _ in expected]
    assert [n["similarity"] for n in got] == pytest.approx([s for _, s in expected], abs=1e-9)
    assert got[0]["id"] == "target_kohya" and got[0]["similarity"] == pytest.approx(1.0, abs=1e-12)
    strengths = np.asarray(c.strength)[idx]
    assert cmp["target"]["strength_percentile"] == pytest.approx(100 * np.sum(strengths <= metrics["strength"]) / len(idx))


def test_case_against_a_differently_profiled_corpus_is_refused_before_generation(demo_assets, tmp_path, monkeypatch):
    monkeypatch.setattr(profile_mod, "generate_batch", lambda *a: pytest.fail("generated"))
    extra = '\n[reference]\ncorpus = "%s"\n' % demo_assets["corpus"]
    cf = write_case(tmp_path, demo_assets, seeds="[0]", steps=3, extra=extra)
    with pytest.raises(AuditError, match=r"profiled differently: .*steps .*--allow-incompatible"):
        run_case(load_case(cf), tmp_path / "out", progress=False)


def test_allow_incompatible_is_recorded(demo_assets, tmp_path):
    extra = '\n[reference]\ncorpus = "%s"\nallow_incompatible = true\n' % demo_assets["corpus"]
    cf = write_case(tmp_path, demo_assets, seeds="[0]", steps=3, extra=extra)
    run_case(load_case(cf), tmp_path / "out", progress=False)
    cmp = read_json(tmp_path / "out" / "comparison.json")
    assert cmp["corpus"]["compatible"] is False and "steps" in cmp["corpus"]["differing_fields"]
    assert cmp["corpus"]["allow_incompatible"] is True


def test_text_retrieval_end_to_end(demo_assets):
    from carlos_audit.case.protocol import load_prompts
    from carlos_audit.models.embedders import load_embedder
    from carlos_audit.run.embed import text_features

    r = CliRunner().invoke(main, ["retrieve", demo_assets["corpus"], "watercolor painting", "--top-k", "3",
                                  "--max-strength", "10", "--min-consistency", "0", "--json"])
    assert r.exit_code == 0, r.output
    import json

    out = json.loads(r.output)
    assert out["filters"]["source"] == "given" and out["kept"] == len(demo_assets["loras"])
    emb = load_embedder("embedded:tiny-clip", None)
    prompts = [p.text for p in load_prompts("builtin:retrieval")[0]]
    sig = (text_features(emb, [f"{p} watercolor painting" for p in prompts]).astype(float)
           - text_features(emb, prompts).astype(float)).mean(axis=0)
    c = load_corpus(demo_assets["corpus"])
    d = np.asarray(c.directions, dtype=float)
    scores = d @ sig / (np.linalg.norm(d, axis=1) * np.linalg.norm(sig))
    best = sorted(zip(c.ids, scores), key=lambda t: (-t[1], t[0]))[:3]
    assert [x["id"] for x in out["results"]] == [i for i, _ in best]
    assert [x["score"] for x in out["results"]] == pytest.approx([s for _, s in best], abs=1e-6)
    # default filters: percentiles of this corpus
    r2 = CliRunner().invoke(main, ["retrieve", demo_assets["corpus"], "watercolor painting", "--json"])
    assert json.loads(r2.output)["filters"]["source"].startswith("corpus percentiles")


def test_retrieval_on_the_carlos_preset_says_what_is_missing(carlos_reference, tmp_path, monkeypatch):
    from carlos_audit.corpus.carlos import import_carlos_db

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    import_carlos_db(carlos_reference / "carlos_sdxl_vitb32_metrics.parquet", tmp_path / "c")
    r = CliRunner().invoke(main, ["retrieve", str(tmp_path / "c"), "anime", "--prompts",
                                  str(carlos_reference / "carlos_prompts.json")])
    assert r.exit_code != 0 and len(r.output.strip().splitlines()) == 1
    assert "openai/clip-vit-base-patch32" in r.output and "not in the local Hugging Face cache" in r.output
    r = CliRunner().invoke(main, ["retrieve", str(tmp_path / "c"), "anime"])
    assert "pass --prompts" in r.output
