"""The demo's claimed-works case end to end: `carlos-audit demo --casefile casefiles/demo-claimed.toml`,
then analyse, verify, export and the report, checked against numbers recomputed here."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from carlos_audit.cli import main
from carlos_audit.hashing import sha256_file

REPO = Path(__file__).resolve().parents[1]
CASEFILE = REPO / "casefiles" / "demo-claimed.toml"


@pytest.fixture(scope="module")
def claimed_case(demo_assets, tmp_path_factory) -> Path:
    works = Path(demo_assets["claimed_works"])
    before = {p.name: sha256_file(p) for p in works.iterdir()}
    out = tmp_path_factory.mktemp("claimed") / "demo-claimed"
    r = CliRunner().invoke(main, ["demo", "--casefile", str(CASEFILE), "--out", str(out), "--no-progress"])
    assert r.exit_code == 0, r.output
    assert {p.name: sha256_file(p) for p in works.iterdir()} == before  # the works were only read
    return out


def features(case: Path, rels) -> np.ndarray:
    return np.stack([np.load(case / r) for r in rels]).astype(np.float64)


def test_measures_and_calibration_match_an_independent_computation(claimed_case, demo_assets):
    from carlos_audit.corpus.store import load_corpus

    m = json.loads((claimed_case / "manifest.json").read_text())
    cw = json.loads((claimed_case / "metrics.json").read_text())["claimed_works"]
    rec = m["claimed_works"]
    assert rec["n"] == 8 and cw["n_works"] == 8 and cw["supplier"] == "the claimant (demo)"
    roles = [i for i in m["inputs"] if i["role"].startswith("claimed_work_")]
    assert len(roles) == 8 and all(i["unchanged"] for i in roles)
    assert {i["sha256"] for i in roles} == {w["sha256"] for w in rec["works"]}

    base = features(claimed_case, [r["arms"]["base"]["embedding"] for r in m["pairs"]])
    lora = features(claimed_case, [r["arms"]["lora"]["embedding"] for r in m["pairs"]])
    works = features(claimed_case, [w["embedding"] for w in rec["works"]])
    d, u = (lora - base).mean(0), works.mean(0) - base.mean(0)
    a = d @ u / np.linalg.norm(d) / np.linalg.norm(u)
    assert cw["alignment"]["value"] == pytest.approx(a, abs=1e-12)
    lo, hi = cw["alignment"]["ci"]
    assert lo < a < hi

    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    c = unit(works.mean(0))
    centroid = unit(lora) @ c - unit(base) @ c
    assert [p["centroid"] for p in cw["per_pair"]] == pytest.approx(list(centroid), abs=1e-12)
    assert cw["approach"]["centroid"]["n_closer"] == int((centroid > 0).sum())
    assert sum(v["n_pairs"] for v in cw["approach"]["nearest"]["per_category"].values()) == len(m["pairs"])

    near = cw["nearest"][0]["pairs"][0]
    sims = unit(works[0]) @ unit(lora).T
    assert near["pair_id"] == m["pairs"][int(np.argmax(sims))]["pair_id"]
    assert near["work_lora"] == pytest.approx(float(sims.max()), abs=1e-12)

    cal = cw["calibration"]
    corpus = load_corpus(demo_assets["corpus"])
    assert cal["available"] and cal["corpus"]["name"] == "demo corpus"
    assert [e["id"] for e in cal["excluded"]] == ["derivative"]  # the examined LoRA itself (same file)
    rows = [i for i, rid in enumerate(corpus.ids) if rid != "derivative"]
    D = np.asarray(corpus.directions, dtype=np.float64)[rows]
    scores = D @ u / np.linalg.norm(D, axis=1) / np.linalg.norm(u)
    assert cal["n_compared"] == len(rows) and cal["n_at_least"] == int((scores >= a).sum())
    assert cal["rate"] == pytest.approx((scores >= a).mean())
    assert cal["most_aligned"][0]["id"] in ("target", "target_kohya")  # the works' source LoRA (and its twin)

    loo = {r["work"]: r["alignment"] for r in cw["sensitivity"]["leave_one_out"]}
    u0 = works[1:].mean(0) - base.mean(0)
    assert loo["w0001"] == pytest.approx(d @ u0 / np.linalg.norm(d) / np.linalg.norm(u0), abs=1e-12)
    assert cw["sensitivity"]["resampled"]["alignment_ci"][0] <= cw["sensitivity"]["resampled"]["alignment_ci"][1]


def test_analyse_and_verify_reproduce_it(claimed_case):
    r = CliRunner().invoke(main, ["analyse", str(claimed_case), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["results"]["metrics.json"]["identical"]
    r = CliRunner().invoke(main, ["verify", str(claimed_case), "--sample", "0", "--json"])
    checks = {c["check"]: c for c in json.loads(r.stdout)["checks"]}
    assert checks["claimed works: alignment recomputed"]["ok"]
    assert checks["claimed works: stored features and thumbnails"]["ok"] and r.exit_code == 0


def test_verify_flags_a_modified_claimed_feature(claimed_case, tmp_path):
    import shutil

    case = shutil.copytree(claimed_case, tmp_path / "c")
    f = case / "embeddings" / "claimed" / "w0003.npy"
    x = np.load(f)
    x[0] += 1.0
    np.save(f, x)
    r = CliRunner().invoke(main, ["verify", str(case), "--sample", "0", "--json"])
    checks = {c["check"]: c for c in json.loads(r.stdout)["checks"]}
    assert r.exit_code != 0 and not checks["claimed works: stored features and thumbnails"]["ok"]
    assert "w0003.npy" in checks["claimed works: stored features and thumbnails"]["detail"]


def test_calibration_is_refused_for_a_corpus_profiled_differently(claimed_case, demo_assets):
    from carlos_audit.analysis.claimed_calibration import open_rater
    from carlos_audit.records import Manifest

    m = Manifest.read(claimed_case)
    m.signature = {**m.signature, "seeds": [7, 8, 9]}
    rater, head = open_rater(Path(demo_assets["corpus"]), m)
    assert rater is None and not head["available"] and head["differing_fields"] == ["seeds"]
    assert "not approximated" in head["refused"]


def test_kit_carries_hashes_and_the_images_only_with_include_inputs(claimed_case, tmp_path):
    for flag, kit in (([], tmp_path / "k.zip"), (["--include-inputs"], tmp_path / "ki.zip")):
        r = CliRunner().invoke(main, ["export", str(claimed_case), "--out", str(kit), *flag])
        assert r.exit_code == 0, r.output
        names = zipfile.ZipFile(kit).namelist()
        case_toml = zipfile.ZipFile(kit).read("case.toml").decode()
        manifest = json.loads((claimed_case / "manifest.json").read_text())
        for w in manifest["claimed_works"]["works"]:
            assert w["sha256"] in case_toml and f"results/{w['embedding']}" in names
            assert (f"results/{w['thumbnail']}" in names) == bool(flag)
            assert any(n.startswith("inputs/claimed_work_") and n.endswith(w["file_name"]) for n in names) == bool(flag)


def test_report_section_states_what_it_is_and_respects_the_filing_size(claimed_case):
    import re
    from urllib.parse import unquote

    from PIL import Image

    from carlos_audit.report.render import report_html

    html = report_html(claimed_case, "filing")
    assert "Toward the claimed works?" in html and "a finding that the LoRA was trained on these works" in html
    assert "chosen by their supplier" in html and "the claimant (demo)" in html
    assert "false-alignment rate</strong>" in html and "derivative.safetensors" in html
    section = html[html.index('id="claimed-works"'):]
    section = section[:section.index("</section>")]
    srcs = re.findall(r'<img src="([^"]+)"', section)
    assert html.count('alt="Claimed work w00') == 8 and len(srcs) == 24
    assert all(max(Image.open(claimed_case / unquote(s)).size) <= 256 for s in srcs)


def test_materials_considered_give_role_and_source_as_stated(claimed_case):
    from carlos_audit.records import Manifest
    from carlos_audit.report.expert import materials_considered

    m = json.loads((claimed_case / "manifest.json").read_text())
    rows = {r["role"]: r for r in materials_considered(Manifest.from_json(m), None, [])}  # report/ takes records
    w1 = next(r for role, r in rows.items() if role.startswith("claimed work w0001"))
    assert "Portfolio of the (fictional) artist" in w1["role"] and w1["sha256"] == m["claimed_works"]["works"][0]["sha256"]
    assert "supplied by the claimant (demo)" in w1["source"] and w1["source"].endswith("(as stated)")
    assert "claimed works: sha256 list pinning them" in rows


def test_a_run_with_a_corrupt_claimed_work_stops_in_one_line_before_generating(demo_assets, tmp_path):
    from conftest import write_case

    works = tmp_path / "works"
    works.mkdir()
    good = Path(demo_assets["claimed_works"]) / "w01.png"
    (works / "good.png").write_bytes(good.read_bytes())
    (works / "bad.png").write_bytes(good.read_bytes()[:200])
    sums = "".join(f"{sha256_file(p)}  {p.name}\n" for p in sorted(works.iterdir()))
    (works / "SHA256SUMS").write_text(sums)
    before = {p.name: sha256_file(p) for p in works.iterdir()}
    case = write_case(tmp_path, demo_assets, case_id="bad-works", extra=f'''
[claimed_works]
label = "works"
supplier = "test"
folder = "{works}"
sha256sums = "{works / 'SHA256SUMS'}"
''')
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["run", str(case), "--out", str(out), "--no-progress"])
    assert r.exit_code != 0 and "Traceback" not in r.output
    err = r.stderr.strip()
    assert err.count("\n") == 0 and "claimed work bad.png: corrupt or truncated PNG file" in err
    assert not (out / "images").exists()  # refused at intake: nothing generated
    assert {p.name: sha256_file(p) for p in works.iterdir()} == before
