"""Build step for the trained world's data (never run time).

Fetches the pinned npm packages with ``npm pack NAME@VERSION`` into a cache folder outside git, checks each
tarball's sha256 against ``world/manifest.json``, renders every image of the chosen concepts to one size
(32x32, composited on white) for four designers, and writes the split:

* concepts held out from all training (never seen by any model),
* per-designer training sets,
* per-designer held-out works (the "claimed works": that designer's images of concepts it is not trained on).

Usage::

    python world/data.py                 # fetch (if needed), verify, render, write the split
    python world/data.py --record        # first fetch only: write the tarballs' sha256 into the manifest

Outputs (under ``--out``, default ``world/build/data``; git-ignored): ``images_<designer>.npy`` (uint8, N x 32 x 32 x 3,
row i = concept i of ``split.json``), ``split.json`` (concepts, subcategories, captions, the split, data hashes) and
``preview_<designer>.png`` (all concepts of one designer on one sheet).

OpenMoji ships SVGs; they are rasterised with cairosvg (``pip install --target DIR cairosvg``, then put DIR on
PYTHONPATH), at 4x the target size, then box-downsampled like the PNG sets.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import random
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
MANIFEST = HERE / "manifest.json"
DEFAULT_CACHE = Path(os.environ.get("CARLOS_WORLD_CACHE", Path.home() / ".cache" / "carlos-world")) / "npm"
DEFAULT_OUT = HERE / "build" / "data"

SIZE = 32
SEED = 30

# Visually distinct subcategories of emoji-datasource's emoji.json (category / subcategory).
SUBCATEGORIES = [
    "face-smiling", "face-concerned", "face-neutral-skeptical", "cat-face", "heart",
    "animal-mammal", "animal-bird", "animal-marine", "animal-bug",
    "food-fruit", "food-vegetable", "food-sweet",
    "sky & weather", "transport-air", "musical-instrument", "keycap",
]

# Designer id -> (package, how its images are read, the style words its captions use).
DESIGNERS = {
    "noto": ("emoji-datasource-google", "png:google", "noto"),
    "twemoji": ("emoji-datasource-twitter", "png:twitter", "twemoji"),
    "openmoji-color": ("openmoji", "svg:color", "openmoji color"),
    "openmoji-black": ("openmoji", "svg:black", "openmoji line art"),
}

HELD_OUT_CONCEPT_FRACTION = 0.10   # of each subcategory, at least one: never in any training set
HELD_OUT_WORK_FRACTION = 0.12      # of each designer's remaining concepts: that designer's claimed works


def caption(name: str, designer: str | None) -> str:
    """The caption naming the concept and, when designer is given, the style."""
    base = f"a {name} emoji"
    if designer is None:
        return base
    return f"{base} in {DESIGNERS[designer][2]} style"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch(cache: Path, record: bool) -> dict[str, Path]:
    manifest = json.loads(MANIFEST.read_text())
    cache.mkdir(parents=True, exist_ok=True)
    paths = {}
    changed = False
    for pkg in manifest["packages"]:
        name, version = pkg["name"], pkg["version"]
        tarball = cache / f"{name.replace('@', '').replace('/', '-')}-{version}.tgz"
        if not tarball.exists():
            print(f"npm pack {name}@{version}", flush=True)
            subprocess.run(["npm", "pack", f"{name}@{version}", "--silent"], cwd=cache, check=True,
                           stdout=subprocess.DEVNULL)
        digest = sha256(tarball)
        if pkg.get("sha256") is None:
            if not record:
                sys.exit(f"{name}@{version}: no sha256 pinned in {MANIFEST}; run with --record once")
            pkg["sha256"] = digest
            changed = True
        elif pkg["sha256"] != digest:
            sys.exit(f"{name}@{version}: sha256 {digest} != pinned {pkg['sha256']}")
        print(f"ok {name}@{version} sha256 {digest}")
        paths[name] = tarball
    if changed:
        MANIFEST.write_text(json.dumps(manifest, indent=2) + "\n")
    return paths


def members(tarball: Path, prefix: str) -> dict[str, bytes]:
    out = {}
    with tarfile.open(tarball, "r:gz") as tf:
        for m in tf.getmembers():
            if m.isfile() and m.name.startswith(prefix):
                out[m.name[len(prefix):]] = tf.extractfile(m).read()
    return out


def on_white(img: Image.Image) -> np.ndarray:
    img = img.convert("RGBA")
    white = Image.new("RGBA", img.size, (255, 255, 255, 255))
    img = Image.alpha_composite(white, img).convert("RGB")
    if img.size != (SIZE, SIZE):
        img = img.resize((SIZE, SIZE), Image.Resampling.BOX)
    return np.asarray(img, dtype=np.uint8)


def render_svg(svg: bytes) -> np.ndarray:
    import cairosvg  # noqa: PLC0415 (only the OpenMoji sets need it)

    # OpenMoji draws on a 72x72 canvas with a wide empty margin: crop to the 60x60 middle so that the
    # drawing fills the image about as much as the PNG sets do.
    svg = svg.replace(b'viewBox="0 0 72 72"', b'viewBox="6 6 60 60"', 1)
    png = cairosvg.svg2png(bytestring=svg, output_width=SIZE * 4, output_height=SIZE * 4)
    return on_white(Image.open(io.BytesIO(png)))


def openmoji_name(e: dict, files: dict[str, bytes]) -> str | None:
    cands = [e["unified"], e.get("non_qualified") or "", e["unified"].replace("-FE0F", "")]
    for c in cands:
        if c and f"{c}.svg" in files:
            return f"{c}.svg"
    return None


def build(cache: Path, out: Path, record: bool) -> None:
    tarballs = fetch(cache, record)
    emoji = json.loads(members(tarballs["emoji-datasource-google"], "package/emoji.json")[""])
    pngs = {
        "google": members(tarballs["emoji-datasource-google"], "package/img/google/64/"),
        "twitter": members(tarballs["emoji-datasource-twitter"], "package/img/twitter/64/"),
    }
    svgs = {
        "color": members(tarballs["openmoji"], "package/color/svg/"),
        "black": members(tarballs["openmoji"], "package/black/svg/"),
    }
    concepts = []
    for e in sorted(emoji, key=lambda e: e["sort_order"]):
        if e["subcategory"] not in SUBCATEGORIES or not (e.get("has_img_google") and e.get("has_img_twitter")):
            continue
        om = openmoji_name(e, svgs["color"])
        if om is None or om not in svgs["black"] or e["image"] not in pngs["google"] or e["image"] not in pngs["twitter"]:
            continue
        concepts.append({"name": e["name"].lower(), "short_name": e["short_name"], "unified": e["unified"],
                         "category": e["category"], "subcategory": e["subcategory"],
                         "png": e["image"], "svg": om})
    names = [c["name"] for c in concepts]
    assert len(set(names)) == len(names), "concept names must be unique"

    out.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for d, (_pkg, how, _style) in DESIGNERS.items():
        kind, which = how.split(":")
        imgs = []
        for c in concepts:
            if kind == "png":
                imgs.append(on_white(Image.open(io.BytesIO(pngs[which][c["png"]]))))
            else:
                imgs.append(render_svg(svgs[which][c["svg"]]))
        arr = np.stack(imgs)
        np.save(out / f"images_{d}.npy", arr)
        arrays[d] = arr
        print(f"{d}: {arr.shape}", flush=True)
        sheet(arr, out / f"preview_{d}.png")

    rng = random.Random(SEED)
    by_sub: dict[str, list[int]] = {}
    for i, c in enumerate(concepts):
        by_sub.setdefault(c["subcategory"], []).append(i)
    held_out_concepts = []
    for sub in SUBCATEGORIES:
        idx = by_sub.get(sub, [])
        k = max(1, round(HELD_OUT_CONCEPT_FRACTION * len(idx)))
        held_out_concepts += rng.sample(idx, k)
    held_out_concepts.sort()
    seen = [i for i in range(len(concepts)) if i not in set(held_out_concepts)]
    train, held_out_works = {}, {}
    for d in DESIGNERS:
        k = round(HELD_OUT_WORK_FRACTION * len(seen))
        hw = sorted(rng.sample(seen, k))
        held_out_works[d] = hw
        train[d] = [i for i in seen if i not in set(hw)]

    split = {
        "size": SIZE,
        "seed": SEED,
        "subcategories": SUBCATEGORIES,
        "designers": {d: {"package": p, "style": s} for d, (p, _h, s) in DESIGNERS.items()},
        "concepts": concepts,
        "held_out_concepts": held_out_concepts,
        "train": train,
        "held_out_works": held_out_works,
        "image_sha256": {d: hashlib.sha256(a.tobytes()).hexdigest() for d, a in arrays.items()},
        "packages": json.loads(MANIFEST.read_text())["packages"],
    }
    (out / "split.json").write_text(json.dumps(split, indent=1) + "\n")
    n_train = {d: len(v) for d, v in train.items()}
    print(f"{len(concepts)} concepts in {len(SUBCATEGORIES)} subcategories; {len(held_out_concepts)} held out from all "
          f"training; per designer {n_train} training works and {len(held_out_works['noto'])} held-out works")


def sheet(arr: np.ndarray, path: Path, cols: int = 24) -> None:
    n = len(arr)
    rows = (n + cols - 1) // cols
    canvas = np.full((rows * SIZE, cols * SIZE, 3), 255, np.uint8)
    for i, a in enumerate(arr):
        r, c = divmod(i, cols)
        canvas[r * SIZE:(r + 1) * SIZE, c * SIZE:(c + 1) * SIZE] = a
    Image.fromarray(canvas).save(path)


def load(out: Path = DEFAULT_OUT):
    """The built data: (split dict, {designer: uint8 array N x S x S x 3})."""
    split = json.loads((out / "split.json").read_text())
    arrays = {d: np.load(out / f"images_{d}.npy") for d in split["designers"]}
    for d, a in arrays.items():
        if hashlib.sha256(a.tobytes()).hexdigest() != split["image_sha256"][d]:
            raise RuntimeError(f"{out}: images_{d}.npy does not match split.json")
    return split, arrays


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--record", action="store_true", help="write missing sha256 into the manifest")
    a = ap.parse_args()
    build(a.cache, a.out, a.record)


if __name__ == "__main__":
    main()
