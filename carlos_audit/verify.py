"""Re-check a finished case folder: stored files, metrics, and a regenerated sample.

Checks, each reported pass/fail with the file or pair it concerns:

1. ``manifest.json`` matches ``manifest.json.sha256`` (an edited manifest is named).
2. Every stored image and embedding matches the sha256 the manifest records for it; the case
   file copy and ``metrics.json`` match their recorded hashes; ``report.pdf`` (filing copy),
   ``report-archive.pdf`` and a signed archive copy match their ``.sha256`` files; the filing
   copy prints the archive copy's sha256; a signature, when present, is intact and covers the
   signed file (checked against ``--trust`` certificates when given; nothing is fetched).
3. Metrics recomputed from the stored embeddings equal ``metrics.json`` (relative tolerance
   1e-9 for floating-point summation order; identical on the same platform).
4. A random sample of N pairs (sample seed recorded in the output) is regenerated from the
   recorded inputs. On the same software and hardware the image hashes must match exactly.
   Where the environment differs in what changes bits (``case/signature.bits_environment``:
   package versions, python, machine, platform, device, dtype, torch threads, CUDA, GPU, fast path), exact
   equality is not expected: each regenerated embedding must then have cosine >= EMBEDDING_COSINE_TOLERANCE with
   the stored one.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path


from carlos_audit.casefolder import CaseFolder
from carlos_audit.errors import AuditError, VerificationFailed
from carlos_audit.records import Manifest
from carlos_audit.vectors import cosine

EMBEDDING_COSINE_TOLERANCE = 0.999
METRICS_RTOL = 1e-9


@dataclass
class Check:
    name: str
    ok: bool
    detail: str

    def as_dict(self) -> dict:
        return {"check": self.name, "ok": self.ok, "detail": self.detail}


def _close(a, b, path="") -> list[str]:
    """Paths where two JSON-like values differ beyond METRICS_RTOL."""
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return [f"{path}: keys differ"]
        return [d for k in a for d in _close(a[k], b[k], f"{path}.{k}" if path else k)]
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{path}: lengths differ"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _close(x, y, f"{path}[{i}]")]
    if isinstance(a, float) or isinstance(b, float):
        if a is None or b is None or not math.isclose(a, b, rel_tol=METRICS_RTOL, abs_tol=1e-12):
            return [f"{path}: {a!r} != {b!r}"]
        return []
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


def check_manifest(folder: CaseFolder) -> Check:
    """manifest.json against manifest.json.sha256, which the run writes last."""
    intact = folder.manifest_intact()
    return Check("manifest.json", bool(intact), "manifest.json.sha256 is missing" if intact is None else
                 "matches manifest.json.sha256" if intact else "manifest.json was modified after the run")


def check_stored(folder: CaseFolder) -> list[Check]:
    """Every stored image, embedding, text feature and label signature, and every result file
    (metrics.json, comparison.json), against the sha256 the manifest records for it."""
    checks = []
    manifest = folder.manifest
    stored = [(e[kind], e[f"{kind}_sha256"]) for row in manifest.pairs for e in row["arms"].values()
              for kind in ("image", "embedding")]
    text = list((manifest.text_features or {}).values())
    text += [manifest.label_signatures] if manifest.label_signatures else []
    stored += [(rec["path"], rec["sha256"]) for rec in text]
    missing = [rel for rel, _ in stored if not folder.has(rel)]
    bad = [rel for rel, digest in stored if folder.has(rel) and folder.digest(rel) != digest]
    n = len(stored)
    if bad or missing:
        detail = "; ".join(filter(None, [
            f"modified: {', '.join(bad[:10])}" + (" ..." if len(bad) > 10 else "") if bad else "",
            f"missing: {', '.join(missing[:10])}" + (" ..." if len(missing) > 10 else "") if missing else ""]))
        checks.append(Check("stored images and embeddings", False, detail))
    else:
        checks.append(Check("stored images and embeddings", True, f"{n} files match their recorded sha256"))
    # (text features of the prompts and the label signatures are included in the count above)
    for rel, ok in folder.results_intact().items():
        checks.append(Check(rel, ok, "matches its recorded sha256" if ok else f"{rel} was modified or is missing"))
    return checks


def check_files(folder: CaseFolder, trust: list[Path] | None = None) -> list[Check]:
    """check_stored, the case file copy, and both report copies (check_reports)."""
    checks = check_stored(folder)
    manifest = folder.manifest
    casefile = next((i for i in manifest.inputs if i["role"] == "casefile"), None)
    if casefile and folder.has("case.toml"):
        ok = folder.digest("case.toml") == casefile["sha256"]
        checks.append(Check("case.toml", ok, "equals the case file as run" if ok else "case.toml was modified"))
    checks += check_reports(folder, trust)
    return checks


def check_reports(folder: CaseFolder, trust: list[Path] | None = None) -> list[Check]:
    """Both copies of the report (and a signed archive copy) against their .sha256 files; the
    filing copy's record of the archive copy's sha256; the signature, when there is one."""
    from carlos_audit.report import ARCHIVE_PDF, FILING_PDF, SIGNED_PDF
    from carlos_audit.report.signing import verify_signature

    checks, case_dir = [], folder.root
    for name in (FILING_PDF, ARCHIVE_PDF, SIGNED_PDF):
        pdf, side = case_dir / name, case_dir / f"{name}.sha256"
        if pdf.is_file() and side.is_file():
            ok = side.read_text().split()[0] == folder.digest(name)
            checks.append(Check(name, ok, f"matches {name}.sha256" if ok else f"{name} was modified (or its .sha256)"))
        elif pdf.is_file() or side.is_file():
            checks.append(Check(name, False, f"{name} or {name}.sha256 is missing"))
    filing, archive = case_dir / FILING_PDF, case_dir / ARCHIVE_PDF
    if filing.is_file() and archive.is_file():
        digest = folder.digest(ARCHIVE_PDF)
        ok = _pdf_text_has(filing, digest)
        checks.append(Check("filing copy bound to the archive copy", ok,
                            f"{FILING_PDF} prints the sha256 of {ARCHIVE_PDF}" if ok
                            else f"{FILING_PDF} does not print the sha256 of this {ARCHIVE_PDF} (re-rendered separately?)"))
    checks += [Check(n, ok, d) for n, ok, d in verify_signature(case_dir, trust)]
    return checks


def _pdf_text_has(pdf: Path, text: str) -> bool:
    """Whether the PDF's extracted text contains ``text`` (pdftotext, as the report tests read it)."""
    import subprocess

    try:
        out = subprocess.run(["pdftotext", "-raw", str(pdf), "-"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return False
    return text in out.replace("\n", "")


def check_metrics(folder: CaseFolder) -> Check:
    """metrics.json recomputed from the stored features by the analysis step's own code
    (analysis/case_analysis.compute_case_metrics, what `run` and `analyse` write it with), every
    profile and indicator included, compared within METRICS_RTOL."""
    from carlos_audit.analysis.case_analysis import compute_case_metrics

    name = "metrics recomputed from embeddings"
    try:
        stored = folder.metrics
        again = compute_case_metrics(folder.units, folder.manifest, folder.case)
    except (OSError, ValueError, KeyError, AuditError) as e:
        return Check(name, False, f"cannot read stored results: {e}")
    diffs = _close(again.to_json(), stored.to_json())
    if diffs:
        return Check(name, False, "metrics.json differs: " + "; ".join(diffs[:3]))
    return Check(name, True, f"strength {again.strength:.6g}, consistency {again.consistency} reproduced")


def integrity_checks(folder: CaseFolder, recompute: bool = True) -> list[Check]:
    """What ``report`` and ``analyse`` check before they use a case folder's results, with
    verify's own checks (no model): the manifest's own hash (check_manifest), every stored file
    and result file against the manifest (check_stored) and, with ``recompute``, metrics.json
    recomputed from the stored embeddings (check_metrics: an edit whose hashes were fixed up too);
    with ``[claimed_works]``, their stored features and thumbnails and the alignment recomputed."""
    from carlos_audit.analysis.alignment import claimed_checks

    checks = [check_manifest(folder), *check_stored(folder)]
    if recompute:
        checks.append(check_metrics(folder))
    return checks + [Check(*c) for c in claimed_checks(folder)]


def integrity_failures(checks: list[Check]) -> list[str]:
    """One sentence per failed check, naming the file it concerns."""
    return [c.detail if c.name in c.detail else f"{c.name}: {c.detail}" for c in checks if not c.ok]


def require_intact(folder: CaseFolder, *, despite: bool = False) -> list[str]:
    """Before ``report`` renders: the integrity failures of a finished case folder
    (integrity_checks); VerificationFailed in one line naming the first failed file, unless
    ``despite`` (the report then prints them on its cover)."""
    failures = integrity_failures(integrity_checks(folder.require_finished()))
    if failures and not despite:
        more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
        raise VerificationFailed(f"{folder.root} fails the integrity check, report not rendered: {failures[0]}{more}; "
                                 "`carlos-audit verify` lists every check; --render-despite-integrity-failure renders "
                                 "it with the failure on the cover")
    return failures


def check_sequential(folder: CaseFolder) -> Check:
    """A sequential case: every recorded look evaluated again from the stored features."""
    from carlos_audit.case.casefile import reference_corpus
    from carlos_audit.looks import recheck_looks

    corpus = reference_corpus(folder.case)
    seq = folder.manifest.sequential
    try:
        bad = recheck_looks(folder.units, folder.manifest, corpus)
    except (OSError, ValueError, AuditError) as e:
        return Check("sequential stopping rule re-applied", False, f"cannot re-evaluate the looks: {e}")
    if bad:
        return Check("sequential stopping rule re-applied", False, "differs at " + ", ".join(bad))
    return Check("sequential stopping rule re-applied", True,
                 f"{len(seq['looks'])} look(s) re-evaluated; stopped at look {seq['stopped_at_look']} of {seq['n_looks']} "
                 f"({seq['n_prompts_run']} of {seq['n_prompts_protocol']} prompts), as recorded")


def check_regenerated(folder: CaseFolder, sample: int, seed: int, progress: bool = False) -> list[Check]:
    """Regenerate the batches holding a random sample of pairs (run/profile.regenerate, the
    path `reproduce` takes: the main profile's two arms, the run's batch layout) into a scratch
    folder and compare with what the manifest records."""
    import shutil
    import tempfile

    from carlos_audit.case.options import RunOptions
    from carlos_audit.case.signature import environment_differences
    from carlos_audit.casefolder.unit_store import CaseStore
    from carlos_audit.run.intake import intake
    from carlos_audit.run.profile import prepare_run, regenerate

    case, manifest = folder.case, folder.manifest
    _, inputs, _ = intake(case)
    recorded = {i["role"]: i["sha256"] for i in manifest.inputs}
    changed = [i["role"] for i in inputs if recorded.get(i["role"]) not in (None, i["sha256"])]
    if changed:
        return [Check("regenerated sample", False, f"input file(s) differ from the ones recorded: {', '.join(changed)}")]
    checks = [check_base_files(case, manifest)] if manifest.base_model.get("files") else []
    rows = folder.pairs()
    picked = sorted(random.Random(seed).sample(range(len(rows)), min(sample, len(rows))))
    main = list(folder.main_profile())
    load = manifest.lora["load"]
    scratch = Path(tempfile.mkdtemp(prefix="verify-"))
    try:
        store = CaseStore(scratch)
        prep = prepare_run(case, store, RunOptions(allow_partial=load.get("partial", False)), prepare_folder=False)
        differences = environment_differences(prep.session.environment, manifest.environment)
        if "application" in load:  # a weight patch: the same method, the same patched weights
            from carlos_audit.run.patch import application_differences

            diff = application_differences(load["application"], prep.lora_load.get("application"))
            checks.append(Check("LoRA application", not diff, diff or "applied by the recorded method; patched-weight hashes identical"))
        regenerate(prep, manifest.to_json(), store, batch_ids={rows[i]["batch"] for i in picked}, arm_names=main,
                   progress=progress)
        for i in picked:
            m = rows[i]
            for arm_name in main:
                rec = m["arms"][arm_name]
                unit = store.unit_done(arm_name, m["batch"])
                now = next(e for e in unit["pairs"] if e["pair_id"] == m["pair_id"])
                same_image = now["image_sha256"] == rec["image_sha256"]
                f = store.feature(arm_name, m["pair_id"])
                stored = folder.units.feature(arm_name, m["pair_id"])
                cos = cosine(f, stored)
                cos = 0.0 if cos is None else cos  # a zero embedding never passes the tolerance
                if not differences:
                    ok, detail = same_image, ("image hash identical" if same_image else "image hash differs on the same platform")
                else:
                    ok = cos >= EMBEDDING_COSINE_TOLERANCE
                    detail = (f"platform differs ({', '.join(differences)}); embedding cosine {cos:.6f} "
                              f"(tolerance {EMBEDDING_COSINE_TOLERANCE})")
                checks.append(Check(f"regenerate {m['pair_id']} [{arm_name}]", ok, detail))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return checks


def check_unit_bindings(folder: CaseFolder) -> Check:
    """Every unit record of the case (not a sample) against the inputs the manifest records: the
    hashes it carries of what made it (its arm's LoRA, the prompt set, the base model, the
    embedder: run/hostchain.finish_unit), each prompt it sent (the manifest's prompt text with the
    arm's trigger words) and each file hash (the manifest's pair rows); the folder's
    ``inputs.json`` (casefolder/binding.py) against the manifest's inputs. Fails naming the units."""
    from carlos_audit.casefolder.binding import read_binding
    from carlos_audit.run.arms import Arm

    m = folder.manifest
    text = {p.id: p.text for p in m.prompts}
    rows: dict[int, dict] = {}
    for row in m.pairs:
        rows.setdefault(row.batch, {})[row.pair_id] = row
    common = {"prompts_sha256": m.protocol.prompts_sha256, "base_model_sha256": m.base_model.sha256,
              "embedder_sha256": m.embedder.sha256}
    bad, unbound, n = [], 0, 0
    for name, arm in m.protocol.arms.items():
        send = Arm(name, arm.adapter, arm.scale, arm.with_triggers)
        for b, batch_rows in sorted(rows.items()):
            unit, rec = f"{name}/b{b:05d}", folder.units.unit_done(name, b)
            if rec is None:
                bad.append(f"{unit} (missing or unreadable)")
                continue
            n += 1
            made = rec.get("inputs")
            unbound += made is None
            wrong = [k for k, v in dict(common, lora_sha256=arm.lora_sha256).items() if made is not None and made.get(k) != v]
            wrong += _unit_entries_differ(rec, batch_rows, name, lambda pid: send.prompt_for(text[pid], list(m.lora.trigger_words)))
            if wrong:
                bad.append(f"{unit} ({', '.join(wrong[:3])})")
    bad += _binding_record_differs(read_binding(folder.root), m)
    if bad:
        return Check("unit records bound to the inputs", False,
                     "made from other inputs than the manifest records: " + "; ".join(bad[:8]) + (" ..." if len(bad) > 8 else ""))
    note = f"; {unbound} carry no input hashes (an earlier carlos-audit): prompts and files checked" if unbound else ""
    return Check("unit records bound to the inputs", True,
                 f"{n} unit records: LoRA, prompt set, base model, embedder, prompts and files as recorded{note}")


def _unit_entries_differ(rec: dict, batch_rows: dict, arm: str, prompt_of) -> list[str]:
    """What in a unit record's entries differs from the manifest's pair rows of its batch."""
    entries = {e.get("pair_id"): e for e in rec["pairs"]}
    if not set(batch_rows) <= set(entries):
        return ["pairs"]
    out = []
    for pid, row in batch_rows.items():
        e, recorded = entries[pid], row.arms.get(arm)
        if e.get("prompt") != prompt_of(row.prompt_id):
            out.append(f"prompt of {pid}")
        if recorded is None or [e.get("image_sha256"), e.get("embedding_sha256")] != [recorded.image_sha256, recorded.embedding_sha256]:
            out.append(f"files of {pid}")
    return out


def _binding_record_differs(binding, m: Manifest) -> list[str]:
    """inputs.json (absent in folders of an earlier carlos-audit) against the manifest's inputs."""
    if binding is None:
        return []
    recorded = {i.role: i.sha256 for i in m.inputs if i.role != "casefile"}
    out = [f"inputs.json {role}" for role in sorted(set(recorded) | set(binding.inputs)) if recorded.get(role) != binding.inputs.get(role)]
    if binding.prompts_sha256 != m.protocol.prompts_sha256:
        out.append("inputs.json prompt set")
    if binding.models is not None and binding.models != {"base_model": m.base_model.sha256, "embedder": m.embedder.sha256}:
        out.append("inputs.json models")
    return out


def check_base_files(case, manifest: Manifest) -> Check:
    """Every file that affects the images (weights, configs, scheduler, tokenizer) against the
    sha256 the manifest recorded; a changed, missing or added one is named."""
    from carlos_audit.models.loading import resolve_base_source

    bm = case.base_model
    try:
        src = resolve_base_source(bm.source, base_dir=case.base_dir, variant=bm.variant, config=bm.config)
    except AuditError as e:
        return Check("base model files", False, str(e))
    then = {f["name"]: f["sha256"] for f in manifest.base_model["files"]}
    now = {f["name"]: f["sha256"] for f in src.files}
    changed = sorted(n for n in then.keys() & now.keys() if then[n] != now[n])
    missing, added = sorted(then.keys() - now.keys()), sorted(now.keys() - then.keys())
    if changed or missing or added:
        parts = [f"{label}: {', '.join(names[:5])}" for label, names in (("changed", changed), ("missing", missing), ("added", added)) if names]
        return Check("base model files", False, "base model files differ from the ones recorded; " + "; ".join(parts))
    return Check("base model files", True, f"{len(now)} files (weights, configs, tokenizer) match their recorded sha256")


def verify_case(case_dir: Path, sample: int = 4, seed: int = 0, trust: list[Path] | None = None) -> dict:
    """Every check, every model file read and hashed again (never from models/filehash's cache)."""
    from carlos_audit.models.filehash import rehashing

    with rehashing():
        return _verify_case(case_dir, sample, seed, trust)


def _verify_case(case_dir: Path, sample: int, seed: int, trust: list[Path] | None) -> dict:
    """The checks on the folder's records, each file read and hashed once. A missing or edited
    metrics.json is a failed check, not a refusal: only the manifest is required."""
    from carlos_audit.analysis.alignment import claimed_checks
    from carlos_audit.analysis.near_copies import near_copy_checks

    case_dir = Path(case_dir)
    folder = CaseFolder(case_dir).require_finished(Manifest)
    checks = [check_manifest(folder)]
    manifest = folder.manifest
    checks += check_files(folder, trust)
    checks.append(check_unit_bindings(folder))
    checks.append(check_metrics(folder))
    if manifest.sequential:
        checks.append(check_sequential(folder))
    checks += [Check(*c) for c in claimed_checks(folder)]  # [claimed_works]
    checks += [Check(*c) for c in near_copy_checks(folder)]  # [near_copies]
    checks.append(Check("chain of custody", bool(manifest.custody_ok),
                        "inputs unchanged during the run" if manifest.custody_ok else "an input changed during the run"))
    if sample > 0:
        checks += check_regenerated(folder, sample, seed)
    return {"case_dir": str(case_dir), "sample": sample, "sample_seed": seed, "ok": all(c.ok for c in checks),
            "checks": [c.as_dict() for c in checks]}
