"""Evidence intake and verification (issue 5): a bad-input matrix through the CLI, refusals
before generation, degenerate outputs, and tamper detection by `verify`."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import REPO, write_case
from safetensors.numpy import load_file, save_file

from carlos_audit.case.casefile import load_case
from carlos_audit.cli import main
from carlos_audit.errors import AuditError
from carlos_audit.hashing import sha256_file
from carlos_audit.run import profile as profile_mod
from carlos_audit.pipeline import run_case
from carlos_audit.verify import verify_case


def _hashes(paths):
    return {str(p): sha256_file(p) for p in paths if Path(p).is_file()}


def _copy_lora(demo_assets, tmp_path, name="target", dest="lora.safetensors") -> Path:
    p = tmp_path / dest
    shutil.copyfile(demo_assets["loras"][name], p)
    return p


def _write(p: Path, data: bytes) -> Path:
    p.write_bytes(data)
    return p


def _truncated(p: Path) -> Path:
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    return p


def _header_too_long(p: Path) -> Path:
    data = bytearray(p.read_bytes())
    data[:8] = struct.pack("<Q", len(data) * 10)
    p.write_bytes(bytes(data))
    return p


def _overlapping(p: Path) -> Path:
    n = struct.unpack("<Q", p.read_bytes()[:8])[0]
    header = json.loads(p.read_bytes()[8 : 8 + n])
    keys = [k for k in header if k != "__metadata__"]
    a, b = header[keys[0]], header[keys[1]]
    b["data_offsets"] = [a["data_offsets"][0], a["data_offsets"][0] + (b["data_offsets"][1] - b["data_offsets"][0])]
    raw = json.dumps(header).encode()
    raw += b" " * ((8 - len(raw) % 8) % 8)
    p.write_bytes(struct.pack("<Q", len(raw)) + raw + p.read_bytes()[8 + n :])
    return p


def _sd15_lora(p: Path) -> Path:
    rng = np.random.default_rng(0)
    save_file({
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight": rng.standard_normal((4, 768)).astype(np.float32),
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_B.weight": rng.standard_normal((320, 4)).astype(np.float32),
    }, str(p))
    return p


def _partial_lora(demo_assets, p: Path) -> Path:
    sd = load_file(demo_assets["loras"]["target"])
    rng = np.random.default_rng(1)
    sd["unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_nowhere.lora_A.weight"] = rng.standard_normal((4, 64)).astype(np.float32)
    sd["unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_nowhere.lora_B.weight"] = rng.standard_normal((64, 4)).astype(np.float32)
    save_file(sd, str(p), metadata={"format": "pt"})
    return p


# (id, how to make the LoRA file (or None for the demo copy), case-file edit, extra CLI args, words in the error)
MATRIX = [
    ("missing-lora", lambda d, t: t / "absent.safetensors", None, [], ["does not exist"]),
    ("lora-is-directory", lambda d, t: (t / "dir.safetensors").mkdir() or t / "dir.safetensors", None, [], ["is a directory"]),
    ("empty-lora", lambda d, t: _write(t / "empty.safetensors", b""), None, [], ["empty"]),
    ("truncated", lambda d, t: _truncated(_copy_lora(d, t)), None, [], ["safetensors"]),
    ("header-length", lambda d, t: _header_too_long(_copy_lora(d, t)), None, [], ["header"]),
    ("overlapping-tensors", lambda d, t: _overlapping(_copy_lora(d, t)), None, [], ["overlap"]),
    ("pickle-ckpt", lambda d, t: _write(t / "x.ckpt", b"\x80\x02}q\x00."), None, [], ["pickle", "--allow-unsafe-pickle"]),
    ("pickle-renamed", lambda d, t: _write(t / "x.safetensors", b"PK\x03\x04" + b"\x00" * 60), None, [], ["pickle"]),
    ("architecture-mismatch", lambda d, t: _sd15_lora(t / "sd15.safetensors"), None, [], ["targets sd15", "refusing before any generation"]),
    ("partial-load", lambda d, t: _partial_lora(d, t / "partial.safetensors"), None, [], ["not applied", "--allow-partial"]),
    ("sha256-mismatch", None, lambda s: s.replace("[protocol]", 'sha256 = "' + "0" * 64 + '"\n\n[protocol]'), [], ["does not match the expected"]),
    ("output-escape", None, lambda s: s + '\n[output]\ndir = "../outside"\n', ["__no_out__"], ["output.dir", "reports"]),
    ("unknown-key", None, lambda s: s.replace("[protocol]", "[protocol]\ncolour = 1"), [], ["unknown key", "protocol.colour"]),
    ("wrong-type", None, lambda s: s.replace("steps = 4", 'steps = "4"'), [], ["protocol.steps", "integer"]),
    ("bad-prompt-set", None, lambda s: s.replace('"builtin:demo"', '"builtin:missing"'), [], ["protocol.prompts", "builtin:missing"]),
    ("prompt-file-missing", None, lambda s: s.replace('"builtin:demo"', '"nope.json"'), [], ["protocol.prompts", "does not exist"]),
    ("malformed-toml", None, lambda s: s.replace("[case]", "[case"), [], ["malformed TOML"]),
]


@pytest.mark.parametrize("name, make_lora, edit, args, words", MATRIX, ids=[m[0] for m in MATRIX])
def test_bad_input_matrix(name, make_lora, edit, args, words, demo_assets, tmp_path, monkeypatch):
    lora = make_lora(demo_assets, tmp_path) if make_lora else _copy_lora(demo_assets, tmp_path)
    cf = write_case(tmp_path, demo_assets, lora=str(lora))
    if edit:
        cf.write_text(edit(cf.read_text()))
    inputs = [cf, lora, *demo_assets["loras"].values()]
    before = _hashes(inputs)
    monkeypatch.chdir(tmp_path)
    calls = []
    monkeypatch.setattr(profile_mod, "generate_batch", lambda *a, **k: calls.append(a) or pytest.fail("generated"))
    out_args = [] if args == ["__no_out__"] else ["--out", str(tmp_path / "out")]
    r = CliRunner().invoke(main, ["run", str(cf), "--no-progress", *out_args])
    assert r.exit_code not in (0, None), r.output
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    msg = r.output.strip()
    assert len(msg.splitlines()) == 1 and msg.startswith("Error: ") and "Traceback" not in msg, msg
    for w in words:
        assert w.lower() in msg.lower(), (w, msg)
    assert _hashes(inputs) == before, "an input file changed"
    assert not calls
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_other_commands_fail_in_one_line(tmp_path):
    runner = CliRunner()
    for args, word in ((["inspect", str(tmp_path / "none.safetensors")], "not found"),
                       (["verify", str(tmp_path)], "no manifest.json"),
                       (["verify", str(tmp_path / "missing")], "does not exist")):
        r = runner.invoke(main, args)
        assert r.exit_code != 0 and r.output.startswith("Error: ") and len(r.output.strip().splitlines()) == 1, r.output
        assert word in r.output


def test_partial_load_allowed_is_flagged(demo_assets, tmp_path):
    lora = _partial_lora(demo_assets, tmp_path / "partial.safetensors")
    cf = write_case(tmp_path, demo_assets, lora=str(lora), seeds="[0]")
    res = run_case(load_case(cf), tmp_path / "out", allow_partial=True, progress=False)
    load = res.manifest.lora["load"]
    assert load["partial"] is True and load["in_file"] - load["applied"] == 1
    assert any("to_nowhere" in u for u in load["unapplied"])


def test_degenerate_images_stop_the_run_naming_pairs(demo_assets, tmp_path, monkeypatch):
    from PIL import Image

    real = profile_mod.generate_batch

    def black_lora(pipe, prompts, seeds, params):
        images = real(pipe, prompts, seeds, params)
        lora_on = any(not m.disable_adapters for m in pipe.unet.modules() if hasattr(m, "lora_A"))
        return [Image.new("RGB", im.size) for im in images] if lora_on else images

    monkeypatch.setattr(profile_mod, "generate_batch", black_lora)
    cf = write_case(tmp_path, demo_assets, seeds="[0]")
    with pytest.raises(AuditError, match=r"arm lora: degenerate output for pairs p001_s0 \(all-black image\)"):
        run_case(load_case(cf), tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_ctrl_c_says_how_to_resume(demo_assets, tmp_path, monkeypatch):
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(profile_mod, "generate_batch", interrupted)
    monkeypatch.setattr(profile_mod.BaseImageCache, "get", lambda self, key, n: None)
    cf = write_case(tmp_path, demo_assets, seeds="[0]")
    r = CliRunner().invoke(main, ["run", str(cf), "--out", str(tmp_path / "out"), "--no-progress"])
    assert r.exit_code == 130
    assert "interrupted" in r.output and "run the same command again to resume" in r.output


# ------------------------------------------------------------------------------------ verify


@pytest.fixture
def case_copy(demo_case_dir, tmp_path):
    dst = tmp_path / "case"
    shutil.copytree(demo_case_dir, dst)
    return dst


def test_verify_passes_on_an_untouched_case(case_copy):
    r = CliRunner().invoke(main, ["verify", str(case_copy), "--sample", "2", "--seed", "3"])
    assert r.exit_code == 0, r.output
    assert "FAIL" not in r.output and r.output.count("regenerate") == 4  # 2 pairs x 2 arms
    assert "seed 3" in r.output


def _flip_byte(p: Path, at: int = -1):
    data = bytearray(p.read_bytes())
    data[at] ^= 0x01
    p.write_bytes(bytes(data))


TAMPERS = {
    "image": (lambda c: _flip_byte(c / "images" / "lora" / "p003_s1.png", -20), "images/lora/p003_s1.png"),
    "embedding": (lambda c: _flip_byte(c / "embeddings" / "base" / "p002_s0.npy"), "embeddings/base/p002_s0.npy"),
    "metrics": (lambda c: (c / "metrics.json").write_text((c / "metrics.json").read_text().replace('"strength": 0.', '"strength": 1.', 1)), "metrics.json"),
    "manifest": (lambda c: (c / "manifest.json").write_text((c / "manifest.json").read_text().replace('"examiner": "', '"examiner": "X', 1)), "manifest.json"),
    "report": (lambda c: _flip_byte(c / "report.pdf", 200), "report.pdf"),
    "archive-report": (lambda c: _flip_byte(c / "report-archive.pdf", 200), "report-archive.pdf"),
    "missing-image": (lambda c: (c / "images" / "base" / "p001_s0.png").unlink(), "images/base/p001_s0.png"),
}


@pytest.mark.parametrize("kind", list(TAMPERS))
def test_verify_detects_and_names_tampering(case_copy, kind):
    tamper, named = TAMPERS[kind]
    tamper(case_copy)
    result = verify_case(case_copy, sample=0)
    assert not result["ok"]
    failed = [c for c in result["checks"] if not c["ok"]]
    assert any(named in c["check"] or named in c["detail"] for c in failed), failed
    r = CliRunner().invoke(main, ["verify", str(case_copy), "--sample", "0"])
    assert r.exit_code == 3 and "FAIL" in r.output and "verification failed" in r.output


def test_verify_detects_metrics_that_do_not_follow_from_the_embeddings(case_copy):
    """An embedding replaced together with its manifest hash (and the manifest's own sha256):
    the file checks pass but the recomputed metrics expose the change."""
    from carlos_audit.records import Manifest

    m = Manifest.read(case_copy)
    row = m.pairs[0]
    e = row.arms["lora"]
    p = case_copy / e.embedding
    v = np.load(p)
    np.save(p, v * 2.0)
    # sections are frozen: the pair row is replaced by one with the new hash
    m.pairs[0] = type(row).from_json({**row, "arms": {**row.arms, "lora": {**e, "embedding_sha256": sha256_file(p)}}})
    m.write(case_copy)
    result = verify_case(case_copy, sample=0)
    bad = [c["check"] for c in result["checks"] if not c["ok"]]
    # the unit record still holds the embedding's original hash (its bindings, issue 33): it names the change too
    assert bad == ["unit records bound to the inputs", "metrics recomputed from embeddings"]
