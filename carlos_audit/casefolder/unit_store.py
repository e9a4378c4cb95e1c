"""The case folder on disk, and the base-image cache shared across cases.

Layout (see docs/ARCHITECTURE.md):

    case.toml  run.json  manifest.json  metrics.json  report.pdf
    images/<arm>/<pair>.png       embeddings/<arm>/<pair>.npy
    units/<arm>/b<batch>.json     one record per finished (arm, batch): the resume points

A unit record is written last, atomically, after its images and embeddings: a unit with a
record is complete and is never generated again; a unit without one is regenerated whole
(the batch layout fixes its bytes, so a half-written unit is simply overwritten identically).
"""

from __future__ import annotations

import io
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from carlos_audit.errors import AuditError
from carlos_audit.fileio import read_json, write_bytes_atomic, write_json_atomic
from carlos_audit.hashing import sha256_bytes, sha256_file


def png_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def npy_bytes(vec: np.ndarray, dtype: str = "<f4") -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(vec, dtype=dtype), allow_pickle=False)
    return buf.getvalue()


def load_npy(path: Path) -> np.ndarray:
    """A stored .npy file; AuditError in one line naming it when it is missing or unreadable."""
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        what = ("is missing" if isinstance(e, FileNotFoundError) else
                "cannot be read (not a .npy array of numbers)" if isinstance(e, ValueError) else
                f"cannot be read ({type(e).__name__}: {e})")
        raise AuditError(f"{path} {what}; `carlos-audit verify` compares the case folder with its manifest") from None


@dataclass(frozen=True)
class UnitOutput:
    """What one (arm, batch) unit produced, image by image: the images (PNG bytes or PIL images),
    their features, pair ids, the prompts as sent, the seeds; where the images came from
    (``source``: generated, cached, shared); the hook-counted work (run/cost.py) and the device
    record (run/devices.device_record), each None when not known; ``inputs``: the hashes of what
    made the unit (its LoRA, None for the base weights; the prompt set; the base model; the
    embedder), checked by ``verify`` against the manifest."""

    images: list
    features: np.ndarray
    pair_ids: list
    prompts_sent: list
    seeds: list
    source: str
    cost: dict | None = None
    device: dict | None = None
    inputs: dict | None = None


