"""Claimed works as a case input: pinning, every common format and mode, and each hostile file a
one-line refusal with the inputs never modified."""

from __future__ import annotations

import hashlib
import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from carlos_audit.case.casefile import parse_case
from carlos_audit.case.claimed_works import check_works, claimed_files, decode, load_work
from carlos_audit.errors import AuditError

CASE_HEAD = """
[case]
id = "c"
title = "t"
examiner = "e"
question = "q"
[base_model]
source = "embedded:tiny-sd"
[embedder]
model = "embedded:tiny-clip"
[lora]
path = "x.safetensors"
[protocol]
prompts = "builtin:demo"
seeds = [0]
"""


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def pinned_folder(folder: Path, extra_lines: str = "") -> Path:
    lines = [f"{sha(p)}  {p.name}" for p in sorted(folder.iterdir()) if p.name != "SHA256SUMS"]
    (folder / "SHA256SUMS").write_text("\n".join(lines) + "\n" + extra_lines)
    return folder / "SHA256SUMS"


def section(folder: Path, **kw) -> dict:
    return {"label": "works", "supplier": "claimant", "folder": str(folder), "sha256sums": str(folder / "SHA256SUMS"),
            "files": [], "sha256": [], "max_pixels": 50_000_000, "nearest": 3, **kw}


