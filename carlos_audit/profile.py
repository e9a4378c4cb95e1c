"""Profile a LoRA: the steps of a case run, in order, each writing files into the case folder.

    intake      hash every input, refuse what cannot be examined soundly
    load        base pipeline (+ LoRA as adapter "target"), embedder
    generate    for each arm and batch: images (base arm from the shared cache when present)
    embed       raw CLIP image features of each batch, stored beside the images
    metrics     Direction, Strength, Consistency with CIs, from the stored features
    custody     re-hash every input; write manifest.json

A run killed anywhere resumes: finished (arm, batch) units are never generated again.
"""

from __future__ import annotations

import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import __version__
from .casefile import Case, expand_path
from .errors import AuditError
from .fileio import read_json, write_json_atomic, write_text_atomic
from .generate import GenerationParams, generate_batch, set_adapter_state
from .hashing import sha256_bytes, sha256_file, sha256_json
from .protocol import Pair, batches, enumerate_pairs, load_prompts, prompts_sha256
from .store import BaseImageCache, CaseStore, hash_inputs, png_bytes

MANIFEST_SCHEMA = "carlos-audit/manifest/1"
TARGET_ADAPTER = "target"
CASE_ARTIFACTS = ("case.toml", "run.json", "manifest.json", "manifest.json.sha256", "metrics.json", "comparison.json", "report.pdf",
                  "report.pdf.sha256", "images", "embeddings", "units", "figures")


@dataclass(frozen=True)
class Arm:
    """One way of generating every pair: which adapter (None = base weights), at what scale,
    and whether the trigger words are appended to the prompt."""

    name: str
    adapter: str | None
    scale: float
    with_triggers: bool

    def prompt_for(self, text: str, triggers: list[str]) -> str:
        # the upstream CARLoS convention: ", <trigger>" appended for each trigger word
        return text + "".join(f", {t}" for t in triggers) if self.with_triggers else text


def arms_for(case: Case) -> tuple[Arm, Arm]:
    policy = case.lora["trigger_policy"]
    base = Arm("base", None, 0.0, policy == "both")
    lora = Arm("lora", TARGET_ADAPTER, case.lora["scale"], policy in ("both", "lora_only"))
    return base, lora


# ----------------------------------------------------------------------------- intake


def resolve_inputs(case: Case) -> dict:
    """Absolute paths of the case's input files, checked to exist."""
    lora = expand_path(case.lora["path"], case.base_dir)
    if not lora.exists():
        raise AuditError(f"{case.path}: lora.path {lora} does not exist")
    if lora.is_dir():
        raise AuditError(f"{case.path}: lora.path {lora} is a directory, not a LoRA file")
    paths = {"casefile": case.path, "lora": lora}
    src = case.base_model["source"]
    if not src.startswith("embedded:"):
        bp = expand_path(src, case.base_dir)
        if bp.exists():
            paths["base_model"] = bp
    pre = case.embedder.get("pretrained")
    if pre:
        ep = expand_path(pre, case.base_dir)
        if ep.exists():
            paths["embedder"] = ep
    pr = case.protocol["prompts"]
    if not pr.startswith("builtin:"):
        paths["prompts"] = expand_path(pr, case.base_dir)
    if case.reference.get("corpus"):
        paths["corpus"] = expand_path(case.reference["corpus"], case.base_dir)
    return paths


def intake(case: Case, *, allow_unsafe_pickle: bool = False) -> tuple[dict, list[dict], dict]:
    from . import lora_file

    paths = resolve_inputs(case)
    for role, p in paths.items():
        if not p.exists():
            raise AuditError(f"{case.path}: {role} {p} does not exist")
    lora_file.check_not_pickle(paths["lora"], allow_unsafe_pickle=allow_unsafe_pickle)
    if paths["lora"].suffix.lower() == ".safetensors":
        lora_file.validate_safetensors(paths["lora"])
    inputs = hash_inputs([{"role": r, "path": str(p)} for r, p in paths.items()])
    by_role = {e["role"]: e for e in inputs}
    for role, section in (("lora", case.lora), ("base_model", case.base_model), ("embedder", case.embedder)):
        want = section.get("sha256")
        if want and role in by_role and by_role[role]["sha256"] != want.lower():
            raise AuditError(f"{role} {by_role[role]['path']}: sha256 {by_role[role]['sha256']} does not match the expected {want.lower()} in the case file")
    inspection = lora_file.inspect_lora(paths["lora"], allow_unsafe_pickle=allow_unsafe_pickle)
    return paths, inputs, inspection


