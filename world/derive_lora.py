"""Derivatives of the world's trained LoRAs, with known sources (the neighbour validation's truth):

- ``<src>-rescale05``: the source with every ``lora_B`` halved (the LoRA's effect at half strength, as a user
  rescaling a LoRA before sharing it);
- ``<src>-svd2``: the source's per-module update ``B @ A`` reduced to rank 2 by SVD (``A' = sqrt(S) Vh``,
  ``B' = U sqrt(S)``, alpha = rank so the scale alpha/r stays 1 as in the source).

Written with the same diffusers save code and kohya converter as ``train_lora.py``, each with a record naming its
source and the operation. (Continued training and another seed are trained: ``train_lora.py --init`` / ``--seed``.)
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import common
from train_lora import LORAS, TARGETS, save_lora


def source_layers(src: Path) -> tuple[dict, dict]:
    """The source's layers without the ``unet.`` prefix, and its LoraConfig fields from the adapter metadata."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(src / "pytorch_lora_weights.safetensors"), "pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    layers = {k.removeprefix("unet."): v for k, v in load_file(src / "pytorch_lora_weights.safetensors").items()}
    return layers, {k.removeprefix("unet."): v for k, v in meta.items()}


def rescale(layers: dict, factor: float) -> dict:
    return {k: v * factor if ".lora_B." in k else v.clone() for k, v in layers.items()}


def svd_reduce(layers: dict, rank: int, scale: float) -> dict:
    """Each module's B @ A (times the source's alpha/r) reduced to ``rank`` by SVD (1x1 convolutions flattened)."""
    out = {}
    for ka in [k for k in layers if ".lora_A." in k]:
        kb = ka.replace(".lora_A.", ".lora_B.")
        a, b = layers[ka], layers[kb]
        u, s, vh = torch.linalg.svd(b.flatten(1) @ a.flatten(1) * scale, full_matrices=False)
        root = s[:rank].sqrt()
        out[ka] = (root[:, None] * vh[:rank]).reshape(rank, *a.shape[1:]).contiguous()
        out[kb] = (u[:, :rank] * root[None, :]).reshape(b.shape[0], rank, *b.shape[2:]).contiguous()
    return out


def derive(src_name: str, kind: str) -> None:
    from peft import LoraConfig

    src = LORAS / src_name
    layers, meta = source_layers(src)
    r, alpha = int(meta["r"]), float(meta["lora_alpha"])
    if kind == "rescale05":
        new, config = rescale(layers, 0.5), LoraConfig(r=r, lora_alpha=alpha, target_modules=TARGETS)
        op = "every lora_B multiplied by 0.5"
    else:
        new, config = svd_reduce(layers, 2, alpha / r), LoraConfig(r=2, lora_alpha=2.0, target_modules=TARGETS)
        op = f"per-module B @ A (x alpha/r = {alpha / r}) truncated to rank 2 by SVD; alpha 2"
    name = f"{src_name}-{kind}"
    out = LORAS / name
    files = save_lora(new, config, out, name)
    rec = {"lora": name, "kind": "derivative", "source": src_name, "operation": op,
           "source_files": json.loads((src / "training_record.json").read_text())["files"], "files": files,
           "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "versions": common.versions()}
    (out / "training_record.json").write_text(json.dumps(rec, indent=1) + "\n")
    print(f"{name}: {op}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", default="twemoji-style")
    a = ap.parse_args()
    common.threads()
    for kind in ("rescale05", "svd2"):
        derive(a.source, kind)


if __name__ == "__main__":
    main()
