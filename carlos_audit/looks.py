"""Generate a case's pairs: all at once, or look by look under its pre-registered sequential rule.

``run_protocol`` is how pipeline.py has run/profile.generate_units schedule the pairs. Without ``[protocol.sequential]`` it runs
every arm over every pair (as before). With it (case/sequential_plan.py), look k runs the batches of
the prompts added at look k for every arm, then evaluates the stopping rule from the stored
features of the main profile, model-free (analysis/sequential.evaluate_look), and stops when
every target is met or the last look is done. A killed run resumes through the unit records:
the looks already run are skipped batch by batch and evaluated again, to the same decisions.
"""

from __future__ import annotations

from pathlib import Path

from carlos_audit.case.sequential_plan import SequentialSpec, case_plan, look_rows
from carlos_audit.casefolder.unit_store import CaseStore
from carlos_audit.records import Manifest


def run_protocol(session, plan, pairs: list, prompts: list, corpus, lora_sha256: str,
                 run_arm) -> tuple[list, dict, dict | None]:
    """Run the case's pairs; ``run_arm(arm, pairs)`` generates one arm's missing batches and returns
    its stats (run/profile.run_arm); ``corpus``: the run's opened reference Corpus (or its path, or
    None). Returns the pairs run, the per-arm stats and the manifest's
    ``sequential`` record (None for a case without the table)."""
    look_plan = case_plan(session.case, prompts)
    if look_plan is None:
        return pairs, {arm.name: run_arm(arm, pairs) for arm in plan.arms.values()}, None
    from carlos_audit.analysis.sequential_intervals import LookSetting

    corpus, own = open_reference(corpus, lora_sha256, look_plan.rule)
    pc = session.case.protocol
    setting = LookSetting(look_plan.rule, [look_plan.fraction(k) for k in range(1, len(look_plan.looks) + 1)],
                          look_plan.n_protocol, look_plan.n_seeds, pc.bootstrap_resamples, pc.bootstrap_seed, corpus, own)
    done = {a: {"generated_batches": 0, "cached_batches": 0} for a in plan.arms}
    evaluations = []
    for look in range(1, len(look_plan.looks) + 1):
        run = look_plan.pairs(pairs, look)
        for arm in plan.arms.values():
            st = run_arm(arm, run)
            for k in done[arm.name]:
                done[arm.name][k] += st[k]
        ev = evaluate_stored(session.store, plan.profiles["main"], [p.id for p in run], [p.prompt.id for p in run],
                             look, setting)
        evaluations.append(ev)
        if ev["met"]:
            break
    n_batches = len({p.batch for p in run})
    stats = {a: {**s, "skipped_batches": n_batches - s["generated_batches"] - s["cached_batches"]}
             for a, s in done.items()}
    return run, stats, sequential_record(look_plan, evaluations, len(plan.arms))


def open_reference(corpus, lora_sha256: str, rule: SequentialSpec):
    """The corpus (an opened Corpus, or its path) the percentile and neighbour targets are judged
    against, and the case's own row in it (left out, as the comparison does); (None, None) when
    no target needs it."""
    from carlos_audit.case.sequential_plan import CORPUS_TARGETS

    if corpus is None or all(getattr(rule, k) is None for k in CORPUS_TARGETS):
        return None, None
    from carlos_audit.corpus.placement import own_row
    from carlos_audit.corpus.store import as_corpus

    corpus = as_corpus(corpus)
    return corpus, own_row(corpus, lora_sha256)


def evaluate_stored(store, main: tuple, ids: list[str], prompt_ids: list[str], look: int, setting) -> dict:
    """``evaluate_look`` on the stored features of the pairs ``ids`` (the main profile's arms);
    ``setting``: analysis/sequential.LookSetting."""
    from carlos_audit.analysis.metrics import diffs
    from carlos_audit.analysis.sequential_intervals import evaluate_look

    d = diffs(store.features(main[1], ids), store.features(main[0], ids))
    return evaluate_look(d, prompt_ids, look, setting)


def recheck_looks(store: CaseStore, manifest: Manifest, corpus_path: Path | None = None) -> list[str]:
    """Every look a finished sequential case recorded (``manifest``: its records.Manifest),
    evaluated again from the features of its unit store (``verify``): the looks whose decision or
    intervals differ (empty: the rule was applied as pre-registered and stopped where it says)."""
    import math

    from carlos_audit.analysis.sequential_intervals import LookSetting

    seq, rows, protocol = manifest.sequential, manifest.pairs, manifest.protocol
    looks = [r["n_prompts"] for r in seq["planned_looks"]]
    rule = SequentialSpec.from_dict(seq["rule"])
    corpus, own = open_reference(corpus_path, manifest.lora["sha256"], rule)
    setting = LookSetting(rule, [n / looks[-1] for n in looks], seq["n_prompts_protocol"], seq["n_seeds"],
                          protocol["bootstrap_resamples"], protocol["bootstrap_seed"], corpus, own)
    bad = []
    for rec in seq["looks"]:
        keep = set(seq["order"][:rec["n_prompts"]])
        part = [r for r in rows if r["prompt_id"] in keep]
        ev = evaluate_stored(store, protocol["profiles"]["main"], [r["pair_id"] for r in part],
                             [r["prompt_id"] for r in part], rec["look"], setting)
        same = ev["met"] == rec["met"] and all(
            math.isclose(ev[k]["half_width"], rec[k]["half_width"], rel_tol=1e-9, abs_tol=1e-12)
            for k in ("strength", "consistency") if rec[k]["half_width"] is not None)
        if not same:
            bad.append(f"look {rec['look']}")
    last = seq["looks"][-1]
    if not last["met"] and last["look"] != len(looks):
        bad.append("stopped before the last look without meeting the targets")
    return bad


def sequential_record(look_plan, evaluations: list[dict], n_arms: int) -> dict:
    """The manifest's ``sequential``: the rule, the order, every look evaluated, where it stopped
    and how many images that saved."""
    rows = look_rows(look_plan, n_arms)
    last = evaluations[-1]
    k = last["look"]
    full = look_plan.n_protocol * look_plan.n_seeds * n_arms
    looks = []
    for ev in evaluations:
        entry = {key: ev[key] for key in ("look", "n_prompts", "alpha_look", "z", "fpc", "strength", "consistency",
                                          "targets", "normal_approximation", "met")}
        for key in ("strength_percentile", "consistency_percentile", "neighbours"):
            if key in ev:
                entry[key] = ev[key]
        entry["images"] = rows[ev["look"] - 1]["images"]
        looks.append(entry)
    return {
        "rule": look_plan.rule.to_dict(), "construction": last["construction"], "order": list(look_plan.order),
        "planned_looks": rows, "looks": looks, "stopped_at_look": k, "n_looks": len(look_plan.looks),
        "stopped_early": bool(last["met"] and k < len(look_plan.looks)),
        "reason": "every stopping target met" if last["met"] else "the last look was reached",
        "n_prompts_run": last["n_prompts"], "n_prompts_protocol": look_plan.n_protocol,
        "n_seeds": look_plan.n_seeds, "n_arms": n_arms,
        "images_run": rows[k - 1]["images"], "images_full_protocol": full,
        "images_saved": full - rows[k - 1]["images"], "share_of_protocol": rows[k - 1]["images"] / full,
        "full_protocol": last["n_prompts"] == look_plan.n_protocol,
    }
