"""Loading a case's models: the base pipeline, the LoRA as an adapter (with its module
accounting) and the embedder, each checked against the hashes the case expects; kept loaded for
the next case in the same process.

Module accounting is decided from what peft actually wrapped, never from names: a module of the
file counts as applied when every one of its factor tensors (not its alpha) is held, value for
value, by one peft-wrapped module of the pipeline under the adapter's name. The text-encoder
prefixes of the installed transformers version (``text_model.`` or not), kohya's SDXL block
names and any other renaming therefore cannot make the count wrong. For a module that was not
applied, diffusers' own conversion (``lora_state_dict``) is run on the file to say why.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

from carlos_audit.case.casefile import Case
from carlos_audit.case.options import RunOptions
from carlos_audit.errors import AuditError
from carlos_audit.run.arms import TARGET_ADAPTER

#: Pipeline components a LoRA can wrap.
LORA_COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "text_encoder_3", "transformer", "prior")

# ----------------------------------------------------------------------------- loading


def load_lora(pipe, path: Path, adapter: str, inspection: dict, allow_partial: bool, convention: str = "reference",
              scale: float = 1.0) -> dict:
    """Load through diffusers' load_lora_weights, or as a weight patch (run/patch.py) for the
    families diffusers does not load exactly, and check every module in the file was applied.

    Returns the load record of the manifest: ``partial``, ``applied`` (modules of the file that
    peft applied), ``in_file`` (modules in the file), ``wrapped`` (peft-wrapped modules of the
    pipeline under this adapter), ``by_component`` (applied modules per pipeline component),
    ``skipped`` (``[{"module", "reason"}]``), ``unapplied`` (the skipped module names) and
    ``application`` (the method, the application ``convention`` and per family the modules
    applied; see ``patch.load_patch``). Under the ``comfyui`` convention the families ComfyUI
    applies as the reference does (plain LoRA/LoCon) still go through diffusers.
    """
    from carlos_audit.run import patch

    if patch.needs_patch(inspection):  # a family diffusers does not load exactly: run/patch.py
        state = patch.load_patch(pipe, path, adapter, inspection, convention, scale)
    else:
        state = load_with_diffusers(pipe, path, adapter, inspection)
        state["application"]["convention"] = convention
    if state["partial"]:
        shown = "; ".join(f"{s['module']} ({s['reason']})" for s in state["skipped"][:3])
        more = f"; and {len(state['skipped']) - 3} more" if len(state["skipped"]) > 3 else ""
        msg = (f"LoRA {path.name}: {len(state['skipped'])} of {state['in_file']} modules in the file were not applied "
               f"to the base model: {shown}{more}")
        state["message"] = msg
        if not allow_partial:
            raise AuditError(msg + "; pass --allow-partial to profile it anyway (the report will flag it)")
    return state


def load_with_diffusers(pipe, path: Path, adapter: str, inspection: dict) -> dict:
    """diffusers' load_lora_weights (peft adapters), accounted by ``module_accounting``."""
    import diffusers.utils.logging as dlog

    level = dlog.get_verbosity()
    dlog.set_verbosity_error()  # "no LoRA keys for the text encoder" is expected; we check coverage ourselves
    try:
        pipe.load_lora_weights(str(path), adapter_name=adapter)
    except Exception as e:
        raise AuditError(f"LoRA {path.name} could not be loaded into the base model: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}") from None
    finally:
        dlog.set_verbosity(level)
    state = module_accounting(pipe, adapter, path, inspection)
    families: dict = {}
    for row in inspection.get("modules") or []:
        if row["name"] not in state["unapplied"]:
            families[row["kind"]] = families.get(row["kind"], 0) + 1
    state["application"] = {"method": "diffusers_peft", "families": {
        k: {"method": "diffusers_peft", "modules": n} for k, n in sorted(families.items())}}
    return state


def tensor_fingerprint(tensor) -> str:
    """sha256 of a tensor's bytes (shape-free: a (r, in) and an (r, in, 1, 1) factor agree)."""
    import torch

    t = tensor.detach().to("cpu").contiguous().reshape(-1)
    return hashlib.sha256(t.view(torch.uint8).numpy().tobytes()).hexdigest()


