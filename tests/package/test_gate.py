"""The promotion gate's rules on plain metric dicts: what passes, what fails, with which numbers."""

from llmpipe.package.gate import GateSettings, Minimums, check

BPB = "eval/dpo/llmpipe_bpb/bits_per_byte"
ACC = "eval/dpo/llmpipe_chat_reply/acc"
CONTAM = "decontamination/llmpipe_bpb/fraction"
GATE = GateSettings(max_bpb_regression=0.01, max_accuracy_drop=0.02, max_contamination=0.5,
                    minimums=Minimums(bpb_max=3.0, acc_min={"llmpipe_chat_reply": 0.3}))
PRODUCTION = {BPB: 2.0, ACC: 0.5, CONTAM: 0.1}


def failing(rules):
    return {r.name.split()[0] for r in rules if not r.passed}


def test_first_version_passes_on_minimums():
    rules = check({BPB: 2.9, ACC: 0.31, CONTAM: 0.0}, None, GATE)
    assert rules and all(r.passed for r in rules)


def test_first_version_below_minimums_fails_each_rule_with_its_value():
    rules = check({BPB: 3.1, ACC: 0.29, CONTAM: 0.0}, None, GATE)
    assert failing(rules) == {BPB, ACC}
    bpb = next(r for r in rules if r.name.startswith(BPB))
    assert (bpb.candidate, bpb.reference, bpb.limit) == (3.1, None, 3.0)


def test_bpb_may_regress_up_to_the_relative_limit_only():
    assert not failing(check({BPB: 2.0199, ACC: 0.5, CONTAM: 0.1}, PRODUCTION, GATE))
    rules = check({BPB: 2.0201, ACC: 0.5, CONTAM: 0.1}, PRODUCTION, GATE)
    assert failing(rules) == {BPB}
    rule = next(r for r in rules if not r.passed)
    assert (rule.candidate, rule.reference) == (2.0201, 2.0) and abs(rule.limit - 2.02) < 1e-12
    assert "candidate 2.0201" in rule.describe() and "production 2" in rule.describe()


def test_accuracy_may_drop_up_to_the_absolute_limit_only():
    assert not failing(check({BPB: 2.0, ACC: 0.4801, CONTAM: 0.1}, PRODUCTION, GATE))
    assert failing(check({BPB: 2.0, ACC: 0.4799, CONTAM: 0.1}, PRODUCTION, GATE)) == {ACC}


def test_contamination_is_bounded_with_or_without_production():
    assert failing(check({BPB: 2.0, ACC: 0.5, CONTAM: 0.51}, PRODUCTION, GATE)) == {CONTAM}
    assert failing(check({BPB: 2.0, ACC: 0.5, CONTAM: 0.51}, None, GATE)) == {CONTAM}


def test_a_metric_production_has_but_the_candidate_lacks_fails():
    rules = check({BPB: 1.0, CONTAM: 0.0}, PRODUCTION, GATE)
    assert failing(rules) == {ACC}
    assert "not measured" in next(r for r in rules if not r.passed).describe()


def test_a_first_version_with_no_eval_metrics_fails():
    assert not all(r.passed for r in check({}, None, GATE))


def test_only_the_listed_tasks_have_an_accuracy_floor_and_a_listed_one_must_be_measured():
    cloze = "eval/dpo/llmpipe_cloze/acc"  # exact-word recall: near 0 for a small model, no floor listed
    assert not failing(check({BPB: 2.9, ACC: 0.31, cloze: 0.02, CONTAM: 0.0}, None, GATE))
    rules = check({BPB: 2.9, cloze: 0.02, CONTAM: 0.0}, None, GATE)
    assert [r.name for r in rules if not r.passed] == ["eval/<model>/llmpipe_chat_reply/acc measured"]