def png_header_only(w: int, h: int) -> bytes:
    """A PNG whose header claims w x h pixels, with a tiny IDAT: a decompression bomb's header."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))


def rgb_array(w=24, h=16):
    a = np.zeros((h, w, 3), dtype=np.uint8)
    a[:, : w // 2] = (200, 30, 30)
    a[:, w // 2:] = (20, 40, 220)
    return a


@pytest.fixture
def formats(tmp_path) -> Path:
    """One file per accepted format and mode."""
    d = tmp_path / "works"
    d.mkdir()
    base = Image.fromarray(rgb_array())
    base.save(d / "rgb.png")
    base.save(d / "photo.webp", lossless=True)
    base.save(d / "scan.tiff")
    base.convert("CMYK").save(d / "print.jpg", quality=95)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    base.save(d / "rotated.jpg", exif=exif, quality=95)
    pal = base.convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    pal.info["transparency"] = 0
    pal.save(d / "palette.png", transparency=0)
    rgba = Image.fromarray(np.dstack([rgb_array(), np.full((16, 24), 0, np.uint8)]))
    rgba.save(d / "clear.png")
    Image.fromarray((np.arange(16 * 24, dtype=np.uint16).reshape(16, 24) * 170)).save(d / "deep.png")
    frames = [Image.fromarray(rgb_array()), Image.fromarray(255 - rgb_array())]
    frames[0].save(d / "anim.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    pinned_folder(d)
    return d


def test_every_format_and_mode_decodes_with_what_was_done_stated(formats):
    before = {p.name: (sha(p), p.stat().st_mtime_ns) for p in formats.iterdir()}
    records = {r["file_name"]: r for r in check_works(section(formats), formats)}
    assert sorted(records) == sorted(p.name for p in formats.iterdir() if p.name != "SHA256SUMS")
    assert records["rgb.png"]["format"] == "PNG" and records["rgb.png"]["notes"] == []
    assert records["photo.webp"]["format"] == "WEBP"
    assert records["scan.tiff"]["format"] == "TIFF"
    assert records["print.jpg"]["mode"] == "CMYK" and "CMYK" in records["print.jpg"]["notes"][0]
    rot = records["rotated.jpg"]
    assert (rot["width"], rot["height"]) == (16, 24) and "EXIF orientation 6" in rot["notes"][0]
    assert "transparency composited on white" in records["palette.png"]["notes"]
    assert "transparency composited on white" in records["clear.png"]["notes"]
    assert records["deep.png"]["mode"].startswith("I") and "16-bit" in records["deep.png"]["notes"][0]
    assert records["anim.gif"]["frames"] == 2 and "first frame" in records["anim.gif"]["notes"][0]
    after = {p.name: (sha(p), p.stat().st_mtime_ns) for p in formats.iterdir()}
    assert after == before  # inputs never modified


def test_decoded_pixels_follow_the_stated_rules(formats):
    works = {w.path.name: w for w in claimed_files(section(formats), formats)[0]}
    clear, _ = load_work(works["clear.png"])
    assert np.asarray(clear).min() == 255  # fully transparent -> white
    deep, _ = load_work(works["deep.png"])
    src = np.arange(16 * 24).reshape(16, 24) * 170
    assert np.array_equal(np.asarray(deep)[..., 0], np.rint(src * 255 / 65535).astype(np.uint8))
    rot, _ = load_work(works["rotated.jpg"])
    top = np.asarray(rot)[0:3].mean(axis=(0, 1))  # rotated clockwise: the red left half is now on top
    assert top[0] > 150 and top[2] < 100
    anim, _ = load_work(works["anim.gif"])
    assert np.asarray(anim)[0, 0, 0] > 150  # first frame (red), not the inverted second


def refusal(exc) -> str:
    msg = str(exc.value)
    assert "\n" not in msg and "Traceback" not in msg
    return msg


@pytest.mark.parametrize("name,data,expected", [
    ("truncated.png", None, "corrupt or truncated"),
    ("bomb.png", png_header_only(100_000, 100_000), "decompression bomb"),
    ("big.png", png_header_only(8000, 8000), "more than the 50,000,000 accepted"),
    ("notes.png", b"this is a text file, not a picture\n", "not an image"),
    ("float.tiff", None, "floating-point"),
])
def test_hostile_file_is_a_one_line_refusal(tmp_path, name, data, expected):
    d = tmp_path / "w"
    d.mkdir()
    if name == "truncated.png":
        buf = io.BytesIO()
        Image.fromarray(rgb_array(64, 64)).save(buf, "PNG")
        data = buf.getvalue()[: len(buf.getvalue()) // 2]
    if name == "float.tiff":
        buf = io.BytesIO()
        Image.fromarray(np.ones((4, 4), np.float32)).save(buf, "TIFF")
        data = buf.getvalue()
    (d / name).write_bytes(data)
    pinned_folder(d)
    before = sha(d / name)
    with pytest.raises(AuditError) as e:
        check_works(section(d), d)
    assert expected in refusal(e) and name in str(e.value)
    assert sha(d / name) == before


def test_truncated_file_is_refused_even_when_pillow_was_told_to_accept_them():
    from PIL import ImageFile

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    saved = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = True  # what importing weasyprint does
    try:
        with pytest.raises(AuditError) as e:
            decode(buf.getvalue()[: len(buf.getvalue()) // 2], "cut.png")
        assert "corrupt or truncated PNG file" in refusal(e)
        assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # the global is left as it was
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = saved


def test_decompression_bomb_cap_is_checked_before_pixels_are_read():
    with pytest.raises(AuditError) as e:
        decode(png_header_only(300, 300), "x.png", max_pixels=1000)
    assert "300 x 300 pixels" in refusal(e)


def test_duplicate_empty_unpinned_and_mismatch_are_refused(tmp_path):
    d = tmp_path / "w"
    d.mkdir()
    Image.fromarray(rgb_array()).save(d / "a.png")
    (d / "b.png").write_bytes((d / "a.png").read_bytes())
    pinned_folder(d)
    with pytest.raises(AuditError) as e:
        check_works(section(d), d)
    assert "same file" in refusal(e)

    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "SUMS").write_text("")
    with pytest.raises(AuditError) as e:
        check_works(section(empty, sha256sums=str(tmp_path / "SUMS")), tmp_path)
    assert "is empty" in refusal(e)

    (d / "b.png").unlink()
    pinned_folder(d)
    Image.fromarray(255 - rgb_array()).save(d / "c.png")
    with pytest.raises(AuditError) as e:
        check_works(section(d), d)
    assert "'c.png' is not pinned" in refusal(e)

    (d / "c.png").unlink()
    files = {"label": "w", "supplier": "s", "folder": None, "sha256sums": None, "files": [str(d / "a.png")],
             "sha256": ["0" * 64], "max_pixels": 100, "nearest": 3}
    with pytest.raises(AuditError) as e:
        check_works(files, d)
    assert "does not match the pinned" in refusal(e)


def test_case_file_table_rules(tmp_path):
    ok = CASE_HEAD + '[claimed_works]\nlabel = "L"\nsupplier = "S"\nfiles = ["a.png"]\nsha256 = ["' + "a" * 64 + '"]\n'
    case = parse_case(ok, tmp_path / "c.toml")
    assert case.claimed_works["label"] == "L" and case.claimed_works["files"] == ["a.png"]
    assert parse_case(CASE_HEAD, tmp_path / "c.toml").claimed_works["label"] is None
    for body, msg in [
        ('label = "L"\nfiles = ["a.png"]\nsha256 = ["' + "a" * 64 + '"]', "claimed_works.supplier"),
        ('label = "L"\nsupplier = "S"\nfiles = ["a.png"]', "one hash per file"),
        ('label = "L"\nsupplier = "S"\nfolder = "w"', "needs claimed_works.sha256sums"),
        ('label = "L"\nsupplier = "S"\nfolder = "w"\nsha256sums = "s"\nfiles = ["a"]', "exactly one of"),
        ('label = "L"\nsupplier = "S"\nfiles = ["a.png"]\nsha256 = ["xyz"]', "64 hex"),
        ('label = "L"\nsupplier = "S"\nurl = "http://x"', "unknown key claimed_works.url"),
    ]:
        with pytest.raises(AuditError) as e:
            parse_case(CASE_HEAD + "[claimed_works]\n" + body + "\n", tmp_path / "c.toml")
        assert msg in refusal(e)


def test_check_reports_claimed_works_present_or_invalid(tmp_path):
    from carlos_audit.check import check_case

    d = tmp_path / "w"
    d.mkdir()
    Image.fromarray(rgb_array()).save(d / "a.png")
    pinned_folder(d)
    body = f'[claimed_works]\nlabel = "L"\nsupplier = "S"\nfolder = "w"\nsha256sums = "w/SHA256SUMS"\n'
    (tmp_path / "c.toml").write_text(CASE_HEAD + body)
    item = next(i for i in check_case(tmp_path / "c.toml")["inputs"] if i["role"] == "claimed_works")
    assert item["status"] == "present" and item["n"] == 1 and item["path"] == str(d)
    (d / "a.png").write_bytes(b"not an image")
    result = check_case(tmp_path / "c.toml")
    item = next(i for i in result["inputs"] if i["role"] == "claimed_works")
    assert item["status"] == "invalid" and "does not match the pinned" in item["detail"]
    assert not result["ready"] and any(p.startswith("claimed_works: invalid") for p in result["problems"])
