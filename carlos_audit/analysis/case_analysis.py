"""The analysis step: a case folder in, metrics.json and comparison.json out, no model and no torch.

It reads only stored numbers: the image features of every arm, the text features of the prompts
and the text signatures of the effect-label words (both stored by the run), the manifest's arm
plan and pair rows, the LoRA files (weight-space head to head) and the reference corpus. The run
calls it with the manifest it is about to write; ``carlos-audit analyse CASE_DIR`` calls it with
the manifest on disk, so re-running it on a finished case gives the same bytes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from carlos_audit.case.casefile import Case
from carlos_audit.paths import expand_path
from carlos_audit.casefolder import CaseFolder
from carlos_audit.casefolder.unit_store import CaseStore, load_npy
from carlos_audit.errors import AuditError
from carlos_audit.records import Comparison, Manifest, Metrics


def _diffs(store: CaseStore, manifest: Manifest, profile: str, ids: list[str]) -> np.ndarray:
    from carlos_audit.analysis.metrics import diffs

    b, l = manifest.protocol["profiles"][profile]
    return diffs(store.features(l, ids), store.features(b, ids))


def compute_case_metrics(store: CaseStore, manifest: Manifest, case: Case, corpus=None) -> Metrics:
    """metrics.json: the CARLoS representation of the main profile, then the indicators.
    ``corpus``: the case's opened reference Corpus, when the caller holds it (claimed works)."""
    from carlos_audit.analysis import indicators as ind
    from carlos_audit.analysis.metrics import compute_metrics, diffs

    p, rows, profiles = manifest.protocol, manifest.pairs, manifest.protocol["profiles"]
    n, seed = p["bootstrap_resamples"], p["bootstrap_seed"]
    ids = [r["pair_id"] for r in rows]
    prompt_ids = [r["prompt_id"] for r in rows]
    b, l = profiles["main"]
    base_f, lora_f = store.features(b, ids), store.features(l, ids)
    metrics = compute_metrics(lora_f, base_f, rows, n_resamples=n, seed=seed)
    d_main = diffs(lora_f, base_f)
    extra = {}
    if p["scales"]:
        by_scale = {manifest.lora["scale"]: d_main}
        by_scale.update({s: _diffs(store, manifest, f"scale:{s:g}", ids) for s in p["scales"]})
        extra["dose_response"] = ind.dose_response(by_scale, prompt_ids, n, seed,
                                                   main=(manifest.lora["scale"], metrics["ci"]))
    if "trigger:without" in profiles:
        shared = list(profiles["trigger:with"]) == list(profiles["trigger:without"])
        extra["trigger_dependence"] = ind.trigger_dependence(
            _diffs(store, manifest, "trigger:with", ids), _diffs(store, manifest, "trigger:without", ids),
            list(manifest.lora["trigger_words"]), prompt_ids, n, seed, shared)
    if manifest.text_features is not None:
        text = np.stack([store.array(manifest.text_features[pid]["path"]) for pid in prompt_ids])
        extra["prompt_override"] = ind.prompt_override(text, base_f, lora_f, prompt_ids, n, seed)
    extra["scope"] = ind.scope(d_main, [r["category"] for r in rows], prompt_ids, n, seed)
    if manifest.label_signatures is not None:
        labels = manifest.label_signatures
        extra["effect_labels"] = ind.effect_labels(
            np.array(metrics["direction"]), [tuple(w) for w in labels["words"]], load_npy(store.path(labels["path"])),
            case.indicators.top_labels)
    out = Metrics(**metrics, indicators=extra)
    if manifest.sequential:
        from carlos_audit.analysis.sequential_intervals import metrics_record, stopped_look

        out.sequential = metrics_record(stopped_look(d_main, prompt_ids, manifest.sequential, p), manifest.sequential)
    if manifest.claimed_works:  # [claimed_works]: analysis/alignment.py
        from carlos_audit.analysis.alignment import claimed_works_metrics

        out.claimed_works = claimed_works_metrics(store, manifest, case, corpus)
    if manifest.near_copies:  # [near_copies]: analysis/near_copies.py
        from carlos_audit.analysis.near_copies import near_copy_metrics

        out.near_copies = near_copy_metrics(store, manifest)
    return out


def head_to_head(store: CaseStore, manifest: Manifest, loras: dict | None = None) -> list[dict]:
    """comparison.json ``head_to_head``: behaviour (shared base arm) and weights, per comparison
    LoRA. ``loras``: {path: LoraFile} as the run read them (else each file is read here)."""
    from carlos_audit.analysis.head_to_head import behaviour, weights

    p, rows = manifest.protocol, manifest.pairs
    ids = [r["pair_id"] for r in rows]
    d_t = _diffs(store, manifest, "main", ids)
    loras = loras or {}
    target = _checked(manifest.lora["path"], manifest.lora["sha256"], loras.get(manifest.lora["path"]))
    results = []
    for c in manifest.comparison_loras:
        prof = f"comparison:{c['adapter']}"
        results.append({
            "lora": {"path": c["path"], "file_name": Path(c["path"]).name, "sha256": c["sha256"]},
            "arm": p["profiles"][prof][1],
            "behaviour": behaviour(d_t, _diffs(store, manifest, prof, ids), rows, p["bootstrap_resamples"],
                                   p["bootstrap_seed"]),
            "weights": weights(target, _checked(c["path"], c["sha256"], loras.get(c["path"]))),
        })
    return results


