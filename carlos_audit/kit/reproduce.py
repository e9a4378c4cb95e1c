"""``carlos-audit reproduce KIT.zip --lora FILE --out DIR``: repeat a case from its kit.

    open        the kit: every file checked against kit.json, extracted to DIR/kit/
    refuse      the inputs given here: each sha256 must equal the kit's, named when it does not
                (before any model is loaded); then the base model and embedder identities
    environment this machine's packages and run settings against the kit's lock, every difference
    generate    all pairs (--all) or the batches holding a sample of pairs stratified over the prompt
                categories, every arm the kit's case generated (comparison arms when their LoRAs
                are given), with the profile's own functions (run/profile: make_session, run_arm)
                into DIR/case/; the base-image cache is never used, so the base arm is regenerated
    compare     images, features, diffs, metrics, conclusions (compare.py)
    write       DIR/reproduction.json and DIR/reproduction.pdf (document.py)

The verdict and exit status: ``identical`` (0), ``within tolerance`` (4), ``different`` (5).
A refused input or a damaged kit is an error (exit 1) and nothing is generated.
"""

from __future__ import annotations

import random
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from carlos_audit.casefolder import CaseFolder
from carlos_audit.errors import AuditError
from carlos_audit.fileio import write_json_atomic, write_text_atomic
from carlos_audit.hashing import sha256_bytes, sha256_file
from carlos_audit.kit.export import KIT_JSON, KIT_SCHEMA
from carlos_audit.records import Comparison, Manifest

REPRO_SCHEMA = "carlos-audit/reproduction/1"
EXIT_CODES = {"identical": 0, "within tolerance": 4, "different": 5}
OUT_ARTIFACTS = ("kit", "case", "case.toml", "reproduction.json", "reproduction.pdf", "reproduction.pdf.sha256")
DEFAULT_SAMPLE = 8


# ----------------------------------------------------------------------------- the kit


def open_kit(kit_path: Path, dest: Path) -> dict:
    """Check every file of the kit against kit.json and extract it to ``dest``. Returns kit.json."""
    import json

    kit_path = Path(kit_path)
    if not kit_path.is_file():
        raise AuditError(f"kit {kit_path} does not exist")
    try:
        zf = zipfile.ZipFile(kit_path)
    except (zipfile.BadZipFile, OSError) as e:
        raise AuditError(f"{kit_path.name} is not a zip file: {e}") from None
    with zf:
        names = zf.namelist()
        if KIT_JSON not in names:
            raise AuditError(f"{kit_path.name} is not a carlos-audit kit (no {KIT_JSON})")
        try:
            kit = json.loads(zf.read(KIT_JSON))
        except ValueError as e:
            raise AuditError(f"{kit_path.name}: {KIT_JSON} is not valid JSON: {e}") from None
        if kit.get("schema") != KIT_SCHEMA:
            raise AuditError(f"{kit_path.name}: kit schema {kit.get('schema')!r}; this carlos-audit reads {KIT_SCHEMA}")
        files = kit.get("files", {})
        bad = [n for n in names if n != KIT_JSON and n not in files]
        missing = [n for n in files if n not in names]
        if bad or missing:
            raise AuditError(f"{kit_path.name}: files not listed in kit.json ({', '.join(bad[:3])}) or missing ({', '.join(missing[:3])})")
        for name in sorted(files):
            pp = PurePosixPath(name)
            if pp.is_absolute() or ".." in pp.parts or name.endswith("/"):
                raise AuditError(f"{kit_path.name}: refusing kit entry {name!r}")
            data = zf.read(name)
            if sha256_bytes(data) != files[name]:
                raise AuditError(f"{kit_path.name}: {name} does not match its sha256 in kit.json (the kit was modified)")
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        (dest / KIT_JSON).write_bytes(zf.read(KIT_JSON))
    return kit


