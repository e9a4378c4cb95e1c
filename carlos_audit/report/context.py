"""The report's context: one dict the templates read, built from the stored results.

``build_context(inputs, copy)`` merges what every section needs. Each section's own part comes
from a function in that section's module (evidence.py, method.py, indicators.py,
comparison.py, expert.py); a new section adds its function to ``SECTION_CONTEXT`` below (one
line) and its partial to templates/report.html.j2 (one include line).
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path

from carlos_audit import __version__
from carlos_audit.fileio import read_json
from carlos_audit.hashing import sha256_file
from carlos_audit.paths import portable_command
from carlos_audit.records import Comparison, LoraLoad, Manifest, Metrics
from carlos_audit.report import image_evidence as ev
from carlos_audit.report.claimed_section import claimed_works_context
from carlos_audit.report.near_copy_section import near_copy_context
from carlos_audit.report.comparison import corpus_placement
from carlos_audit.report.expert import expert_context
from carlos_audit.report.indicators_section import indicators
from carlos_audit.report.method import arms_plan, convention_rows, self_reported
from carlos_audit.report.sequential_section import sequential_context
from carlos_audit.report.text import ellipsis, flatten, iso, seeds_text

KNOWN_ERRORS = Path(__file__).resolve().parent / "known_errors.json"
N_TOP_PROMPTS = 5         # results table: prompts with the largest and smallest strength
COPIES = ("archive", "filing")


@dataclass
class ReportInputs:
    """What the renderer read and prepared from a case folder (shared by both copies)."""
    case_dir: Path
    manifest: Manifest
    metrics: Metrics
    comparison: Comparison | None
    report: object               # [report] of the case folder's case.toml (case.casefile.ReportSpec)
    expert: object               # [expert] of it (ExpertSpec)
    casefile_edited: bool        # case.toml differs from the case file as run
    figures: dict
    evidence: dict
    companions: list[dict]       # the JSON files beside the PDF: name, size, sha256, description
    head_to_head: list[dict] = field(default_factory=list)
    body: dict = field(default_factory=dict)   # copy -> (sample, largest, smallest) pair ids
    folder: object = None        # the casefolder.CaseFolder it was read through (each file read once)
    integrity_failures: tuple = ()  # verify's integrity checks that failed (rendered despite them, on request)


def prompt_tables(manifest: Manifest, metrics: Metrics) -> tuple[list[dict], list[dict]]:
    """The prompts with the largest and the smallest strength."""
    prompt_meta = {p.id: p for p in manifest.prompts}
    ranked = sorted(metrics.per_prompt.items(), key=lambda kv: (-kv[1].strength, kv[0]))

    def rows(items):
        return [{"id": pid, "category": prompt_meta[pid].category if pid in prompt_meta else "",
                 "text": ellipsis(prompt_meta[pid].text if pid in prompt_meta else "", 140),
                 "strength": v.strength, "consistency": v.consistency} for pid, v in items]

    k = min(N_TOP_PROMPTS, len(ranked) // 2) if len(ranked) > 1 else len(ranked)
    return rows(ranked[:k]), (rows(list(reversed(ranked[len(ranked) - k:]))) if len(ranked) > 1 else [])


def custody(inp: ReportInputs, copy: str) -> dict:
    """Inputs, their hashes at start and end, and every warning the cover repeats."""
    manifest, case_dir = inp.manifest, inp.case_dir
    inputs = [{"role": i.role if "role" in i else "?", "kind": i.kind if "kind" in i else "file",
               "path": i.path if "path" in i else "", "size": i.size, "sha256": i.sha256, "sha256_end": i.sha256_end,
               "unchanged": bool(i.unchanged)} for i in manifest.inputs]
    custody_ok = bool(manifest.custody_ok) and all(i["unchanged"] for i in inputs)
    metrics_recorded = (manifest.results or {}).get(Metrics.FILE)
    metrics_actual = sha256_file(case_dir / Metrics.FILE)
    load = manifest.lora.load or LoraLoad()
    warnings = [f"INTEGRITY CHECK FAILED: {f}. This report was rendered on request despite the failure "
                "(report --render-despite-integrity-failure); what it states may not be what the run measured."
                for f in inp.integrity_failures]
    if not custody_ok:
        changed = [f"{i['role']} ({Path(str(i['path'])).name})" for i in inputs if not i["unchanged"]]
        warnings.append("CHAIN OF CUSTODY FAILED: input file(s) changed while the run was in progress: "
                        + (", ".join(changed) or "see the chain of custody appendix")
                        + ". The run is marked invalid; its results must not be relied on.")
    if inp.evidence["mismatches"]:
        warnings.append(f"{len(inp.evidence['mismatches'])} image file(s) in the case folder do not match the sha256 recorded "
                        "in the manifest (listed in the chain of custody appendix). The images shown may not be the images that were measured.")
    if metrics_recorded and metrics_recorded != metrics_actual:
        warnings.append("metrics.json in the case folder does not match the sha256 recorded in the manifest at the end of the run.")
    if load.partial:
        warnings.append(f"{len(load.skipped or load.unapplied or [])} of {load.in_file} modules in the LoRA file "
                        f"were not applied to the base model ({load.applied} applied; run with --allow-partial; reasons in "
                        "the method chapter). The profile describes the applied part only.")
    if inp.casefile_edited:
        warnings.append("case.toml in the case folder differs from the case file as run (its sha256 is recorded in the manifest): "
                        "the [report] and [expert] settings of this document come from the edited copy.")
    return {"inputs": inputs, "custody_ok": custody_ok, "warnings": warnings,
            "metrics_sha256_recorded": metrics_recorded, "metrics_sha256_actual": metrics_actual}


def core(inp: ReportInputs, copy: str) -> dict:
    """Cover, summary, method and results: the case, the run, the protocol, the metrics."""
    manifest, metrics = inp.manifest, inp.metrics
    run, proto, lora = manifest.run, manifest.protocol, manifest.lora
    top, bottom = prompt_tables(manifest, metrics)
    environment = manifest.environment or {}
    return {
        "version": __version__,
        "case": manifest.case,
        "tool": manifest.tool,
        "run": run,
        "document_date": iso(run["source_date_epoch"]),
        "command": shlex.join(portable_command(run["command"] if "command" in run else [])),
        "lora": lora,
        "lora_size": next((i.size for i in manifest.inputs if i.role == "lora"), None),
        "self_reported": self_reported(lora, (manifest.signature or {}).get("family")),
        "convention_rows": convention_rows(lora),
        "base_model": manifest.base_model,
        "embedder": manifest.embedder,
        "protocol": proto,
        "seeds_text": seeds_text(list(proto.seeds or [])),
        "signature_rows": flatten(manifest.signature),
        "metrics": metrics,
        "ci": metrics.ci,
        "figures": inp.figures,
        "top_prompts": top,
        "bottom_prompts": bottom,
        "per_category": [{"name": n, **metrics.per_category[n]} for n in sorted(metrics.per_category)],
        "prompts": manifest.prompts,
        "environment_rows": flatten({k: v for k, v in environment.items() if k != "packages"}),
        "package_rows": flatten(environment["packages"] if "packages" in environment else {}),
        "known_errors": read_json(KNOWN_ERRORS)["entries"],
        "arms": proto.arms or {},
        "arms_plan": arms_plan(manifest),
        "indicators": indicators(metrics),
        "comparison": corpus_placement(inp.comparison),
    }


def images(inp: ReportInputs, copy: str) -> dict:
    sample, largest, smallest = inp.body[copy]
    return {
        "image_mismatches": inp.evidence["mismatches"],
        "n_images": inp.evidence["n_images"],
        "sample_cards": ev.pair_cards(sample, inp.manifest, inp.evidence, copy),
        "largest_cards": ev.pair_cards(largest, inp.manifest, inp.evidence, copy),
        "smallest_cards": ev.pair_cards(smallest, inp.manifest, inp.evidence, copy),
        "body_capped": inp.body[copy] != inp.body["archive"],
        "appendix_prompts": ev.appendix_prompts(inp.manifest, inp.evidence),
    }


def comparisons(inp: ReportInputs, copy: str) -> dict:
    from carlos_audit.analysis.replication import replication_context
    from carlos_audit.report.error_rates import error_rates_context

    return {"head_to_head": inp.head_to_head,
            "replication": replication_context(inp.comparison.to_json() if inp.comparison is not None else None),
            "error_rates": error_rates_context(inp.comparison, inp.metrics),
            "n_cmp_images_checked": sum(len(t) for h in inp.head_to_head for t in (h["agree_most"], h["agree_least"]))}


def expert(inp: ReportInputs, copy: str, archive_sha256: str | None) -> dict:
    return {"expert": expert_context(inp.expert, inp.manifest, inp.comparison, inp.companions,
                                     archive_sha256, inp.evidence["n_images"])}


SECTION_CONTEXT = [core, custody, images, comparisons, sequential_context, claimed_works_context, near_copy_context]


def build_context(inp: ReportInputs, copy: str, archive_sha256: str | None = None) -> dict:
    """The context of one copy ("filing" or "archive"); ``archive_sha256`` binds the filing copy
    to the archive copy rendered before it."""
    ctx: dict = {"copy": copy, "paper": inp.report.paper, "companions": inp.companions,
                 "archive_sha256": archive_sha256}
    for part in SECTION_CONTEXT:
        ctx.update(part(inp, copy))
    ctx.update(expert(inp, copy, archive_sha256))
    return ctx
