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

import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from carlos_audit import __version__
from carlos_audit.case.casefile import Case, expand_path
from carlos_audit.case.protocol import (
    Pair,
    batches,
    enumerate_pairs,
    load_prompts,
    prompts_sha256,
)
from carlos_audit.errors import AuditError
from carlos_audit.fileio import read_json, write_json_atomic, write_text_atomic
from carlos_audit.hashing import sha256_bytes, sha256_file, sha256_json
from carlos_audit.run.generate import (
    GenerationParams,
    generate_batch,
    set_adapter_state,
)
from carlos_audit.run.store import BaseImageCache, CaseStore, hash_inputs, png_bytes

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
    lora_sha256: str | None = None  # the adapter's file: two arms of the same file are one arm

    def prompt_for(self, text: str, triggers: list[str]) -> str:
        # the upstream CARLoS convention: ", <trigger>" appended for each trigger word
        return text + "".join(f", {t}" for t in triggers) if self.with_triggers else text

    @property
    def spec(self) -> tuple:
        return (self.lora_sha256, self.scale if self.adapter else 0.0, self.with_triggers)


def arms_for(case: Case, lora_sha256: str | None = None) -> tuple[Arm, Arm]:
    policy = case.lora["trigger_policy"]
    has = bool(case.lora["trigger_words"])  # without trigger words the flag changes nothing
    base = Arm("base", None, 0.0, has and policy == "both")
    lora = Arm("lora", TARGET_ADAPTER, case.lora["scale"], has and policy in ("both", "lora_only"), lora_sha256)
    return base, lora


@dataclass
class ArmPlan:
    """The arms a case generates (each spec once) and the profiles (base arm, LoRA arm) built
    from them. A profile whose arms equal another's shares them: nothing is generated twice."""

    arms: dict  # name -> Arm, unique specs, generation order
    alias: dict  # requested name -> name of the arm that generates it
    profiles: dict  # profile name -> (base arm name, LoRA arm name)

    def add(self, arm: Arm) -> str:
        for name, a in self.arms.items():
            if a.spec == arm.spec:
                self.alias[arm.name] = name
                return name
        self.arms[arm.name] = arm
        self.alias[arm.name] = arm.name
        return arm.name


def plan_arms(case: Case, lora_sha256: str, comparisons: list[dict]) -> ArmPlan:
    policy = case.lora["trigger_policy"]
    has = bool(case.lora["trigger_words"])
    trig = has and policy in ("both", "lora_only")
    plan = ArmPlan({}, {}, {})
    base_arm, lora_arm = arms_for(case, lora_sha256)
    base, lora = plan.add(base_arm), plan.add(lora_arm)
    plan.profiles["main"] = (base, lora)
    for s in case.protocol["scales"]:
        plan.profiles[f"scale:{s:g}"] = (base, plan.add(Arm(f"lora-s{s:g}", TARGET_ADAPTER, s, trig, lora_sha256)))
    if case.indicators["trigger_dependence"]:
        nb = plan.add(Arm("base-notrig", None, 0.0, False))
        nl = plan.add(Arm("lora-notrig", TARGET_ADAPTER, case.lora["scale"], False, lora_sha256))
        plan.profiles["trigger:without"] = (nb, nl)
        if policy == "none":
            plan.profiles["trigger:with"] = (plan.add(Arm("base-trig", None, 0.0, has)),
                                             plan.add(Arm("lora-trig", TARGET_ADAPTER, case.lora["scale"], has, lora_sha256)))
        else:
            plan.profiles["trigger:with"] = (base, lora)
    for c in comparisons:
        plan.profiles[f"comparison:{c['adapter']}"] = (base, plan.add(Arm(c["adapter"], c["adapter"], case.lora["scale"], trig, c["sha256"])))
    return plan


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
    for i, c in enumerate(case.comparison["loras"], start=1):
        cp = expand_path(c, case.base_dir)
        if not cp.is_file():
            raise AuditError(f"{case.path}: comparison.loras[{i - 1}] {cp} does not exist or is not a file")
        paths[f"comparison_lora_{i}"] = cp
    return paths


def intake(case: Case, *, allow_unsafe_pickle: bool = False) -> tuple[dict, list[dict], dict]:
    from carlos_audit.lora.fileformat import check_not_pickle, validate_safetensors
    from carlos_audit.lora.intake import inspect_lora

    paths = resolve_inputs(case)
    for role, p in paths.items():
        if not p.exists():
            raise AuditError(f"{case.path}: {role} {p} does not exist")
    for role, p in paths.items():
        if role == "lora" or role.startswith("comparison_lora_"):
            check_not_pickle(p, allow_unsafe_pickle=allow_unsafe_pickle)
            if p.suffix.lower() == ".safetensors":
                validate_safetensors(p)
    inputs = hash_inputs([{"role": r, "path": str(p)} for r, p in paths.items()])
    by_role = {e["role"]: e for e in inputs}
    for role, section in (("lora", case.lora), ("base_model", case.base_model), ("embedder", case.embedder)):
        want = section.get("sha256")
        if want and role in by_role and by_role[role]["sha256"] != want.lower():
            raise AuditError(f"{role} {by_role[role]['path']}: sha256 {by_role[role]['sha256']} does not match the expected {want.lower()} in the case file")
    inspection = inspect_lora(paths["lora"], allow_unsafe_pickle=allow_unsafe_pickle)
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
                                "started_epoch": _now_epoch()})
        write_text_atomic(out / "case.toml", case.raw_text)


