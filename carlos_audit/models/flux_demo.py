"""Deterministic demo LoRAs for the embedded tiny Flux pipeline (``casefiles/demo-flux.toml``).

Like the SD demo LoRAs (``demo_loras.py``, same seeded factors and writer): rank-4 updates of
the attention projections of every double- and single-stream block of the tiny transformer
(to_q, to_k, to_v, to_out.0, add_q/k/v_proj, to_add_out), in the diffusers/peft layout
(``transformer.<module>.lora_A.weight`` / ``lora_B.weight``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from carlos_audit.models.demo_loras import RANK, lora_factors, merged_factors, write_lora

FLUX_DEMO_VERSION = 1
_PROJECTIONS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                "attn.add_v_proj", "attn.to_add_out")

#: name -> (seed, effect); "derivative" is 0.7 x target + 0.3 x unrelated (rank 8)
FLUX_DEMO_LORAS = {"target": (21, 1.0), "weak": (22, 0.3), "unrelated": (24, 1.0), "derivative": (None, None)}


def flux_target_modules(transformer_dir: Path | None = None) -> list[tuple[str, int, int]]:
    """(module path, in_features, out_features) of the tiny transformer's attention projections."""
    import torch
    from diffusers import FluxTransformer2DModel

    from carlos_audit.models.flux import ensure_tiny_flux

    model = FluxTransformer2DModel.from_pretrained(transformer_dir or ensure_tiny_flux() / "transformer")
    return [(n, m.in_features, m.out_features) for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and n.endswith(_PROJECTIONS)]


def flux_demo_dir() -> Path:
    from carlos_audit.paths import carlos_home

    return carlos_home() / "demo" / f"flux-loras-v{FLUX_DEMO_VERSION}"


def build_flux_demo_loras(dest: Path | None = None) -> dict[str, Path]:
    """Write the Flux demo LoRAs into ``dest`` (idempotent: the same bytes every time)."""
    dest = Path(dest or flux_demo_dir())
    modules = flux_target_modules()
    paths = {}
    for name, (seed, effect) in FLUX_DEMO_LORAS.items():
        p = paths[name] = dest / f"{name}.safetensors"
        if p.is_file():
            continue
        factors = merged_factors(modules, FLUX_DEMO_LORAS) if seed is None else lora_factors(seed, effect, modules)
        state = {}
        for module, (down, up) in factors.items():
            state[f"transformer.{module}.lora_A.weight"] = down.astype(np.float32)
            state[f"transformer.{module}.lora_B.weight"] = up.astype(np.float32)
        write_lora(p, state, {"format": "pt", "ss_base_model_version": "embedded:tiny-flux",
                              "ss_output_name": f"demo-flux-{name}", "ss_network_dim": str(RANK),
                              "carlos_audit.demo": f"seed={seed} effect={effect} version={FLUX_DEMO_VERSION}"})
    return paths
