"""The run's part of the claimed works (``[claimed_works]``, case/claimed_works.py): each pinned
work decoded, embedded with the case's embedder and stored in the case folder, so that the
analysis step (analysis/alignment.py) needs no model and no access to the original files.

    embeddings/claimed/<id>.npy   raw image features of the work (float32, as for the pairs)
    images/claimed/<id>.png       a thumbnail (longest edge THUMB_PX) for the report's exhibit grid

The manifest's ``claimed_works`` records the table as stated (label, supplier, source), how each
work was decoded and the sha256 of every file written. The works themselves are inputs of the
case (roles ``claimed_work_NNNN``), hashed at intake and again at the end of the run.
"""

from __future__ import annotations

import numpy as np

from carlos_audit.case.claimed_works import DEFAULT_MAX_PIXELS, check_works, claimed_files, configured, load_work
from carlos_audit.errors import AuditError
from carlos_audit.records import Manifest

EMBED_DIR = "embeddings/claimed"
THUMB_DIR = "images/claimed"
THUMB_PX = 256
BATCH = 16
SELECTION = ("The claimed works were chosen by their supplier, not by the tool or the examiner; "
             "every measure below is relative to this selection.")


def claimed_inputs(case) -> dict:
    """{role: path} of the claimed works (and of their sha256sums list), each checked: pinned,
    present, decodable. Empty without a [claimed_works] table. Called at intake."""
    section = case.claimed_works
    if not configured(section):
        return {}
    works, listing = claimed_files(section, case.base_dir)
    check_works(section, case.base_dir)
    paths = {w.role: w.path for w in works}
    if listing is not None:
        paths["claimed_works_list"] = listing
    return paths


def thumbnail_png(image) -> bytes:
    from PIL import Image

    from carlos_audit.casefolder.unit_store import png_bytes

    im = image.copy()
    if max(im.size) > THUMB_PX:
        im.thumbnail((THUMB_PX, THUMB_PX), Image.Resampling.LANCZOS)
    return png_bytes(im)


def store_claimed_works(store, embedder, case) -> dict | None:
    """Decode, embed and store every claimed work; the manifest's ``claimed_works`` (None
    without a [claimed_works] table)."""
    from carlos_audit.fileio import write_bytes_atomic
    from carlos_audit.hashing import sha256_bytes
    from carlos_audit.run.embed import image_features
    from carlos_audit.casefolder.unit_store import npy_bytes

    section = case.claimed_works
    if not configured(section):
        return None
    works, listing = claimed_files(section, case.base_dir)
    max_pixels = section.max_pixels or DEFAULT_MAX_PIXELS
    records = []
    for start in range(0, len(works), BATCH):
        loaded = [load_work(w, max_pixels) for w in works[start:start + BATCH]]
        feats = image_features(embedder, [im for im, _ in loaded])
        for (image, rec), f in zip(loaded, feats):
            if not np.isfinite(f).all():
                raise AuditError(f"claimed work {rec['file_name']}: its embedding is not finite")
            emb, thumb = npy_bytes(f), thumbnail_png(image)
            erel, trel = f"{EMBED_DIR}/{rec['id']}.npy", f"{THUMB_DIR}/{rec['id']}.png"
            write_bytes_atomic(store.path(erel), emb)
            write_bytes_atomic(store.path(trel), thumb)
            records.append({**rec, "embedding": erel, "embedding_sha256": sha256_bytes(emb),
                            "thumbnail": trel, "thumbnail_sha256": sha256_bytes(thumb)})
    return {"label": section.label, "supplier": section.supplier, "source": section.source,
            "selection": SELECTION, "sha256sums": str(listing) if listing else None,
            "max_pixels": max_pixels, "nearest": section.nearest or 3, "n": len(records),
            "decoder": decoder_text(), "works": records}


def decoder_text() -> str:
    import PIL

    return (f"Pillow {PIL.__version__}: EXIF orientation applied, transparency composited on white, 16-bit samples "
            "mapped to 8 bits, CMYK converted without colour management, first frame of an animation")


def claimed_features(store, record: dict) -> np.ndarray:
    """(works x dim) float64 features of the claimed works, from the case folder."""
    from carlos_audit.casefolder.unit_store import load_npy

    return np.stack([load_npy(store.path(w["embedding"])) for w in record["works"]]).astype(np.float64)


def kit_files(manifest: Manifest, include_inputs: bool) -> list[str]:
    """Case-folder files of the claimed works a kit carries: the features always, the thumbnails
    (copies of the works) only with the works themselves (--include-inputs)."""
    works = (manifest.claimed_works or {}).get("works") or []
    return sorted([w["embedding"] for w in works] + ([w["thumbnail"] for w in works] if include_inputs else []))


def kit_table(table: dict, by_role: dict) -> dict:
    """The kit case file's [claimed_works]: each work's kit path and pinned sha256 (the kit's
    inputs/<role>/<name>; present there only with --include-inputs)."""
    roles = sorted(r for r in by_role if r.startswith("claimed_work_"))
    keep = {k: v for k, v in table.items() if k not in ("folder", "sha256sums", "files", "sha256")}
    return {**keep, "files": [by_role[r]["kit_path"] for r in roles], "sha256": [by_role[r]["sha256"] for r in roles]}


def check_items(case) -> list[dict]:
    """``check``'s line for the claimed works: present (pinned and decodable) or invalid, why."""
    section = case.claimed_works
    if not configured(section):
        return []
    from carlos_audit.paths import expand_path

    where = str(expand_path(section.folder, case.base_dir)) if section.folder else f"{len(section.files)} files"
    try:
        n = sum(1 for role in claimed_inputs(case) if role.startswith("claimed_work_"))
    except AuditError as e:
        return [{"role": "claimed_works", "status": "invalid", "path": where, "detail": str(e)}]
    return [{"role": "claimed_works", "status": "present", "path": where, "n": n}]