def _now_epoch() -> int:
    """The time recorded in run.json and the manifest: now, or SOURCE_DATE_EPOCH when it is set
    (the reproducible-builds convention: two builds of the same corpus then write the same bytes)."""
    sde = os.environ.get("SOURCE_DATE_EPOCH", "").strip()
    if sde.isdigit():
        return int(sde)
    return int(time.time())


def _utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(_now_epoch()))


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
_LOADED: dict = {}


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
    cached = _LOADED.get(key)
    if cached is not None:
        lp, emb = cached
        lp.pipe.unload_lora_weights()  # removes the adapter layers; the base weights were never touched
    else:
        _LOADED.clear()
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
        _LOADED[key] = (lp, emb)
    from carlos_audit.run.cost import install_embedder_hooks, install_pipeline_hooks

    install_pipeline_hooks(lp.pipe)  # counting only (cost.py); idempotent on the cached pipeline
    install_embedder_hooks(emb)
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

    all_batches = batches(pairs)
    todo = [b for b in all_batches if s.store.unit_done(arm.name, b[0].batch) is None]
    stats = {"generated_batches": 0, "cached_batches": 0, "skipped_batches": len(all_batches) - len(todo)}
    bar = tqdm(todo, desc=f"{arm.name:>10}", unit="batch", disable=not progress, file=sys.stderr, leave=False)
    for batch in bar:
        record = run_batch(s, arm, batch)
        stats["cached_batches" if record["source"] == "base-cache" else "generated_batches"] += 1
    bar.close()
    return stats


def run_batch(s: Session, arm: Arm, batch: list[Pair]) -> dict:
    """One unit of work: one arm of one batch of pairs, generated (or, for an arm without adapter,
    taken from the base-image cache), embedded and written to ``s.store``; its record is written
    last. The one implementation used by ``run_arm`` and by the build engines (engines/units.py).
    Returns the unit record, with the hook-counted ``cost`` of producing it."""
    import io

    from PIL import Image

    from carlos_audit.run import cost
    from carlos_audit.run.embed import image_features

    before = cost.snapshot()
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
    # embed what was stored (decoded PNG), so embeddings are reproducible from the files alone
    images = [Image.open(io.BytesIO(b)).convert("RGB") for b in pngs]
    feats = image_features(s.embedder, images)
    check_finite(arm.name, batch, images, feats)
    spent = cost.delta(before)
    spent["images_generated"] = len(batch) if source == "generated" else 0
    return s.store.write_unit(arm.name, batch[0].batch, pngs, feats, [p.id for p in batch], prompts_sent, seeds, source,
                              cost=spent)


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


def make_session(case: Case, store: CaseStore, lp, emb, determinism: dict) -> tuple[Session, dict]:
    """The Session a run generates with, and the environment record of its manifest."""
    from carlos_audit.models.tiny import carlos_home
    from carlos_audit.run.environment import capture

    pc = case.protocol
    params = GenerationParams(pc["steps"], pc["guidance_scale"], pc["width"], pc["height"],
                              type(lp.pipe.scheduler).__name__, pc["negative_prompt"])
    env = capture(lp.device, lp.dtype, determinism)
    env_key = {k: env["packages"][k] for k in ("torch", "diffusers", "transformers", "peft")} | {"device": lp.device, "dtype": lp.dtype}
    fastpath = getattr(lp, "fastpath", None)
    if fastpath is not None:
        env["fastpath"] = fastpath
        if fastpath.get("active"):  # settings that change the numbers are part of the cache key
            env_key["fastpath"] = fastpath
    session = Session(case, store, lp.pipe, lp, emb, params, list(case.lora["trigger_words"]),
                      BaseImageCache(carlos_home() / "base-cache"), env_key, pc["batch_size"])
    return session, env


