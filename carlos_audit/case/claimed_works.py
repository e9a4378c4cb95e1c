"""Claimed works: the images a claimant points to, as a case input (``[claimed_works]``).

    [claimed_works]
    label = "Portfolio of the artist A. N. Other"      # what the works are, as the supplier says
    supplier = "Claimant's solicitors"                   # who supplied them
    source = "USB stick received 2026-11-02"             # optional: how they were received, as stated
    folder = "works/"              # every image in it, pinned by
    sha256sums = "works/SHA256SUMS"  #   a sha256sum-format list (one "<hex>  <name>" line per file)
    # or: files = ["a.png", "b.jpg"] with sha256 = ["<hex>", "<hex>"] (same order)
    max_pixels = 50000000          # decompression-bomb cap, width x height of one image

Every file is pinned by its sha256 and decoded by Pillow, one well-kept library, from the bytes
that were hashed (never re-read between the hash and the decoding). What the decoding did is
stated per work: EXIF orientation applied, transparency composited on white, 16-bit samples
mapped to 8 bits, CMYK converted without colour management, the first frame of an animation.
A corrupt file, a decompression bomb, a non-image, a duplicate (same sha256), an empty folder,
an unpinned file or a hash mismatch is a one-line refusal (AuditError). Input files are only
read, never written.
"""

from __future__ import annotations

import contextlib
import io
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

from carlos_audit.errors import AuditError
from carlos_audit.hashing import sha256_bytes

#: the image formats accepted (Pillow format names); anything else is "not an image"
FORMATS = ("PNG", "JPEG", "WEBP", "TIFF", "GIF", "BMP")
MAX_FILE_BYTES = 256 << 20
DEFAULT_MAX_PIXELS = 50_000_000
WHITE = (255, 255, 255)
_HEX = re.compile(r"^[0-9a-fA-F]{64}$")


@dataclass(frozen=True)
class ClaimedFile:
    """One pinned claimed work: where it is and the sha256 the case file pins."""

    index: int          # 1-based, in the order of the list
    path: Path
    sha256: str

    @property
    def id(self) -> str:
        return f"w{self.index:04d}"

    @property
    def role(self) -> str:
        return f"claimed_work_{self.index:04d}"


def configured(section: dict) -> bool:
    return any(section.get(k) not in (None, []) for k in ("label", "supplier", "folder", "files", "sha256sums", "sha256"))


def check_section(c: dict, where: str) -> None:
    """The [claimed_works] table's own rules (called by casefile._check_values)."""
    if not configured(c):
        return
    for k in ("label", "supplier"):
        if not (c.get(k) or "").strip():
            raise AuditError(f"{where}: [claimed_works] needs claimed_works.{k} (as the supplier states it)")
    if bool(c.get("folder")) == bool(c.get("files")):
        raise AuditError(f"{where}: [claimed_works] needs exactly one of claimed_works.folder (with sha256sums) "
                         "or claimed_works.files (with sha256)")
    if c.get("folder") and (not c.get("sha256sums") or c.get("sha256")):
        raise AuditError(f"{where}: claimed_works.folder needs claimed_works.sha256sums (a sha256sum-format list "
                         "pinning every file), not claimed_works.sha256")
    if c.get("files"):
        if c.get("sha256sums") or len(c.get("sha256") or []) != len(c["files"]):
            raise AuditError(f"{where}: claimed_works.files needs claimed_works.sha256, one hash per file in the same "
                             f"order ({len(c['files'])} files, {len(c.get('sha256') or [])} hashes)")
        bad = [h for h in c["sha256"] if not _HEX.match(h)]
        if bad:
            raise AuditError(f"{where}: claimed_works.sha256 entries must be 64 hex characters, got {bad[0][:80]!r}")
    if c.get("max_pixels", DEFAULT_MAX_PIXELS) < 1:
        raise AuditError(f"{where}: claimed_works.max_pixels must be >= 1")
    if not 1 <= c.get("nearest", 3) <= 16:
        raise AuditError(f"{where}: claimed_works.nearest must be between 1 and 16")


