"""Weight changes as ComfyUI's own LoRA code computes them, for small fixture files: the measured
side of the ComfyUI convention (issue 34).

ComfyUI is GPL-3.0: none of its code is copied here. This script imports it from a snapshot
checkout of Comfy-Org/ComfyUI at the pinned commit (``--comfyui PATH``; the script refuses a
snapshot whose ``comfy/lora.py`` and ``comfy/weight_adapter/*.py`` differ from the pinned
hashes) and runs, unchanged:

* ``comfy.lora.model_lora_keys_unet`` / ``model_lora_keys_clip``: the key maps ComfyUI builds
  for a model, given the model's state-dict names (ComfyUI's ``diffusion_model.`` /
  ``clip_l.transformer.`` names, made from our diffusers model with ComfyUI's own
  ``comfy.utils.unet_to_diffusers``);
* ``comfy.lora.load_lora``: which tensors of the file it takes for which weight (the rest it
  logs as "lora key not loaded");
* ``comfy.lora.calculate_weight``: the patched weight, with ComfyUI's patch tuple
  ``(strength, adapter, strength_model=1.0, offset=None, function=None)``, for each multiplier.

What is stored per file (``tests/data/comfyui/<name>.npz`` and one ``manifest.json``): for every
weight ComfyUI changes, the diffusers name of the layer and the response of the weight change
to a fixed probe, ``(W_comfy - W0).reshape(out, -1) @ X`` with ``X`` seeded by the flattened
input width (2 standard-normal columns, ``numpy.random.default_rng(in_width)``), at each
multiplier (float32): small, and enough to hold another implementation to ComfyUI's to float32
round-off. A weight ComfyUI fails to compute (it logs an error and leaves the weight as it was)
is stored as the zero change it is, and listed under ``failed``.
The manifest records the commit, the hashes of ComfyUI's files that ran, each fixture file's
content hash and the tensors ComfyUI did not load.

Run (once, where the snapshot is; the outputs are committed):

    PYTHONPATH=$PWD:tests python tests/comfyui/make_fixtures.py --comfyui /path/to/ComfyUI
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
from pathlib import Path

import numpy as np

COMMIT = "a125cd84b054a57729b5eecab930ca9408719832"
MULTIPLIERS = (1.0, 0.5)
PROBES = 2
HERE = Path(__file__).resolve().parent
DATA = HERE.parent / "data" / "comfyui"


def content_sha256(path: Path) -> str:
    """sha256 of a safetensors file's content (metadata and tensors, in sorted order): the
    LyCORIS library writes the same content with its metadata keys in varying order."""
    import torch
    from safetensors import safe_open

    h = hashlib.sha256()
    with safe_open(str(path), "pt") as f:
        h.update(json.dumps(f.metadata() or {}, sort_keys=True).encode())
        for k in sorted(f.keys()):
            t = f.get_tensor(k).contiguous()
            h.update(f"{k}|{t.dtype}|{tuple(t.shape)}".encode())
            h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def probe(width: int) -> np.ndarray:
    return np.random.default_rng(width).standard_normal((width, PROBES))


def response(delta) -> np.ndarray:
    d = delta.detach().double().reshape(delta.shape[0], -1).numpy() if delta.dim() > 1 else delta.double().numpy()[:, None]
    return (d @ probe(d.shape[1])).astype(np.float32)


def comfy_files_hashes(root: Path) -> dict:
    files = [root / "comfy" / "lora.py", root / "comfy" / "lora_convert.py", *sorted((root / "comfy" / "weight_adapter").glob("*.py"))]
    return {str(f.relative_to(root)): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def import_comfy(root: Path):
    sys.path.insert(0, str(root))
    sys.argv = [sys.argv[0], "--cpu"]
    import comfy.options

    comfy.options.enable_args_parsing()
    import comfy.lora
    import comfy.utils

    return comfy


def ldm_unet_config(config) -> dict:
    """ComfyUI's (ldm) UNet config of a diffusers SD 1.5-style UNet2DConditionModel config."""
    levels = len(config.block_out_channels)
    per = config.layers_per_block
    attn = ["CrossAttn" in t for t in config.down_block_types]
    return {"num_res_blocks": [per] * levels,
            "channel_mult": [c // config.block_out_channels[0] for c in config.block_out_channels],
            "transformer_depth": [int(a) for a in attn for _ in range(per)],
            "transformer_depth_output": [int(a) for a in attn for _ in range(per + 1)],
            "transformer_depth_middle": 1}


class StateDictModel:
    """What ComfyUI's key-map functions read of a model: ``state_dict()`` (its names) and
    ``model_config.unet_config``."""

    def __init__(self, tensors: dict, unet_config: dict | None = None):
        self.tensors = tensors
        self.model_config = type("Config", (), {"unet_config": unet_config or {}})()

    def state_dict(self):
        return self.tensors


def comfy_names(comfy, pipe) -> tuple[dict, dict]:
    """``(comfy name -> tensor, comfy name -> diffusers name)`` for the UNet and text encoder."""
    unet_sd = pipe.unet.state_dict()
    mapping = comfy.utils.unet_to_diffusers(ldm_unet_config(pipe.unet.config))
    tensors, names = {}, {}
    for dname, cname in mapping.items():
        if dname in unet_sd:
            tensors[f"diffusion_model.{cname}"] = unet_sd[dname]
            names[f"diffusion_model.{cname}"] = f"unet.{dname}"
    for dname, t in pipe.text_encoder.state_dict().items():
        cname = f"clip_l.transformer.text_model.{dname}"
        tensors[cname] = t
        names[cname] = f"text_encoder.{dname}"
    return tensors, names


def comfy_deltas(comfy, pipe, lora_path: Path) -> tuple[dict, list[str], list[str]]:
    """``({diffusers weight name: {multiplier: probe response}}, [keys ComfyUI did not load],
    [weights ComfyUI patched but left unchanged: its calculation failed])``."""
    import torch
    from safetensors.torch import load_file

    tensors, names = comfy_names(comfy, pipe)
    unet_model = StateDictModel({k: v for k, v in tensors.items() if k.startswith("diffusion_model.")},
                                ldm_unet_config(pipe.unet.config))
    clip_model = StateDictModel({k: v for k, v in tensors.items() if k.startswith("clip_l.")})
    key_map = comfy.lora.model_lora_keys_unet(unet_model, {})
    key_map = comfy.lora.model_lora_keys_clip(clip_model, key_map)
    lora = load_file(str(lora_path))
    not_loaded: list[str] = []

    class Catch(logging.Handler):
        def emit(self, record):
            msg = record.getMessage()
            if msg.startswith("lora key not loaded: "):
                not_loaded.append(msg.split(": ", 1)[1])

    handler = Catch()
    logging.getLogger().addHandler(handler)
    try:
        patches = comfy.lora.load_lora(lora, key_map)
    finally:
        logging.getLogger().removeHandler(handler)
    out: dict[str, dict] = {}
    failed: set[str] = set()
    for target, patch in patches.items():
        key, offset = target if isinstance(target, tuple) else (target, None)
        w0 = tensors[key].detach().to(torch.float32)
        for m in MULTIPLIERS:
            new = comfy.lora.calculate_weight([(m, patch, 1.0, offset, None)], w0.clone(), key)
            if torch.equal(new, w0):
                failed.add(names[key])
            out.setdefault(names[key], {})[m] = response(new - w0)
    return out, sorted(not_loaded), sorted(failed)


def fixture_files(pipe, folder: Path) -> dict[str, Path]:
    """The small LoRA files the fixtures are made for: every LyCORIS family, made by the LyCORIS
    library on the tiny SD pipeline (seeded, deterministic)."""
    from lycoris_files import FAMILIES, make_lycoris_file, quiet

    out = {}
    with quiet():
        for i, family in enumerate(sorted(FAMILIES)):
            out[f"sd15-lycoris-{family}"] = make_lycoris_file(pipe, family, folder / f"{family}.safetensors", seed=i + 1).path
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--comfyui", type=Path, required=True, help="a checkout of Comfy-Org/ComfyUI at the pinned commit")
    ap.add_argument("--out", type=Path, default=DATA)
    args = ap.parse_args(argv)
    hashes = comfy_files_hashes(args.comfyui)
    pinned = json.loads((HERE / "pinned.json").read_text())
    if pinned["commit"] != COMMIT or hashes != pinned["files"]:
        print(f"{args.comfyui} is not ComfyUI at {COMMIT[:8]} (its LoRA files differ from tests/comfyui/pinned.json)")
        return 2
    comfy = import_comfy(args.comfyui)
    from carlos_audit.models.loading import load_base_pipeline

    pipe = load_base_pipeline("embedded:tiny-sd", dtype="float32", device="cpu").pipe
    args.out.mkdir(parents=True, exist_ok=True)
    manifest = {"comfyui_commit": COMMIT, "comfyui_files": hashes, "multipliers": list(MULTIPLIERS),
                "probe": f"numpy.random.default_rng(in_width).standard_normal((in_width, {PROBES}))", "files": {}}
    for name, path in fixture_files(pipe, args.out).items():
        deltas, not_loaded, failed = comfy_deltas(comfy, pipe, path)
        arrays = {f"{m}|{layer}": r for layer, per in deltas.items() for m, r in per.items()}
        np.savez_compressed(args.out / f"{name}.npz", **arrays)
        manifest["files"][name] = {"lora": path.name, "content_sha256": content_sha256(path),
                                   "weights_patched": len(deltas), "failed": failed, "not_loaded": not_loaded}
        print(f"{name}: {len(deltas)} weights patched ({len(failed)} left unchanged), {len(not_loaded)} tensors not loaded")
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
