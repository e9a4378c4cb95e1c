"""The arm plan: every way a case generates its pairs (adapter x scale x trigger words), each
distinct arm once, and the profiles (base arm, LoRA arm) built from them."""

from __future__ import annotations

from dataclasses import dataclass

from carlos_audit.case.casefile import Case

TARGET_ADAPTER = "target"

@dataclass(frozen=True)
class Arm:
    """One way of generating every pair: which adapter (None = base weights), at what scale,
    and whether the trigger words are appended to the prompt."""

    name: str
    adapter: str | None
    scale: float
    with_triggers: bool
    lora_sha256: str | None = None  # the adapter's file: two arms of the same file are one arm

    def prompt_for(self, text: str, triggers: list[str]) -> str:
        # the upstream CARLoS convention: ", <trigger>" appended for each trigger word
        return text + "".join(f", {t}" for t in triggers) if self.with_triggers else text

    @property
    def spec(self) -> tuple:
        return (self.lora_sha256, self.scale if self.adapter else 0.0, self.with_triggers)


def arms_for(case: Case, lora_sha256: str | None = None) -> tuple[Arm, Arm]:
    policy = case.lora.trigger_policy
    has = bool(case.lora.trigger_words)  # without trigger words the flag changes nothing
    base = Arm("base", None, 0.0, has and policy == "both")
    lora = Arm("lora", TARGET_ADAPTER, case.lora.scale, has and policy in ("both", "lora_only"), lora_sha256)
    return base, lora


@dataclass
class ArmPlan:
    """The arms a case generates (each spec once) and the profiles (base arm, LoRA arm) built
    from them. A profile whose arms equal another's shares them: nothing is generated twice."""

    arms: dict  # name -> Arm, unique specs, generation order
    alias: dict  # requested name -> name of the arm that generates it
    profiles: dict  # profile name -> (base arm name, LoRA arm name)

    def add(self, arm: Arm) -> str:
        for name, a in self.arms.items():
            if a.spec == arm.spec:
                self.alias[arm.name] = name
                return name
        self.arms[arm.name] = arm
        self.alias[arm.name] = arm.name
        return arm.name


def plan_arms(case: Case, lora_sha256: str, comparisons: list[dict]) -> ArmPlan:
    policy = case.lora.trigger_policy
    has = bool(case.lora.trigger_words)
    trig = has and policy in ("both", "lora_only")
    plan = ArmPlan({}, {}, {})
    base_arm, lora_arm = arms_for(case, lora_sha256)
    base, lora = plan.add(base_arm), plan.add(lora_arm)
    plan.profiles["main"] = (base, lora)
    for s in case.protocol.scales:
        plan.profiles[f"scale:{s:g}"] = (base, plan.add(Arm(f"lora-s{s:g}", TARGET_ADAPTER, s, trig, lora_sha256)))
    if case.indicators.trigger_dependence:
        nb = plan.add(Arm("base-notrig", None, 0.0, False))
        nl = plan.add(Arm("lora-notrig", TARGET_ADAPTER, case.lora.scale, False, lora_sha256))
        plan.profiles["trigger:without"] = (nb, nl)
        if policy == "none":
            plan.profiles["trigger:with"] = (plan.add(Arm("base-trig", None, 0.0, has)),
                                             plan.add(Arm("lora-trig", TARGET_ADAPTER, case.lora.scale, has, lora_sha256)))
        else:
            plan.profiles["trigger:with"] = (base, lora)
    for c in comparisons:
        plan.profiles[f"comparison:{c['adapter']}"] = (base, plan.add(Arm(c["adapter"], c["adapter"], case.lora.scale, trig, c["sha256"])))
    return plan