def check_inputs(kit: dict, given: dict[str, Path]) -> list[dict]:
    """Each input given here against the kit's sha256, before anything is loaded: a mismatch
    is refused with the role, the file and both hashes."""
    from carlos_audit.hashing import tree_sha256

    by_role = {i["role"]: i for i in kit["inputs"]}
    checked, wrong = [], []
    for role, path in given.items():
        want = by_role[role]
        if not path.exists():
            raise AuditError(f"{role} {path} does not exist")
        if role == "corpus":
            continue  # a corpus is checked by its directions and rows hashes (compare.py)
        got = tree_sha256(path) if path.is_dir() else sha256_file(path)
        checked.append({"role": role, "name": path.name, "sha256": got, "kit_sha256": want["sha256"], "same": got == want["sha256"]})
        if got != want["sha256"]:
            wrong.append(f"{role} {path.name} (sha256 {got[:16]}…, the kit's {want['name']} has {str(want['sha256'])[:16]}…)")
    if wrong:
        raise AuditError("refusing to reproduce, nothing generated: input(s) differ from the kit's: " + "; ".join(wrong))
    return checked


def select_pairs(rows: list[dict], n: int, seed: int) -> list[str]:
    """``n`` pair ids stratified over the prompt categories: round-robin over the categories (in
    protocol order), a seeded random order within each."""
    rng = random.Random(seed)
    by_cat: dict[str, list[str]] = {}
    for r in rows:
        by_cat.setdefault(r["category"], []).append(r["pair_id"])
    for ids in by_cat.values():
        rng.shuffle(ids)
    picked: list[str] = []
    while len(picked) < min(n, len(rows)):
        for ids in by_cat.values():
            if ids and len(picked) < n:
                picked.append(ids.pop())
    return picked


# ----------------------------------------------------------------------------- the case to regenerate


def _given_inputs(kit: dict, kit_dir: Path, lora, base, embedder, comparisons, corpus) -> dict[str, Path]:
    """Role -> file to use: what the user gave, else the kit's own copy when it carries one."""
    by_role = {i["role"]: i for i in kit["inputs"]}
    given: dict[str, Path] = {}

    def pick(role: str, value) -> None:
        if value is not None:
            given[role] = Path(value).expanduser().resolve()
        elif role in by_role and by_role[role].get("included"):
            given[role] = kit_dir / by_role[role]["kit_path"]

    pick("lora", lora)
    if "lora" not in given:
        raise AuditError("the kit does not carry the LoRA: pass --lora FILE")
    for role, value in (("base_model", base), ("embedder", embedder)):
        if role in by_role and by_role[role]["kind"] in ("file", "folder"):
            pick(role, value)
            if role not in given:
                raise AuditError(f"the kit's {role} is a local {by_role[role]['kind']} ({by_role[role]['name']}): pass --{role.split('_')[0]} PATH")
    n_cmp = sum(1 for r in by_role if r.startswith("comparison_lora_"))
    if comparisons and len(comparisons) != n_cmp:
        raise AuditError(f"the kit's case has {n_cmp} comparison LoRA(s); --comparison was given {len(comparisons)} time(s)")
    for k in range(1, n_cmp + 1):
        pick(f"comparison_lora_{k}", comparisons[k - 1] if comparisons else None)
    if any(f"comparison_lora_{k}" not in given for k in range(1, n_cmp + 1)):
        for k in range(1, n_cmp + 1):
            given.pop(f"comparison_lora_{k}", None)
    if "corpus" in by_role:
        pick("corpus", corpus)
    return given


def _case_text(kit_dir: Path, kit: dict, given: dict[str, Path], base: str | None) -> str:
    """The kit's case file with its paths pointing at the inputs on this machine."""
    import tomllib

    from carlos_audit.case.case_toml import dump_case

    data = tomllib.loads((kit_dir / "case.toml").read_text("utf-8"))
    data["lora"]["path"] = str(given["lora"])
    if "base_model" in given:
        data["base_model"]["source"] = str(given["base_model"])
    elif base is not None:
        data["base_model"]["source"] = base
    if "embedder" in given:
        data["embedder"]["pretrained"] = str(given["embedder"])
    data["protocol"]["prompts"] = str(kit_dir / "prompts.json")
    cmps = sorted((r for r in given if r.startswith("comparison_lora_")), key=lambda r: int(r.rsplit("_", 1)[1]))
    if cmps:
        data["comparison"] = {"loras": [str(given[r]) for r in cmps]}
    else:
        data.pop("comparison", None)
    data.pop("reference", None)  # the corpus placement is recomputed from stored numbers (compare.py)
    data.pop("claimed_works", None)  # not regenerated: their features are stored (results/embeddings/claimed)
    data.pop("near_copies", None)  # nor the extraction arms: their images and features are stored (export)
    return dump_case(data)


