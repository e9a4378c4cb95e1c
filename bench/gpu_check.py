"""CUDA check of the full-size SDXL path: run on a machine with one CUDA GPU (H100-class: < 8 min).

    python bench/gpu_check.py            # builds the SDXL random-weight fixture once (~1-5 min, 13.6 GB)

For float16 and bfloat16, with SDPA attention (diffusers' default on torch 2): images/s at batch
1, 4 and 8 (torch.compile of the UNet off and on), whether the VAE decode gave NaN (the fp32-VAE
rule of models/fastpath.py is applied through load_base_pipeline, as in a real run), the drift of the
LoRA effect against float32 on the same seeds (cosine of the base-vs-LoRA feature differences,
tiny CLIP features), and peak GPU memory. Prints one table. Without CUDA it exits with one line.
"""

from __future__ import annotations

import sys
import time


def main() -> int:
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; run it on a machine with a CUDA GPU (see docs/TESTING-REAL.md)")
        return 0
    import os
    import tempfile
    from pathlib import Path

    import numpy as np

    from carlos_audit.models.fixtures import ensure_random_pipeline, write_kohya_lora
    from carlos_audit.models.loading import load_base_pipeline, load_embedder
    from carlos_audit.run.embed import image_features
    from carlos_audit.run.generate import GenerationParams, generate_batch, set_adapter_state
    from carlos_audit.run.load import load_lora
    from carlos_audit.lora.intake import inspect_lora

    os.environ.setdefault("CARLOS_AUDIT_HOME", tempfile.mkdtemp(prefix="carlos-gpu-"))
    folder = ensure_random_pipeline("sdxl")
    lora = write_kohya_lora("sdxl", Path(os.environ["CARLOS_AUDIT_HOME"]) / "xl-lora.safetensors")
    inspection = inspect_lora(lora)
    params = GenerationParams(8, 5.0, 1024, 1024, "EulerDiscreteScheduler", "")
    emb = load_embedder("embedded:tiny-clip", None, device="cuda")
    prompts, seeds = ["a red car on a street"] * 8, list(range(8))

    def diffs(pipe):
        set_adapter_state(pipe, None)
        base = image_features(emb, generate_batch(pipe, prompts[:2], seeds[:2], params))
        set_adapter_state(pipe, "target", 1.0)
        with_lora = image_features(emb, generate_batch(pipe, prompts[:2], seeds[:2], params))
        return with_lora - base

    rows, reference = [], None
    for dtype in ("float32", "float16", "bfloat16"):
        torch.cuda.reset_peak_memory_stats()
        lp = load_base_pipeline(str(folder), dtype=dtype, device="cuda")
        load_lora(lp.pipe, lora, "target", inspection, False)
        d = diffs(lp.pipe)
        if dtype == "float32":
            reference = d
            del lp
            torch.cuda.empty_cache()
            continue
        set_adapter_state(lp.pipe, None)
        nan = False
        for compiled in (False, True):
            if compiled:
                lp.pipe.unet = torch.compile(lp.pipe.unet)
            for batch in (1, 4, 8):
                generate_batch(lp.pipe, prompts[:batch], seeds[:batch], params)  # warm-up (and compile)
                torch.cuda.synchronize()
                t = time.perf_counter()
                images = generate_batch(lp.pipe, prompts[:batch], seeds[:batch], params)
                torch.cuda.synchronize()
                rate = batch / (time.perf_counter() - t)
                nan = nan or any(not np.asarray(im).any() for im in images)
                rows.append((dtype, "on" if compiled else "off", batch, f"{rate:.2f}"))
        cos = [float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) or 1)) for a, b in zip(d, reference)]
        peak = torch.cuda.max_memory_allocated() / 2**30
        rows.append((dtype, "drift", f"cos {min(cos):.4f}..{max(cos):.4f}", f"VAE black/NaN: {nan}; peak {peak:.1f} GiB; fastpath {lp.fastpath}"))
        del lp
        torch.cuda.empty_cache()
    print(f"gpu_check on {torch.cuda.get_device_name()} (torch {torch.__version__}), SDXL random weights, 1024 px, 8 steps")
    print(f"{'dtype':<9} {'compile':<8} {'batch':<22} images/s")
    for r in rows:
        print(f"{r[0]:<9} {r[1]:<8} {str(r[2]):<22} {r[3]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
