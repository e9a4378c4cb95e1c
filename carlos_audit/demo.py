"""What ``carlos-audit demo`` prepares: the embedded tiny models and the demo LoRAs."""

from __future__ import annotations

from .models.demo_loras import build_demo_loras, demo_dir
from .models.tiny import carlos_home, ensure_tiny_clip, ensure_tiny_sd, tree_sha256


def prepare_demo() -> dict:
    sd = ensure_tiny_sd()
    clip = ensure_tiny_clip()
    loras = build_demo_loras(demo_dir(), base_sha256=tree_sha256(sd))
    return {"home": str(carlos_home()), "tiny_sd": str(sd), "tiny_clip": str(clip),
            "loras": {k: str(v) for k, v in loras.items()}}
