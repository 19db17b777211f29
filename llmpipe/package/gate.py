"""The promotion gate: may a candidate model version replace the `production` one?

The rules compare flat metric dicts (the keys the evaluate stage writes) and know nothing about MLflow:
- bits per byte (`eval/<model>/<task>/bits_per_byte`): at most `max_bpb_regression` (relative) above
  production's, and at most `minimums.bpb_max` when there is no production version yet;
- accuracy (`eval/<model>/<task>/acc`): at most `max_accuracy_drop` (absolute) below production's, and at
  least `minimums.acc_min` for a first version;
- contamination (`decontamination/<task>/fraction`): at most `max_contamination`, always.
A candidate missing a metric that production has, or with no bpb or accuracy at all, fails: a gate that
passes whatever was not measured would promote a broken package.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from pydantic import Field

from llmpipe.config import StageConfig


class Minimums(StageConfig):
    """Absolute bounds a first version must meet alone (there is no production version to compare with)."""

    bpb_max: float = Field(3.5, gt=0, description="highest bits per byte on every bpb task (a uniform guess over "
                                                  "the demo's 4096 pieces scores about 3.8)")
    acc_min: dict[str, float] = Field({"llmpipe_chat_reply": 0.28, "llmpipe_continuation": 0.28},
                                      description="lowest accuracy per task (4-choice tasks: chance is 0.25); "
                                                  "tasks not listed have no minimum")


class GateSettings(StageConfig):
    """params.yaml section `promote`: the rules a candidate must pass (the registered model is
    `package.registered_model`, the one the package stage registers into)."""

    max_bpb_regression: float = Field(0.01, ge=0,
        description="Relative: the candidate's bits per byte may be at most this fraction above production's (0.01 = 1%).")
    max_accuracy_drop: float = Field(0.02, ge=0, le=1,
        description="Absolute points: no task accuracy may fall more than this below production's (0.02 = 2 points).")
    max_contamination: float = Field(0.9, ge=0, le=1,
        description="Highest fraction of an eval task's items found in the training data (decontamination/<task>/fraction).")
    minimums: Minimums = Field(default_factory=Minimums,
                               description="what the first version must reach alone to become production")


@dataclass(frozen=True)
class Rule:
    """One comparison; `reference` is production's value, None for an absolute bound."""

    name: str
    candidate: float | None
    reference: float | None
    limit: float
    passed: bool

    def describe(self) -> str:
        cand = "not measured" if self.candidate is None else f"{self.candidate:.6g}"
        ref = "" if self.reference is None else f", production {self.reference:.6g}"
        return f"{'pass' if self.passed else 'FAIL'} {self.name}: candidate {cand}{ref} (limit {self.limit:.6g})"

    def to_dict(self) -> dict:
        return asdict(self)


def is_bpb(key: str) -> bool:
    return key.startswith("eval/") and key.endswith("/bits_per_byte")


def is_accuracy(key: str) -> bool:
    return key.startswith("eval/") and key.endswith("/acc")


def is_contamination(key: str) -> bool:
    return key.startswith("decontamination/") and key.endswith("/fraction")


def check(candidate: dict[str, float], production: dict[str, float] | None, gate: GateSettings) -> list[Rule]:
    """Every rule the candidate is held to; it may be promoted when all pass."""
    rules = _contamination_rules(candidate, gate)
    if production is None:
        return _minimum_rules(candidate, gate) + rules
    return _comparison_rules(candidate, production, gate) + rules


def _contamination_rules(candidate: dict[str, float], gate: GateSettings) -> list[Rule]:
    return [Rule(f"{key} <= max_contamination", value, None, gate.max_contamination, value <= gate.max_contamination)
            for key, value in sorted(candidate.items()) if is_contamination(key)]


def _minimum_rules(candidate: dict[str, float], gate: GateSettings) -> list[Rule]:
    low = gate.minimums
    rules = [Rule(f"{key} <= minimums.bpb_max", value, None, low.bpb_max, value <= low.bpb_max)
             for key, value in sorted(candidate.items()) if is_bpb(key)]
    if not any(is_bpb(k) for k in candidate):
        rules.append(Rule("eval/<model>/<task>/bits_per_byte measured", None, None, low.bpb_max, False))
    for task, minimum in sorted(low.acc_min.items()):
        measured = {k: v for k, v in candidate.items() if is_accuracy(k) and k.split("/")[-2] == task}
        rules += [Rule(f"{key} >= minimums.acc_min.{task}", value, None, minimum, value >= minimum)
                  for key, value in sorted(measured.items())]
        if not measured:
            rules.append(Rule(f"eval/<model>/{task}/acc measured", None, None, minimum, False))
    return rules


def _comparison_rules(candidate: dict[str, float], production: dict[str, float], gate: GateSettings) -> list[Rule]:
    rules = []
    for key, ref in sorted(production.items()):
        value = candidate.get(key)
        if is_bpb(key):
            limit = ref * (1 + gate.max_bpb_regression)
            rules.append(Rule(f"{key} regression <= max_bpb_regression", value, ref, limit,
                              value is not None and value <= limit))
        elif is_accuracy(key):
            limit = ref - gate.max_accuracy_drop
            rules.append(Rule(f"{key} drop <= max_accuracy_drop", value, ref, limit,
                              value is not None and value >= limit))
    if not rules:  # production measured nothing comparable: hold the candidate to the minimums instead
        return _minimum_rules(candidate, gate)
    return rules
