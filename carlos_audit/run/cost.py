"""Exact cost accounting: what a run or a corpus build actually computed, counted by hooks.

Forward pre-hooks on the loaded models count the work as it happens (never an estimate):

    unet_forward_calls        calls of ``pipe.unet`` (one per denoising step per generated batch;
                              with classifier-free guidance ONE call evaluates the conditional and
                              the unconditional latents together, batched)
    unet_latent_evaluations   latents the UNet evaluated, summed over calls (the batch dimension of
                              the UNet input: 2 x images x steps with CFG, images x steps without)
    unet_image_steps          images x denoising steps (latent evaluations / 2 when the pipeline
                              ran with CFG): the figure to compare with images x steps
    vae_decoder_calls         calls of ``pipe.vae.decoder``; ``vae_decoded_images`` the images
                              (batch dimension) they decoded (tiled decoding would count tiles)
    clip_forward_calls        calls of the embedder's image tower (``model.visual``, what
                              ``encode_image`` runs); ``clip_image_encodings`` the images encoded
    images_generated          images produced by the pipeline (``generate_batch``)

Each unit record (``units/<arm>/b<batch>.json``) carries the counts of the work that produced it
(``cost``); the manifest's ``cost`` section and a corpus build's ``build.json`` sum these records.
"""

from __future__ import annotations

import weakref

FIELDS = ("images_generated", "unet_forward_calls", "unet_latent_evaluations", "unet_image_steps",
          "vae_decoder_calls", "vae_decoded_images", "clip_forward_calls", "clip_image_encodings")

#: the attribute of a hooked module naming the CostCounter its hook advances
COUNTER_ATTRIBUTE = "carlos_cost_counter"

COUNTING = {
    "method": "torch forward pre-hooks on pipe.unet, pipe.vae.decoder and the embedder's image tower (model.visual)",
    "unet_forward_calls": "UNet calls: one per denoising step per generated batch (with CFG one call evaluates both halves, batched)",
    "unet_latent_evaluations": "latents evaluated by the UNet (its input batch dimension summed over calls): 2 x images x steps with CFG",
    "unet_image_steps": "images x denoising steps",
    "vae_decoded_images": "images decoded by the VAE decoder",
    "clip_image_encodings": "images encoded by the CLIP image tower",
    "images_generated": "images produced by the diffusion pipeline (base images taken from a cache count 0)",
}


class CostCounter:
    """Counts of the work done by the models its owner loaded (run/load.ModelCache holds one),
    advanced by the hooks; read with ``snapshot`` and ``delta``. ``images_generated``: images
    ``generate_batch`` produced (kept apart from ``counts``, where the unit's own figure is set)."""

    def __init__(self) -> None:
        self.counts = zero()
        self.images_generated = 0

    def snapshot(self) -> dict:
        return dict(self.counts)

    def delta(self, before: dict) -> dict:
        return {k: self.counts[k] - before.get(k, 0) for k in FIELDS}


def counter_of(pipe) -> CostCounter | None:
    """The counter the hooks of ``pipe``'s denoiser advance (None when it has no hooks)."""
    return getattr(_denoiser(pipe), COUNTER_ATTRIBUTE, None)


def _denoiser(pipe):
    return getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)


def zero() -> dict:
    return {k: 0 for k in FIELDS}


def add(into: dict, other: dict | None) -> dict:
    for k in FIELDS:
        into[k] = into.get(k, 0) + int((other or {}).get(k, 0))
    return into


def _batch_of(args, kwargs, name: str) -> int:
    x = args[0] if args else kwargs.get(name)
    shape = getattr(x, "shape", None)
    return int(shape[0]) if shape else 0


def _hook_once(module, hook, counter: CostCounter) -> None:
    """Register a counting forward pre-hook on ``module`` unless one is there (cached models keep
    theirs); the hook advances ``counter``, the module's current one (the last install names it)."""
    if module is None:
        return
    setattr(module, COUNTER_ATTRIBUTE, counter)
    if not getattr(module, "_carlos_cost_hook", False):
        module.register_forward_pre_hook(hook, with_kwargs=True)
        module._carlos_cost_hook = True


def install_pipeline_hooks(pipe, counter: CostCounter) -> CostCounter:
    """Count UNet and VAE-decoder work of ``pipe`` into ``counter`` (idempotent: a cached pipeline
    keeps its hooks); a FLUX.1 pipeline's transformer is counted as its UNet (the denoiser; no CFG
    batch doubling). Returns ``counter``."""
    ref = weakref.ref(pipe)

    def on_unet(module, args, kwargs):
        n = _batch_of(args, kwargs, "sample") or _batch_of(args, kwargs, "hidden_states")
        p = ref()
        cfg = bool(getattr(p, "do_classifier_free_guidance", False)) if p is not None else False
        counts = getattr(module, COUNTER_ATTRIBUTE).counts
        counts["unet_forward_calls"] += 1
        counts["unet_latent_evaluations"] += n
        counts["unet_image_steps"] += n // 2 if cfg else n

    def on_decode(module, args, kwargs):
        counts = getattr(module, COUNTER_ATTRIBUTE).counts
        counts["vae_decoder_calls"] += 1
        counts["vae_decoded_images"] += _batch_of(args, kwargs, "z")

    _hook_once(_denoiser(pipe), on_unet, counter)
    _hook_once(getattr(getattr(pipe, "vae", None), "decoder", None), on_decode, counter)
    return counter


def install_embedder_hooks(embedder, counter: CostCounter) -> None:
    """Count image encodings of an embedder's image tower into ``counter``: ``model.visual``
    (open_clip ``encode_image``) or ``model.vision_model`` (transformers ``get_image_features``)."""

    def on_visual(module, args, kwargs):
        counts = getattr(module, COUNTER_ATTRIBUTE).counts
        counts["clip_forward_calls"] += 1
        counts["clip_image_encodings"] += _batch_of(args, kwargs, "x") or _batch_of(args, kwargs, "pixel_values")

    model = getattr(embedder, "model", None)
    _hook_once(getattr(model, "visual", None) or getattr(model, "vision_model", None), on_visual, counter)


# --------------------------------------------------------------------------- records -> sections


def case_cost(store, plan, pairs) -> dict:
    """The manifest's ``cost`` section, summed from the case's unit records.

    ``total`` is the work done for this case; arms whose batches were ``shared`` (a corpus build
    computes the base arm once for every LoRA) are summed in ``shared`` instead: counted once for
    the whole build, in its build.json."""
    from carlos_audit.case.protocol import batches

    arms, total, shared = {}, zero(), zero()
    unmeasured = 0
    for arm in plan.arms.values():
        agg = {"batches": 0, "images": 0, "sources": {}, **zero()}
        for b in batches(pairs):
            rec = store.unit_done(arm.name, b[0].batch) or {}
            src = rec.get("source", "missing")
            agg["batches"] += 1
            agg["images"] += len(b)
            agg["sources"][src] = agg["sources"].get(src, 0) + 1
            c = rec.get("cost")
            if c is None:
                unmeasured += 1
                continue
            add(agg, c)
            add(shared if src == "shared" else total, c)
        agg["sources"] = dict(sorted(agg["sources"].items()))
        arms[arm.name] = agg
    return {"counting": COUNTING, "arms": arms, "total": total, "shared": shared,
            "unmeasured_batches": unmeasured,
            "note": "counts of the work that produced each stored unit (units/<arm>/b*.json `cost`); "
                    "`shared` batches were computed once for a whole corpus build and are counted in its build.json"}
