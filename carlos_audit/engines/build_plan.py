"""A corpus build as work units: plan, run on an engine, account.

Plan (in the driver, no model loaded):

1. each LoRA gets its case folder ``DEST/cases/<id>/`` (case.toml, run.json), as before;
2. arms without an adapter (the base arm) are computed ONCE for the whole build, in a shared
   folder ``DEST/cases/_shared/<arm>-<key>/`` keyed by everything that determines their bytes
   (the reproducibility key of case/signature.py: base model, generation parameters, batch
   layout, the prompt text actually sent, the seeds, the environment that changes bits, thread
   count included; plus the embedder). With trigger policy "both" the base prompt carries the trigger words, so LoRAs
   with different trigger words would get different base arms; in a corpus build every LoRA
   takes its trigger words from the template, so there is one shared base arm per build;
3. one unit per (LoRA, LoRA arm, batch) into the LoRA's case folder;
   (the first unit of the main LoRA arm also returns the case's run record);
4. one finalize unit per LoRA: copy the shared arm into the case folder, then the model-free
   finish step (``pipeline.finish_case``: metrics, manifest) with that run record.

The corpus rows are added by the caller in sorted LoRA order after every finalize unit, so the
corpus bytes do not depend on the engine or on the order units complete.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from carlos_audit.corpus.store import BUILD_CASES_DIR
from carlos_audit.engines.units import WorkUnit
from carlos_audit.errors import AuditError
from carlos_audit.run import cost as cost_mod

SHARED_DIR = "_shared"  # under DEST/cases/ (row ids never start with "_")
BUILD_SCHEMA = "carlos-audit/build/1"


@dataclass
class BuildPlan:
    dest: Path
    rows: list  # [(row id, LoRA path, lora sha256)] in sorted order
    arm_units: list = field(default_factory=list)
    finalize_units: list = field(default_factory=list)
    deps: dict = field(default_factory=dict)  # finalize key -> [arm unit keys]
    shared: dict = field(default_factory=dict)  # shared id -> {"dir", "arm", "rows", "batches"}
    n_prompts: int = 0
    n_seeds: int = 0
    n_batches: int = 0
    steps: int = 0
    n_lora_arms: int = 0

    @property
    def minimum_images(self) -> int:
        """Images a build must generate: every LoRA arm, plus each shared arm once:
        (L + 1) x P x S for L LoRAs sharing one base arm."""
        return (self.n_lora_arms + len(self.shared)) * self.n_prompts * self.n_seeds


def shared_arm_key(case, arm, pairs, environment: dict) -> str:
    """What fixes the bytes of an arm without adapter, from the case alone (no model loaded): the
    reproducibility key (case/signature.py) of the whole arm, with the base model as the case names
    it, the embedder (the shared folder holds embeddings too), and ``environment``, the build's
    (``planned_environment``)."""
    from carlos_audit.case.signature import key_params, reproducibility_key

    pc = case.protocol
    key, _ = reproducibility_key(
        base_model={"source": case.base_model.source, "sha256": case.base_model.sha256,
                    "base_dir": str(case.base_dir)},
        params=key_params(pc, pc.scheduler),
        batch_size=pc.batch_size,
        prompts_sent=[arm.prompt_for(p.prompt.text, list(case.lora.trigger_words)) for p in pairs],
        seeds=[p.seed for p in pairs], environment=environment,
        extra={"embedder": embedder_key(case), **({"watermarker": True} if case.base_model.add_watermarker else {})})
    return key


def embedder_key(case) -> dict:
    """The embedder as the case names it; its preprocessing backend and dtype only when not the
    pinned defaults (so the keys of earlier builds hold)."""
    from carlos_audit.models.pinned import EMBEDDER_DEFAULTS

    key = {"model": case.embedder.model, "pretrained": case.embedder.pretrained, "sha256": case.embedder.sha256}
    pinned = (case.embedder.preprocess, case.embedder.dtype)
    return key | ({"preprocess": pinned[0], "dtype": pinned[1]} if pinned != EMBEDDER_DEFAULTS else {})


def planned_environment(case, threads: int | None) -> dict:
    """The environment a build's units will run under, as far as the driver knows it: this
    process's packages and machine, the case's device and dtype as written, ``threads``. CUDA is
    never queried here (a driver without a GPU plans a CUDA build): a CUDA arm is keyed by its
    device class, and every unit records the GPU it ran on, one class per shared arm
    (run/devices.check_one_class, in the driver)."""
    from carlos_audit.run.environment import capture

    device = case.base_model.device
    env = capture("cpu", case.base_model.dtype, {}) | {"device": device}
    if device.startswith("cuda"):
        env["cuda"] = None  # the workers' toolkit, recorded per unit
    return env | {"torch_threads": threads or env["torch_threads"]}


def plan_build(dest: Path, cases: list, *, allow_partial: bool = False, argv: list[str] | None = None,
               threads: int | None = None) -> BuildPlan:
    """``cases``: [(row id, LoRA path, Case)] in sorted order; ``threads``: the torch threads every
    unit runs with (default: this process's). Prepares the case folders."""
    from carlos_audit.case.protocol import batches, enumerate_pairs, load_prompts
    from carlos_audit.engines.inputs import planned_inputs
    from carlos_audit.hashing import sha256_file
    from carlos_audit.run.arms import plan_arms
    from carlos_audit.run.intake import prepare_case_dir

    if cases and cases[0][2].protocol.sequential is not None:
        raise AuditError(f"{cases[0][2].path}: a corpus build plans every unit of the full protocol up front; "
                         "remove [protocol.sequential] from the template (run sequential cases with `run`, then `corpus add`)")
    plan = BuildPlan(Path(dest), [])
    argv = tuple(argv or ())
    inputs = planned_inputs(cases[0][2]) if cases else ()  # the same template for every LoRA
    for rid, lora, case in cases:
        case_dir = plan.dest / BUILD_CASES_DIR / rid
        prepare_case_dir(case_dir, case, force=False)
        lora_sha = sha256_file(lora)
        plan.rows.append((rid, lora, lora_sha))
        prompts, _ = load_prompts(case.protocol.prompts, case.base_dir)
        pc = case.protocol
        pairs = enumerate_pairs(prompts, pc.seeds, pc.batch_size)
        batch_ids = [b[0].batch for b in batches(pairs)]
        plan.n_prompts, plan.n_seeds, plan.n_batches, plan.steps = len(prompts), len(pc.seeds), len(batch_ids), pc.steps
        common = dict(case_id=rid, case_text=case.raw_text, case_path=str(case.path), lora_path=str(lora),
                      lora_sha256=lora_sha, allow_partial=allow_partial, inputs=inputs)
        arms = plan_arms(case, lora_sha, [])
        shared, deps = [], []
        for arm in arms.arms.values():
            if arm.adapter is None:
                sid = f"{arm.name}-{shared_arm_key(case, arm, pairs, planned_environment(case, threads))[:16]}"
                sdir = plan.dest / BUILD_CASES_DIR / SHARED_DIR / sid
                if sid not in plan.shared:
                    # computed with the first LoRA's session (adapters disabled: the base weights)
                    plan.shared[sid] = {"dir": str(sdir), "arm": arm.name, "rows": [], "batches": batch_ids}
                    for b in batch_ids:
                        plan.arm_units.append(WorkUnit("arm", store=str(sdir), arm=arm.name, batch=b, **common))
                plan.shared[sid]["rows"].append(rid)
                shared.append((arm.name, str(sdir), f"{SHARED_DIR}/{sid}", tuple(batch_ids)))
                deps += [f"{sid}/{arm.name}/b{b:05d}" for b in batch_ids]
            else:
                plan.n_lora_arms += 1
                for b in batch_ids:
                    first = arm.name == arms.profiles["main"][1] and b == batch_ids[0]
                    u = WorkUnit("arm", store=str(case_dir), arm=arm.name, batch=b, record=first, **common)
                    plan.arm_units.append(u)
                    deps.append(u.key)
        fin = WorkUnit("finalize", store=str(case_dir), shared=tuple(shared), argv=argv, **common)
        plan.finalize_units.append(fin)
        plan.deps[fin.key] = deps
    # shared (base) units first, then the LoRA units, each in plan order
    shared_dirs = {s["dir"] for s in plan.shared.values()}
    plan.arm_units.sort(key=lambda u: u.store not in shared_dirs)
    return plan


def run_plan(plan: BuildPlan, *, engine: str = "local", ray_address: str | None = None, gpus_per_task: float = 0,
             threads: int | None = None, unit_fn=None, progress: bool = True) -> dict:
    """Run every unit of ``plan`` on ``engine``; returns {finalize results by row id, unit results,
    per-node stats of this invocation, wall_s}."""
    from carlos_audit.engines.units import run_unit

    unit_fn = unit_fn or run_unit
    t0 = time.perf_counter()
    if engine == "local":
        from carlos_audit.engines.local import run_local

        arm_results, fin_results, nodes = run_local(plan, threads=threads, unit_fn=unit_fn, progress=progress)
    elif engine == "ray":
        from carlos_audit.engines.ray_engine import run_ray

        arm_results, fin_results, nodes = run_ray(plan, address=ray_address, gpus_per_task=gpus_per_task, threads=threads,
                                           unit_fn=unit_fn, progress=progress)
    else:
        raise AuditError(f"unknown engine {engine!r}; allowed: local, ray")
    return {"arm_units": arm_results, "finalized": {r["case_id"]: r for r in fin_results}, "nodes": nodes,
            "wall_s": time.perf_counter() - t0}


def default_threads() -> int:
    import torch

    return torch.get_num_threads()


def build_cost(plan: BuildPlan) -> dict:
    """Totals over the unit records of this build: each shared arm once, each LoRA arm once."""
    from carlos_audit.casefolder.unit_store import CaseStore

    total, by_kind = cost_mod.zero(), {"shared": cost_mod.zero(), "lora": cost_mod.zero()}
    unmeasured = 0
    shared_dirs = {s["dir"] for s in plan.shared.values()}
    for u in plan.arm_units:
        rec = CaseStore(u.store).unit_done(u.arm, u.batch) or {}
        c = rec.get("cost")
        if c is None:
            unmeasured += 1
            continue
        cost_mod.add(total, c)
        cost_mod.add(by_kind["shared" if u.store in shared_dirs else "lora"], c)
    return {"total": total, "shared_arms": by_kind["shared"], "lora_arms": by_kind["lora"], "unmeasured_units": unmeasured}


def build_record(plan: BuildPlan, run: dict, *, engine: str, threads: int, ray_address, gpus_per_task) -> dict:
    """build.json: what the build computed (hook counts summed from the unit records) against the
    minimum (L + 1) x P x S images, and how this invocation ran."""
    costs = build_cost(plan)
    n_l = len(plan.rows)
    pairs = plan.n_prompts * plan.n_seeds
    executed = sum(1 for r in run["arm_units"] if r["status"] == "done")
    nodes = run.get("nodes", {})
    return {
        "schema": BUILD_SCHEMA,
        "engine": engine, "ray_address": ray_address, "gpus_per_task": gpus_per_task, "torch_threads": threads,
        "loras": [r[0] for r in plan.rows], "n_loras": n_l, "n_prompts": plan.n_prompts, "n_seeds": plan.n_seeds,
        "steps": plan.steps,
        "shared_arms": {k: {"folder": f"{BUILD_CASES_DIR}/{SHARED_DIR}/{k}", "arm": v["arm"], "used_by": v["rows"]} for k, v in plan.shared.items()},
        "images": {
            "minimum": plan.minimum_images,
            "formula": "(L + 1) x P x S: each LoRA arm, and the base arm once per build",
            "naive_per_lora_base": 2 * n_l * pairs,
            "generated": costs["total"]["images_generated"],
            "note": "generated < minimum when base images came from the base-image cache of an earlier run",
        },
        "cost": {"counting": cost_mod.COUNTING, **costs},
        "this_invocation": {"arm_units": len(run["arm_units"]), "arm_units_executed": executed,
                            "arm_units_already_done": len(run["arm_units"]) - executed,
                            "cases_finalized": len(run["finalized"]), "wall_s": round(run["wall_s"], 3),
                            "nodes": nodes,
                            "images_generated": sum(n["images_generated"] for n in nodes.values())},
    }
