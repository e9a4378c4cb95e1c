"""A whole case run, step by step, each step reading what the previous one wrote:

    prepare_run      intake, case folder, models loaded                      (run/profile.py)
    check_reference  the reference corpus accepts this profile's signature   (corpus/placement.py)
    generate_units   every (arm, batch) unit, text features -> RunRecord     (run/profile.py)
    finish_case      model-free: analysis (metrics.json, comparison.json), manifest.json, custody
    render_report    report.pdf, report-archive.pdf                          (report/)

``run_case`` is the first four under the case folder's lock, ``run_full`` all five (``carlos-audit
run``). The corpus build's finalize unit (engines/units.py) runs ``finish_case`` alone, with the
run record its workers wrote, and loads no model. Any step can be re-run alone
(``carlos-audit analyse CASE_DIR``, ``carlos-audit report CASE_DIR``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from carlos_audit import __version__
from carlos_audit.case.casefile import Case
from carlos_audit.case.options import RunOptions
from carlos_audit.case.casefile import reference_corpus
from carlos_audit.case.protocol import Pair, batches, enumerate_pairs, load_prompts, prompts_sha256
from carlos_audit.casefolder import CaseFolder
from carlos_audit.casefolder.unit_store import CaseStore
from carlos_audit.errors import AuditError
from carlos_audit.fileio import read_json
from carlos_audit.records import Comparison, Manifest, Metrics, RunRecord
from carlos_audit.run.environment import git_commit
from carlos_audit.run.intake import utc_now


@dataclass(frozen=True)
class CaseResult:
    """What a run wrote: the case folder and its records (``written``: the further files of
    ``run_full``: comparison.json when there is one, both report copies)."""

    out: Path
    manifest: Manifest
    metrics: Metrics
    comparison: Comparison | None
    written: tuple[str, ...] = ()


def run_full(case: Case, out: Path, options: RunOptions | None = None, *, argv: list[str] | None = None,
             **flags) -> CaseResult:
    """``carlos-audit run``: generate, finish, then the report, all under one case-folder lock.
    ``flags``: single RunOptions fields over ``options`` (``progress=False``)."""
    from carlos_audit.report import ARCHIVE_PDF, render_report
    from carlos_audit.casefolder.lock import case_lock

    with case_lock(out):  # taken once, held through the report
        try:
            result = generate_and_finish(case, out, RunOptions.given(options, **flags), argv)
        except AuditError:
            # an input changed during the run: the manifest is written (custody_ok false) and the
            # exhibit is still rendered, marked invalid, before the error reaches the user
            if custody_failed(out):
                render_report(out, check=False)
            raise
        written = [str(Path(out) / Comparison.FILE)] if result.comparison is not None else []
        written.append(str(render_report(out)))           # filing copy, pre-flight checked
        written.append(str(Path(out) / ARCHIVE_PDF))
    return replace(result, written=tuple(written))


def run_case(case: Case, out: Path, options: RunOptions | None = None, *, argv: list[str] | None = None,
             **flags) -> CaseResult:
    """Profile ``case`` into case folder ``out`` (no report), holding the folder's lock."""
    from carlos_audit.casefolder.lock import case_lock

    with case_lock(out):
        return generate_and_finish(case, out, RunOptions.given(options, **flags), argv)


def generate_and_finish(case: Case, out: Path, options: RunOptions, argv: list[str] | None = None) -> CaseResult:
    """The run's steps in order; the caller holds the case folder's lock."""
    from carlos_audit.run.profile import generate_units, prepare_run

    out = Path(out)
    prep = prepare_run(case, CaseStore(out), options)
    allow_incompatible = options.allow_incompatible or case.reference.allow_incompatible
    corpus = check_reference(case, prep.signature, allow_incompatible)  # opened once for the whole run
    record = generate_units(prep, options.progress, protocol=looks_of(prep, corpus))
    return finish_case(case, out, record, argv=argv, allow_incompatible=allow_incompatible,
                       units=prep.session.store,
                       opened=Opened(corpus, prep.prompts, prep.plan,
                                     {str(f.path): f for f in (prep.loras or {}).values()}))


