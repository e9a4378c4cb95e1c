"""The numeric ranges a case file's values must lie in, checked when the case file is read (so
``check`` refuses what ``run`` would fail on, in one line, before any model is loaded).

Every number is finite (``casefile``: a NaN, an Inf or a number too big for a float is refused
as a type error). The ranges, and why:

- ``lora.scale`` and each of ``protocol.scales``: 0..100. The scale multiplies the LoRA's
  weight change; 100 is the bound the common front-ends put on a LoRA strength (ComfyUI's
  ``LoraLoader``: -100..100) and far beyond any scale at which an image still shows anything but
  noise. Negative scales are not profiles of the LoRA (refused as before).
- ``protocol.guidance_scale``: 0..100, ComfyUI's bound on classifier-free guidance (``cfg``);
  diffusers sets none, and a larger value saturates every latent.
- each seed: 0 <= seed < 2**64, what ``torch.Generator.manual_seed`` takes without wrapping
  (larger values raise inside the generation step; negative ones alias other seeds).
- ``protocol.steps``: at most 1000, the timesteps the supported models' schedulers are trained
  on (``num_train_timesteps``). diffusers' DDIM and DDPM schedulers refuse more inference steps
  than that (a ValueError at the first batch, after the models are loaded); the others would
  visit the same trained timesteps more than once, which no published protocol does.
"""

from __future__ import annotations

from carlos_audit.errors import AuditError

MAX_SCALE = 100.0
MAX_GUIDANCE = 100.0
SEED_LIMIT = 2 ** 64
MAX_STEPS = 1000


def check_ranges(lora_scale: float, protocol: dict, seeds: list[int], where: str) -> None:
    """AuditError (one line, naming the key) for the first value outside its range (``protocol``:
    the [protocol] table's values)."""
    for key, values, lo, top in (("lora.scale", [lora_scale], 0, MAX_SCALE),
                                 ("protocol.scales", protocol["scales"], 0, MAX_SCALE),
                                 ("protocol.guidance_scale", [protocol["guidance_scale"]], 0, MAX_GUIDANCE),
                                 ("protocol.steps", [protocol["steps"]], 1, MAX_STEPS)):
        for v in values:
            if not lo <= v <= top:
                raise AuditError(f"{where}: {key} must be in {lo}..{top:g}, got {v!r}")
    bad = [s for s in seeds if not 0 <= s < SEED_LIMIT]
    if bad:
        raise AuditError(f"{where}: protocol.seeds must be in 0..2**64-1 (a torch generator seed), got {bad[0]}")
