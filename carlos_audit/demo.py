"""What ``carlos-audit demo`` prepares: the embedded tiny models, the demo LoRAs, and a demo
reference corpus profiled from those LoRAs under the demo protocol."""

from __future__ import annotations

from pathlib import Path

from carlos_audit.models.demo_loras import DEMO_VERSION, build_demo_loras, demo_dir
from carlos_audit.paths import carlos_home
from carlos_audit.models.tiny import ensure_tiny_clip, ensure_tiny_sd
from carlos_audit.hashing import tree_sha256

DEMO_CASEFILE = Path(__file__).resolve().parent.parent / "casefiles" / "demo.toml"
DEMO_CLAIMED_CASEFILE = DEMO_CASEFILE.with_name("demo-claimed.toml")  # [claimed_works]: demo_claimed.py


def demo_corpus_dir() -> Path:
    return carlos_home() / "demo" / f"corpus-v{DEMO_VERSION}"


def prepare_demo(progress: bool = False, corpus: bool = True, claimed: bool = True) -> dict:
    from carlos_audit.engines.corpus_build import build_corpus
    from carlos_audit.demo_claimed import build_demo_claimed_works

    sd = ensure_tiny_sd()
    clip = ensure_tiny_clip()
    loras = build_demo_loras(demo_dir(), base_sha256=tree_sha256(sd))
    info = {"home": str(carlos_home()), "tiny_sd": str(sd), "tiny_clip": str(clip),
            "loras": {k: str(v) for k, v in loras.items()}}
    if claimed:
        info["claimed_works"] = str(build_demo_claimed_works(loras))
    if corpus:
        build_corpus(demo_dir(), DEMO_CASEFILE, demo_corpus_dir(), name="demo corpus", progress=progress)
        info["corpus"] = str(demo_corpus_dir())
    return info


DEMO_FLUX_CASEFILE = DEMO_CASEFILE.with_name("demo-flux.toml")
DEMO_ZIMAGE_CASEFILE = DEMO_CASEFILE.with_name("demo-zimage.toml")


def prepare_family_demo(source: str) -> dict | None:
    """For a case on a family's embedded tiny pipeline that has demo LoRAs (``demo-flux.toml``,
    ``demo-zimage.toml``): that pipeline, the tiny CLIP embedder and the family's demo LoRAs,
    built once; None for any other base model (models/families.py)."""
    from carlos_audit.models.families import build_demo_loras, ensure_embedded, family_of_embedded

    fam = family_of_embedded(source)
    if fam is None or not fam.demo_loras:
        return None
    pipe, clip = ensure_embedded(source), ensure_tiny_clip()
    loras = build_demo_loras(fam)
    return {"home": str(carlos_home()), f"tiny_{fam.name}": str(pipe), "tiny_clip": str(clip),
            "loras": {k: str(v) for k, v in loras.items()}}


def prepare_flux_demo() -> dict:
    """The embedded tiny Flux pipeline, the tiny CLIP embedder and the Flux demo LoRAs
    (``casefiles/demo-flux.toml``)."""
    return prepare_family_demo("embedded:tiny-flux")
