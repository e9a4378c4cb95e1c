"""How exactly carlos-audit applies Z-Image LoRAs of every layout, against each format's reference.

    OMP_NUM_THREADS=1 PYTHONPATH=.:tests .venv/bin/python bench/bench_zimage_layouts.py [--musubi GIT_DIR]

On the embedded tiny Z-Image transformer (``embedded:tiny-zimage``):

* every layout tests/zimage_lora_writers.py writes from one peft LoRA: the tool's weight change
  (run/load.load_lora -> run/patch.py) against the dense merge of that peft LoRA and against
  diffusers' own loader (``ZImagePipeline.load_lora_weights``) where it loads the file;
* the LyCORIS library's LoRA, LoKr, LoHa and DoRA (``create_lycoris``): the tool against the
  library's forward, and diffusers' loader on the same file;
* with ``--musubi`` (a git clone or mirror of kohya-ss/musubi-tuner): musubi-tuner's own code at
  the pinned commit, its ``LoRANetwork`` for Z-Image (networks/lora_zimage.py,
  ``create_arch_network``; ``save_weights``) and its ComfyUI converter
  (networks/convert_z_image_lora_to_comfy.py, ``main``) run on the tiny transformer: the files it
  writes against the tool (vs the network's own ``scale * up @ down``) and against the test
  writers' key sets. The pinned files are copied out of git into a cache once per machine.

Prints one JSON object (the figures of docs/LORA_FAMILIES.md).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
os.environ.setdefault("CARLOS_AUDIT_HOME", tempfile.mkdtemp(prefix="carlos-bench-"))

MUSUBI_COMMIT = "30c658c4f4b0bf05038b3346eff9670259b10fc7"  # kohya-ss/musubi-tuner, 2026-06-24
AI_TOOLKIT_COMMIT = "27a03a91f23eb1b757d5ec2e80ee3e129cfcc350"  # ostris/ai-toolkit, 2026-08-21 (its rename is followed)
MUSUBI_FILES = ("src/musubi_tuner/networks/lora.py", "src/musubi_tuner/networks/lora_zimage.py",
                "src/musubi_tuner/networks/convert_z_image_lora_to_comfy.py", "src/musubi_tuner/utils/model_utils.py")


def musubi_package(git_dir: Path) -> Path:
    """The pinned musubi-tuner files as an importable package in the cache (built once)."""
    from carlos_audit.paths import carlos_home

    root = carlos_home() / "trainers" / f"musubi-tuner-{MUSUBI_COMMIT[:12]}"
    if not (root / ".complete").is_file():
        for rel in MUSUBI_FILES:
            data = subprocess.run(["git", f"--git-dir={git_dir}", "show", f"{MUSUBI_COMMIT}:{rel}"], check=True,
                                  capture_output=True).stdout
            dest = root / rel.removeprefix("src/")
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(data)
            for pkg in (dest.parent, dest.parent.parent):
                (pkg / "__init__.py").touch()
        (root / ".complete").write_text(MUSUBI_COMMIT + "\n")
    return root


def musubi_files(git_dir: Path, transformer, out: Path) -> tuple[dict, Path, Path]:
    """musubi-tuner's own Z-Image LoRA (seeded factors) saved by its own code, and its ComfyUI
    conversion; ``({"transformer.<module>": dW}, kohya file, comfy file)``."""
    import copy

    sys.path.insert(0, str(musubi_package(git_dir)))
    from musubi_tuner.networks import convert_z_image_lora_to_comfy, lora_zimage

    model = copy.deepcopy(transformer)
    net = lora_zimage.create_arch_network(1.0, 4, 2.0, None, [], model)
    net.apply_to([], model, apply_text_encoder=False, apply_unet=True)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in sorted(net.named_parameters()):
            p.copy_(torch.randn(p.shape, generator=g) * 0.5 / p.shape[-1] ** 0.5)
    kohya, comfy = out / "musubi-kohya.safetensors", out / "musubi-comfy.safetensors"
    net.save_weights(str(kohya), torch.float32, {"ss_dit": "z_image_turbo_bf16.safetensors"})
    convert_z_image_lora_to_comfy.main(argparse.Namespace(src_path=str(kohya), dst_path=str(comfy), reverse=False))
    changes = {}
    for lora in net.unet_loras:
        name = "transformer." + lora.lora_name.removeprefix("lora_unet_")
        dotted = next(n for n, _ in model.named_modules() if n.replace(".", "_") == name.removeprefix("transformer.").replace(".", "_"))
        changes[f"transformer.{dotted}"] = lora.scale * (lora.lora_up.weight.double() @ lora.lora_down.weight.double())
    return changes, kohya, comfy


def _diffusers_vs(path: Path, changes: dict):
    from zimage_lora_writers import diffusers_changes, rel_error

    ref = diffusers_changes(path)
    if isinstance(ref, str):
        return f"diffusers cannot load it: {ref}"
    if set(ref) != set(changes):
        return f"diffusers applied {len(ref)} of {len(changes)} modules"
    return rel_error(changes, ref)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--musubi", type=Path, default=None, help="git dir of kohya-ss/musubi-tuner (clone or mirror)")
    args = parser.parse_args()
    from zimage_lora_writers import (PEFT_LAYOUTS, layout_alpha, library_forward_error, lycoris_file,
                                     peft_weight_changes, rel_error, tool_changes, write_layout)

    from carlos_audit.models.loading import load_base_pipeline

    pipe = load_base_pipeline("embedded:tiny-zimage", dtype="float32", device="cpu").pipe
    out, figures = Path(tempfile.mkdtemp(prefix="zimage-layouts-")), {"layouts": {}, "lycoris": {}, "musubi": None}
    for layout in PEFT_LAYOUTS:
        path = write_layout(out / f"{layout}.safetensors", pipe.transformer, layout)
        state, inspection, changes = tool_changes(pipe, path)
        source = peft_weight_changes(pipe.transformer, alpha=layout_alpha(layout))
        source = {n: d for n, d in source.items() if n in changes or layout not in ("kohya_zimage", "comfyui")}
        figures["layouts"][layout] = {"modules": f"{state['applied']} of {state['in_file']}",
                                      "vs_dense_merge": rel_error(changes, source), "vs_diffusers": _diffusers_vs(path, changes)}
    for family, kwargs in {"lora": {}, "lokr": {"factor": 4}, "loha": {}, "dora": {"dora_wd": True}}.items():
        path, net, model = lycoris_file(out / f"lyc-{family}.safetensors", pipe.transformer,
                                        "lora" if family == "dora" else family, **kwargs)
        state, inspection, changes = tool_changes(pipe, path)
        figures["lycoris"][family] = {"modules": f"{state['applied']} of {state['in_file']}",
                                      "vs_library_forward": library_forward_error(net, model, pipe, changes),
                                      "vs_diffusers": _diffusers_vs(path, changes)}
    if args.musubi is not None:
        figures["musubi"] = musubi_figures(args.musubi, pipe, out)
    print(json.dumps(figures, indent=2, default=str))


def musubi_figures(git_dir: Path, pipe, out: Path) -> dict:
    from safetensors import safe_open
    from zimage_lora_writers import rel_error, tool_changes, write_layout

    changes, kohya, comfy = musubi_files(git_dir, pipe.transformer, out)
    result = {"commit": MUSUBI_COMMIT}
    for name, path, layout in (("kohya", kohya, "kohya_zimage"), ("comfyui", comfy, "comfyui")):
        state, inspection, tool = tool_changes(pipe, path)
        ours = write_layout(out / f"writer-{layout}.safetensors", pipe.transformer, layout)
        with safe_open(str(path), framework="pt") as a, safe_open(str(ours), framework="pt") as b:
            shapes = ({k: tuple(a.get_slice(k).get_shape()) for k in a.keys()},
                      {k: tuple(b.get_slice(k).get_shape()) for k in b.keys()})
        result[name] = {"layout_detected": inspection["layout"], "modules": f"{state['applied']} of {state['in_file']}",
                        "vs_musubi_network": rel_error(tool, changes), "vs_diffusers": _diffusers_vs(path, tool),
                        "writer_keys_and_shapes_equal": shapes[0] == shapes[1]}
    return result


if __name__ == "__main__":
    main()
