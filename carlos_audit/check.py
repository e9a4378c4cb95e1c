"""``carlos-audit check``: everything ``run`` needs, resolved before any GPU hour is spent.

Validates the case file, resolves every input (present or missing, and the command that supplies
it), compares the case's signature with its reference corpus field by field, and counts the work
(images, UNet calls) — without loading any weights and without importing torch: a hub model is
looked up as files in the local Hugging Face cache, a LoRA through its safetensors header. The
result says ``ready`` only when ``run`` could start.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from carlos_audit.case.init import PLACEHOLDER  # what ``init`` writes; ``run`` refuses a case that still has it
from carlos_audit.errors import AuditError
from carlos_audit.run.intake import input_paths  # the one resolver of input paths, shared with ``run``

HUB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def unfilled_fields(case) -> list[str]:
    return [f"case.{k}" for k in ("id", "title", "examiner", "question") if PLACEHOLDER in str(getattr(case.case, k) or "")]


def require_filled(case) -> None:
    missing = unfilled_fields(case)
    if missing:
        raise AuditError(f"{case.path}: {', '.join(missing)} still hold the {PLACEHOLDER} placeholder written by "
                         "`carlos-audit init`; fill them in before running")


def _hub_item(role: str, repo: str, files: tuple, what: str) -> dict:
    from carlos_audit.models.hub import cached_snapshot, hf_hub_cache

    snap = cached_snapshot(repo, files)
    if snap is not None:
        return {"role": role, "status": "present", "source": f"hf:{repo}", "path": str(snap)}
    return {"role": role, "status": "missing", "source": f"hf:{repo}",
            "detail": f"{what} {repo} is not in the local Hugging Face cache ({hf_hub_cache()}; needs {', '.join(files)})",
            "supply": f"on a machine with network: `hf download {repo}` (fills the cache; copy "
                      f"models--{repo.replace('/', '--')} into {hf_hub_cache()} here), or run with --allow-download"}


def _embedded_detail(name: str) -> str:
    from carlos_audit.models.world_registry import is_world_model

    return "package data, sha256-pinned (the trained world)" if is_world_model(name) else "built from code on first use"


def _base_model_item(case) -> tuple[dict, str]:
    src = case.base_model.source
    if src.startswith("embedded:"):
        return {"role": "base_model", "status": "present", "source": src, "detail": _embedded_detail(src)}, src
    p = input_paths(case)["base_model"]
    if p.exists():
        ok = p.is_file() and p.suffix.lower() == ".safetensors" or (p / "model_index.json").is_file()
        item = {"role": "base_model", "status": "present" if ok else "invalid", "source": src, "path": str(p)}
        if not ok:
            item["detail"] = "neither a .safetensors file nor a diffusers folder (model_index.json)"
        return item, (f"file:{p.name}" if p.is_file() else f"dir:{p.name}")
    if HUB_ID_RE.match(src):
        from carlos_audit.models.families import family_of_variant, hub_files

        item = _hub_item("base_model", src, hub_files(case.base_model.family), "base model")
        fam = family_of_variant(case.base_model.family)
        if item["status"] == "missing" and fam is not None and fam.supply_note:
            item["supply"] += f"; {fam.supply_note}"
        return item, f"hf:{src}"
    return {"role": "base_model", "status": "missing", "source": src, "detail": f"{p} does not exist"}, src


def _flux_components_item(case, base: dict) -> list[dict]:
    """A FLUX.1 transformer file needs the VAE, CLIP-L and T5-XXL from ``[base_model] config``."""
    from carlos_audit.paths import expand_path
    from carlos_audit.models.families import family_of_variant, hub_files

    fam = family_of_variant(case.base_model.family)
    if fam is None or fam.name != "flux" or not base.get("path") or not Path(base["path"]).is_file():
        return []
    config = case.base_model.config
    role = "base_model_components"
    if not config:
        return [{"role": role, "status": "missing", "source": None,
                 "detail": "a FLUX.1 transformer checkpoint holds only the transformer",
                 "supply": "set [base_model] config to a diffusers FLUX.1 folder or a hub id in the local cache "
                           "(e.g. black-forest-labs/FLUX.1-dev) for the VAE, CLIP-L and T5-XXL"}]
    folder = expand_path(config, case.base_dir)
    if folder.is_dir():
        ok = (folder / "model_index.json").is_file()
        return [{"role": role, "status": "present" if ok else "invalid", "source": config, "path": str(folder)}]
    files = tuple(f for f in hub_files(case.base_model.family) if not f.startswith("transformer/"))
    return [_hub_item(role, config, files, "FLUX.1 components")]


def _embedder_item(case) -> tuple[dict, str]:
    from carlos_audit.paths import expand_path

    model, pre = case.embedder.model, case.embedder.pretrained
    if model.startswith("embedded:"):
        return {"role": "embedder", "status": "present", "source": model, "detail": _embedded_detail(model)}, model
    if model.startswith("hf:"):
        ref = model[3:]
        folder = expand_path(ref, case.base_dir)
        if folder.is_dir():
            ok = (folder / "config.json").is_file()
            return ({"role": "embedder", "status": "present" if ok else "invalid", "source": model, "path": str(folder)},
                    f"hf-transformers:dir:{folder.name}")
        files = ("config.json", "*.safetensors", "preprocessor_config.json", "tokenizer_config.json")
        return _hub_item("embedder", ref, files, "embedder"), f"hf-transformers:{ref}"
    identity = f"open_clip:{model}/{pre}"
    if pre:
        p = input_paths(case)["embedder"]
        if p.exists():
            return {"role": "embedder", "status": "present", "source": model, "path": str(p)}, f"open_clip:{model}/file:{p.name}"
    return {"role": "embedder", "status": "unchecked", "source": identity,
            "detail": "open_clip tags are resolved by open_clip at load time"}, identity


def _file_item(role: str, path: Path, want_sha: str | None = None) -> dict:
    from carlos_audit.hashing import sha256_file

    if not path.is_file():
        return {"role": role, "status": "missing", "path": str(path), "detail": f"{path} does not exist"}
    item = {"role": role, "status": "present", "path": str(path), "size": path.stat().st_size}
    if want_sha:
        digest = sha256_file(path)
        item["sha256"] = digest
        if digest != want_sha.lower():
            item.update(status="invalid", detail=f"sha256 {digest} differs from the pinned {want_sha.lower()}")
    return item


def _lora_item(case) -> tuple[dict, dict | None]:
    from carlos_audit.lora.fileformat import LoraFile
    from carlos_audit.lora.inspection import inspect_lora, weight_faults, weight_refusal

    item = _file_item("lora", input_paths(case)["lora"], case.lora.sha256)
    if item["status"] != "present":
        if item["status"] == "missing":
            item["supply"] = "put the disputed LoRA there, or point lora.path at it (`carlos-audit init LORA` writes a case for it)"
        return item, None
    try:
        source = LoraFile(item["path"])
        inspection = inspect_lora(source)
        faults = weight_faults(source)  # what run refuses before generating (run/intake)
    except AuditError as e:
        item.update(status="invalid", detail=str(e).removeprefix(f"{item['path']}: "))  # the path is on the line
        return item, None
    if faults:
        item.update(status="invalid", detail=weight_refusal(faults))
        return item, None
    item["architecture"] = inspection["architecture"]
    return item, inspection


def _device_item(case) -> dict:
    dev = case.base_model.device
    if dev == "cpu" or case.base_model.source.startswith("embedded:"):
        return {"role": "device", "status": "present", "source": dev}
    has_gpu = Path("/proc/driver/nvidia/version").is_file() or shutil.which("nvidia-smi") is not None
    if has_gpu:
        return {"role": "device", "status": "present", "source": dev, "detail": "NVIDIA driver found (torch not loaded)"}
    status = "missing" if dev.startswith("cuda") else "present"
    return {"role": "device", "status": status, "source": dev,
            "detail": "no NVIDIA driver found" + ("" if status == "missing" else "; auto would run on the CPU"),
            **({"supply": "run on a machine with a CUDA GPU"} if status == "missing" else {})}


def expected_signature(case, prompts, base_identity: str, embedder_identity: str) -> dict:
    """The signature ``run`` will record (case/signature.case_signature), as far as it is known
    without loading weights: model hashes only when the case pins them, the scheduler only when the
    case names it; otherwise null (unverifiable, not differing). Without prompts, no prompt hash."""
    from carlos_audit.case.signature import case_signature

    sig = case_signature(case, prompts or [], base_model=base_identity, base_model_sha256=case.base_model.sha256,
                         embedder=embedder_identity, embedder_sha256=case.embedder.sha256,
                         scheduler=case.protocol.scheduler or None)
    return sig if prompts else dict(sig, prompts_sha256=None)


def _corpus_section(case, signature: dict) -> dict | None:
    from carlos_audit.paths import expand_path
    from carlos_audit.case.signature import check_compatible, unverifiable_fields

    if not case.reference.corpus:
        return None
    path = expand_path(case.reference.corpus, case.base_dir)
    out = {"path": str(path), "allow_incompatible": case.reference.allow_incompatible}
    if not (path / "corpus.json").is_file():
        from carlos_audit.case.protocol import FETCH_COMMAND, PUBLIC_NAME

        supply = FETCH_COMMAND if path.name == PUBLIC_NAME else "carlos-audit corpus import|build|fetch ..."
        return dict(out, status="missing", compatible=None, supply=supply)
    from carlos_audit.corpus.store import Corpus

    corpus = Corpus.open(path, verify=False)
    differing = check_compatible(corpus.signature, signature)
    unverifiable = unverifiable_fields(corpus.signature, signature)
    fields = [{"field": f, "corpus": corpus.signature.get(f), "case": signature.get(f),
               "status": "differs" if f in differing else "unverifiable" if f in unverifiable else "equal"}
              for f in signature]
    for f in fields:  # a 280 x 16 seed list or a hash is shown in full in --json only
        if f["field"] == "seeds" and f["status"] == "equal":
            f["corpus"] = f["case"] = f"{len(signature['seeds'])} seeds {signature['seeds'][0]}..{signature['seeds'][-1]}"
    return dict(out, status="present", name=corpus.name, n=corpus.n, compatible=not differing,
                differing=differing, unverifiable=unverifiable, fields=fields)


def _plan(case, n_prompts: int | None, lora_sha: str | None) -> dict:
    from carlos_audit.run.arms import plan_arms
    from carlos_audit.run.budget import counts

    pc = case.protocol
    comparisons = [{"adapter": f"cmp{i}", "sha256": f"cmp{i}"} for i in range(1, len(case.comparison.loras) + 1)]
    arms = plan_arms(case, lora_sha or "target", comparisons).arms
    n_prompts = n_prompts or 0
    per_arm = counts(len(arms) - 1, n_prompts, len(pc.seeds), pc.batch_size, pc.steps, pc.guidance_scale > 1)
    return {"arms": sorted(arms), "n_arms": len(arms), "n_prompts": n_prompts, "n_seeds": len(pc.seeds),
            "images": per_arm["images"], "unet_forward_calls": per_arm["unet_forward_calls"],
            "unet_image_steps": per_arm["unet_image_steps"], "device_hours": None,
            "device_hours_how": f"carlos-audit plan {case.path} --measure-images 8  (on the GPU that will run it; "
                                "it generates and times 8 images)",
            "note": "base-arm batches already in the base-image cache are not generated again"}


def check_case(casefile) -> dict:
    """What ``run`` needs for this case, resolved without loading weights. ``ready`` is True only
    when ``run`` could start."""
    from carlos_audit.case.casefile import load_case
    from carlos_audit.case.protocol import load_prompts

    case = load_case(casefile)
    items, problems = [], []
    lora, inspection = _lora_item(case)
    base, base_identity = _base_model_item(case)
    emb, emb_identity = _embedder_item(case)
    items += [lora, base, emb, *_flux_components_item(case, base)]
    prompts = None
    try:
        prompts, _ = load_prompts(case.protocol.prompts, case.base_dir)
        items.append({"role": "prompts", "status": "present", "source": case.protocol.prompts, "n": len(prompts)})
    except AuditError as e:
        from carlos_audit.case.protocol import FETCH_COMMAND

        items.append({"role": "prompts", "status": "missing", "source": case.protocol.prompts, "detail": str(e),
                      "supply": FETCH_COMMAND if case.protocol.prompts.startswith("builtin:carlos-") else None})
    items += [_file_item(role, p) for role, p in input_paths(case).items() if role.startswith("comparison_lora_")]
    from carlos_audit.run.embed_works import check_items

    items += check_items(case)  # [claimed_works]: pinned, present, decodable
    items.append(_device_item(case))
    signature = expected_signature(case, prompts, base_identity, emb_identity)
    corpus = _corpus_section(case, signature)
    if corpus is not None:
        items.append({"role": "reference_corpus", "status": corpus["status"], "path": corpus["path"],
                      **({"supply": corpus["supply"]} if "supply" in corpus else {})})
    for it in items:
        if it["status"] in ("missing", "invalid"):
            problems.append(f"{it['role']}: {it['status']}" + (f" ({it['detail']})" if it.get("detail") else ""))
    if corpus is not None and corpus["status"] == "present" and case.reference.replicate_id:
        from carlos_audit.analysis.replication import check_replicate_id

        try:
            check_replicate_id(Path(corpus["path"]), case.reference.replicate_id)
        except AuditError as e:
            problems.append(f"reference.replicate_id: {e}")
    if corpus is not None and corpus["compatible"] is False and not corpus["allow_incompatible"]:
        problems.append("reference_corpus: profiled differently in " + ", ".join(corpus["differing"]))
    plan = _plan(case, len(prompts) if prompts else None, lora.get("sha256"))
    sequential = _sequential(case, prompts, problems, plan["n_arms"])
    unfilled = unfilled_fields(case)
    if unfilled:
        problems.append(f"{', '.join(unfilled)}: placeholder not filled in")
    return {"casefile": str(case.path), "case_id": case.id, "ready": not problems, "problems": problems,
            "inputs": items, "signature": signature, "corpus": corpus,
            "plan": plan, "sequential": sequential}


def _sequential(case, prompts, problems: list, n_arms: int) -> dict | None:
    """The looks of a ``[protocol.sequential]`` case and their cumulative image counts."""
    from carlos_audit.case.sequential_plan import case_plan, look_rows

    if case.protocol.sequential is None or not prompts:
        return None
    try:
        look_plan = case_plan(case, prompts)
    except AuditError as e:
        problems.append(str(e))
        return None
    return {"rule": look_plan.rule.to_dict(), "order": look_plan.order, "looks": look_rows(look_plan, n_arms)}
