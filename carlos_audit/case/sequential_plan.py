"""The pre-registered sequential protocol: the order of the prompts and the looks, fixed before any
image is made.

A case file's ``[protocol.sequential]`` table asks for it::

    [protocol.sequential]
    order_seed = 2026            # fixes the prompt order (recorded in the manifest)
    step = 16                    # prompts added per look (balanced over subcategories)
    min_prompts = 16             # the first look
    max_prompts = 64             # the last look (default: every prompt of the protocol)
    alpha = 0.05                 # the error spent over all looks
    spending = "pocock"          # or "obrien-fleming" (Lan-DeMets spending functions)
    strength_half_width = 0.05   # stopping targets; a target left out is not required
    consistency_half_width = 0.01
    percentile_half_width = 5.0  # percentage points, against [reference] corpus
    neighbour_stability = 0.8    # mean share of the top-k kept under the resamples
    neighbour_k = 5
    normal_check = true          # no stop before Cochran's rule holds (analysis/sequential_intervals.py)

The order is a category-stratified random permutation: the prompts of each subcategory are
shuffled with ``order_seed``, the subcategories too, and the order takes one prompt of each
subcategory in turn; look k holds the first ``min(min_prompts + (k-1) step, max_prompts)`` of it.
The batch layout is the full protocol's (``protocol.enumerate_pairs``): a look runs the batches of
its prompts, so a stopped case's units are the full case's units, bit for bit. That needs every
batch to hold one prompt's seeds only: the number of seeds must be a multiple of ``batch_size``.
No torch, no numpy beyond the permutation.
"""

from __future__ import annotations

from dataclasses import dataclass

from carlos_audit.case.spec import section_type
from carlos_audit.errors import AuditError

SPENDING = ("pocock", "obrien-fleming")
TARGETS = ("strength_half_width", "consistency_half_width", "percentile_half_width", "neighbour_stability")
CORPUS_TARGETS = ("percentile_half_width", "neighbour_stability")
#: key -> (python types, default); None: not required / every prompt
KEYS = {
    "order_seed": ((int,), None), "step": ((int,), None), "min_prompts": ((int,), None),
    "max_prompts": ((int,), None), "alpha": ((int, float), 0.05), "spending": ((str,), "pocock"),
    "strength_half_width": ((int, float), None), "consistency_half_width": ((int, float), None),
    "percentile_half_width": ((int, float), None), "neighbour_stability": ((int, float), None),
    "neighbour_k": ((int,), 5), "normal_check": ((bool,), True),
}
REQUIRED = ("order_seed", "step", "min_prompts")
#: the validated table (``case.protocol.sequential``), generated from KEYS
SequentialSpec = section_type("sequential", {k: (float if float in types else types[0], default)
                                             for k, (types, default) in KEYS.items()}, REQUIRED, module=__name__)


def check_table(table: dict, protocol: dict, where: str, has_corpus: bool = True) -> dict:
    """The validated ``[protocol.sequential]`` table with its defaults (what the manifest records)."""
    out = {}
    for k in table:
        if k not in KEYS:
            raise AuditError(f"{where}: unknown key protocol.sequential.{k}; allowed: {', '.join(KEYS)}")
    for k, (types, default) in KEYS.items():
        v = table.get(k, default)
        if v is None and k in REQUIRED:
            raise AuditError(f"{where}: missing required key protocol.sequential.{k}")
        if v is not None and (isinstance(v, bool) != (types == (bool,)) or not isinstance(v, types)):
            kind = {(str,): "string", (bool,): "boolean"}.get(types, "number")
            raise AuditError(f"{where}: protocol.sequential.{k} must be a {kind}, got {type(v).__name__} {v!r}"[:300])
        out[k] = float(v) if v is not None and float in types else v
    for k, lo in (("step", 1), ("min_prompts", 2), ("neighbour_k", 1)):
        if out[k] < lo:
            raise AuditError(f"{where}: protocol.sequential.{k} must be >= {lo}")
    if out["order_seed"] < 0:
        raise AuditError(f"{where}: protocol.sequential.order_seed must be >= 0")
    if out["max_prompts"] is not None and out["max_prompts"] < out["min_prompts"]:
        raise AuditError(f"{where}: protocol.sequential.max_prompts must be >= min_prompts")
    if not 0 < out["alpha"] < 1:
        raise AuditError(f"{where}: protocol.sequential.alpha must lie between 0 and 1")
    if out["spending"] not in SPENDING:
        raise AuditError(f"{where}: protocol.sequential.spending {out['spending']!r}; allowed: {', '.join(SPENDING)}")
    for k in TARGETS:
        if out[k] is not None and out[k] <= 0:
            raise AuditError(f"{where}: protocol.sequential.{k} must be > 0")
    if out["neighbour_stability"] is not None and out["neighbour_stability"] > 1:
        raise AuditError(f"{where}: protocol.sequential.neighbour_stability is a share: at most 1")
    if not any(out[k] is not None for k in TARGETS):
        raise AuditError(f"{where}: protocol.sequential needs at least one stopping target ({', '.join(TARGETS)})")
    for k in CORPUS_TARGETS:
        if out[k] is not None and not has_corpus:
            raise AuditError(f"{where}: protocol.sequential.{k} needs a reference corpus ([reference] corpus)")
    if len(protocol["seeds"]) % protocol["batch_size"]:
        raise AuditError(f"{where}: protocol.sequential needs every batch to hold one prompt's seeds: the number of "
                         f"seeds ({len(protocol['seeds'])}) must be a multiple of batch_size ({protocol['batch_size']})")
    return out


