"""CUDA check of the full-size SDXL path, sized for one H100-class GPU in under 7 minutes
(after the random-weight fixture exists; building it once takes 1-5 min and 13.6 GB):

    python bench/gpu_check.py                 # CUDA; prints each row as it is measured
    python bench/gpu_check.py --cpu-smoke     # the same code on the CPU with the tiny models (seconds)

One load. First the real batch path: a case folder (SDXL random weights, 1024 px, 25 steps,
carlos-batch batch 4, float16, a kohya LoRA) run by ``run_case``, which applies the determinism
settings (TF32 off) and the fast path, writes one batch per arm and its manifest; that row is
the wall time of a unit including the host chain. The same loaded pipeline then gives, each
row printed as measured, with the peak GPU memory of the row:

- float16 and bfloat16 eager, batch 4: denoising (``output_type="latent"``) and VAE decode timed
  apart, images/s, whether any decoded value was non-finite (the NaN check of the VAE rule);
- SDPA against the classic attention processor at batch 1 (float16);
- one static compile of the UNet through the tool's own option (CARLOS_AUDIT_TORCH_COMPILE=1,
  models/fastpath.py), first call (compile) and steady state, batch 4.

Without CUDA and without --cpu-smoke it exits with one line.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
PROMPT = "a red car on a street"


class Rows:
    """Prints one row per measurement at once (flushed), with the peak memory since the last row."""

    def __init__(self, cuda: bool):
        self.cuda, self.t0 = cuda, time.perf_counter()
        print(f"{'row':<34} {'dtype':<9} {'batch':>5} {'denoise s':>10} {'vae s':>7} {'img/s':>7} {'peak GiB':>9}  note",
              flush=True)

    def sync(self):
        if self.cuda:
            import torch

            torch.cuda.synchronize()

    def start(self):
        if self.cuda:
            import torch

            torch.cuda.reset_peak_memory_stats()
        self.sync()
        return time.perf_counter()

    def add(self, name, dtype, batch, denoise, vae, note=""):
        peak = "-"
        if self.cuda:
            import torch

            peak = f"{torch.cuda.max_memory_allocated() / 2**30:.1f}"
        total = (denoise or 0) + (vae or 0)
        rate = f"{batch / total:.2f}" if total else "-"
        fmt = lambda v: f"{v:.2f}" if v is not None else "-"  # noqa: E731
        print(f"{name:<34} {dtype:<9} {batch:>5} {fmt(denoise):>10} {fmt(vae):>7} {rate:>7} {peak:>9}  {note} "
              f"[t+{time.perf_counter() - self.t0:.0f}s]", flush=True)


def setup(smoke: bool, home: Path) -> dict:
    """The base model folder, a LoRA for it and the protocol of the check."""
    if smoke:
        from carlos_audit.demo import prepare_demo

        demo = prepare_demo(corpus=False)
        return {"source": "embedded:tiny-sd", "lora": demo["loras"]["target"], "device": "cpu", "dtype": "float32",
                "size": 64, "steps": 2, "dtypes": ("float32",)}
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the full-size fixtures are test code
    from fullsize_fixtures import ensure_random_pipeline, write_kohya_lora

    folder = ensure_random_pipeline("sdxl")
    lora = write_kohya_lora("sdxl", home / "xl-lora.safetensors")
    return {"source": str(folder), "lora": str(lora), "device": "cuda", "dtype": "float16", "size": 1024, "steps": 25,
            "dtypes": ("float16", "bfloat16")}


def case_row(cfg: dict, home: Path, rows: Rows):
    """A case folder through the real batch path: one batch of 4 per arm, manifest written."""
    from carlos_audit.case.casefile import load_case
    from carlos_audit.run.load import process_models
    from carlos_audit.pipeline import run_case

    (home / "prompts.json").write_text('{"objects": {"vehicles": ["%s"]}}' % PROMPT)
    (home / "case.toml").write_text(f'''
[case]
id = "gpu-check"
title = "gpu check"
examiner = "bench"
question = "speed"
[base_model]
source = "{cfg['source']}"
dtype = "{cfg['dtype']}"
device = "{cfg['device']}"
[embedder]
model = "embedded:tiny-clip"
[lora]
path = "{cfg['lora']}"
trigger_policy = "none"
[protocol]
prompts = "prompts.json"
seeds = {{ count = 4, start = 42 }}
steps = {cfg['steps']}
width = {cfg['size']}
height = {cfg['size']}
seed_mode = "carlos-batch"
batch_size = 4
bootstrap_resamples = 100
[indicators]
trigger_dependence = false
prompt_override = false
effect_labels = false
''')
    t = rows.start()
    result = run_case(load_case(home / "case.toml"), home / "case", progress=False)
    rows.sync()
    wall = time.perf_counter() - t
    m = result.manifest.to_json()
    arms = len(m["protocol"]["arms"])
    rows.add("case folder (real batch path)", cfg["dtype"], 4 * arms, wall, None,
             f"{arms} arms incl. load; TF32 {m['environment'].get('tf32')}; fastpath active "
             f"{(m['environment'].get('fastpath') or {}).get('active')}")
    lp, _ = process_models().loaded
    return lp


def timed_batch(lp, rows: Rows, batch: int, cfg: dict):
    """(denoise s, vae s, any non-finite) of one carlos-batch call, denoising and decode apart."""
    import torch

    from carlos_audit.run.generate import carlos_batch_call

    pipe = lp.pipe
    call = carlos_batch_call([PROMPT] * batch, list(range(42, 42 + batch)))
    t = rows.start()
    with torch.no_grad():
        latents = pipe(**call, num_inference_steps=cfg["steps"], width=cfg["size"], height=cfg["size"],
                       output_type="latent").images
    rows.sync()
    denoise = time.perf_counter() - t
    t = time.perf_counter()
    with torch.no_grad():
        vae = pipe.vae
        z = latents.to(next(vae.parameters()).dtype) / vae.config.scaling_factor
        decoded = vae.decode(z, return_dict=False)[0]
    rows.sync()
    return denoise, time.perf_counter() - t, bool((~torch.isfinite(decoded)).any())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="run the same code on the CPU with the tiny models")
    args = ap.parse_args()
    import torch

    if not args.cpu_smoke and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; run it on a machine with a CUDA GPU, or pass --cpu-smoke")
        return 0
    home = Path(tempfile.mkdtemp(prefix="carlos-gpu-"))
    os.environ.setdefault("CARLOS_AUDIT_HOME", str(home))
    from carlos_audit.run.generate import set_adapter_state

    cfg = setup(args.cpu_smoke, home)
    name = torch.cuda.get_device_name() if cfg["device"] == "cuda" else "CPU (smoke)"
    print(f"gpu_check on {name}, torch {torch.__version__}, {cfg['size']} px, {cfg['steps']} steps", flush=True)
    rows = Rows(cfg["device"] == "cuda")
    lp = case_row(cfg, home, rows)
    set_adapter_state(lp.pipe, None)  # the base weights from here on
    for dtype in cfg["dtypes"]:
        if dtype != lp.dtype:  # the VAE stays float32 (models/fastpath.py); the rest follows the row's dtype
            for comp in ("unet", "text_encoder", "text_encoder_2"):
                if getattr(lp.pipe, comp, None) is not None:
                    getattr(lp.pipe, comp).to(getattr(torch, dtype))
        timed_batch(lp, rows, 1, dict(cfg, steps=2))  # warm-up
        d, v, bad = timed_batch(lp, rows, 4, cfg)
        rows.add("eager carlos-batch", dtype, 4, d, v, f"non-finite VAE output: {bad}")
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    for label, proc in (("attention SDPA", AttnProcessor2_0()), ("attention classic", AttnProcessor())):
        lp.pipe.unet.set_attn_processor(proc)
        d, v, _ = timed_batch(lp, rows, 1, cfg)
        rows.add(label, cfg["dtypes"][-1], 1, d, v)
    lp.pipe.unet.set_attn_processor(AttnProcessor2_0())
    if cfg["device"] != "cuda":
        print("compile row: skipped on the CPU smoke run (minutes of compilation for a 64 px model)", flush=True)
        return 0
    from carlos_audit.run import fastpath

    os.environ["CARLOS_AUDIT_TORCH_COMPILE"] = "1"
    fp = fastpath.select_for(lp.pipe, lp.device, cfg["dtypes"][-1], lp.architecture)
    fastpath.apply(lp.pipe, fp)
    d, v, _ = timed_batch(lp, rows, 4, cfg)
    rows.add("static compile, first call", cfg["dtypes"][-1], 4, d, v, "includes compilation")
    d, v, _ = timed_batch(lp, rows, 4, cfg)
    rows.add("static compile, steady", cfg["dtypes"][-1], 4, d, v)
    return 0


if __name__ == "__main__":
    sys.exit(main())
