"""The ranking loss of Wang & Gupta (ICCV 2015) and its negative selection: pure functions, and
`RankingLoss`, the object `model.loss` instantiates (vidrep/conf/model/loss/{paper,code_faithful}.yaml).

Embeddings are L2-normalised, so s(x, y) = x . y is a cosine. Pair i has an anchor a_i (the query
patch) and a positive p_i (the patch tracked 30 frames later). Its candidate negatives are the 2N
patches of the batch (every anchor, then every positive) whose video id differs from its own.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import ClassVar

import torch
from torch import Tensor

from vidrep.losses.base import Candidates, Draws, batch_candidates, check_pairs, target_of, uniform_rows
from vidrep.losses.schedule import NegativeSchedule


def _check_inputs(anchor: Tensor, positive: Tensor, video_ids: Tensor, num_negatives: int, hard_ratio: float) -> None:
    check_pairs(anchor, positive, video_ids)
    if num_negatives < 1:
        raise ValueError(f"num_negatives must be >= 1; got {num_negatives}")
    if not 0.0 <= hard_ratio <= 1.0:
        raise ValueError(f"hard_ratio must lie in [0, 1]; got {hard_ratio}")


def _anchor_hinges(
    anchor: Tensor, positive: Tensor, margin: float, patches: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The candidate patches [M, D] (default: the batch's 2N), s(a_i, p_i) [N, 1], s(a_i, j) [N, M]
    and its hinges [N, M]."""
    patches = torch.cat([anchor, positive], dim=0) if patches is None else patches
    s_ap = (anchor * positive).sum(dim=1, keepdim=True)
    s_an = anchor @ patches.T
    return patches, s_ap, s_an, (margin - s_ap + s_an).clamp_min(0)


@torch.no_grad()
def select_negatives(
    anchor: Tensor,
    positive: Tensor,
    video_ids: Tensor,
    *,
    margin: float,
    num_negatives: int,
    hard_ratio: float,
    violators_only: bool,
    patches: Tensor | None = None,
    patch_ids: Tensor | None = None,
    draws: Draws | None = None,
) -> Tensor:
    """Boolean mask [N, 2N]: which of the 2N batch patches serve as negatives of each pair.

    `patches` [M, D] with their video ids `patch_ids` [M] replace the batch's own 2N patches as the
    candidates (the mask is then [N, M]): under DDP, a rank's pairs against every rank's patches.

    With at most K candidates all are taken. Otherwise `int(K * hard_ratio)` come from the K
    candidates most similar to the anchor (all K when hard_ratio is 1; a random subset of them
    otherwise) and the rest are drawn at random among the candidates not already taken, the
    unchosen top-K included, as the released RankHardLoss layer does. The random keys come from
    `draws` (`uniform_rows`: one generator for the whole global batch, each rank its rows), or
    without it from torch's global generator.
    """
    _check_inputs(anchor, positive, video_ids, num_negatives, hard_ratio)
    k = num_negatives
    patches, _, s_an, hinge_a = _anchor_hinges(anchor, positive, margin, patches)
    patch_ids = torch.cat([video_ids, video_ids]) if patch_ids is None else patch_ids
    candidate = video_ids[:, None] != patch_ids[None, :]
    if violators_only:
        candidate &= hinge_a > 0
    num_candidates = candidate.sum(dim=1, keepdim=True)
    if patches.shape[0] <= k:
        return candidate

    hard = int(k * hard_ratio)
    chosen = torch.zeros_like(candidate)
    if hard > 0:
        similarity = s_an.masked_fill(~candidate, float("-inf"))
        top_k = similarity.topk(k, dim=1).indices
        if hard < k:
            # A random `hard` of the K most similar: order them by random keys and keep the first.
            keys = uniform_rows(draws, *top_k.shape, anchor.device)
            top_k = top_k.gather(1, keys.argsort(dim=1)[:, :hard])
        chosen.scatter_(1, top_k, True)
        chosen &= candidate
    if hard < k:
        remaining = candidate & ~chosen
        keys = uniform_rows(draws, *candidate.shape, anchor.device).masked_fill(~remaining, -1.0)
        picks = keys.topk(k - hard, dim=1)
        drawn = torch.zeros_like(candidate).scatter_(1, picks.indices, picks.values >= 0)
        chosen |= drawn & remaining
    return torch.where(num_candidates <= k, candidate, chosen)


def ranking_loss_from_mask(
    anchor: Tensor,
    positive: Tensor,
    mask: Tensor,
    *,
    margin: float,
    num_negatives: int,
    symmetric: bool,
    patches: Tensor | None = None,
) -> Tensor:
    """The hinge sum over the selected negatives, over the fixed denominator N * K * (2 if symmetric).
    `patches`: the candidates the mask's columns refer to (default: the batch's 2N patches)."""
    patches, s_ap, _, hinge_a = _anchor_hinges(anchor, positive, margin, patches)
    mask = mask.to(hinge_a.dtype)
    total = (hinge_a * mask).sum()
    if symmetric:
        s_pn = positive @ patches.T
        total = total + ((margin - s_ap + s_pn).clamp_min(0) * mask).sum()
    return total / (anchor.shape[0] * num_negatives * (2 if symmetric else 1))


