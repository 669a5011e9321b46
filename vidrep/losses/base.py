"""What every loss of the triplet model offers, so that `model.loss` can name any of them.

A loss is a callable object instantiated from `model.loss` (its `_target_` and settings):

    loss, stats = loss_fn(anchor, positive, video_ids, hard_ratio=..., candidates=...)

`anchor` and `positive` are the L2-normalised embeddings [N, D] of N pairs (query patch, patch
tracked 30 frames later), `video_ids` [N] their videos. Any patch of the batch from another video
may serve as a negative. `candidates` (default: the batch's own 2N patches, anchors then positives)
replace those patches: under DDP the training module passes the whole global batch's patches there
(vidrep.training.ranks), so a loss never deals with processes. `draws` (a `Draws`) is where a loss
that draws at random takes its numbers from: drawn for every pair of the global batch from a
generator all ranks share, each call keeping its own pairs' rows, so that N ranks draw what one
process draws (default: torch's global generator, for this call's pairs alone). `hard_ratio` is the negative
schedule's state at this step (losses without a schedule ignore it). The stats are detached 0-dim
tensors named by `stat_names`; the training module logs them as train/<name> and val/<name>.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Protocol, runtime_checkable

import torch
from torch import Tensor

if TYPE_CHECKING:
    from vidrep.losses.schedule import NegativeSchedule


@dataclass(frozen=True)
class Candidates:
    """The patches [M, D] a batch's pairs may draw negatives from, with their video ids [M]."""

    patches: Tensor
    video_ids: Tensor

    def __post_init__(self) -> None:
        if self.patches.ndim != 2 or self.video_ids.shape != (self.patches.shape[0],):
            raise ValueError(
                f"candidates must be patches [M, D] with video ids [M]; got {tuple(self.patches.shape)} "
                f"and {tuple(self.video_ids.shape)}"
            )


@dataclass(frozen=True)
class Draws:
    """The random numbers of one training step, shared by every rank: `generator` is seeded for
    the step alike on all ranks, and this call's N pairs are rows `first` to `first + N` of the
    `total` pairs of the global batch (`total` None: this call's pairs are the whole batch)."""

    generator: torch.Generator
    first: int = 0
    total: int | None = None


def uniform_rows(draws: Draws | None, rows: int, cols: int, device: torch.device) -> Tensor:
    """Uniform [0, 1) numbers [rows, cols] for this call's pairs: with `draws`, drawn [total, cols]
    from its generator and cut to this call's rows (what one process draws on the global batch);
    without, from torch's global generator."""
    if draws is None:
        return torch.rand((rows, cols), device=device)
    total = rows if draws.total is None else draws.total
    drawn = torch.rand((total, cols), generator=draws.generator, device=draws.generator.device)
    return drawn[draws.first : draws.first + rows].to(device)


def check_pairs(anchor: Tensor, positive: Tensor, video_ids: Tensor) -> None:
    if anchor.ndim != 2 or anchor.shape != positive.shape:
        raise ValueError(
            f"anchor and positive must both be [N, D]; got {tuple(anchor.shape)} and {tuple(positive.shape)}"
        )
    if video_ids.shape != (anchor.shape[0],):
        raise ValueError(f"video_ids must be [N] = [{anchor.shape[0]}]; got {tuple(video_ids.shape)}")


def batch_candidates(
    anchor: Tensor, positive: Tensor, video_ids: Tensor, candidates: Candidates | None = None
) -> Candidates:
    """`candidates`, or by default the batch's own 2N patches: every anchor, then every positive
    (the pairs' shapes checked first)."""
    check_pairs(anchor, positive, video_ids)
    if candidates is not None:
        return candidates
    return Candidates(torch.cat([anchor, positive], dim=0), torch.cat([video_ids, video_ids]))


@runtime_checkable
class PairLoss(Protocol):
    """The interface of a loss (see the module docstring)."""

    stat_names: ClassVar[tuple[str, ...]]  # keys of the stats dict; the first is shown in the progress bar
    gather_across_ranks: bool  # under DDP: candidates from the whole global batch (True) or this rank's share

    @property
    def schedule(self) -> NegativeSchedule | None: ...  # the negative schedule, None for a loss without one

    def __call__(
        self,
        anchor: Tensor,
        positive: Tensor,
        video_ids: Tensor,
        *,
        hard_ratio: float | None = None,
        candidates: Candidates | None = None,
        draws: Draws | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]: ...

    def negatives(
        self,
        anchor: Tensor,
        positive: Tensor,
        video_ids: Tensor,
        *,
        hard_ratio: float | None = None,
        candidates: Candidates | None = None,
        draws: Draws | None = None,
    ) -> Tensor: ...  # bool [N, M]: each pair's scored negatives

    def config(self) -> dict: ...  # `_target_` and settings, plain types: rebuilds the loss (loss_from_config)


def target_of(obj) -> str:
    """The dotted name Hydra's `_target_` takes for an object's class."""
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def resolve_target(target: str) -> type:
    """The class a `_target_` names; a ValueError naming the key when it does not import."""
    module, _, name = target.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as e:
        raise ValueError(
            f"model.loss._target_={target!r} does not name an importable class ({e}); "
            "use e.g. vidrep.losses.RankingLoss or vidrep.losses.InfoNCELoss"
        ) from None


def loss_from_config(config: Mapping) -> PairLoss:
    """A loss from its `config()` (a checkpoint's hyper_parameters["loss"]). Checkpoints written
    before losses were objects hold the ranking loss's settings without `_target_`."""
    config = dict(config)
    target = config.pop("_target_", "vidrep.losses.RankingLoss")
    return resolve_target(target)(**config)