def wrapped_modules(pipe, adapter: str) -> dict[str, list]:
    """``{"component.module": [adapter tensors]}`` for every module peft wrapped for ``adapter``."""
    import torch
    from peft.tuners.tuners_utils import BaseTunerLayer

    out: dict[str, list] = {}
    for comp in LORA_COMPONENTS:
        model = getattr(pipe, comp, None)
        if not isinstance(model, torch.nn.Module):
            continue
        for name, module in model.named_modules():
            if not isinstance(module, BaseTunerLayer):
                continue
            tensors = []
            for attr in module.adapter_layer_names:
                holder = getattr(module, attr, None)
                if holder is None or adapter not in holder:
                    continue
                held = holder[adapter]
                tensors += list(held.parameters()) if isinstance(held, torch.nn.Module) else [held]
            if tensors:
                out[f"{comp}.{name}"] = tensors
    return out


def module_accounting(pipe, adapter: str, path: Path, inspection: dict) -> dict:
    """Which modules of the file peft applied, matched by tensor values (see the module doc)."""
    from safetensors import safe_open

    from carlos_audit.lora.keys import parse_key

    wrapped = wrapped_modules(pipe, adapter)
    dtypes = {t.dtype for ts in wrapped.values() for t in ts}
    where: dict[str, set[str]] = {}
    for name, tensors in wrapped.items():
        for t in tensors:
            where.setdefault(tensor_fingerprint(t), set()).add(name)
    rows = inspection.get("modules") or []
    if not rows:  # a pickle file allowed unopened: nothing to match against
        return {"partial": False, "applied": len(wrapped), "in_file": None, "wrapped": len(wrapped),
                "by_component": _by_component(wrapped), "skipped": [], "unapplied": []}
    applied: dict[str, str] = {}
    skipped = []
    with safe_open(str(path), framework="pt") as f:
        for row in rows:
            factors = [k for k in row["tensors"] if (parse_key(k) or ("", "", ""))[2] != "alpha"]
            homes = None
            for key in factors:
                t = f.get_tensor(key)
                found = set().union(*(where.get(tensor_fingerprint(t.to(d)), set()) for d in dtypes)) if dtypes else set()
                homes = found if homes is None else homes & found
            if homes:
                applied[row["name"]] = sorted(homes)[0]
            else:
                skipped.append(row["name"])
    if skipped and getattr(pipe, "transformer", None) is not None:  # FLUX.1: fused and alpha-folded factors
        from carlos_audit.run.flux_accounting import match_by_weight_change

        by_change = match_by_weight_change(pipe, adapter, path, [r for r in rows if r["name"] in skipped],
                                           LORA_COMPONENTS, set(applied.values()))
        applied.update({n: homes[0] for n, homes in by_change.items()})
        skipped = [n for n in skipped if n not in by_change]
    reasons = skip_reasons(pipe, path, skipped, {r["name"]: r for r in rows}) if skipped else {}
    return {"partial": bool(skipped), "applied": len(applied), "in_file": len(rows), "wrapped": len(wrapped),
            "by_component": _by_component(applied.values()),
            "skipped": [{"module": n, "reason": reasons.get(n, "not applied")} for n in skipped],
            "unapplied": skipped}


def _by_component(names) -> dict[str, int]:
    counts: dict[str, int] = {}
    for n in names:
        comp = n.split(".", 1)[0]
        counts[comp] = counts.get(comp, 0) + 1
    return dict(sorted(counts.items()))