def read_sha256sums(path: Path) -> list[tuple[str, str]]:
    """(name, sha256) of each line of a sha256sum-format list ("<hex>  <name>" or "<hex> *<name>")."""
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as e:
        raise AuditError(f"claimed_works.sha256sums {path}: cannot be read ({e.strerror})") from None
    except UnicodeDecodeError:
        raise AuditError(f"claimed_works.sha256sums {path}: not UTF-8 text") from None
    out = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        m = re.match(r"^([0-9a-fA-F]{64}) [ *](.+)$", line)
        if not m or "/" in m.group(2) or "\\" in m.group(2) or m.group(2) in (".", ".."):
            raise AuditError(f"claimed_works.sha256sums {path} line {n}: expected \"<64 hex>  <file name in the folder>\"")
        out.append((m.group(2), m.group(1).lower()))
    return out


def claimed_files(section: dict, base_dir: Path) -> tuple[list[ClaimedFile], Path | None]:
    """The pinned works of a [claimed_works] table (paths resolved against ``base_dir``) and the
    sha256sums list when there is one. Refuses an empty folder, an unpinned file, a pinned file
    that is missing, a duplicate hash and two works with one file name."""
    from carlos_audit.paths import expand_path

    listing = None
    if section.get("folder"):
        folder = expand_path(section["folder"], base_dir)
        listing = expand_path(section["sha256sums"], base_dir)
        if not folder.is_dir():
            raise AuditError(f"claimed_works.folder {folder} does not exist or is not a folder")
        if not listing.is_file():
            raise AuditError(f"claimed_works.sha256sums {listing} does not exist or is not a file")
        present = sorted(p.name for p in folder.iterdir() if not p.name.startswith(".") and p.resolve() != listing.resolve())
        if not present:
            raise AuditError(f"claimed_works.folder {folder} is empty: no claimed work to examine")
        pinned = read_sha256sums(listing)
        names = [n for n, _ in pinned]
        unpinned = [n for n in present if n not in names]
        if unpinned:
            raise AuditError(f"claimed_works.folder {folder}: {unpinned[0]!r} is not pinned in {listing.name}"
                             + (f" (and {len(unpinned) - 1} more)" if len(unpinned) > 1 else ""))
        pairs = [(folder / n, h) for n, h in pinned]
    else:
        pairs = [(expand_path(f, base_dir), h.lower()) for f, h in zip(section["files"], section["sha256"])]
    if not pairs:
        raise AuditError("claimed_works: no claimed work is listed")
    seen_hash: dict[str, Path] = {}
    seen_name: dict[str, Path] = {}
    for p, h in pairs:
        if not p.is_file():
            raise AuditError(f"claimed work {p} does not exist or is not a file")
        if h in seen_hash:
            raise AuditError(f"claimed works {seen_hash[h].name} and {p.name} are the same file (sha256 {h[:16]}...): "
                             "a duplicate would count twice")
        if p.name in seen_name:
            raise AuditError(f"claimed works {seen_name[p.name]} and {p} share the file name {p.name!r}; rename one")
        seen_hash[h], seen_name[p.name] = p, p
    return [ClaimedFile(i, p, h) for i, (p, h) in enumerate(pairs, start=1)], listing


# ----------------------------------------------------------------------------- decoding


def read_pinned(work: ClaimedFile) -> bytes:
    """The file's bytes, refused when they are not the pinned ones."""
    size = work.path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise AuditError(f"claimed work {work.path.name}: {size:,} bytes, more than the {MAX_FILE_BYTES:,} accepted")
    data = work.path.read_bytes()
    got = sha256_bytes(data)
    if got != work.sha256:
        raise AuditError(f"claimed work {work.path.name}: sha256 {got} does not match the pinned {work.sha256}")
    return data


def decode(data: bytes, name: str, max_pixels: int = DEFAULT_MAX_PIXELS):
    """(RGB PIL image, decoding record) of one image file's bytes, or an AuditError naming the
    file. The size is checked against ``max_pixels`` from the header, before any pixel is read.
    A truncated file is refused even when another library has told Pillow to accept them
    (weasyprint sets ``ImageFile.LOAD_TRUNCATED_IMAGES = True`` when it is imported)."""
    with strict_decoding():
        return _decode(data, name, max_pixels)