# ----------------------------------------------------------------------------- case folder


def prepare_case_dir(out: Path, case: Case, force: bool) -> None:
    """Refuse to overwrite a different case (or a folder that is not a case) without --force;
    the same case resumes."""
    casefile_sha = sha256_bytes(case.raw_text.encode("utf-8"))
    run = out / "run.json"
    if out.exists() and not out.is_dir():
        raise AuditError(f"output {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        same = run.is_file() and read_json(run).get("casefile_sha256") == casefile_sha
        if not same:
            if not force:
                what = "a different case" if run.is_file() else "files that are not a carlos-audit case"
                raise AuditError(f"output folder {out} holds {what}; pass --force to replace it, or choose another --out")
            foreign = [p.name for p in out.iterdir() if p.name not in CASE_ARTIFACTS]
            if foreign:
                raise AuditError(f"output folder {out} holds files carlos-audit did not write ({', '.join(sorted(foreign)[:5])}); refusing even with --force")
            for name in CASE_ARTIFACTS:
                p = out / name
                if p.is_dir():
                    shutil.rmtree(p)
                elif p.exists():
                    p.unlink()
    out.mkdir(parents=True, exist_ok=True)
    if not run.is_file():
        write_json_atomic(run, {"casefile_sha256": casefile_sha, "case_id": case.id, "started_utc": _utc_now(),
                                "started_epoch": int(time.time())})
        write_text_atomic(out / "case.toml", case.raw_text)


def _utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


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


def load_models(case: Case, paths: dict, inspection: dict, *, allow_partial: bool = False,
                allow_download: bool = False, allow_unsafe_pickle: bool = False):
    """Base pipeline with the target LoRA as adapter "target", and the embedder; each checked
    against the hashes the case expects, the LoRA checked for architecture and full coverage."""
    from .environment import apply_determinism
    from .models.loading import load_base_pipeline, load_embedder, set_scheduler

    lp = load_base_pipeline(case.base_model["source"], dtype=case.base_model["dtype"], device=case.base_model["device"],
                            allow_download=allow_download, base_dir=case.base_dir)
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
    emb = load_embedder(case.embedder["model"], case.embedder.get("pretrained"), device=lp.device,
                        allow_download=allow_download, allow_unsafe_pickle=allow_unsafe_pickle, base_dir=case.base_dir)
    want = case.embedder.get("sha256")
    if want and emb.sha256 != want.lower():
        raise AuditError(f"embedder {emb.identity}: hash {emb.sha256} does not match the expected {want.lower()}")
    return lp, emb, load_state, determinism


# ----------------------------------------------------------------------------- generation


@dataclass
class Session:
    """What a run has loaded: shared by every arm it generates."""

    case: Case
    store: CaseStore
    pipe: object
    base_info: object
    embedder: object
    params: GenerationParams
    triggers: list[str]
    cache: BaseImageCache
    env_key: dict
    batch_size: int


def _cache_key(s: Session, prompts_sent: list[str], seeds: list[int]) -> tuple[str, dict]:
    desc = {"base_model_sha256": s.base_info.sha256, "env": s.env_key, "params": s.params.as_dict(),
            "batch_size": s.batch_size, "batch": [[p, int(sd)] for p, sd in zip(prompts_sent, seeds)]}
    return sha256_json(desc), desc


def run_arm(s: Session, arm: Arm, pairs: list[Pair], progress: bool = True) -> dict:
    """Generate and embed every batch of one arm that is not already done. Returns stats."""
    from tqdm import tqdm

    from .embed import image_features
    from PIL import Image
    import io

    todo = [b for b in batches(pairs) if s.store.unit_done(arm.name, b[0].batch) is None]
    stats = {"generated_batches": 0, "cached_batches": 0, "skipped_batches": len(batches(pairs)) - len(todo)}
    bar = tqdm(todo, desc=f"{arm.name:>10}", unit="batch", disable=not progress, file=sys.stderr, leave=False)
    for batch in bar:
        prompts_sent = [arm.prompt_for(p.prompt.text, s.triggers) for p in batch]
        seeds = [p.seed for p in batch]
        pngs = None
        key = desc = None
        if arm.adapter is None:
            key, desc = _cache_key(s, prompts_sent, seeds)
            pngs = s.cache.get(key, len(batch))
        source = "base-cache" if pngs is not None else "generated"
        if pngs is None:
            set_adapter_state(s.pipe, arm.adapter, arm.scale)
            images = generate_batch(s.pipe, prompts_sent, seeds, s.params)
            pngs = [png_bytes(im) for im in images]
            if key is not None:
                s.cache.put(key, pngs, desc)
            stats["generated_batches"] += 1
        else:
            stats["cached_batches"] += 1
        # embed what was stored (decoded PNG), so embeddings are reproducible from the files alone
        images = [Image.open(io.BytesIO(b)).convert("RGB") for b in pngs]
        feats = image_features(s.embedder, images)
        check_finite(arm.name, batch, images, feats)
        s.store.write_unit(arm.name, batch[0].batch, pngs, feats, [p.id for p in batch], prompts_sent, seeds, source)
    bar.close()
    return stats


def check_finite(arm: str, batch: list[Pair], images, feats: np.ndarray) -> None:
    bad = []
    for p, im, f in zip(batch, images, feats):
        if not np.isfinite(f).all():
            bad.append(f"{p.id} (embedding not finite)")
        elif not np.asarray(im).any():
            bad.append(f"{p.id} (all-black image)")
    if bad:
        raise AuditError(f"arm {arm}: degenerate output for pairs {', '.join(bad[:8])}; metrics would be computed over garbage (on a GPU try dtype = \"float32\")")


# ----------------------------------------------------------------------------- the run


def run_case(case: Case, out: Path, *, force: bool = False, allow_partial: bool = False,
             allow_unsafe_pickle: bool = False, allow_download: bool = False, argv: list[str] | None = None,
             progress: bool = True) -> dict:
    from .environment import capture, git_commit
    from .metrics import compute_metrics
    from .models.tiny import carlos_home

    paths, inputs, inspection = intake(case, allow_unsafe_pickle=allow_unsafe_pickle)
    prompts, prompt_source = load_prompts(case.protocol["prompts"], case.base_dir)
    prepare_case_dir(out, case, force)
    store = CaseStore(out)
    run_info = read_json(out / "run.json")

    lp, emb, load_state, determinism = load_models(case, paths, inspection, allow_partial=allow_partial,
                                                   allow_download=allow_download,
                                                   allow_unsafe_pickle=allow_unsafe_pickle)

    pc = case.protocol
    params = GenerationParams(pc["steps"], pc["guidance_scale"], pc["width"], pc["height"],
                              type(lp.pipe.scheduler).__name__, pc["negative_prompt"])
    env = capture(lp.device, lp.dtype, determinism)
    env_key = {k: env["packages"][k] for k in ("torch", "diffusers", "transformers", "peft")} | {"device": lp.device, "dtype": lp.dtype}
    session = Session(case, store, lp.pipe, lp, emb, params, list(case.lora["trigger_words"]),
                      BaseImageCache(carlos_home() / "base-cache"), env_key, pc["batch_size"])
    pairs = enumerate_pairs(prompts, pc["seeds"], pc["batch_size"])
    base_arm, lora_arm = arms_for(case)
    stats = {}
    for arm in (base_arm, lora_arm):
        stats[arm.name] = run_arm(session, arm, pairs, progress)

    pair_rows = collect_pairs(store, pairs, (base_arm, lora_arm))
    base_f = store.features("base", [p.id for p in pairs])
    lora_f = store.features("lora", [p.id for p in pairs])
    metrics = compute_metrics(lora_f, base_f, pair_rows, n_resamples=pc["bootstrap_resamples"], seed=pc["bootstrap_seed"])
    write_json_atomic(out / "metrics.json", metrics)

    end_inputs = hash_inputs([{"role": e["role"], "path": e["path"]} for e in inputs])
    custody = []
    for a, b in zip(inputs, end_inputs):
        custody.append({**a, "sha256_end": b["sha256"], "unchanged": a["sha256"] == b["sha256"]})
    signature = {
        "base_model": lp.identity, "base_model_sha256": lp.sha256,
        "embedder": emb.identity, "embedder_sha256": emb.sha256, "feature": "raw_image_features",
        "prompts_sha256": prompts_sha256(prompts), "seeds": list(pc["seeds"]),
        "lora_scale": case.lora["scale"], "trigger_policy": case.lora["trigger_policy"],
        "steps": pc["steps"], "guidance_scale": pc["guidance_scale"], "width": pc["width"], "height": pc["height"],
        "scheduler": params.scheduler,
    }
    manifest = {
        "schema": MANIFEST_SCHEMA,
        "case": dict(case.case),
        "tool": {"name": "carlos-audit", "version": __version__, "git_commit": git_commit()},
        "run": {"started_utc": run_info["started_utc"], "source_date_epoch": run_info["started_epoch"],
                "finished_utc": _utc_now(), "command": argv or ["carlos-audit", "run", str(case.path)],
                "stats": stats},
        "inputs": custody,
        "custody_ok": all(c["unchanged"] for c in custody),
        "base_model": {"source": case.base_model["source"], "identity": lp.identity, "sha256": lp.sha256,
                       "architecture": lp.architecture, "path": lp.path, "dtype": lp.dtype, "device": lp.device,
                       "pipeline": type(lp.pipe).__name__},
        "embedder": {"model": case.embedder["model"], "pretrained": case.embedder.get("pretrained"),
                     "identity": emb.identity, "sha256": emb.sha256, "feature_dim": emb.feature_dim,
                     "features": "raw image features (encode_image, normalize=False)",
                     "preprocess": emb.preprocess_description},
        "lora": {"path": str(paths["lora"]), "file_name": paths["lora"].name,
                 "sha256": next(e["sha256"] for e in inputs if e["role"] == "lora"),
                 "scale": case.lora["scale"], "trigger_words": list(case.lora["trigger_words"]),
                 "trigger_policy": case.lora["trigger_policy"], "load": load_state, "inspection": inspection},
        "protocol": {"prompts": case.protocol["prompts"], "prompt_source": prompt_source,
                     "prompts_sha256": prompts_sha256(prompts), "n_prompts": len(prompts),
                     "seeds": list(pc["seeds"]), **params.as_dict(), "batch_size": pc["batch_size"],
                     "bootstrap_resamples": pc["bootstrap_resamples"], "bootstrap_seed": pc["bootstrap_seed"],
                     "arms": {a.name: {"adapter": a.adapter, "scale": a.scale, "with_triggers": a.with_triggers}
                              for a in (base_arm, lora_arm)}},
        "signature": signature,
        "prompts": [{"id": p.id, "category": p.category, "subcategory": p.subcategory, "text": p.text} for p in prompts],
        "pairs": pair_rows,
        "results": {"metrics.json": sha256_file(out / "metrics.json")},
        "environment": env,
    }
    write_manifest(out, manifest)
    if not manifest["custody_ok"]:
        changed = [c["role"] for c in custody if not c["unchanged"]]
        raise AuditError(f"input file(s) changed during the run ({', '.join(changed)}): the run is marked invalid in manifest.json")
    return {"out": str(out), "manifest": manifest, "metrics": metrics}


def write_manifest(out: Path, manifest: dict) -> None:
    """manifest.json and, beside it, its sha256 (sha256sum format) for verify."""
    write_json_atomic(out / "manifest.json", manifest)
    write_text_atomic(out / "manifest.json.sha256", f"{sha256_file(out / 'manifest.json')}  manifest.json\n")


def collect_pairs(store: CaseStore, pairs: list[Pair], arms) -> list[dict]:
    """The manifest's pair rows, from the unit records on disk."""
    recs = {}
    for arm in arms:
        for b in batches(pairs):
            unit = store.unit_done(arm.name, b[0].batch)
            for e in unit["pairs"]:
                recs.setdefault(e["pair_id"], {})[arm.name] = {k: e[k] for k in ("prompt", "image", "image_sha256", "embedding", "embedding_sha256")}
    rows = []
    for p in pairs:
        rows.append({"pair_id": p.id, "prompt_id": p.prompt.id, "category": p.prompt.category,
                     "subcategory": p.prompt.subcategory, "seed": p.seed, "batch": p.batch, "position": p.position,
                     "arms": recs[p.id]})
    return rows
