"""Loading a case's models: the base pipeline, the LoRA as an adapter (with its module
accounting) and the embedder, each checked against the hashes the case expects; kept loaded for
the next case in the same process."""

from __future__ import annotations

from pathlib import Path

from carlos_audit.case.casefile import Case
from carlos_audit.errors import AuditError
from carlos_audit.run.arms import TARGET_ADAPTER

# ----------------------------------------------------------------------------- loading


def load_lora(pipe, path: Path, adapter: str, inspection: dict, allow_partial: bool) -> dict:
    """Load through diffusers' load_lora_weights and check every module in the file was applied."""
    import diffusers.utils.logging as dlog

    level = dlog.get_verbosity()
    dlog.set_verbosity_error()  # "no LoRA keys for the text encoder" is expected; we check coverage ourselves
    try:
        pipe.load_lora_weights(str(path), adapter_name=adapter)
    except Exception as e:
        raise AuditError(f"LoRA {path.name} could not be loaded into the base model: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from None
    finally:
        dlog.set_verbosity(level)
    applied = applied_modules(pipe, adapter)
    in_file = {m["name"] for m in inspection.get("modules", [])}
    missing = sorted(in_file - applied) if in_file and all("." in n for n in in_file) else []
    n_file = inspection.get("module_count", len(in_file))
    if len(applied) < n_file or missing:
        n_missing = max(len(missing), n_file - len(applied))
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        msg = f"LoRA {path.name}: {n_missing} of {n_file} modules in the file were not applied to the base model ({shown or 'names not mappable'})"
        if not allow_partial:
            raise AuditError(msg + "; pass --allow-partial to profile it anyway (the report will flag it)")
        return {"partial": True, "applied": len(applied), "in_file": n_file, "unapplied": missing, "message": msg}
    return {"partial": False, "applied": len(applied), "in_file": n_file, "unapplied": []}


def applied_modules(pipe, adapter: str) -> set[str]:
    names = set()
    for comp in ("unet", "text_encoder", "text_encoder_2", "transformer"):
        model = getattr(pipe, comp, None)
        if model is None:
            continue
        for n, m in model.named_modules():
            la = getattr(m, "lora_A", None)
            if la is not None and hasattr(la, "keys") and adapter in la.keys():
                names.add(f"{comp}.{n}")
    return names


#: The last loaded (pipeline, embedder), reused by the next case in the same process with the same
#: base model and embedder (corpus builds, comparison LoRAs): only the LoRA adapter is swapped.
LOADED: dict = {}


def load_models(case: Case, paths: dict, inspection: dict, *, allow_partial: bool = False,
                allow_download: bool = False, allow_unsafe_pickle: bool = False):
    """Base pipeline with the target LoRA as adapter "target", and the embedder; each checked
    against the hashes the case expects, the LoRA checked for architecture and full coverage."""
    from carlos_audit.models.loading import (
        load_base_pipeline,
        load_embedder,
        set_scheduler,
    )
    from carlos_audit.run.environment import apply_determinism

    key = (case.base_model["source"], case.base_model["dtype"], case.base_model["device"], str(case.base_dir),
           case.embedder["model"], case.embedder.get("pretrained"), allow_download, allow_unsafe_pickle)
    cached = LOADED.get(key)
    if cached is not None:
        lp, emb = cached
        lp.pipe.unload_lora_weights()  # removes the adapter layers; the base weights were never touched
    else:
        LOADED.clear()
        lp = load_base_pipeline(case.base_model["source"], dtype=case.base_model["dtype"], device=case.base_model["device"],
                                allow_download=allow_download, base_dir=case.base_dir)
        emb = None
    want = case.base_model.get("sha256")
    if want and lp.sha256 != want.lower():
        raise AuditError(f"base model {lp.identity}: hash {lp.sha256} does not match the expected {want.lower()}")
    arch = inspection.get("architecture")
    if arch and arch != lp.architecture:
        raise AuditError(f"LoRA {paths['lora'].name} targets {arch} but the base model {lp.identity} is {lp.architecture}; refusing before any generation")
    determinism = apply_determinism(lp.device)
    if case.protocol["scheduler"]:
        set_scheduler(lp.pipe, case.protocol["scheduler"])
    load_state = load_lora(lp.pipe, paths["lora"], TARGET_ADAPTER, inspection, allow_partial)
    if emb is None:
        emb = load_embedder(case.embedder["model"], case.embedder.get("pretrained"), device=lp.device,
                            allow_download=allow_download, allow_unsafe_pickle=allow_unsafe_pickle, base_dir=case.base_dir)
        LOADED[key] = (lp, emb)
    from carlos_audit.run.cost import install_embedder_hooks, install_pipeline_hooks

    install_pipeline_hooks(lp.pipe)  # counting only (cost.py); idempotent on the cached pipeline
    install_embedder_hooks(emb)
    want = case.embedder.get("sha256")
    if want and emb.sha256 != want.lower():
        raise AuditError(f"embedder {emb.identity}: hash {emb.sha256} does not match the expected {want.lower()}")
    return lp, emb, load_state, determinism