class CaseStore:
    """The units of a case folder. Each unit record and each feature file is read from disk once
    per store object: what this object writes or reads is kept (a sequential run's looks, the
    manifest's pair rows, the cost and the analysis all read the same units)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self._units: dict[tuple[str, int], dict] = {}
        self._features: dict[str, np.ndarray] = {}  # by relative path
        self.unreadable: list[Path] = []  # unit records found unreadable (counted as not done)

    # paths -------------------------------------------------------------
    def image_rel(self, arm: str, pair_id: str) -> str:
        return f"images/{arm}/{pair_id}.png"

    def embedding_rel(self, arm: str, pair_id: str) -> str:
        return f"embeddings/{arm}/{pair_id}.npy"

    def unit_path(self, arm: str, batch: int) -> Path:
        return self.root / "units" / arm / f"b{batch:05d}.json"

    def path(self, rel: str) -> Path:
        return self.root / rel

    def write_file(self, rel: str, data: bytes) -> None:
        """One file of the case folder written atomically (a build's worker keeps it instead)."""
        self._features.pop(rel, None)
        write_bytes_atomic(self.path(rel), data)

    # units -------------------------------------------------------------
    def unit_done(self, arm: str, batch: int) -> dict | None:
        """The unit's record, or None while it is not written (a missing record is looked for
        again). An unreadable record (truncated, not JSON, not a unit record) counts as not done:
        one line is noted on stderr and the unit is generated again on resume."""
        key = (arm, batch)
        if key not in self._units:
            p = self.unit_path(arm, batch)
            if not p.is_file():
                return None
            record = read_unit_record(p)
            if record is None:
                if p not in self.unreadable:
                    self.unreadable.append(p)
                    print(f"Note: unit record {p} is unreadable (truncated?); the unit counts as not done and is "
                          "generated again", file=sys.stderr)
                return None
            self._units[key] = record
        return self._units[key]

    def unit_files(self, arm: str, batch: int, out: "UnitOutput") -> tuple[list, dict]:
        """The files of one finished unit as ([(relative path, bytes)], record), nothing written:
        what ``write_unit`` writes here, or what a Ray worker sends back to the driver."""
        files, entries = [], []
        for im, f, pid, prompt, seed in zip(out.images, out.features, out.pair_ids, out.prompts_sent, out.seeds):
            data = im if isinstance(im, bytes) else png_bytes(im)
            irel, erel = self.image_rel(arm, pid), self.embedding_rel(arm, pid)
            emb = npy_bytes(f)
            files += [(irel, data), (erel, emb)]
            entries.append({
                "pair_id": pid, "prompt": prompt, "seed": int(seed),
                "image": irel, "image_sha256": sha256_bytes(data),
                "embedding": erel, "embedding_sha256": sha256_bytes(emb),
            })
        record = {"arm": arm, "batch": batch, "source": out.source, "pairs": entries}
        if out.cost is not None:
            record["cost"] = out.cost  # hook-counted work that produced this unit (cost.py)
        if out.device is not None:
            record["device"] = out.device  # where it ran and its device class (run/devices.device_record)
        if out.inputs is not None:
            record["inputs"] = out.inputs  # the hashes of what made it (verify checks them)
        return files, record

    def write_unit_files(self, arm: str, batch: int, files: list, record: dict) -> dict:
        """Write a unit's images and embeddings atomically, then its record last (the resume point)."""
        for rel, data in files:
            write_bytes_atomic(self.path(rel), data)
        for rel, _ in files:
            self._features.pop(rel, None)
        write_json_atomic(self.unit_path(arm, batch), record)
        self._units[(arm, batch)] = record
        return record

    def write_unit(self, arm: str, batch: int, out: "UnitOutput") -> dict:
        files, record = self.unit_files(arm, batch, out)
        return self.write_unit_files(arm, batch, files, record)

    def features(self, arm: str, pair_ids) -> np.ndarray:
        """The stored features of ``pair_ids`` in ``arm`` (a new array; each file read once)."""
        return np.stack([self.feature(arm, p) for p in pair_ids])

    def feature(self, arm: str, pair_id: str) -> np.ndarray:
        return self.array(self.embedding_rel(arm, pair_id))

    def array(self, rel: str) -> np.ndarray:
        """A stored .npy file of the case folder (features, text features, label signatures), read
        once per store object (read-only: ``np.stack`` and arithmetic give the caller its own)."""
        if rel not in self._features:
            self._features[rel] = load_npy(self.path(rel))
            self._features[rel].setflags(write=False)
        return self._features[rel]


def read_unit_record(path: Path) -> dict | None:
    """A unit record as written (a JSON object with its ``pairs`` list), or None when the file
    cannot be read as one."""
    try:
        record = read_json(path)
    except (OSError, ValueError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return None
    ok = isinstance(record, dict) and isinstance(record.get("pairs"), list) and all(isinstance(e, dict) for e in record["pairs"])
    return record if ok else None


class BaseImageCache:
    """Base-arm images keyed by (base model hash, environment, generation parameters, batch
    layout with the prompt text and seed of every image). Reused across cases and LoRAs."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def _dir(self, key: str) -> Path:
        return self.root / key[:2] / key

    def get(self, key: str, n: int) -> list[bytes] | None:
        d = self._dir(key)
        idx = d / "index.json"
        if not idx.is_file():
            return None
        index = read_json(idx)
        if len(index.get("images", [])) != n:
            return None
        out = []
        for i, digest in enumerate(index["images"]):
            p = d / f"{i}.png"
            if not p.is_file():
                return None
            data = p.read_bytes()
            if sha256_bytes(data) != digest:  # a damaged cache entry is never used
                shutil.rmtree(d, ignore_errors=True)
                return None
            out.append(data)
        return out

    def put(self, key: str, images_png: list[bytes], description: dict) -> None:
        d = self._dir(key)
        for i, data in enumerate(images_png):
            write_bytes_atomic(d / f"{i}.png", data)
        write_json_atomic(d / "index.json", {"key": description, "images": [sha256_bytes(b) for b in images_png]})


#: Input roles that are model files: hashed through models/filehash (once, unless --rehash); the
#: evidence (LoRA, comparison LoRAs, case and prompt files) is always read and hashed afresh.
MODEL_ROLES = ("base_model", "embedder")


def hash_inputs(inputs: list[dict]) -> list[dict]:
    """Add size and sha256 to each {role, path} entry (folders get a tree hash)."""
    from carlos_audit.models.filehash import file_sha256
    from carlos_audit.hashing import tree_sha256

    out = []
    for e in inputs:
        p = Path(e["path"])
        hasher = file_sha256 if e["role"] in MODEL_ROLES else sha256_file
        if p.is_dir():
            out.append({**e, "kind": "folder", "size": sum(f.stat().st_size for f in p.rglob("*") if f.is_file()),
                        "sha256": tree_sha256(p, hasher)})
        else:
            out.append({**e, "kind": "file", "size": p.stat().st_size, "sha256": hasher(p)})
    return out