def skip_reasons(pipe, path: Path, skipped: list[str], rows: dict[str, dict]) -> dict[str, str]:
    """Why each skipped module was not applied, from diffusers' own conversion of the file."""
    from safetensors.torch import load_file

    from carlos_audit.lora.keys import parse_key

    if getattr(pipe, "transformer", None) is not None:
        from carlos_audit.run.flux_accounting import flux_skip_reasons

        return flux_skip_reasons(pipe, path, skipped, rows)
    tensors = load_file(str(path))
    origin = {id(t): k for k, t in tensors.items()}
    kwargs = {"unet_config": pipe.unet.config} if getattr(pipe, "unet", None) is not None else {}
    try:
        converted, _ = type(pipe).lora_state_dict(dict(tensors), **kwargs)
    except Exception as e:
        why = f"diffusers cannot convert the file: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
        return {n: why for n in skipped}
    converted_as = {origin[id(t)]: k for k, t in converted.items() if id(t) in origin}
    out = {}
    for name in skipped:
        roles = {k: (parse_key(k) or ("", "", k))[2] for k in rows[name]["tensors"]}
        keys = [k for k, role in roles.items() if role != "alpha"]
        dropped = [roles[k] for k in keys if k not in converted_as]
        if len(dropped) == len(keys):
            out[name] = "dropped by diffusers' conversion (a layout it does not load)"
        elif dropped:
            out[name] = f"diffusers' conversion dropped its {', '.join(sorted(dropped))} tensor(s)"
        else:
            out[name] = f"converted to {converted_as[keys[0]]}, but no module of the base model took it"
    return out


class ModelCache:
    """The last loaded (pipeline, embedder) of its owner, reused by the owner's next case with the
    same base model and embedder (corpus builds, the cases of one process): only the LoRA adapter
    is swapped. Created by whoever runs cases (``process_models()``, an engines/units.UnitWorker)
    and passed down to ``load_models``; it holds one entry at most."""

    def __init__(self) -> None:
        from carlos_audit.run.cost import CostCounter

        self.key: tuple | None = None
        self.loaded: tuple | None = None  # (LoadedPipeline, embedder)
        self.cost = CostCounter()  # the work of every model it held (run/cost.py hooks)

    def get(self, key: tuple):
        return self.loaded if self.loaded is not None and self.key == key else None

    def keep(self, key: tuple, lp, emb) -> None:
        self.key, self.loaded = key, (lp, emb)

    def clear(self) -> None:
        self.key = self.loaded = None


@functools.cache
def process_models() -> ModelCache:
    """The one model cache of this process, for the callers that are given none (one instance,
    created on first use; a test or bench empties it with ``.clear()``)."""
    return ModelCache()


def _loaded_key(case: Case, options: RunOptions) -> tuple:
    return (case.base_model.source, case.base_model.dtype, case.base_model.device, str(case.base_dir),
            case.base_model.variant, case.base_model.config, case.base_model.add_watermarker,
            case.embedder.model, case.embedder.pretrained, case.embedder.preprocess,
            case.embedder.dtype, options.allow_download, options.allow_unsafe_pickle)


