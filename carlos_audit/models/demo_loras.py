"""Deterministic demo LoRAs for the embedded tiny pipeline, of known and different effect sizes.

Each LoRA adapts the attention projections (to_q, to_k, to_v, to_out.0) of the tiny UNet with
rank-4 factors drawn from a seeded generator: down ~ N(0, 1/in), up ~ N(0, effect^2 / rank), so
``effect`` sets the size of the weight update relative to the layer's own initialisation.

Written in the diffusers/peft format (``unet.<module>.lora_A.weight`` / ``lora_B.weight``) and,
for the target, also in the kohya format (``lora_unet_<module>.lora_down.weight`` /
``lora_up.weight`` / ``alpha``) with the same weights.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

RANK = 4
DEMO_VERSION = 2

#: name -> (seed, effect, format, extra metadata)
DEMO_LORAS = {
    "target": (11, 1.0, "diffusers", {}),
    "target_kohya": (11, 1.0, "kohya", {}),
    "weak": (12, 0.3, "diffusers", {}),
    "strong": (13, 3.0, "diffusers", {}),
    "unrelated": (14, 1.0, "kohya", {}),
    # a merge: 0.7 x target + 0.3 x unrelated, rank 8 (the factors concatenated)
    "derivative": (None, None, "kohya", {"ss_network_dim": "8", "ss_network_alpha": "8"}),
    "hostile": (15, 1.0, "diffusers", {
        "ss_output_name": "<img src=\"http://127.0.0.1:9/pwn.png\"><style>@import url('http://127.0.0.1:9/x.css');</style><b>bold</b>",
        "modelspec.title": "</td><script>alert(1)</script>",
        "ss_tag_frequency": "{\"x\": {\"<a href='http://127.0.0.1:9/'>link</a>\": 3}}",
    }),
}


def target_modules(unet_config_dir: Path | None = None) -> list[tuple[str, int, int]]:
    """(module path, in_features, out_features) of every attention projection of the tiny UNet."""
    import torch
    from diffusers import UNet2DConditionModel

    from carlos_audit.models.tiny import ensure_tiny_sd

    unet = UNet2DConditionModel.from_pretrained(unet_config_dir or ensure_tiny_sd() / "unet")
    out = []
    for name, m in unet.named_modules():
        if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v", "0") and ".attn" in name:
            if name.endswith(".0") and not name.endswith("to_out.0"):
                continue
            out.append((name, m.in_features, m.out_features))
    return out


def lora_factors(seed: int, effect: float, modules) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = {}
    for name, fin, fout in modules:
        down = rng.standard_normal((RANK, fin)) / np.sqrt(fin)
        up = rng.standard_normal((fout, RANK)) * (effect / np.sqrt(RANK))
        out[name] = (down.astype(np.float32), up.astype(np.float32))
    return out


def merged_factors(modules, loras: dict | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """0.7 x target + 0.3 x unrelated as one rank-8 LoRA: up @ down = sum of the scaled updates.
    ``loras``: a family's demo table (name -> (seed, effect, ...)), the SD one by default."""
    loras = loras or DEMO_LORAS
    t = lora_factors(loras["target"][0], loras["target"][1], modules)
    u = lora_factors(loras["unrelated"][0], loras["unrelated"][1], modules)
    return {name: (np.concatenate([t[name][0], u[name][0]]), np.concatenate([0.7 * t[name][1], 0.3 * u[name][1]], axis=1))
            for name in t}


def to_diffusers(factors) -> dict[str, np.ndarray]:
    sd = {}
    for name, (down, up) in factors.items():
        sd[f"unet.{name}.lora_A.weight"] = down
        sd[f"unet.{name}.lora_B.weight"] = up
    return sd


def to_kohya(factors, alpha: float = RANK) -> dict[str, np.ndarray]:
    sd = {}
    for name, (down, up) in factors.items():
        k = "lora_unet_" + name.replace(".", "_")
        sd[f"{k}.lora_down.weight"] = down
        sd[f"{k}.lora_up.weight"] = up
        sd[f"{k}.alpha"] = np.array(alpha, dtype=np.float32)
    return sd


def write_lora(path: Path, state: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
    from safetensors.numpy import save

    from carlos_audit.fileio import write_bytes_atomic

    data = save({k: np.ascontiguousarray(v) for k, v in sorted(state.items())}, metadata=metadata)
    write_bytes_atomic(path, canonical_header(data))


def canonical_header(data: bytes) -> bytes:
    """A safetensors file with its JSON header's keys sorted: safetensors writes the metadata in
    the order of a Rust HashMap, which changes from one process to the next, so the same LoRA
    would get another sha256 every time it is written. Tensor offsets are relative to the data
    that follows the header, so the tensors are unchanged."""
    import json

    n = int.from_bytes(data[:8], "little")
    header = json.dumps(json.loads(data[8:8 + n]), sort_keys=True, separators=(",", ":")).encode("utf-8")
    header += b" " * (-len(header) % 8)  # the header length stays a multiple of 8, as safetensors writes it
    return len(header).to_bytes(8, "little") + header + data[8 + n:]


def build_demo_loras(dest: Path, base_sha256: str | None = None) -> dict[str, Path]:
    """Write every demo LoRA into ``dest`` (idempotent: same bytes every time)."""
    dest = Path(dest)
    modules = target_modules()
    paths = {}
    for name, (seed, effect, fmt, extra) in DEMO_LORAS.items():
        p = dest / f"{name}.safetensors"
        paths[name] = p
        if p.is_file():
            continue
        factors = merged_factors(modules) if seed is None else lora_factors(seed, effect, modules)
        meta = {"ss_network_dim": str(RANK), "ss_network_alpha": str(RANK), "ss_network_module": "networks.lora",
                "ss_base_model_version": "embedded:tiny-sd", "ss_output_name": f"demo-{name}",
                "carlos_audit.demo": f"seed={seed} effect={effect} version={DEMO_VERSION}"}
        if base_sha256:
            meta["ss_new_sd_model_hash"] = base_sha256
        meta.update(extra)
        if fmt == "diffusers":
            meta["format"] = "pt"
        rank = next(iter(factors.values()))[0].shape[0]
        state = to_diffusers(factors) if fmt == "diffusers" else to_kohya(factors, alpha=rank)
        write_lora(p, state, meta)
    return paths


def demo_dir() -> Path:
    from carlos_audit.paths import carlos_home

    return carlos_home() / "demo" / f"loras-v{DEMO_VERSION}"