def _checked(path: str, sha256: str, source=None):
    """A LoRA file the analysis reads, refused when it is not the one the run used; ``source``:
    the LoraFile the run read it as (its bytes are those hashed: not read again)."""
    from carlos_audit.lora.fileformat import LoraFile

    if source is None and Path(path).is_file():
        source = LoraFile(path, allow_unsafe_pickle=True)  # read once: hashed here, parsed by the comparison
    if source is None or source.sha256 != sha256:
        raise AuditError(f"LoRA {path} is missing or differs from the file the case ran with (sha256 {sha256[:12]}...)")
    return source


def sequential_placement(store: CaseStore, manifest: Manifest, corpus) -> dict:
    """comparison.json ``target.sequential`` of a sequential case (analysis/sequential_intervals.py), against
    the opened reference Corpus."""
    from carlos_audit.analysis.sequential_intervals import comparison_record, stopped_look
    from carlos_audit.corpus.placement import own_row

    ids = [r["pair_id"] for r in manifest.pairs]
    ev = stopped_look(_diffs(store, manifest, "main", ids), [r["prompt_id"] for r in manifest.pairs],
                      manifest.sequential, manifest.protocol, corpus, own_row(corpus, manifest.lora["sha256"]))
    return comparison_record(ev)


def open_case_corpus(case: Case):
    """The case's reference corpus opened (None when it names none): once per analysis."""
    if not case.reference.corpus:
        return None
    from carlos_audit.corpus.store import load_corpus

    corpus_path = expand_path(case.reference.corpus, case.base_dir)
    if not corpus_path.exists():
        raise AuditError(f"reference corpus {corpus_path} does not exist")
    return load_corpus(corpus_path)


def analyse_case(case_dir: Path, manifest: Manifest, case: Case, *, allow_incompatible: bool = False,
                 store: CaseStore | None = None, corpus=None, loras: dict | None = None) -> tuple[Metrics, Comparison | None]:
    """The metrics and the comparison (None when the case has neither comparison LoRAs nor a
    reference corpus) of a case folder whose units are all done. Writes nothing. ``store``: the
    folder's unit store when the caller holds one (its features already read); ``corpus``: the
    case's reference Corpus as the run opened it (else opened here, once, for every part);
    ``loras``: {path: LoraFile} of the LoRA files as the run read them."""
    store = store if store is not None else CaseStore(case_dir)
    if corpus is None:
        corpus = open_case_corpus(case)
    metrics = compute_case_metrics(store, manifest, case, corpus)
    comparison = Comparison()
    if manifest.comparison_loras:
        comparison.head_to_head = head_to_head(store, manifest, loras)
    if corpus is not None:
        from carlos_audit.analysis.replication import replication
        from carlos_audit.corpus.placement import place_in_corpus

        placement = place_in_corpus(corpus, metrics, top_k=case.reference.top_k, signature=manifest.signature,
                                    lora_sha256=manifest.lora["sha256"], head_to_head=comparison.head_to_head,
                                    allow_incompatible=allow_incompatible or case.reference.allow_incompatible)
        comparison.corpus, comparison.target, comparison.corpus_points = (
            placement["corpus"], placement["target"], placement["corpus_points"])
        if manifest.sequential:
            comparison.target["sequential"] = sequential_placement(store, manifest, corpus)
        comparison.replication = replication(store, manifest, metrics, corpus, case.reference.replicate_id)
    if comparison.head_to_head is None and comparison.corpus is None:
        return metrics, None
    return metrics, comparison


def reanalyse(case_dir: Path, *, allow_incompatible: bool = False, out: Path | None = None) -> dict:
    """``carlos-audit analyse CASE_DIR``: the analysis of a finished case folder run again from
    its manifest, case file copy and stored features, compared byte for byte with the recorded
    results (sha256 in the manifest's ``results``) and with the files on disk (result_status:
    an edited file is named EDITED). The case folder is never written; the recomputed files go
    to ``out`` when given."""
    from carlos_audit.fileio import json_dumps
    from carlos_audit.hashing import sha256_bytes

    folder = CaseFolder(case_dir)
    case_dir, manifest, previous = folder.root, folder.manifest, folder.comparison
    allow_incompatible = allow_incompatible or bool(previous and (previous.corpus or {}).get("allow_incompatible"))
    records = [r for r in analyse_case(case_dir, manifest, folder.case, allow_incompatible=allow_incompatible,
                                       store=folder.units) if r is not None]
    results = {}
    for r in records:
        now = sha256_bytes(json_dumps(r.to_json()).encode("utf-8"))
        results[r.FILE] = result_status(folder, r.FILE, now)
        if out is not None:
            r.write(out)
    for name in set(manifest.results) - set(results):
        results[name] = result_status(folder, name, None)
    return {"case_dir": str(case_dir), "out": str(out) if out else None, "results": results,
            "identical": all(r["identical"] for r in results.values())}


def result_status(folder: CaseFolder, name: str, now: str | None) -> dict:
    """One result file: the sha256 of the recomputation (``now``), the one the manifest records
    and the file's on disk, and what they say (``status``): SAME (all three equal), MISSING (no
    file), EDITED (the file on disk is not the recomputation, and neither its recorded hash in
    an intact manifest vouches for it), DIFF (the analysis does not reproduce the file the run
    wrote, or the manifest's record of it)."""
    recorded, disk = folder.manifest.results.get(name), folder.digest(name)
    if disk is None:
        status = "MISSING"
    elif now == disk == recorded:
        status = "SAME"
    elif now != disk and (disk != recorded or not folder.manifest_intact()):
        status = "EDITED"
    else:
        status = "DIFF"
    return {"recorded": recorded, "now": now, "on_disk": disk, "identical": status == "SAME", "status": status}