def load_models(case: Case, paths: dict, inspection: dict, options: RunOptions | None = None,
                models: ModelCache | None = None):
    """Base pipeline with the target LoRA as adapter "target", and the embedder; each checked
    against the hashes the case expects, the LoRA checked for architecture and full coverage
    (``options``: allow_partial, allow_download, allow_unsafe_pickle). ``models``: the caller's
    cache of loaded models (``process_models()`` when None)."""
    from carlos_audit.models.embedders import load_embedder
    from carlos_audit.models.loading import load_base_pipeline, set_scheduler
    from carlos_audit.run.environment import apply_determinism

    options = options or RunOptions()
    models = models if models is not None else process_models()
    allow_download, allow_unsafe_pickle = options.allow_download, options.allow_unsafe_pickle
    key = _loaded_key(case, options)
    cached = models.get(key)
    if cached is not None:
        lp, emb = cached
        from carlos_audit.run.patch import unload

        unload(lp.pipe)  # weight patches: the base weights back, bit for bit
        lp.pipe.unload_lora_weights()  # removes the adapter layers; the base weights were never touched
    else:
        models.clear()
        lp = load_base_pipeline(case.base_model.source, dtype=case.base_model.dtype, device=case.base_model.device,
                                allow_download=allow_download, base_dir=case.base_dir,
                                variant=case.base_model.variant, config=case.base_model.config,
                                add_watermarker=case.base_model.add_watermarker)
        emb = None
    want = case.base_model.sha256
    if want and lp.sha256 != want.lower():
        raise AuditError(f"base model {lp.identity}: hash {lp.sha256} does not match the expected {want.lower()}")
    inspection.update(claimed_base_hash_check(inspection, lp))
    fam = case.base_model.family
    if fam and lp.variant_family and fam != lp.variant_family:
        raise AuditError(f"base model {lp.identity} is {lp.variant_family} but the case says base_model.family = {fam!r}")
    arch = inspection.get("architecture")
    if arch and arch != lp.architecture:
        raise AuditError(f"LoRA {paths['lora'].name} targets {arch} but the base model {lp.identity} is {lp.architecture}; refusing before any generation")
    refuse_misfit(inspection, lp, paths["lora"].name)
    determinism = apply_determinism(lp.device, tf32=case.base_model.tf32)
    if case.protocol.scheduler:
        set_scheduler(lp.pipe, case.protocol.scheduler)
    load_state = load_lora(lp.pipe, paths["lora"], TARGET_ADAPTER, inspection, options.allow_partial,
                           case.lora.convention, case.lora.scale)
    if emb is None:
        emb = load_embedder(case.embedder.model, case.embedder.pretrained, device=lp.device,
                            preprocess=case.embedder.preprocess, dtype=case.embedder.dtype,
                            allow_download=allow_download, allow_unsafe_pickle=allow_unsafe_pickle, base_dir=case.base_dir)
        models.keep(key, lp, emb)
    from carlos_audit.run.cost import install_embedder_hooks, install_pipeline_hooks

    install_pipeline_hooks(lp.pipe, models.cost)  # counting only (cost.py); idempotent on the cached pipeline
    install_embedder_hooks(emb, models.cost)
    want = case.embedder.sha256
    if want and emb.sha256 != want.lower():
        raise AuditError(f"embedder {emb.identity}: hash {emb.sha256} does not match the expected {want.lower()}")
    return lp, emb, load_state, determinism




def refuse_misfit(inspection: dict, lp, lora_name: str) -> None:
    """A Z-Image LoRA whose width (its attention projections' in-features) is not the base
    transformer's is refused in one line naming both, before any generation."""
    evidence = inspection.get("architecture_evidence") or {}
    width, pipe = evidence.get("width"), lp.pipe
    if lp.architecture == "zimage" and width and width != pipe.transformer.config.dim:
        raise AuditError(f"LoRA {lora_name} is a Z-Image LoRA of width {width} but the base model {lp.identity} "
                         f"({lp.variant_family or 'zimage'}) has width {pipe.transformer.config.dim}; refusing before any generation")


def claimed_base_hash_check(inspection: dict, lp) -> dict:
    """The LoRA's self-reported base-model hash against the loaded base model
    (lora/intake.base_hash_check: one vocabulary for inspect and run)."""
    from carlos_audit.lora.inspection import base_hash_check

    return base_hash_check(inspection.get("claimed_base_model_hash"), lp.sha256, lp.identity)


def base_model_record(case: Case, lp) -> dict:
    """The manifest's ``base_model`` section: what was loaded, and every file that affects the images
    (``hashing``: how their hashes were obtained, models/filehash.py)."""
    from carlos_audit.models.filehash import policy

    return {"hashing": policy(), "source": case.base_model.source, "identity": lp.identity, "sha256": lp.sha256,
            "architecture": lp.architecture, "path": lp.path, "dtype": lp.dtype, "device": lp.device,
            "pipeline": type(lp.pipe).__name__, "variant": lp.variant, "config": case.base_model.config,
            "watermarker": lp.watermarker,
            "config_source": lp.config_source, "files": lp.files,
            # a FLUX.1 transformer file: its stored dtypes (float8 is upcast to ``dtype`` on loading)
            **({"stored_dtypes": lp.stored_dtypes} if getattr(lp, "stored_dtypes", None) else {})}