@dataclass(frozen=True)
class LookPlan:
    """The pre-registered plan: the prompt order and the prompts of each look."""

    rule: SequentialSpec  # the validated table (case.protocol.sequential)
    order: list[str]      # prompt ids, in the order they are added
    looks: list[int]      # cumulative prompts at each look
    n_protocol: int       # prompts of the full protocol
    n_seeds: int

    def prompt_ids(self, look: int) -> set[str]:
        """The prompts of looks 1..``look`` (1-based)."""
        return set(self.order[:self.looks[look - 1]])

    def pairs(self, pairs: list, look: int) -> list:
        """The protocol's pairs (its order and batch layout) of the prompts of looks 1..``look``."""
        keep = self.prompt_ids(look)
        return [p for p in pairs if p.prompt.id in keep]

    def fraction(self, look: int) -> float:
        """The information fraction of a look: its prompts over the last look's."""
        return self.looks[look - 1] / self.looks[-1]


def prompt_order(prompts: list, seed: int) -> list[str]:
    """Category-stratified random permutation of the prompt ids: each subcategory's prompts
    shuffled, the subcategories shuffled, then one prompt of each subcategory in turn."""
    import numpy as np

    rng = np.random.default_rng(seed)
    strata: dict[tuple, list[str]] = {}
    for p in prompts:
        strata.setdefault((p.category, p.subcategory), []).append(p.id)
    queues = [list(np.array(ids)[rng.permutation(len(ids))]) for ids in strata.values()]
    queues = [queues[i] for i in rng.permutation(len(queues))]
    order = []
    while any(queues):
        for q in queues:
            if q:
                order.append(str(q.pop(0)))
    return order


def plan_looks(rule: SequentialSpec, prompts: list, n_seeds: int) -> LookPlan:
    """The looks of ``rule`` (``case.protocol.sequential``) over ``prompts``."""
    n = len(prompts)
    top = n if rule.max_prompts is None else rule.max_prompts
    if top > n or rule.min_prompts > n:
        raise AuditError(f"protocol.sequential: min_prompts ({rule.min_prompts}) and max_prompts ({top}) "
                         f"must not exceed the protocol's {n} prompts")
    looks = []
    k = rule.min_prompts
    while k < top:
        looks.append(k)
        k += rule.step
    looks.append(top)
    return LookPlan(rule, prompt_order(prompts, rule.order_seed), looks, n, n_seeds)


def look_rows(plan: LookPlan, n_arms: int) -> list[dict]:
    """Per look: the prompts, the cumulative images of every arm, and the share of the full protocol."""
    full = plan.n_protocol * plan.n_seeds * n_arms
    return [{"look": i + 1, "n_prompts": n, "images": n * plan.n_seeds * n_arms,
             "share_of_protocol": n * plan.n_seeds * n_arms / full} for i, n in enumerate(plan.looks)]


def case_plan(case, prompts: list) -> LookPlan | None:
    """The case's look plan, or None when its case file has no ``[protocol.sequential]``."""
    rule = case.protocol.sequential
    return None if rule is None else plan_looks(rule, prompts, len(case.protocol.seeds))


def run_pairs(pairs: list, sequential: dict | None) -> list:
    """The pairs a finished case ran: all of them, or those of a sequential case's looks run
    (manifest ``sequential``)."""
    if not sequential:
        return pairs
    keep = set(sequential["order"][:sequential["n_prompts_run"]])
    return [p for p in pairs if p.prompt.id in keep]


def sequential_note(sequential: dict) -> str | None:
    """A corpus row's note for a case that ran part of its protocol (None for a full one)."""
    if not isinstance(sequential, dict) or sequential.get("full_protocol", True):
        return None
    return (f"sequential: stopped at look {sequential.get('stopped_at_look')} of {sequential.get('n_looks')}, "
            f"{sequential.get('n_prompts_run')} of {sequential.get('n_prompts_protocol')} prompts "
            f"({sequential.get('reason')}); values estimate the full-protocol values")
