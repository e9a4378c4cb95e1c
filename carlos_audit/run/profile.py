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

import sys
from dataclasses import dataclass
from pathlib import Path


from carlos_audit import __version__
from carlos_audit.analysis.case_analysis import analyse_case
from carlos_audit.case.casefile import Case, expand_path
from carlos_audit.case.protocol import (
    Pair,
    batches,
    enumerate_pairs,
    load_prompts,
    prompts_sha256,
)
from carlos_audit.case.signature import case_signature, reproducibility_key
from carlos_audit.errors import AuditError
from carlos_audit.fileio import read_json
from carlos_audit.hashing import sha256_file
from carlos_audit.records import Manifest
from carlos_audit.run.arms import Arm, plan_arms
from carlos_audit.run.embed import store_label_signatures, store_text_features
from carlos_audit.run.generate import (
    GenerationParams,
    generate_batch,
    set_adapter_state,
)
from carlos_audit.run.intake import intake, prepare_case_dir, utc_now
from carlos_audit.run.load import base_model_record, load_lora, load_models
from carlos_audit.run.hostchain import HostChain, Produced, finish_unit
from carlos_audit.run.store import BaseImageCache, CaseStore, hash_inputs

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
    environment: dict  # the run's environment record (environment.capture + fast path)
    batch_size: int

    def cache_key(self, prompts_sent: list[str], seeds: list[int]) -> tuple[str, dict]:
        """The base-image cache key of one batch: the reproducibility key (case/signature.py)."""
        marked = (getattr(self.base_info, "watermarker", None) or {}).get("applied")  # keyed only when on
        return reproducibility_key(base_model=self.base_info.sha256, params=self.params.as_dict(),
                                   batch_size=self.batch_size, prompts_sent=prompts_sent, seeds=seeds,
                                   environment=self.environment, extra={"watermarker": True} if marked else None)


def run_arm(s: Session, arm: Arm, pairs: list[Pair], progress: bool = True) -> dict:
    """Generate and embed every batch of one arm that is not already done. Returns stats."""
    from tqdm import tqdm

    all_batches = batches(pairs)
    todo = [b for b in all_batches if s.store.unit_done(arm.name, b[0].batch) is None]
    stats = {"generated_batches": 0, "cached_batches": 0, "skipped_batches": len(all_batches) - len(todo)}
    bar = tqdm(todo, desc=f"{arm.name:>10}", unit="batch", disable=not progress, file=sys.stderr, leave=False)

    def done(record: dict) -> None:
        stats["cached_batches" if record["source"] == "base-cache" else "generated_batches"] += 1

    with HostChain(s, on_done=done) as chain:  # batch k written while batch k+1 generates
        for batch in bar:
            chain.submit(produce_batch(s, arm, batch))
    bar.close()
    return stats


def run_batch(s: Session, arm: Arm, batch: list[Pair]) -> dict:
    """One unit of work: one arm of one batch of pairs, generated (or, for an arm without adapter,
    taken from the base-image cache), embedded and written to ``s.store``; its record is written
    last. The one implementation used by ``run_arm`` (pipelined, run/hostchain.py) and by the
    build engines (engines/units.py). Returns the unit record, with the hook-counted ``cost``."""
    return finish_unit(s, produce_batch(s, arm, batch))


def produce_batch(s: Session, arm: Arm, batch: list[Pair]) -> Produced:
    """The device side of a unit: its images generated, or its PNGs from the base-image cache."""
    from carlos_audit.run import cost

    before = cost.snapshot()
    prompts_sent = [arm.prompt_for(p.prompt.text, s.triggers) for p in batch]
    seeds = [p.seed for p in batch]
    key = desc = pngs = images = None
    if arm.adapter is None:
        key, desc = s.cache_key(prompts_sent, seeds)
        pngs = s.cache.get(key, len(batch))
    if pngs is None:
        set_adapter_state(s.pipe, arm.adapter, arm.scale)
        images = generate_batch(s.pipe, prompts_sent, seeds, s.params)
    return Produced(arm, batch, prompts_sent, seeds, "base-cache" if pngs is not None else "generated", images, pngs,
                    key, desc, cost.delta(before))


# ----------------------------------------------------------------------------- the run


def make_session(case: Case, store: CaseStore, lp, emb, determinism: dict) -> tuple[Session, dict]:
    """The Session a run generates with, and the environment record of its manifest."""
    from carlos_audit.models.tiny import carlos_home
    from carlos_audit.run.environment import capture

    pc = case.protocol
    params = GenerationParams.from_protocol(pc, type(lp.pipe.scheduler).__name__)
    env = capture(lp.device, lp.dtype, determinism, fastpath=lp.fastpath)
    session = Session(case, store, lp.pipe, lp, emb, params, list(case.lora["trigger_words"]),
                      BaseImageCache(carlos_home() / "base-cache"), env, pc["batch_size"])
    return session, env


def run_case(case: Case, out: Path, **kwargs) -> dict:
    """Profile ``case`` into case folder ``out``, holding the folder's lock (run/lock.py)."""
    from carlos_audit.run.lock import case_lock

    with case_lock(out):
        return profile_case(case, out, **kwargs)