@dataclass(frozen=True)
class Opened:
    """What a run has already read and built, handed to ``finish_case`` so that it is not read
    again: the opened reference corpus (or None), the parsed prompts, the arm plan, the LoRA
    files as intake read them ({path: lora.fileformat.LoraFile})."""

    corpus: object = None
    prompts: list | None = None
    plan: object = None
    loras: dict | None = None


def looks_of(prep, corpus):
    """The pairs' schedule of ``generate_units``: all at once, or look by look under the case's
    ``[protocol.sequential]`` rule (looks.py: the stopping rule evaluated from stored features,
    against the run's opened reference ``corpus``)."""
    from carlos_audit.looks import run_protocol

    return lambda session, plan, pairs, run_arm: run_protocol(session, plan, pairs, prep.prompts, corpus,
                                                              prep.lora_sha256, run_arm)


def check_reference(case: Case, signature: dict, allow_incompatible: bool):
    """Before any generation: the reference corpus (when the case names one) opened, once for the
    whole run, and returned (None without one); it accepts a profile of this signature, and the
    case's ``replicate_id`` is one of its rows."""
    corpus_path = reference_corpus(case)
    if corpus_path is None:
        return None
    from carlos_audit.analysis.replication import check_replicate_id
    from carlos_audit.corpus.placement import check_corpus_signature, open_reference_corpus

    corpus = open_reference_corpus(corpus_path)
    check_corpus_signature(corpus, signature, allow_incompatible)
    check_replicate_id(corpus, case.reference.replicate_id)
    return corpus


def finish_case(case: Case, out: Path, record: RunRecord, *, argv: list[str] | None = None,
                allow_incompatible: bool = False, units: CaseStore | None = None,
                opened: Opened | None = None) -> CaseResult:
    """The model-free end of a run, on a case folder whose units are all generated: the analysis
    step (metrics.json, comparison.json), the manifest built from ``record`` and the unit records,
    custody (every input hashed again) and manifest.json last. Loads no model, imports no torch.
    ``units``: the run's unit store (its unit records and features already read), else the folder's;
    ``opened``: the corpus, prompts and arm plan the run already holds (a build's finalize unit
    passes none: they are read here, once)."""
    from carlos_audit.analysis.case_analysis import analyse_case
    from carlos_audit.casefolder.unit_store import hash_inputs

    out = Path(out)
    folder = CaseFolder(out)
    if units is not None:
        folder.units = units
    opened = opened or Opened()
    manifest = build_manifest(case, folder, record, argv, opened)
    allow_incompatible = allow_incompatible or case.reference.allow_incompatible
    metrics, comparison = analyse_case(out, manifest, case, allow_incompatible=allow_incompatible,
                                       store=folder.units, corpus=opened.corpus, loras=opened.loras)
    for r in (metrics, comparison):
        if r is not None:
            r.write(out)
    manifest.results = {r.FILE: folder.digest(r.FILE) for r in (metrics, comparison) if r is not None}

    inputs = record.inputs
    end_inputs = hash_inputs([{"role": e["role"], "path": e["path"]} for e in inputs])
    manifest.inputs = [{**a, "sha256_end": b["sha256"], "unchanged": a["sha256"] == b["sha256"]}
                       for a, b in zip(inputs, end_inputs)]
    manifest.custody_ok = all(c["unchanged"] for c in manifest.inputs)
    manifest.run["finished_utc"] = utc_now()
    manifest.write(out)
    if not manifest.custody_ok:
        changed = [c["role"] for c in manifest.inputs if not c["unchanged"]]
        raise AuditError(f"input file(s) changed during the run ({', '.join(changed)}): the run is marked invalid in manifest.json")
    return CaseResult(out, manifest, metrics, comparison)