@contextlib.contextmanager
def strict_decoding():
    """Within the block Pillow refuses a truncated image file, whatever another library set
    (``ImageFile.LOAD_TRUNCATED_IMAGES``, restored after)."""
    from PIL import ImageFile

    saved = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = saved


def _decode(data: bytes, name: str, max_pixels: int):
    from PIL import Image, ImageOps, UnidentifiedImageError

    notes: list[str] = []
    fmt = "image"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data), formats=FORMATS)
            fmt, mode, (w, h) = im.format, im.mode, im.size
            if w * h > max_pixels:
                raise AuditError(f"claimed work {name}: {w} x {h} pixels is more than the {max_pixels:,} accepted "
                                 "(claimed_works.max_pixels; a decompression bomb?)")
            frames = int(getattr(im, "n_frames", 1) or 1)
            if frames > 1:
                im.seek(0)
                notes.append(f"animated or multi-page ({frames} frames): the first frame is used")
            im.load()
            orientation = im.getexif().get(0x0112)
            im = ImageOps.exif_transpose(im)
    except AuditError:
        raise
    except UnidentifiedImageError:
        raise AuditError(f"claimed work {name}: not an image in an accepted format ({', '.join(FORMATS)})") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise AuditError(f"claimed work {name}: refused as a decompression bomb (too many pixels for Pillow)") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError) as e:
        raise AuditError(f"claimed work {name}: corrupt or truncated {fmt} file ({_one_line(e)})") from None
    if orientation not in (None, 1):
        notes.append(f"EXIF orientation {orientation} applied")
    rgb = to_rgb(im, name, notes)
    record = {"format": fmt, "mode": mode, "width": rgb.size[0], "height": rgb.size[1], "frames": frames,
              "notes": notes}
    return rgb, record


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())[:160] or type(e).__name__


def to_rgb(im, name: str, notes: list[str]):
    """8-bit RGB, every mode mapped by a stated rule."""
    import numpy as np
    from PIL import Image

    mode = im.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        a = np.asarray(im, dtype=np.int64)
        if a.size and (a.min() < 0 or a.max() > 65535):
            raise AuditError(f"claimed work {name}: {mode} samples outside 0..65535 are not supported")
        notes.append(f"{mode} samples (16-bit range 0..65535) mapped to 8 bits (x 255 / 65535, rounded)")
        return Image.fromarray(np.rint(a * (255.0 / 65535.0)).astype(np.uint8)).convert("RGB")
    if mode == "F":
        raise AuditError(f"claimed work {name}: 32-bit floating-point images are not supported; supply 8- or 16-bit files")
    if mode == "CMYK":
        notes.append("CMYK converted to RGB by Pillow (no ICC colour management)")
        return im.convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode in ("P", "L", "RGB") and "transparency" in im.info)
    if has_alpha:
        rgba = im.convert("RGBA")
        if rgba.getchannel("A").getextrema()[0] < 255:
            notes.append("transparency composited on white")
        bg = Image.new("RGBA", rgba.size, WHITE + (255,))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return im if mode == "RGB" else im.convert("RGB")


def load_work(work: ClaimedFile, max_pixels: int = DEFAULT_MAX_PIXELS):
    """(RGB image, record) of one pinned work: its bytes checked against the pin, then decoded."""
    data = read_pinned(work)
    image, record = decode(data, work.path.name, max_pixels)
    return image, {"id": work.id, "file_name": work.path.name, "path": str(work.path), "sha256": work.sha256,
                   "size": len(data), **record}


def check_works(section: dict, base_dir: Path) -> list[dict]:
    """Every work resolved, pinned and decoded once (at intake, before any model is loaded);
    returns their records. The images are not kept."""
    works, _ = claimed_files(section, base_dir)
    return [load_work(w, section.get("max_pixels") or DEFAULT_MAX_PIXELS)[1] for w in works]