def run_case(case: Case, out: Path, *, force: bool = False, allow_partial: bool = False,
             allow_unsafe_pickle: bool = False, allow_download: bool = False, argv: list[str] | None = None,
             progress: bool = True, allow_incompatible: bool = False) -> dict:
    from carlos_audit.run.cost import case_cost
    from carlos_audit.run.environment import git_commit

    paths, inputs, inspection = intake(case, allow_unsafe_pickle=allow_unsafe_pickle)
    prompts, prompt_source = load_prompts(case.protocol["prompts"], case.base_dir)
    prepare_case_dir(out, case, force)
    store = CaseStore(out)
    run_info = read_json(out / "run.json")

    lp, emb, load_state, determinism = load_models(case, paths, inspection, allow_partial=allow_partial,
                                                   allow_download=allow_download,
                                                   allow_unsafe_pickle=allow_unsafe_pickle)

    pc = case.protocol
    session, env = make_session(case, store, lp, emb, determinism)
    params = session.params
    signature = {
        "base_model": lp.identity, "base_model_sha256": lp.sha256,
        "embedder": emb.identity, "embedder_sha256": emb.sha256, "feature": "raw_image_features",
        "prompts_sha256": prompts_sha256(prompts), "seeds": list(pc["seeds"]),
        "lora_scale": case.lora["scale"], "trigger_policy": case.lora["trigger_policy"],
        "steps": pc["steps"], "guidance_scale": pc["guidance_scale"], "width": pc["width"], "height": pc["height"],
        "scheduler": params.scheduler,
    }
    corpus_path = expand_path(case.reference["corpus"], case.base_dir) if case.reference.get("corpus") else None
    allow_incompatible = allow_incompatible or case.reference["allow_incompatible"]
    if corpus_path is not None:
        from carlos_audit.corpus.placement import check_corpus_signature

        check_corpus_signature(corpus_path, signature, allow_incompatible)
    pairs = enumerate_pairs(prompts, pc["seeds"], pc["batch_size"])
    lora_sha = next(e["sha256"] for e in inputs if e["role"] == "lora")
    comparisons = load_comparisons(lp.pipe, paths, inputs, allow_partial, allow_unsafe_pickle)
    plan = plan_arms(case, lora_sha, comparisons)
    stats = {}
    for arm in plan.arms.values():
        stats[arm.name] = run_arm(session, arm, pairs, progress)

    pair_rows = collect_pairs(store, pairs, plan.arms.values())
    text_records = store_text_features(store, emb, prompts) if case.indicators["prompt_override"] else None
    metrics = analyse(case, store, plan, pairs, pair_rows, emb, text_records)
    write_json_atomic(out / "metrics.json", metrics)
    if comparisons:
        head_to_head(case, store, plan, pairs, pair_rows, paths, comparisons)
    if corpus_path is not None:
        from carlos_audit.corpus.placement import compare_with_corpus

        compare_with_corpus(out, corpus_path, top_k=case.reference["top_k"], allow_incompatible=allow_incompatible,
                            signature=signature, lora_sha256=lora_sha)

    end_inputs = hash_inputs([{"role": e["role"], "path": e["path"]} for e in inputs])
    custody = []
    for a, b in zip(inputs, end_inputs):
        custody.append({**a, "sha256_end": b["sha256"], "unchanged": a["sha256"] == b["sha256"]})
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
                     "scales": list(pc["scales"]),
                     "arms": {a.name: {"adapter": a.adapter, "scale": a.scale, "with_triggers": a.with_triggers,
                                       "lora_sha256": a.lora_sha256} for a in plan.arms.values()},
                     "arm_aliases": plan.alias, "profiles": {k: list(v) for k, v in plan.profiles.items()}},
        "comparison_loras": [{k: c[k] for k in ("adapter", "path", "sha256", "load")} for c in comparisons],
        "text_features": text_records,
        "cost": case_cost(store, plan, pairs),
        "signature": signature,
        "prompts": [{"id": p.id, "category": p.category, "subcategory": p.subcategory, "text": p.text} for p in prompts],
        "pairs": pair_rows,
        "results": {name: sha256_file(out / name) for name in ("metrics.json", "comparison.json") if (out / name).is_file()},
        "environment": env,
    }
    write_manifest(out, manifest)
    if not manifest["custody_ok"]:
        changed = [c["role"] for c in custody if not c["unchanged"]]
        raise AuditError(f"input file(s) changed during the run ({', '.join(changed)}): the run is marked invalid in manifest.json")
    return {"out": str(out), "manifest": manifest, "metrics": metrics}


def load_comparisons(pipe, paths: dict, inputs: list[dict], allow_partial: bool, allow_unsafe_pickle: bool) -> list[dict]:
    """Load each comparison LoRA as its own adapter (cmp1, cmp2, ...); one with the target's
    file hash needs no adapter (its arm is the target's arm)."""
    from carlos_audit.lora.intake import inspect_lora

    sha = {e["role"]: e["sha256"] for e in inputs}
    out = []
    for role in sorted((r for r in paths if r.startswith("comparison_lora_")), key=lambda r: int(r.rsplit("_", 1)[1])):
        adapter = "cmp" + role.rsplit("_", 1)[1]
        p = paths[role]
        entry = {"adapter": adapter, "path": str(p), "sha256": sha[role], "load": None}
        if sha[role] != sha["lora"]:
            inspection = inspect_lora(p, allow_unsafe_pickle=allow_unsafe_pickle)
            entry["load"] = load_lora(pipe, p, adapter, inspection, allow_partial)
        out.append(entry)
    return out


