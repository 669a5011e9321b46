"""The effective training schedule: what a run trains, as a pure function of the config's numbers,
the world size and the corpus counts. The dry run (`dry_run=true`) and the real run both take it
from here, so what the dry run prints is what the run does.

Two ways to use more GPUs (`scaling`):

- `paper`: the global batch stays `data.batch_size` pairs, dealt across the ranks (50 pairs on 4
  GPUs: 13 + 13 + 12 + 12); lr, steps, LR drops and the negative switch are those of one GPU.
  More GPUs only make each step faster.
- `linear`: every rank keeps `data.batch_size` pairs, so the global batch is world x that; the lr
  is multiplied by the world size after a linear warm-up from the one-GPU lr, and max_steps, the
  LR drops and the negative switch are divided by it, so the run sees the same pairs in fewer
  steps. This is the linear scaling rule with gradual warm-up of Goyal et al. 2017, "Accurate,
  Large Minibatch SGD: Training ImageNet in 1 Hour" (arXiv:1706.02677), sections 2.1-2.2.

The negative switch is one rule in pairs seen, the same for every data size, GPU count and
scaling: random negatives for `hard_after_epochs` epochs of the training pairs or
`hard_after_pairs` pairs (the paper: 10 epochs, or 150K steps of 50 = 7.5M pairs), whichever
comes first (vidrep.losses.schedule, which also answers the phase at each step).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from vidrep.data.shares import rank_shares
from vidrep.losses.schedule import switch_step

SCALINGS = ("paper", "linear")


def candidate_pool(pairs: int) -> int:
    """The most negatives one pair can have in a batch of `pairs` pairs: both patches of every other
    pair (2 (N - 1)), when all come from other videos. The loss divides by the fixed N K (the
    released code's denominator, vidrep.losses): a pair of a batch that holds other pairs of its own
    video has fewer negatives and weighs a little less, but K above this bound could be met by no
    batch at all, and the loss would shrink by K / pool whatever the data."""
    return 2 * (pairs - 1)


@dataclass(frozen=True)
class Schedule:
    """schedule.json: exactly these keys."""

    world_size: int
    scaling: str
    global_batch_pairs: int
    per_rank_pairs: list[int]
    lr: float
    max_steps: int
    lr_drops_at_steps: list[int]
    train_pairs: int
    val_pairs: int | None  # None: planned without a corpus (dry_run=true), so not known
    steps_per_epoch: int
    epochs: float  # max_steps x global batch / train pairs
    hard_negatives_from_step: int | None  # None: the initial negative ratio throughout
    negative_pool: int  # candidate patches per pair in a full batch (one pair per video)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Settings:
    """The config's numbers that the schedule depends on, as one GPU would run them."""

    batch_size: int  # data.batch_size
    lr: float  # model.optimizer.lr
    max_steps: int  # trainer.max_steps; <= 0: none (max_epochs decides)
    max_epochs: int | None  # trainer.max_epochs
    lr_step_size: int | None  # model.scheduler.step_size (StepLR); None: no scheduler
    hard_after_epochs: float | None  # model.loss.hard_after_epochs (None: a loss without a negative schedule)
    hard_after_pairs: int | None  # model.loss.hard_after_pairs
    gather_across_ranks: bool  # model.loss.gather_across_ranks
    warmup_pairs: int = 0  # scaling=linear: pairs over which the lr rises to world x lr


def scaled_steps(steps: int, world: int, scaling: str) -> int:
    """A step count of one GPU under `scaling` (linear: divided by the world size, rounded up, so
    that the run sees at least the pairs one GPU would)."""
    return steps if scaling == "paper" else math.ceil(steps / world)


def global_batch(batch_size: int, world: int, scaling: str) -> int:
    if scaling not in SCALINGS:
        raise ValueError(f"scaling={scaling!r} is not one of {SCALINGS}")
    return batch_size if scaling == "paper" else batch_size * world


def warmup_steps(s: Settings, world: int, scaling: str) -> int:
    """Steps of the linear warm-up (scaling=linear and world > 1 only)."""
    if scaling == "paper" or world == 1:
        return 0
    return math.ceil(s.warmup_pairs / global_batch(s.batch_size, world, scaling))


def compute_schedule(s: Settings, world: int, scaling: str, train_pairs: int, val_pairs: int | None) -> Schedule:
    """The effective schedule of a run on `world` ranks over a corpus split of `train_pairs` and
    `val_pairs` (training drops each epoch's last partial global batch)."""
    if world < 1:
        raise ValueError(f"world size must be >= 1; got {world}")
    batch = global_batch(s.batch_size, world, scaling)
    shares = rank_shares(batch, world)
    if train_pairs < batch:
        raise ValueError(
            f"{train_pairs:,} training pairs are fewer than one global batch of {batch:,}; "
            "lower data.batch_size or use a larger corpus"
        )
    steps_per_epoch = train_pairs // batch
    if s.max_steps is not None and s.max_steps > 0:
        max_steps = scaled_steps(s.max_steps, world, scaling)
        if s.max_epochs is not None and s.max_epochs > 0:
            max_steps = min(max_steps, s.max_epochs * steps_per_epoch)
    elif s.max_epochs is not None and s.max_epochs > 0:
        max_steps = s.max_epochs * steps_per_epoch
    else:
        raise ValueError("neither trainer.max_steps nor trainer.max_epochs bounds the run; set one of them")
    drops: list[int] = []
    if s.lr_step_size is not None:
        step = scaled_steps(s.lr_step_size, world, scaling)
        drops = list(range(step, max_steps, step))
    pool_pairs = batch if (world == 1 or s.gather_across_ranks) else min(shares)
    return Schedule(
        world_size=world,
        scaling=scaling,
        global_batch_pairs=batch,
        per_rank_pairs=shares,
        lr=s.lr * (world if scaling == "linear" else 1),
        max_steps=max_steps,
        lr_drops_at_steps=drops,
        train_pairs=train_pairs,
        val_pairs=val_pairs,
        steps_per_epoch=steps_per_epoch,
        epochs=max_steps * batch / train_pairs,
        hard_negatives_from_step=switch_step(s.hard_after_epochs, s.hard_after_pairs, steps_per_epoch, batch),
        negative_pool=candidate_pool(pool_pairs),
    )


def format_table(schedule: Schedule, warmup: int = 0) -> str:
    """The schedule as the table every run prints at its start (and the dry run prints alone)."""
    rows = schedule.to_dict()
    if warmup:
        rows["lr"] = (
            f"{schedule.lr:g} (linear warm-up from {schedule.lr / schedule.world_size:g} over the first {warmup:,} "
            "steps)"
        )
    width = max(map(len, rows))

    def show(value, key: str = "") -> str:
        if value is None and key == "val_pairs":
            return "unknown (planned without a corpus)"
        if isinstance(value, float):
            return f"{value:,.3f}".rstrip("0").rstrip(".") if value >= 1 else f"{value:g}"
        if isinstance(value, int) and not isinstance(value, bool):
            return f"{value:,}"
        if isinstance(value, list):
            return "[" + ", ".join(show(v) for v in value) + "]"
        return "never" if value is None else str(value)

    return "\n".join(f"{key:<{width}}  {show(value, key)}" for key, value in rows.items())


class WarmupStepLR:
    """LR factor of step t: x gamma every `step_size` steps, after a linear rise from
    `start_factor` to 1 over the first `warmup` steps (Goyal et al. 2017's gradual warm-up).
    A class, not a closure, so that LambdaLR's state_dict keeps its numbers."""

    def __init__(self, step_size: int | None, gamma: float, warmup: int, start_factor: float) -> None:
        self.step_size, self.gamma, self.warmup, self.start_factor = step_size, gamma, warmup, start_factor

    def __call__(self, step: int) -> float:
        rise = 1.0 if step >= self.warmup else self.start_factor + (1 - self.start_factor) * step / self.warmup
        return rise * (self.gamma ** (step // self.step_size) if self.step_size else 1.0)


def warmup_step_lr(optimizer, step_size: int | None, gamma: float, warmup: int, start_factor: float):
    """model.scheduler under scaling=linear (set by the run): StepLR with a linear warm-up."""
    from torch.optim.lr_scheduler import LambdaLR

    return LambdaLR(optimizer, WarmupStepLR(step_size, gamma, warmup, start_factor))
