"""Learning-rate schedules: linear warmup, then cosine decay or WSD (warmup-stable-decay).

The rate is a pure function of the step, so the scheduler's whole "state" is the step number and a
resumed run follows exactly the curve of an uninterrupted one.

    cosine: lr rises linearly over `warmup_steps`, then follows half a cosine down to lr * min_lr_ratio
            at `max_steps` (the GPT-2 / Chinchilla recipe).
    wsd:    lr rises over `warmup_steps`, stays flat, and decays linearly to lr * min_lr_ratio over
            the last `decay_frac` of the run (MiniCPM, DeepSeek). The flat phase lets a run be
            extended without redoing the decay from the start of training.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from llmpipe.errors import UserError

SCHEDULES = ("cosine", "wsd")


@dataclass(frozen=True)
class Schedule:
    lr: float
    max_steps: int
    warmup_steps: int = 0
    kind: str = "cosine"
    min_lr_ratio: float = 0.1
    decay_frac: float = 0.2  # wsd only: share of max_steps spent decaying

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise UserError(f"schedule {self.kind!r} is not one of {', '.join(SCHEDULES)}")
        if not 0 <= self.warmup_steps <= self.max_steps:
            raise UserError(f"warmup_steps ({self.warmup_steps}) must be between 0 and max_steps ({self.max_steps})")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise UserError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not 0.0 < self.decay_frac <= 1.0:
            raise UserError(f"decay_frac must be in (0, 1], got {self.decay_frac}")

    def lr_at(self, step: int) -> float:
        """The rate for the optimizer step taken when `step` steps are already done (0-based)."""
        min_lr = self.lr * self.min_lr_ratio
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if self.kind == "cosine":
            span = max(1, self.max_steps - 1 - self.warmup_steps)  # the last step runs at min_lr
            progress = min(1.0, (step - self.warmup_steps) / span)
            return min_lr + 0.5 * (self.lr - min_lr) * (1.0 + math.cos(math.pi * progress))
        # wsd: the decay phase starts after warmup at the latest
        decay_steps = max(1, round(self.decay_frac * self.max_steps))
        decay_start = max(self.warmup_steps, self.max_steps - decay_steps)
        if step < decay_start:
            return self.lr
        progress = min(1.0, (step - decay_start) / max(1, self.max_steps - 1 - decay_start))
        return self.lr - (self.lr - min_lr) * progress