def profile_case(case: Case, out: Path, *, force: bool = False, allow_partial: bool = False,
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
    signature = case_signature(case, prompts, base_model=lp.identity, base_model_sha256=lp.sha256,
                               embedder=emb.identity, embedder_sha256=emb.sha256, scheduler=params.scheduler)
    corpus_path = expand_path(case.reference["corpus"], case.base_dir) if case.reference.get("corpus") else None
    allow_incompatible = allow_incompatible or case.reference["allow_incompatible"]
    if corpus_path is not None:
        from carlos_audit.corpus.placement import check_corpus_signature

        check_corpus_signature(corpus_path, signature, allow_incompatible)
        from carlos_audit.analysis.replication import check_replicate_id

        check_replicate_id(corpus_path, case.reference["replicate_id"])
    pairs = enumerate_pairs(prompts, pc["seeds"], pc["batch_size"])
    lora_sha = next(e["sha256"] for e in inputs if e["role"] == "lora")
    comparisons = load_comparisons(lp.pipe, paths, inputs, allow_partial, allow_unsafe_pickle)
    plan = plan_arms(case, lora_sha, comparisons)
    from carlos_audit.run.looks import run_protocol

    pairs, stats, sequential = run_protocol(session, plan, pairs, prompts, corpus_path, lora_sha,
                                            lambda arm, todo: run_arm(session, arm, todo, progress))

    pair_rows = collect_pairs(store, pairs, plan.arms.values())
    ind = case.indicators
    text_records = store_text_features(store, emb, prompts) if ind["prompt_override"] else None
    labels = store_label_signatures(store, emb, list(ind["labels"])) if ind["effect_labels"] else None
    from carlos_audit.run.claimed import store_claimed_works

    claimed = store_claimed_works(store, emb, case)
    manifest = Manifest(
        case=dict(case.case),
        tool={"name": "carlos-audit", "version": __version__, "git_commit": git_commit()},
        run={"started_utc": run_info["started_utc"], "source_date_epoch": run_info["started_epoch"],
             "finished_utc": None, "command": list(argv or ["carlos-audit", "run", str(case.path)]),
             "stats": stats},
        inputs=inputs,  # with their end hashes once the results are written (custody)
        custody_ok=False,
        base_model=base_model_record(case, lp),
        embedder={"model": case.embedder["model"], "pretrained": case.embedder.get("pretrained"),
                  "identity": emb.identity, "sha256": emb.sha256, "feature_dim": emb.feature_dim,
                  "features": "raw image features (encode_image, normalize=False)",
                  "preprocess": emb.preprocess_description},
        lora={"path": str(paths["lora"]), "file_name": paths["lora"].name, "sha256": lora_sha,
              "scale": case.lora["scale"], "trigger_words": list(case.lora["trigger_words"]),
              "trigger_policy": case.lora["trigger_policy"], "load": load_state, "inspection": inspection},
        protocol={"prompts": case.protocol["prompts"], "prompt_source": prompt_source,
                  "prompts_sha256": prompts_sha256(prompts), "n_prompts": len(prompts),
                  "seeds": list(pc["seeds"]), **params.as_dict(), "batch_size": pc["batch_size"],
                  "bootstrap_resamples": pc["bootstrap_resamples"], "bootstrap_seed": pc["bootstrap_seed"],
                  "scales": list(pc["scales"]),
                  "arms": {a.name: {"adapter": a.adapter, "scale": a.scale, "with_triggers": a.with_triggers,
                                    "lora_sha256": a.lora_sha256} for a in plan.arms.values()},
                  "arm_aliases": plan.alias, "profiles": {k: list(v) for k, v in plan.profiles.items()}},
        comparison_loras=[{k: c[k] for k in ("adapter", "path", "sha256", "load")} for c in comparisons],
        text_features=text_records,
        label_signatures=labels,
        claimed_works=claimed,
        cost=case_cost(store, plan, pairs),
        signature=signature,
        prompts=[{"id": p.id, "category": p.category, "subcategory": p.subcategory, "text": p.text} for p in prompts],
        pairs=pair_rows,
        results={},
        environment=env,
        sequential=sequential,
    )
    # the analysis step (model-free): the same code `carlos-audit analyse CASE_DIR` runs
    metrics, comparison = analyse_case(out, manifest, case, allow_incompatible=allow_incompatible)
    manifest.results = {r.FILE: sha256_file(r.write(out)) for r in (metrics, comparison) if r is not None}

    end_inputs = hash_inputs([{"role": e["role"], "path": e["path"]} for e in inputs])
    manifest.inputs = [{**a, "sha256_end": b["sha256"], "unchanged": a["sha256"] == b["sha256"]}
                       for a, b in zip(inputs, end_inputs)]
    manifest.custody_ok = all(c["unchanged"] for c in manifest.inputs)
    manifest.run["finished_utc"] = utc_now()
    manifest.write(out)
    if not manifest.custody_ok:
        changed = [c["role"] for c in manifest.inputs if not c["unchanged"]]
        raise AuditError(f"input file(s) changed during the run ({', '.join(changed)}): the run is marked invalid in manifest.json")
    return {"out": str(out), "manifest": manifest.to_json(), "metrics": metrics.to_json(),
            "comparison": comparison.to_json() if comparison is not None else None}


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