def store_text_features(store: CaseStore, emb, prompts) -> dict:
    """Raw text features of each prompt as the user wrote it (no trigger words)."""
    from carlos_audit.fileio import write_bytes_atomic
    from carlos_audit.run.embed import text_features
    from carlos_audit.run.store import npy_bytes

    feats = text_features(emb, [p.text for p in prompts])
    records = {}
    for p, f in zip(prompts, feats):
        data = npy_bytes(f)
        rel = f"embeddings/text/{p.id}.npy"
        write_bytes_atomic(store.path(rel), data)
        records[p.id] = {"path": rel, "sha256": sha256_bytes(data)}
    return records


def _diffs(store: CaseStore, plan: ArmPlan, profile: str, ids: list[str]) -> np.ndarray:
    from carlos_audit.analysis.metrics import diffs

    b, l = plan.profiles[profile]
    return diffs(store.features(l, ids), store.features(b, ids))


def analyse(case: Case, store: CaseStore, plan: ArmPlan, pairs, pair_rows, emb, text_records) -> dict:
    """metrics.json: the CARLoS representation of the main profile, then the indicators."""
    from carlos_audit.analysis import indicators as ind
    from carlos_audit.analysis.metrics import compute_metrics, diffs
    from carlos_audit.run.embed import text_features

    pc = case.protocol
    ids = [p.id for p in pairs]
    prompt_ids = [p.prompt.id for p in pairs]
    b, l = plan.profiles["main"]
    base_f, lora_f = store.features(b, ids), store.features(l, ids)
    metrics = compute_metrics(lora_f, base_f, pair_rows, n_resamples=pc["bootstrap_resamples"], seed=pc["bootstrap_seed"])
    n, seed = pc["bootstrap_resamples"], pc["bootstrap_seed"]
    d_main = diffs(lora_f, base_f)
    extra = {}
    if pc["scales"]:
        by_scale = {case.lora["scale"]: d_main}
        by_scale.update({s: _diffs(store, plan, f"scale:{s:g}", ids) for s in pc["scales"]})
        extra["dose_response"] = ind.dose_response(by_scale, prompt_ids, n, seed)
    if "trigger:without" in plan.profiles:
        shared = plan.profiles["trigger:with"] == plan.profiles["trigger:without"]
        extra["trigger_dependence"] = ind.trigger_dependence(
            _diffs(store, plan, "trigger:with", ids), _diffs(store, plan, "trigger:without", ids),
            list(case.lora["trigger_words"]), prompt_ids, n, seed, shared)
    if text_records is not None:
        text = np.stack([np.load(store.path(text_records[p.prompt.id]["path"])) for p in pairs])
        extra["prompt_override"] = ind.prompt_override(text, base_f, lora_f, prompt_ids, n, seed)
    extra["scope"] = ind.scope(d_main, [p.prompt.category for p in pairs], prompt_ids, n, seed)
    if case.indicators["effect_labels"]:
        retrieval, _ = load_prompts("builtin:retrieval")
        extra["effect_labels"] = ind.effect_labels(
            np.array(metrics["direction"]), lambda texts: text_features(emb, texts), [p.text for p in retrieval],
            list(case.indicators["labels"]), case.indicators["top_labels"])
    metrics["indicators"] = extra
    return metrics


def head_to_head(case: Case, store: CaseStore, plan: ArmPlan, pairs, pair_rows, paths: dict, comparisons: list[dict]) -> None:
    """comparison.json ``head_to_head``: behaviour (shared base arm) and weights, per comparison LoRA."""
    from carlos_audit.analysis.head_to_head import behaviour, weights
    from carlos_audit.fileio import update_json

    ids = [p.id for p in pairs]
    d_t = _diffs(store, plan, "main", ids)
    results = []
    for i, c in enumerate(comparisons, start=1):
        prof = f"comparison:{c['adapter']}"
        results.append({
            "lora": {"path": c["path"], "file_name": Path(c["path"]).name, "sha256": c["sha256"]},
            "arm": plan.profiles[prof][1],
            "behaviour": behaviour(d_t, _diffs(store, plan, prof, ids), pair_rows,
                                   case.protocol["bootstrap_resamples"], case.protocol["bootstrap_seed"]),
            "weights": weights(paths["lora"], paths[f"comparison_lora_{i}"]),
        })
    update_json(store.path("comparison.json"), "head_to_head", results)


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
