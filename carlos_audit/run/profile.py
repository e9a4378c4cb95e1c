"""The generation step of a case run, up to "units generated", each step writing files into the
case folder:

    prepare_run     intake (hash every input, refuse what cannot be examined soundly), the case
                    folder prepared, base pipeline (+ LoRA as adapter "target") and embedder loaded
    generate_units  for each arm and batch: images (base arm from the shared cache when present)
                    and their raw CLIP image features; text features; the run record
                    (records.RunRecord, units/generation.json)

What follows needs no model (pipeline.finish_case: analysis, manifest, custody). A run killed
anywhere resumes: finished (arm, batch) units are never generated again.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace

from carlos_audit.case.casefile import Case
from carlos_audit.case.options import RunOptions
from carlos_audit.case.protocol import Pair, batches, enumerate_pairs
from carlos_audit.case.signature import bits_environment, case_signature, key_params, reproducibility_key
from carlos_audit.casefolder.binding import InputBinding
from carlos_audit.errors import AuditError
from carlos_audit.records import RunRecord
from carlos_audit.run.arms import Arm, plan_arms
from carlos_audit.run.embed import store_label_signatures, store_text_features
from carlos_audit.run.generate import (
    GenerationParams,
    generate_batch,
    set_adapter_state,
)
from carlos_audit.run.intake import bind_run, input_binding, prepare_case_dir, read_inputs
from carlos_audit.run.load import ModelCache, base_model_record, load_lora, load_models
from carlos_audit.run.hostchain import HostChain, Produced, finish_unit
from carlos_audit.casefolder.unit_store import BaseImageCache, CaseStore

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
    prompts_sha256: str | None = None  # the prompt set's hash, recorded in every unit (its inputs)

    def cache_key(self, prompts_sent: list[str], seeds: list[int]) -> tuple[str, dict]:
        """The base-image cache key of one batch: the reproducibility key (case/signature.py)."""
        marked = self.watermarked()  # keyed only when on
        return reproducibility_key(base_model=self.base_info.sha256, params=key_params(self.params.as_dict(), self.params.scheduler),
                                   batch_size=self.batch_size, prompts_sent=prompts_sent, seeds=seeds,
                                   environment=self.environment, extra={"watermarker": True} if marked else None)

    def watermarked(self) -> bool:
        return bool((getattr(self.base_info, "watermarker", None) or {}).get("applied"))

    def binding(self, files: InputBinding) -> InputBinding:
        """``files`` (the intake's part, run/intake.input_binding) with what loading decided: the
        base model's and embedder's sha256 and the run-wide parts of the reproducibility key."""
        return replace(files, models={"base_model": self.base_info.sha256, "embedder": self.embedder.sha256},
                       key={"params": key_params(self.params.as_dict(), self.params.scheduler),
                            "batch_size": self.batch_size, "environment": bits_environment(self.environment),
                            "watermarker": self.watermarked()})


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

    counter = cost.counter_of(s.pipe)
    before = counter.snapshot()
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
                    key, desc, counter.delta(before))


# ----------------------------------------------------------------------------- the run


def make_session(case: Case, store: CaseStore, lp, emb, determinism: dict,
                 prompts_sha256: str | None = None) -> tuple[Session, dict]:
    """The Session a run generates with, and the environment record of its manifest."""
    from carlos_audit.paths import carlos_home
    from carlos_audit.run.environment import capture

    pc = case.protocol
    params = GenerationParams.from_protocol(pc, type(lp.pipe.scheduler).__name__)
    env = capture(lp.device, lp.dtype, determinism, fastpath=lp.fastpath)
    session = Session(case, store, lp.pipe, lp, emb, params, list(case.lora.trigger_words),
                      BaseImageCache(carlos_home() / "base-cache"), env, pc.batch_size, prompts_sha256)
    return session, env


@dataclass
class PreparedRun:
    """A run after intake and loading, before any generation: what generate_units needs."""

    case: Case
    paths: dict
    inputs: list
    inspection: dict
    prompts: list
    prompt_source: str
    session: Session
    lora_load: dict
    signature: dict
    options: RunOptions = RunOptions()
    plan: object = None  # the arm plan (run/arms.ArmPlan), built once by generate_units
    loras: dict | None = None  # each LoRA file as intake read it (lora.fileformat.LoraFile by role)

    @property
    def lora_sha256(self) -> str:
        return next(e["sha256"] for e in self.inputs if e["role"] == "lora")

    @property
    def pairs(self) -> list[Pair]:
        pc = self.case.protocol
        return enumerate_pairs(self.prompts, pc.seeds, pc.batch_size)


def prepare_run(case: Case, store: CaseStore, options: RunOptions | None = None, *,
                prepare_folder: bool = True, models: ModelCache | None = None) -> PreparedRun:
    """intake (every input hashed or refused), the case folder prepared (``prepare_folder``; a
    build's worker writes into no folder), base pipeline + target LoRA + embedder loaded (kept in
    ``models``, the caller's cache; run/load.process_models() when None), and the signature of
    the profile this run will produce. A prepared folder is bound to the inputs read (a resume
    with other inputs refused before any model is loaded, run/intake.bind_run)."""
    options = options or RunOptions()
    got = read_inputs(case, allow_unsafe_pickle=options.allow_unsafe_pickle)
    paths, inputs, inspection = got.paths, got.inputs, got.inspection
    prompts, prompt_source = got.prompts, got.prompt_source
    files = input_binding(inputs, prompts)
    if prepare_folder:
        prepare_case_dir(store.root, case, options.force)
        bind_run(store.root, case, files, options.force)
    lp, emb, lora_load, determinism = load_models(case, paths, inspection, options, models)
    session, _ = make_session(case, store, lp, emb, determinism, files.prompts_sha256)
    if prepare_folder:
        bind_run(store.root, case, session.binding(files), options.force)
    signature = case_signature(case, prompts, base_model=lp.identity, base_model_sha256=lp.sha256,
                               embedder=emb.identity, embedder_sha256=emb.sha256, scheduler=session.params.scheduler)
    return PreparedRun(case, paths, inputs, inspection, prompts, prompt_source, session, lora_load, signature,
                       options, loras=got.loras)


def generate_units(prep: PreparedRun, progress: bool = True, protocol=None) -> RunRecord:
    """Every (arm, batch) unit of the case generated (resuming: finished units are skipped),
    the text features and label signatures stored; returns the run record, also written to the
    case folder (``units/generation.json``). Where run/ stops: the rest is model-free.
    ``protocol(session, plan, pairs, run_arm) -> (pairs run, stats, sequential record)`` decides
    which pairs run (pipeline.py passes looks.run_protocol, which reads the stored features
    between looks); without it every arm runs over every pair."""
    from carlos_audit.run import near_copy_arms

    s = prep.session
    near_copy_arms.check(prep.case)  # [near_copies]: refused before any generation when every work is blank
    comparisons = load_comparisons(s.pipe, prep.paths, prep.inputs, prep.options, prep.loras, prep.case.lora.convention)
    plan = prep.plan = plan_arms(prep.case, prep.lora_sha256, comparisons)

    def runner(arm, todo):
        return run_arm(s, arm, todo, progress)

    if protocol is None:
        stats, sequential = {arm.name: runner(arm, prep.pairs) for arm in plan.arms.values()}, None
    else:
        _, stats, sequential = protocol(s, plan, prep.pairs, runner)
    stats.update(near_copy_arms.generate(s, prep.case, prep.lora_sha256, runner))  # [near_copies]: its two arms
    record = run_record(prep, stats, comparisons, sequential)
    record.write(s.store.root)
    return record


def run_record(prep: PreparedRun, stats: dict, comparisons: list[dict], sequential: dict | None = None) -> RunRecord:
    """The run record of ``prep``: text features and label signatures stored through its store
    (a build's worker returns them to the driver), the models as loaded, the environment."""
    s, ind = prep.session, prep.case.indicators
    text = store_text_features(s.store, s.embedder, prep.prompts) if ind.prompt_override else None
    labels = store_label_signatures(s.store, s.embedder, list(ind.labels)) if ind.effect_labels else None
    emb, case = s.embedder, prep.case
    from carlos_audit.run.embed_works import store_claimed_works

    from carlos_audit.run.near_copy_arms import record as near_copy_record

    claimed = store_claimed_works(s.store, emb, case)
    return RunRecord(
        inputs=prep.inputs, inspection=prep.inspection, lora_path=str(prep.paths["lora"]), lora_load=prep.lora_load,
        prompt_source=prep.prompt_source, generation=s.params.as_dict(), stats=stats,
        comparison_loras=[{k: c[k] for k in ("adapter", "path", "sha256", "load")} for c in comparisons],
        base_model=base_model_record(case, s.base_info),
        embedder={"model": case.embedder.model, "pretrained": case.embedder.pretrained,
                  "identity": emb.identity, "sha256": emb.sha256, "feature_dim": emb.feature_dim,
                  "features": "raw image features (encode_image, normalize=False)",
                  "preprocess": emb.preprocess_description},
        environment=s.environment, signature=prep.signature, text_features=text, label_signatures=labels,
        sequential=sequential, claimed_works=claimed, near_copies=near_copy_record(s, case, prep.paths["lora"]))


class NoBaseCache:
    """A base-image cache that never hits: a regeneration (verify, reproduce) generates the base arm too."""

    def get(self, key: str, n: int):
        return None

    def put(self, key: str, images_png, description: dict) -> None:
        return None


def regenerate(prep: PreparedRun, manifest: dict, store: CaseStore, batch_ids=None, arm_names=None,
               progress: bool = False) -> object:
    """The one regeneration path of ``verify`` and ``reproduce``: the case's arm plan and pairs
    checked against the manifest's (refused when they differ), then each arm (``arm_names``, or
    every arm) of the batches ``batch_ids`` (or every batch) generated and embedded into
    ``store`` by ``run_arm`` (the run's own batch layout), the base-image cache bypassed. Returns
    the arm plan."""
    for what, now, then in (("base model", prep.session.base_info.sha256, manifest["base_model"]["sha256"]),
                            ("embedder", prep.session.embedder.sha256, manifest["embedder"]["sha256"])):
        if now != then:
            raise AuditError(f"refusing to regenerate, nothing generated: the {what} here ({now[:16]}…) differs from the recorded one ({str(then)[:16]}…)")
    session = replace(prep.session, store=store, cache=NoBaseCache())
    comparisons = load_comparisons(session.pipe, prep.paths, prep.inputs, prep.options, prep.loras,
                                   prep.case.lora.convention)
    plan = plan_arms(prep.case, prep.lora_sha256, comparisons)
    recorded = manifest["protocol"]["arms"]
    for name, arm in plan.arms.items():
        want = recorded.get(name)
        if want is None or [want["adapter"], want["scale"], want["with_triggers"], want["lora_sha256"]] != \
                [arm.adapter, arm.scale, arm.with_triggers, arm.lora_sha256]:
            raise AuditError(f"arm {name} regenerated here differs from the recorded one; the case and this carlos-audit disagree on the protocol")
    from carlos_audit.case.sequential_plan import run_pairs

    pairs = run_pairs(prep.pairs, manifest.get("sequential"))  # a sequential case: the looks it ran, never decided again
    if [p.id for p in pairs] != [r["pair_id"] for r in manifest["pairs"]]:
        raise AuditError("the pairs regenerated here differ from the manifest's")
    if batch_ids is not None:
        pairs = [p for p in pairs if p.batch in set(batch_ids)]
    for arm in plan.arms.values():
        if arm_names is None or arm.name in arm_names:
            run_arm(session, arm, pairs, progress)
    return plan


def load_comparisons(pipe, paths: dict, inputs: list[dict], options: RunOptions,
                     loras: dict | None = None, convention: str = "reference") -> list[dict]:
    """Load each comparison LoRA as its own adapter (cmp1, cmp2, ...); one with the target's
    file hash needs no adapter (its arm is the target's arm). ``loras``: the files as intake read
    them (inspected from those bytes)."""
    from carlos_audit.lora.inspection import inspect_lora

    sha = {e["role"]: e["sha256"] for e in inputs}
    out = []
    for role in sorted((r for r in paths if r.startswith("comparison_lora_")), key=lambda r: int(r.rsplit("_", 1)[1])):
        adapter = "cmp" + role.rsplit("_", 1)[1]
        p = paths[role]
        entry = {"adapter": adapter, "path": str(p), "sha256": sha[role], "load": None}
        if sha[role] != sha["lora"]:
            inspection = inspect_lora((loras or {}).get(role) or p, allow_unsafe_pickle=options.allow_unsafe_pickle)
            entry["load"] = load_lora(pipe, p, adapter, inspection, options.allow_partial, convention)
        out.append(entry)
    return out