def ranking_loss(
    anchor: Tensor,
    positive: Tensor,
    video_ids: Tensor,
    *,
    margin: float,
    num_negatives: int,
    hard_ratio: float,
    symmetric: bool,
    violators_only: bool,
) -> Tensor:
    """Triplet ranking loss over in-batch negatives; a 0-dim tensor.

    Each selected negative j of pair i adds max(0, margin - s(a_i, p_i) + s(a_i, j)) and, when
    `symmetric`, also max(0, margin - s(a_i, p_i) + s(p_i, j)). The selection carries no gradient.

    >>> a = torch.nn.functional.normalize(torch.randn(50, 1024), dim=1)
    >>> p = torch.nn.functional.normalize(a + 0.1 * torch.randn(50, 1024), dim=1)
    >>> loss = ranking_loss(a, p, torch.arange(50), margin=0.5, num_negatives=4, hard_ratio=1.0,
    ...                     symmetric=False, violators_only=False)
    >>> loss.ndim
    0
    """
    loss = RankingLoss(
        margin=margin,
        num_negatives=num_negatives,
        hard_ratio=hard_ratio,
        symmetric=symmetric,
        violators_only=violators_only,
    )
    return loss(anchor, positive, video_ids, hard_ratio=hard_ratio)[0]


@dataclass(frozen=True)
class TripletStats:
    """Cheap health signals of one batch, all detached."""

    triplet_acc: Tensor  # share of selected triplets with s(a, p) > s(a, n)
    sim_pos: Tensor  # mean s(a, p)
    sim_neg: Tensor  # mean s(a, n) over selected negatives
    embed_std: Tensor  # mean per-dimension std of the embeddings: 0 = collapsed, ~1/sqrt(D) healthy
    negatives_per_pair: Tensor


@torch.no_grad()
def triplet_stats(anchor: Tensor, positive: Tensor, mask: Tensor, patches: Tensor | None = None) -> TripletStats:
    """Stats of the pairs (anchor, positive) against the candidate `patches` (default: the 2N
    patches of the same batch; columns of `mask`)."""
    patches = torch.cat([anchor, positive], dim=0) if patches is None else patches
    s_ap = (anchor * positive).sum(dim=1)
    s_an = anchor @ patches.T
    selected = mask.sum().clamp_min(1)
    correct = ((s_ap[:, None] > s_an) & mask).sum()
    return TripletStats(
        triplet_acc=correct / selected,
        sim_pos=s_ap.mean(),
        sim_neg=(s_an * mask).sum() / selected,
        embed_std=patches.float().std(dim=0).mean(),
        negatives_per_pair=mask.sum(dim=1).float().mean(),
    )


@dataclass(frozen=True)
class RankingLoss:
    """The triplet ranking loss with its negative schedule: `model.loss` of the paper's and the
    released code's presets. The call selects each pair's negatives among the candidates
    (`select_negatives` at the schedule's `hard_ratio`), scores them (`ranking_loss_from_mask`) and
    reports the selection's `TripletStats`.

    The settings are the config keys of model.loss; the schedule's keys are those of
    `NegativeSchedule`, whose `hard_after_steps` the run sets from the other two.
    `gather_across_ranks`: under DDP, negatives from the whole global batch (all_gather of the
    embeddings and video ids, as one process would); False: from this rank's share only (a
    deviation: a smaller pool).
    """

    margin: float = 0.5
    num_negatives: int = 4
    hard_ratio: float = 1.0
    initial_hard_ratio: float = 0.0
    hard_after_epochs: float | None = 10
    hard_after_pairs: int | None = 7_500_000
    hard_after_steps: int | None = None
    symmetric: bool = False
    violators_only: bool = False
    gather_across_ranks: bool = True

    stat_names: ClassVar[tuple[str, ...]] = tuple(f.name for f in fields(TripletStats))

    @property
    def schedule(self) -> NegativeSchedule:
        return NegativeSchedule(
            self.initial_hard_ratio,
            self.hard_ratio,
            self.hard_after_epochs,
            self.hard_after_pairs,
            self.hard_after_steps,
        )

    def negatives(
        self,
        anchor: Tensor,
        positive: Tensor,
        video_ids: Tensor,
        *,
        hard_ratio: float | None = None,
        candidates: Candidates | None = None,
        draws: Draws | None = None,
    ) -> Tensor:
        """Boolean [N, M]: the negatives of each pair among the M candidates (`select_negatives`;
        `hard_ratio` None: the schedule's final ratio)."""
        c = batch_candidates(anchor, positive, video_ids, candidates)
        return select_negatives(
            anchor,
            positive,
            video_ids,
            margin=self.margin,
            num_negatives=self.num_negatives,
            hard_ratio=self.hard_ratio if hard_ratio is None else hard_ratio,
            violators_only=self.violators_only,
            patches=c.patches,
            patch_ids=c.video_ids,
            draws=draws,
        )

    def __call__(
        self,
        anchor: Tensor,
        positive: Tensor,
        video_ids: Tensor,
        *,
        hard_ratio: float | None = None,
        candidates: Candidates | None = None,
        draws: Draws | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        c = batch_candidates(anchor, positive, video_ids, candidates)
        mask = self.negatives(anchor, positive, video_ids, hard_ratio=hard_ratio, candidates=c, draws=draws)
        loss = ranking_loss_from_mask(
            anchor,
            positive,
            mask,
            margin=self.margin,
            num_negatives=self.num_negatives,
            symmetric=self.symmetric,
            patches=c.patches,
        )
        stats = triplet_stats(anchor, positive, mask, c.patches.detach())
        return loss, {name: getattr(stats, name) for name in self.stat_names}

    def config(self) -> dict:
        return {"_target_": target_of(self), **asdict(self)}