def build_manifest(case: Case, folder: CaseFolder, record: RunRecord, argv: list[str] | None,
                   opened: Opened | None = None) -> Manifest:
    """manifest.json before analysis and custody: the run record, the arm plan, the pair rows
    read from the unit records, the cost summed from them. The prompts and the arm plan are
    those in ``opened`` when the run holds them, else read and built here."""
    from carlos_audit.run.arms import plan_arms
    from carlos_audit.run.cost import case_cost

    store, out = folder.units, folder.root
    run_info = read_json(out / "run.json")
    opened = opened or Opened()
    prompts = opened.prompts if opened.prompts is not None else load_prompts(case.protocol.prompts, case.base_dir)[0]
    pc = case.protocol
    from carlos_audit.case.sequential_plan import run_pairs

    # a sequential case: the pairs of the looks it ran
    pairs = run_pairs(enumerate_pairs(prompts, pc.seeds, pc.batch_size), record.sequential)
    lora_sha = next(e["sha256"] for e in record.inputs if e["role"] == "lora")
    plan = opened.plan if opened.plan is not None else plan_arms(case, lora_sha, record.comparison_loras)
    return Manifest(
        case=case.case.to_dict(),
        tool={"name": "carlos-audit", "version": __version__, "git_commit": git_commit()},
        run={"started_utc": run_info["started_utc"], "source_date_epoch": run_info["started_epoch"],
             "finished_utc": None, "command": list(argv or ["carlos-audit", "run", str(case.path)]),
             "stats": record.stats},
        inputs=record.inputs,  # with their end hashes once the results are written (custody)
        custody_ok=False,
        base_model=record.base_model,
        embedder=record.embedder,
        lora={"path": record.lora_path, "file_name": Path(record.lora_path).name, "sha256": lora_sha,
              "scale": case.lora.scale, "trigger_words": list(case.lora.trigger_words),
              "trigger_policy": case.lora.trigger_policy, "convention": case.lora.convention, "load": record.lora_load,
              "inspection": record.inspection},
        protocol={"prompts": pc.prompts, "prompt_source": record.prompt_source,
                  "prompts_sha256": prompts_sha256(prompts), "n_prompts": len(prompts),
                  "seeds": list(pc.seeds), **record.generation, "batch_size": pc.batch_size,
                  "bootstrap_resamples": pc.bootstrap_resamples, "bootstrap_seed": pc.bootstrap_seed,
                  "scales": list(pc.scales),
                  "arms": {a.name: {"adapter": a.adapter, "scale": a.scale, "with_triggers": a.with_triggers,
                                    "lora_sha256": a.lora_sha256} for a in plan.arms.values()},
                  "arm_aliases": plan.alias, "profiles": {k: list(v) for k, v in plan.profiles.items()}},
        comparison_loras=record.comparison_loras,
        text_features=record.text_features,
        label_signatures=record.label_signatures,
        claimed_works=record.claimed_works,
        near_copies=near_copy_part(case, store, record, lora_sha),
        cost=case_cost(store, plan, pairs),
        signature=record.signature,
        prompts=[{"id": p.id, "category": p.category, "subcategory": p.subcategory, "text": p.text} for p in prompts],
        pairs=collect_pairs(store, pairs, plan.arms.values()),
        results={},
        environment=record.environment,
        sequential=record.sequential,
    )


def collect_pairs(store: CaseStore, pairs: list[Pair], arms) -> list[dict]:
    """The manifest's pair rows, from the unit records on disk."""
    recs = {}
    for arm in arms:
        for b in batches(pairs):
            unit = store.unit_done(arm.name, b[0].batch)
            if unit is None:
                raise AuditError(f"{store.root}: unit {arm.name}/b{b[0].batch:05d} was not generated; run the case again to resume")
            for e in unit["pairs"]:
                recs.setdefault(e["pair_id"], {})[arm.name] = {k: e[k] for k in ("prompt", "image", "image_sha256", "embedding", "embedding_sha256")}
    return [{"pair_id": p.id, "prompt_id": p.prompt.id, "category": p.prompt.category,
             "subcategory": p.prompt.subcategory, "seed": p.seed, "batch": p.batch, "position": p.position,
             "arms": recs[p.id]} for p in pairs]


def near_copy_part(case: Case, store: CaseStore, record: RunRecord, lora_sha: str) -> dict | None:
    """The manifest's ``near_copies``: the run record's, with the pair rows of the two extraction
    arms (run/near_copy_arms.py) read from their unit records. None without [near_copies]."""
    if record.near_copies is None:
        return None
    from carlos_audit.case.near_copies import pairs
    from carlos_audit.run.near_copy_arms import arms

    return {**record.near_copies, "pairs": collect_pairs(store, pairs(case), arms(case, lora_sha))}


def custody_failed(out: Path) -> bool:
    """Whether ``out`` is a finished case folder whose manifest records an input changed during the run."""
    folder = CaseFolder(out)
    return all(folder.has(r.FILE) for r in (Manifest, Metrics)) and folder.manifest.custody_ok is False
