"""Deterministic demo LoRAs for the embedded tiny Z-Image pipeline (``casefiles/demo-zimage.toml``).

Like the SD and Flux demo LoRAs (``demo_loras.py``, same seeded factors and writer): rank-4
updates of every attention projection and feed-forward layer (to_q, to_k, to_v, to_out.0, w1, w2,
w3) of every main layer and refiner block of the tiny transformer, in ai-toolkit's layout, the
most common one for Z-Image (``diffusion_model.<module>.lora_A.weight`` / ``lora_B.weight``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from carlos_audit.models.demo_loras import RANK, lora_factors, merged_factors, write_lora

ZIMAGE_DEMO_VERSION = 1
_TARGETS = ("attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0", "feed_forward.w1",
            "feed_forward.w2", "feed_forward.w3")

#: name -> (seed, effect); "derivative" is 0.7 x target + 0.3 x unrelated (rank 8)
ZIMAGE_DEMO_LORAS = {"target": (31, 1.0), "weak": (32, 0.3), "unrelated": (34, 1.0), "derivative": (None, None)}


def zimage_target_modules(transformer_dir: Path | None = None) -> list[tuple[str, int, int]]:
    """(module path, in_features, out_features) of the tiny transformer's attention and
    feed-forward layers."""
    import torch
    from diffusers import ZImageTransformer2DModel

    from carlos_audit.models.zimage import ensure_tiny_zimage

    model = ZImageTransformer2DModel.from_pretrained(transformer_dir or ensure_tiny_zimage() / "transformer")
    return [(n, m.in_features, m.out_features) for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and n.endswith(_TARGETS)]


def zimage_demo_dir() -> Path:
    from carlos_audit.paths import carlos_home

    return carlos_home() / "demo" / f"zimage-loras-v{ZIMAGE_DEMO_VERSION}"


def build_zimage_demo_loras(dest: Path | None = None) -> dict[str, Path]:
    """Write the Z-Image demo LoRAs into ``dest`` (idempotent: the same bytes every time)."""
    dest = Path(dest or zimage_demo_dir())
    modules = zimage_target_modules()
    paths = {}
    for name, (seed, effect) in ZIMAGE_DEMO_LORAS.items():
        p = paths[name] = dest / f"{name}.safetensors"
        if p.is_file():
            continue
        factors = merged_factors(modules, ZIMAGE_DEMO_LORAS) if seed is None else lora_factors(seed, effect, modules)
        state = {}
        for module, (down, up) in factors.items():
            state[f"diffusion_model.{module}.lora_A.weight"] = down.astype(np.float32)
            state[f"diffusion_model.{module}.lora_B.weight"] = up.astype(np.float32)
        write_lora(p, state, {"format": "pt", "software": "carlos-audit demo (ai-toolkit layout)",
                              "ss_base_model_version": "zimage_turbo", "ss_output_name": f"demo-zimage-{name}",
                              "ss_network_dim": str(RANK),
                              "carlos_audit.demo": f"seed={seed} effect={effect} version={ZIMAGE_DEMO_VERSION}"})
    return paths
