"""The negative schedule of the ranking loss: which share of the negatives are the hardest, by step.

Negatives are chosen with `initial_hard_ratio` until the switch, with `hard_ratio` from then on.
The rule is stated in pairs seen: `hard_after_epochs` epochs of the training pairs or
`hard_after_pairs` pairs, whichever comes first (None disables a bound). A run turns it into the
optimiser step `hard_after_steps` for its global batch (`switch_step`, through
vidrep.training.schedule: the same pairs for every data size and GPU count). Without
`hard_after_steps` (a loss built outside train.py) the epoch bound alone decides. The paper takes
random negatives (ratio 0) for 10 epochs of 1.5M patches (150K steps of 50 pairs = 7.5M pairs), then
the top K (ratio 1); the released code uses 0.5 from the start.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def switch_step(
    hard_after_epochs: float | None, hard_after_pairs: int | None, steps_per_epoch: int, global_batch: int
) -> int | None:
    """The first step with hard negatives: the earlier of the two bounds (None: neither is set)."""
    bounds = []
    if hard_after_epochs is not None:
        bounds.append(math.ceil(hard_after_epochs * steps_per_epoch))
    if hard_after_pairs is not None:
        bounds.append(math.ceil(hard_after_pairs / global_batch))
    return min(bounds) if bounds else None


@dataclass(frozen=True)
class NegativeSchedule:
    initial_hard_ratio: float = 0.0
    hard_ratio: float = 1.0
    hard_after_epochs: float | None = 10
    hard_after_pairs: int | None = 7_500_000
    hard_after_steps: int | None = None

    def phase(self, epoch: int, step: int) -> str:
        """ "random" before the switch, "hard" from it on."""
        if self.hard_after_steps is not None:
            return "hard" if step >= self.hard_after_steps else "random"
        return "hard" if self.hard_after_epochs is not None and epoch >= self.hard_after_epochs else "random"

    def ratio(self, epoch: int, step: int) -> float:
        return self.hard_ratio if self.phase(epoch, step) == "hard" else self.initial_hard_ratio