def _prepare_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise AuditError(f"output {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise AuditError(f"output folder {out} is not empty; pass --force to replace a previous reproduction, or choose another --out")
        from carlos_audit.run.intake import clear_artifacts

        clear_artifacts(out, OUT_ARTIFACTS)
    out.mkdir(parents=True, exist_ok=True)


# ----------------------------------------------------------------------------- reproduce


@dataclass(frozen=True)
class Reproduction:
    """What a reproduction is asked for: the inputs the kit lists but does not carry (the LoRA,
    the base model, the embedder's weights, the comparison LoRAs in order, the reference
    corpus), the pairs (``sample``, drawn with ``sample_seed``; None: every pair), the torch
    threads, replace a previous reproduction (``force``), progress bars, the PDF rendered."""

    lora: str | Path | None = None
    base: str | None = None
    embedder: str | Path | None = None
    comparisons: tuple = ()
    corpus: str | Path | None = None
    sample: int | None = DEFAULT_SAMPLE
    sample_seed: int = 0
    threads: int | None = None
    force: bool = False
    progress: bool = True
    render: bool = True


def reproduce(kit_path: Path, out: Path, **request) -> dict:
    """Reproduce the kit's case; ``request``: the fields of ``Reproduction``. Writes and returns
    reproduction.json."""
    req = Reproduction(**request)
    sample, sample_seed, threads, base = req.sample, req.sample_seed, req.threads, req.base
    out = Path(out).resolve()
    _prepare_out(out, req.force)
    kit_dir = out / "kit"
    kit = open_kit(Path(kit_path), kit_dir)
    given = _given_inputs(kit, kit_dir, req.lora, base, req.embedder, list(req.comparisons or []), req.corpus)
    checked = check_inputs(kit, given)

    from carlos_audit.case.casefile import parse_case

    text = _case_text(kit_dir, kit, given, base)
    write_text_atomic(out / "case.toml", text)
    case = parse_case(text, out / "case.toml")
    results = CaseFolder(kit_dir / "results").require_finished()  # the case's records as exported
    manifest, comparison = results.manifest, results.comparison

    import torch

    threads_before = torch.get_num_threads()
    try:
        if threads is not None:
            torch.set_num_threads(int(threads))
        generated = _regenerate(case, manifest, out, sample, sample_seed, req.progress)
    finally:
        torch.set_num_threads(threads_before)
    result = _compare(kit, manifest, comparison, kit_dir, out, generated, given.get("corpus"))
    result.update({
        "schema": REPRO_SCHEMA,
        "kit": {"file": Path(kit_path).name, "sha256": sha256_file(kit_path), "case": kit["case"], "tool": kit["tool"],
                "report_sha256": kit["report"]["sha256"], "originals": kit["originals"]},
        "inputs": checked,
        "mode": "all" if sample is None else "sample",
        "sample": None if sample is None else {"requested": sample, "seed": sample_seed,
                                               "pairs": generated["sampled"], "batches": generated["batches"]},
        "threads": threads,
    })
    write_json_atomic(out / "reproduction.json", result)
    if req.render:
        from carlos_audit.kit.document import render_reproduction

        render_reproduction(out)
    return result


def _regenerate(case, manifest: Manifest, out: Path, sample: int | None, sample_seed: int, progress: bool) -> dict:
    """Generate (into out/case) the arms of the kit's case for every pair or for the batches
    holding a stratified sample (run/profile.regenerate, as verify does); returns what was
    generated and the environment."""
    from carlos_audit.case.options import RunOptions
    from carlos_audit.case.protocol import prompts_sha256
    from carlos_audit.run.intake import utc_now
    from carlos_audit.run.profile import prepare_run, regenerate
    from carlos_audit.casefolder.unit_store import CaseStore

    partial = bool((manifest.lora.get("load") or {}).get("partial"))
    store = CaseStore(out / "case")
    prep = prepare_run(case, store, RunOptions(allow_partial=partial), prepare_folder=False)
    if prompts_sha256(prep.prompts) != manifest.protocol["prompts_sha256"]:
        raise AuditError("the kit's prompts.json does not give the prompts the case was run with (prompts_sha256 differs)")
    from carlos_audit.case.sequential_plan import run_pairs

    # a sequential case: the looks it ran (recorded), never decided again here
    sampled, pairs = None, run_pairs(prep.pairs, manifest.sequential)
    if sample is not None:
        sampled = select_pairs(manifest.pairs, sample, sample_seed)
        keep = {p.batch for p in pairs if p.id in set(sampled)}
        pairs = [p for p in pairs if p.batch in keep]
    started = utc_now()
    plan = regenerate(prep, manifest.to_json(), store, batch_ids={p.batch for p in pairs}, progress=progress)
    return {"pair_ids": [p.id for p in pairs], "sampled": sampled, "batches": sorted({p.batch for p in pairs}),
            "arms": list(plan.arms), "profiles": {k: list(v) for k, v in plan.profiles.items()},
            "environment": prep.session.environment, "started_utc": started, "finished_utc": utc_now()}


def _compare(kit: dict, manifest: Manifest, comparison: Comparison | None, kit_dir: Path, out: Path, gen: dict,
             corpus_dir: Path | None) -> dict:
    from carlos_audit.kit import compare
    from carlos_audit.kit.envlock import diff_environment, installed_distributions, parse_lock

    orig, repro = kit_dir / "results", out / "case"
    wanted = set(gen["pair_ids"])
    rows = [r for r in manifest.pairs if r["pair_id"] in wanted]
    recorded = {(r["pair_id"], arm): e["image_sha256"] for r in rows for arm, e in r["arms"].items()}
    images = compare.compare_images(orig, repro, rows, gen["arms"], recorded)
    profiles = {k: tuple(v) for k, v in gen["profiles"].items()}
    p = manifest.protocol
    metrics = compare.compare_metrics(orig, repro, rows, profiles, p["bootstrap_resamples"], p["bootstrap_seed"])
    every_pair = len(rows) == len(manifest.pairs)
    conclusions = compare.compare_conclusions(comparison, metrics["main"], corpus_dir) if every_pair else None
    verdict, reasons = compare.verdict(images, metrics, conclusions)
    env_rows = diff_environment(parse_lock((kit_dir / "environment.lock").read_text("utf-8")), installed_distributions(),
                                kit["environment"]["run"], gen["environment"])
    for m in metrics.values():
        m.pop("direction", None)
    cos = [r["feature_cosine"] for r in images]
    return {
        "verdict": verdict,
        "exit_status": EXIT_CODES[verdict],
        "reasons": reasons,
        "created_utc": gen["finished_utc"],
        "source_date_epoch": _epoch(gen["finished_utc"]),
        "environment": {"here": gen["environment"], "differences": env_rows,
                        "numeric_differences": sum(1 for r in env_rows if r["numeric"])},
        "summary": {
            "pairs_compared": len(rows), "pairs_in_case": len(manifest.pairs), "arms": gen["arms"],
            "images_compared": len(images), "images_identical": sum(r["image_identical"] for r in images),
            "features_identical": sum(r["features_identical"] for r in images),
            "feature_cosine_min": min(cos) if cos else None,
            "feature_cosine_median": float(sorted(cos)[len(cos) // 2]) if cos else None,
            "feature_cosine_tolerance": compare.FEATURE_COSINE_TOLERANCE,
            "metric_tolerance": compare.METRIC_TOLERANCE,
            "psnr_db_min": min((r["pixels"]["psnr_db"] for r in images if r["pixels"] and r["pixels"]["psnr_db"] is not None), default=None),
            "comparison_arms_reproduced": any(a.startswith("cmp") for a in gen["arms"]),
            "comparison_loras_in_case": sum(1 for i in kit["inputs"] if i["role"].startswith("comparison_lora_")),
        },
        "images": images,
        "diffs": compare.compare_diffs(orig, repro, rows, profiles),
        "metrics": metrics,
        "conclusions": conclusions,
    }


def _epoch(utc: str) -> int:
    import calendar
    import time

    return calendar.timegm(time.strptime(utc, "%Y-%m-%dT%H:%M:%SZ"))
