"""``carlos-audit plan``: what a corpus build from a template will compute, and how long it will
take on this device, before starting it.

Counts follow the build's structure (engines/build_plan.py): L LoRA arms plus ONE base arm shared by
every LoRA, each of P prompts x S seeds, so (L + 1) x P x S images. Device time comes from a
real, timed generation of a few images with the template's base model and protocol (its steps,
size, guidance, scheduler and batch size) on the device the template names, their CLIP
encoding, and the whole host chain of each unit (PNG encode, embedding, hashes, fsync'd writes
into a temporary case folder, run/hostchain.finish_unit): for a real model that is a real
measurement on this machine.
"""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path


def counts(n_loras: int, n_prompts: int, n_seeds: int, batch_size: int, steps: int, cfg: bool) -> dict:
    """The work of a build of ``n_loras`` LoRAs (exact: what the hooks of cost.py will count)."""
    pairs = n_prompts * n_seeds
    arms = n_loras + 1
    batches_per_arm = math.ceil(pairs / batch_size)
    images = arms * pairs
    return {
        "n_loras": n_loras, "n_prompts": n_prompts, "n_seeds": n_seeds, "batch_size": batch_size, "steps": steps,
        "cfg": cfg, "arms": arms, "images": images, "images_if_base_per_lora": 2 * n_loras * pairs,
        "unet_forward_calls": arms * batches_per_arm * steps,
        "unet_image_steps": images * steps,
        "unet_latent_evaluations": images * steps * (2 if cfg else 1),
        "vae_decoded_images": images,
        "clip_image_encodings": images,
    }


def measure(case, n_images: int) -> dict:
    """Time the generation and CLIP encoding of ``n_images`` images of the case's first pairs,
    in the protocol's batch layout, after a one-image warm-up (not timed)."""
    from carlos_audit.case.protocol import enumerate_pairs, load_prompts
    from carlos_audit.models.embedders import load_embedder
    from carlos_audit.models.loading import load_base_pipeline, set_scheduler
    from carlos_audit.run import cost
    from carlos_audit.run.embed import image_features
    from carlos_audit.run.arms import arms_for
    from carlos_audit.run.generate import GenerationParams, generate_batch
    from carlos_audit.run.hostchain import Produced, finish_unit
    from carlos_audit.run.profile import make_session
    from carlos_audit.casefolder.unit_store import CaseStore

    pc = case.protocol
    t0 = time.perf_counter()
    lp = load_base_pipeline(case.base_model.source, dtype=case.base_model.dtype, device=case.base_model.device,
                            base_dir=case.base_dir, variant=case.base_model.variant, config=case.base_model.config)
    if pc.scheduler:
        set_scheduler(lp.pipe, pc.scheduler)
    emb = load_embedder(case.embedder.model, case.embedder.pretrained, device=lp.device, base_dir=case.base_dir)
    load_s = time.perf_counter() - t0
    counter = cost.install_pipeline_hooks(lp.pipe, cost.CostCounter())
    cost.install_embedder_hooks(emb, counter)
    params = GenerationParams.from_protocol(pc, type(lp.pipe.scheduler).__name__)
    prompts, _ = load_prompts(pc.prompts, case.base_dir)
    pairs = enumerate_pairs(prompts, pc.seeds, pc.batch_size)
    chosen = [pairs[i % len(pairs)] for i in range(n_images)]  # more than the protocol has: wrap around
    b = pc.batch_size
    chunks = [chosen[i:i + b] for i in range(0, n_images, b)]
    generate_batch(lp.pipe, [chosen[0].prompt.text], [chosen[0].seed], params)  # warm-up, not timed
    counted = cost.zero()  # the timed generation and CLIP encoding (the host chain's own embedding not counted)
    gen_s = clip_s = host_s = 0.0
    with tempfile.TemporaryDirectory(prefix="carlos-plan-") as tmp:
        session, _ = make_session(case, CaseStore(Path(tmp)), lp, emb, {})
        arm = arms_for(case)[0]
        for chunk in chunks:
            prompts, seeds = [c.prompt.text for c in chunk], [c.seed for c in chunk]
            before, t = counter.snapshot(), time.perf_counter()
            images = generate_batch(lp.pipe, prompts, seeds, params)
            gen_s += time.perf_counter() - t
            t = time.perf_counter()
            image_features(emb, images)
            clip_s += time.perf_counter() - t
            cost.add(counted, counter.delta(before))
            # the whole host chain of a unit, as a run does it: PNG encode, embed, sha256, fsync'd writes
            t = time.perf_counter()
            finish_unit(session, Produced(arm, chunk, prompts, seeds, "generated", images, None, None, None, cost.zero()))
            host_s += time.perf_counter() - t
    return {"device": lp.device, "dtype": lp.dtype, "base_model": lp.identity, "embedder": emb.identity,
            "images": n_images, "batches": len(chunks), "load_s": round(load_s, 3),
            "generation_s": gen_s, "clip_s": clip_s, "host_chain_s": host_s,
            "generation_s_per_image": gen_s / n_images, "clip_s_per_image": clip_s / n_images,
            "host_chain_s_per_image": host_s / n_images,
            "counted": counted, "fastpath": lp.fastpath}


def plan(case_path, n_loras: int, measure_images: int = 4) -> dict:
    from carlos_audit.case.casefile import load_case
    from carlos_audit.case.protocol import load_prompts

    case = load_case(Path(case_path))
    pc = case.protocol
    prompts, _ = load_prompts(pc.prompts, case.base_dir)
    out = {"casefile": str(case_path),
           "counts": counts(n_loras, len(prompts), len(pc.seeds), pc.batch_size, pc.steps, pc.guidance_scale > 1),
           "measurement": None, "estimate": None}
    if measure_images > 0:
        m = measure(case, measure_images)
        out["measurement"] = m
        per_image = m["generation_s_per_image"] + m["clip_s_per_image"]
        images = out["counts"]["images"]
        gen, host = m["generation_s_per_image"], m["host_chain_s_per_image"]
        out["estimate"] = {
            "device_seconds_per_image": per_image,
            "device_hours": images * per_image / 3600.0,
            "generation_hours": images * gen / 3600.0,
            "clip_hours": images * m["clip_s_per_image"] / 3600.0,
            "host_chain_seconds_per_image": host,
            "wall_hours_serial": images * (gen + host) / 3600.0,
            "wall_hours_pipelined": images * max(gen, host) / 3600.0,
            "note": "measured with the base weights (a LoRA adapter adds a little per UNet call) on one device; the "
                    "host chain (PNG encode, CLIP embedding, sha256, fsync'd writes) is timed one unit at a time: a "
                    "run overlaps it with the next generation (run/hostchain.py), so wall time is about "
                    "max(generation, host chain) per image; metrics and model loading are not included; divide "
                    "by the number of workers for wall time",
        }
    return out
