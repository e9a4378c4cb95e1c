"""The demo's claimed works: images made by a source demo LoRA, standing in for a claimant's
portfolio (casefiles/demo-claimed.toml). Generated once with the embedded tiny pipeline and the
source LoRA at scale 1 on prompts of their own (none is a prompt of the demo protocol) and the
protocol's seeds 0-3, written as PNG and lossless WebP, with a ``SHA256SUMS`` list
pinning every file (a case file cannot pin hashes of files generated on the user's machine: a
different CPU may round differently).

Why the protocol's seeds: in the tiny models the image-to-image spread over seeds (about 0.35 in
feature norm) is seven times a demo LoRA's mean effect (about 0.05), so eight works with seeds of
their own would measure mostly seed noise; and JPEG artefacts move the tiny embedder's features
by more than that effect too, so no work is a JPEG (the JPEG decoding is tested in
tests/test_claimed_works.py). docs/VALIDATION.md measures these
regimes (bench/bench_claimed.py): works sharing the protocol's seeds, works with seeds of their
own, and works saved as JPEG.
"""

from __future__ import annotations

import io
from pathlib import Path

CLAIMED_VERSION = 1
SOURCE_LORA = "target"
#: (prompt, seed, file format) of each work
WORKS = [
    ("a portrait of a woman in a garden", 0, "PNG"),
    ("a portrait of a woman in a garden", 1, "PNG"),
    ("a harbour with boats at dawn", 2, "PNG"),
    ("a harbour with boats at dawn", 3, "WEBP"),
    ("a bowl of pears on a wooden table", 0, "PNG"),
    ("a bowl of pears on a wooden table", 1, "PNG"),
    ("a fox standing in tall grass", 2, "PNG"),
    ("a fox standing in tall grass", 3, "PNG"),
]
SUFFIX = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp"}


def demo_claimed_dir() -> Path:
    from carlos_audit.paths import carlos_home

    return carlos_home() / "demo" / f"claimed-v{CLAIMED_VERSION}"


def encode(image, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "JPEG":
        image.save(buf, format="JPEG", quality=95)
    elif fmt == "WEBP":
        image.save(buf, format="WEBP", lossless=True)
    else:
        image.save(buf, format="PNG")
    return buf.getvalue()


def generate_works(source_lora: Path, prompts: list[str], seeds: list[int], *, steps: int = 10, size: int = 64,
                   scale: float = 1.0):
    """Images of the embedded tiny pipeline with ``source_lora`` at ``scale`` (DDIM, guidance 5),
    one per (prompt, seed). A pipeline of its own: the run's cached pipeline is not touched."""
    from carlos_audit.lora.inspection import inspect_lora
    from carlos_audit.models.loading import load_base_pipeline, set_scheduler
    from carlos_audit.run.environment import apply_determinism
    from carlos_audit.run.generate import GenerationParams, generate_batch, set_adapter_state
    from carlos_audit.run.load import load_lora

    lp = load_base_pipeline("embedded:tiny-sd", dtype="float32", device="cpu")
    apply_determinism(lp.device)
    set_scheduler(lp.pipe, "DDIMScheduler")
    load_lora(lp.pipe, Path(source_lora), "source", inspect_lora(source_lora), False)
    set_adapter_state(lp.pipe, "source", scale)
    params = GenerationParams(steps, 5.0, size, size, "DDIMScheduler", "")
    return [im for i in range(0, len(prompts), 4)
            for im in generate_batch(lp.pipe, prompts[i:i + 4], seeds[i:i + 4], params)]


def write_works(dest: Path, images, formats: list[str]) -> Path:
    """The works as files named w01.png, w02.jpg, ... and their SHA256SUMS; returns the list."""
    from carlos_audit.fileio import write_bytes_atomic, write_text_atomic
    from carlos_audit.hashing import sha256_bytes

    lines = []
    for k, (im, fmt) in enumerate(zip(images, formats), start=1):
        name = f"w{k:02d}.{SUFFIX[fmt]}"
        data = encode(im, fmt)
        write_bytes_atomic(dest / name, data)
        lines.append(f"{sha256_bytes(data)}  {name}")
    sums = dest / "SHA256SUMS"
    write_text_atomic(sums, "\n".join(lines) + "\n")
    return sums


def build_demo_claimed_works(loras: dict[str, Path], dest: Path | None = None) -> Path:
    """The demo's claimed works in ``dest`` (default demo_claimed_dir()); built once."""
    dest = Path(dest or demo_claimed_dir())
    if (dest / "SHA256SUMS").is_file():
        return dest
    images = generate_works(loras[SOURCE_LORA], [p for p, _, _ in WORKS], [s for _, s, _ in WORKS])
    write_works(dest, images, [f for _, _, f in WORKS])
    return dest
