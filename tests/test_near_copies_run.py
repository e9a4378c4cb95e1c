"""The near-copy exhibit end to end on the demo (`carlos-audit demo --casefile casefiles/demo-nearcopy.toml`):
the demo 'target' LoRA made the claimed works, so its extraction arm reproduces every work and the
base arm (the control) none; the measures, thresholds and shares are recomputed here from the case
folder's files; analyse, verify, export and both report copies cover the chapter."""

from __future__ import annotations

import json
import re
import shutil
import zipfile
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from carlos_audit.cli import main

REPO = Path(__file__).resolve().parents[1]
CASEFILE = REPO / "casefiles" / "demo-nearcopy.toml"


@pytest.fixture(scope="module")
def nc_case(demo_assets, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("nearcopy") / "demo-nearcopy"
    r = CliRunner().invoke(main, ["demo", "--casefile", str(CASEFILE), "--out", str(out), "--no-progress"])
    assert r.exit_code == 0, r.output
    return out


def px(case: Path, rels) -> np.ndarray:
    from carlos_audit.case.near_copies import pixels

    return np.stack([pixels(Image.open(case / r)) for r in rels])


def test_the_lora_reproduces_the_works_and_the_control_does_not(nc_case):
    from carlos_audit.analysis.near_copies import calibrate, tiled_distance

    m = json.loads((nc_case / "manifest.json").read_text())
    nc = json.loads((nc_case / "metrics.json").read_text())["near_copies"]
    rec, works = m["near_copies"], m["claimed_works"]["works"]
    assert [p["text"] for p in rec["prompts"]][0] == "a portrait of a woman in a garden" and rec["seeds"] == [0, 1, 2, 3]
    assert len(rec["pairs"]) == nc["n_images_per_arm"] == 16 and nc["n_works"] == nc["n_kept"] == 8
    for measure in ("pixel", "embedding", "both"):
        assert nc["shares"][measure]["lora"]["n_reproduced"] == 8 and nc["shares"][measure]["base"]["n_reproduced"] == 0
    lo, hi = nc["shares"]["pixel"]["lora"]["ci"]
    assert lo == pytest.approx(0.6756, abs=1e-4) and hi == 1.0  # Wilson, 8 of 8

    w = px(nc_case, [x["thumbnail"] for x in works])
    lora = px(nc_case, [r["arms"]["nearcopy-lora"]["image"] for r in rec["pairs"]])
    base = px(nc_case, [r["arms"]["nearcopy-base"]["image"] for r in rec["pairs"]])
    d_lora, d_base = tiled_distance(w, lora), tiled_distance(w, base)
    for j, row in enumerate(nc["works"]):
        i = int(np.argmin(d_lora[j]))
        assert row["pair_id"] == rec["pairs"][i]["pair_id"]
        assert row["pixel"]["lora"] == pytest.approx(d_lora[j, i], abs=1e-12)
        assert row["pixel"]["base"] == pytest.approx(d_base[j, i], abs=1e-12)
        assert row["pixel"]["nearest_base"] == pytest.approx(d_base[j].min(), abs=1e-12)
    # the seed the work was made with is the one found (demo_claimed.WORKS: seeds 0, 1, 2, 3, 0, 1, 2, 3)
    assert [r["seed"] for r in nc["works"]] == [0, 1, 2, 3, 0, 1, 2, 3]

    main_base = px(nc_case, [r["arms"]["base"]["image"] for r in m["pairs"]])
    iu = np.triu_indices(8, 1)
    noncopy = np.concatenate([tiled_distance(w, main_base).ravel(), tiled_distance(w, w)[iu]])
    cal = calibrate(noncopy, 0.01)
    got = nc["calibration"]["pixel"]
    assert got["n_noncopies"] == 8 * len(m["pairs"]) + 28 and got["threshold"] == pytest.approx(cal["threshold"], abs=1e-12)
    assert got["rate"] <= 0.01 and got["rate"] == pytest.approx((noncopy < got["threshold"]).mean())
    assert nc["corpus"]["available"] is False and "refused" in nc["corpus"]["refused"]
    wi = nc["weight_indicator"]
    assert wi["exploratory"] and wi["n_modules"] > 0 and 0.0 <= wi["share"] <= 1.0


def test_analyse_and_verify_reproduce_it(nc_case, tmp_path):
    r = CliRunner().invoke(main, ["analyse", str(nc_case), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["results"]["metrics.json"]["identical"]
    r = CliRunner().invoke(main, ["verify", str(nc_case), "--sample", "0", "--json"])
    checks = {c["check"]: c for c in json.loads(r.stdout)["checks"]}
    assert checks["near copies: measures recomputed"]["ok"] and r.exit_code == 0, checks
    assert checks["near copies: extraction-arm images and features"]["ok"]

    case = shutil.copytree(nc_case, tmp_path / "c")
    rel = json.loads((case / "manifest.json").read_text())["near_copies"]["pairs"][0]["arms"]["nearcopy-lora"]["image"]
    im = np.asarray(Image.open(case / rel)).copy()
    im[0, 0] = 255 - im[0, 0]
    Image.fromarray(im).save(case / rel)
    r = CliRunner().invoke(main, ["verify", str(case), "--sample", "0", "--json"])
    checks = {c["check"]: c for c in json.loads(r.stdout)["checks"]}
    assert r.exit_code != 0 and not checks["near copies: extraction-arm images and features"]["ok"]
    assert Path(rel).name in checks["near copies: extraction-arm images and features"]["detail"]


def test_kit_carries_the_extraction_arms_and_leaves_the_table_out_of_reproduction(nc_case, tmp_path):
    kit = tmp_path / "k.zip"
    r = CliRunner().invoke(main, ["export", str(nc_case), "--out", str(kit)])
    assert r.exit_code == 0, r.output
    names = set(zipfile.ZipFile(kit).namelist())
    for row in json.loads((nc_case / "manifest.json").read_text())["near_copies"]["pairs"]:
        for e in row["arms"].values():
            assert f"results/{e['image']}" in names and f"results/{e['embedding']}" in names
    assert "[near_copies]" in zipfile.ZipFile(kit).read("case.toml").decode()


@pytest.mark.parametrize("copy", ["filing", "archive"])
def test_report_chapter_states_what_it_measures_and_respects_the_filing_size(nc_case, copy):
    from carlos_audit.report.render import report_html

    html = report_html(nc_case, copy)
    assert "Near copies of the claimed works?" in html
    section = html[html.index('id="near-copies"'):]
    section = section[:section.index("</section>")]
    assert "whether any image reproduces a work in the legal sense" in section
    assert "False-near-copy rate" in section and "Base model (control)" in section and "Exploratory" in section
    assert "it is refused rather than approximated" in section
    srcs = re.findall(r'<img src="([^"]+)"', section)
    assert len(srcs) == 24 and section.count('alt="Claimed work w00') == 8
    if copy == "filing":
        assert all(max(Image.open(nc_case / unquote(s)).size) <= 256 for s in srcs)
