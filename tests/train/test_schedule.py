import math

import pytest

from llmpipe.errors import UserError
from llmpipe.train.schedule import Schedule


def curve(s: Schedule) -> list[float]:
    return [s.lr_at(step) for step in range(s.max_steps)]


def test_cosine_warms_up_linearly_then_decays_monotonically_to_min_lr():
    s = Schedule(lr=1.0, max_steps=100, warmup_steps=10, kind="cosine", min_lr_ratio=0.1)
    lrs = curve(s)
    assert lrs[:10] == pytest.approx([(i + 1) / 10 for i in range(10)])
    assert lrs[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[-1] == pytest.approx(0.1)
    assert lrs[55] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 45 / 89)))


def test_wsd_is_flat_then_decays_linearly_over_the_last_fraction():
    s = Schedule(lr=2.0, max_steps=100, warmup_steps=5, kind="wsd", min_lr_ratio=0.0, decay_frac=0.2)
    lrs = curve(s)
    assert lrs[4] == pytest.approx(2.0) and lrs[0] == pytest.approx(0.4)
    assert all(lr == 2.0 for lr in lrs[5:80])
    decay = lrs[80:]
    assert all(a > b for a, b in zip(decay, decay[1:]))
    assert decay[-1] == pytest.approx(0.0)
    diffs = [a - b for a, b in zip(decay, decay[1:])]
    assert max(diffs) == pytest.approx(min(diffs))  # linear


def test_no_warmup_starts_at_full_lr():
    assert Schedule(lr=0.5, max_steps=10, warmup_steps=0).lr_at(0) == pytest.approx(0.5)


@pytest.mark.parametrize("kwargs, word", [({"kind": "linear"}, "cosine, wsd"), ({"warmup_steps": 11}, "warmup_steps"),
                                          ({"min_lr_ratio": 2.0}, "min_lr_ratio")])
def test_invalid_schedules_are_rejected_with_the_reason(kwargs, word):
    with pytest.raises(UserError, match=word):
        Schedule(**{"lr": 1.0, "max_steps": 10, **kwargs})
