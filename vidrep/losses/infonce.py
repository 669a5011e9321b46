"""An InfoNCE (NT-Xent) loss over the batch: `model/loss=infonce` (vidrep/conf/model/loss/infonce.yaml).

Each pair's query a_i must pick its tracked patch p_i out of the candidates from other videos:

    l(a_i) = -log( exp(s(a_i, p_i) / t) / (exp(s(a_i, p_i) / t) + sum_n exp(s(a_i, n) / t)) )

over the negatives n: every candidate patch whose video differs from pair i's (the ranking loss's
candidates, vidrep.losses.ranking; every one of them counts, none is selected). Patches of pair i's
own video other than p_i (its query, other pairs of that video) are left out of the denominator:
they are not negatives, whatever they look like. With `symmetric` the tracked patch is a query
too, and the loss is the mean of both directions. This is the NT-Xent loss of SimCLR (Chen et al.
2020, "A Simple Framework for Contrastive Learning of Visual Representations", arXiv:2002.05709,
eq. 1 for one query, Algorithm 1 for the mean over both views of each pair; temperature 0.1, the
default of its released run.py), an InfoNCE loss (van den Oord et al. 2018, arXiv:1807.03748)
whose negatives are the paper's: patches of other videos.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import ClassVar

import torch
from torch import Tensor

from vidrep.losses.base import Candidates, Draws, batch_candidates, target_of


@dataclass(frozen=True)
class ContrastiveStats:
    """Cheap health signals of one batch, all detached. `top1_acc`: share of queries whose tracked
    patch scores above every negative (in-batch retrieval at rank 1)."""

    top1_acc: Tensor
    sim_pos: Tensor  # mean s(a, p)
    sim_neg: Tensor  # mean s(a, n) over the negatives
    embed_std: Tensor  # mean per-dimension std of the candidates: 0 = collapsed
    negatives_per_pair: Tensor


def _query_terms(query: Tensor, s_pos: Tensor, patches: Tensor, negatives: Tensor, temperature: float) -> Tensor:
    """-log softmax of the positive among [positive, negatives], per query [N]."""
    logits = (query @ patches.T / temperature).masked_fill(~negatives, float("-inf"))
    pos = s_pos / temperature
    return torch.logsumexp(torch.cat([pos[:, None], logits], dim=1), dim=1) - pos


@dataclass(frozen=True)
class InfoNCELoss:
    temperature: float = 0.1
    symmetric: bool = True
    gather_across_ranks: bool = True

    stat_names: ClassVar[tuple[str, ...]] = tuple(f.name for f in fields(ContrastiveStats))
    schedule: ClassVar[None] = None  # every negative counts: no schedule

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(
                f"model.loss.temperature={self.temperature!r}: must be > 0; use model.loss.temperature=0.1"
            )

    def negatives(
        self,
        anchor: Tensor,
        positive: Tensor,
        video_ids: Tensor,
        *,
        hard_ratio: float | None = None,
        candidates: Candidates | None = None,
        draws: Draws | None = None,  # unused: nothing is drawn
    ) -> Tensor:
        """Boolean [N, M]: every candidate of another video (`hard_ratio` is ignored)."""
        c = batch_candidates(anchor, positive, video_ids, candidates)
        return video_ids[:, None] != c.video_ids[None, :]

    def __call__(
        self,
        anchor: Tensor,
        positive: Tensor,
        video_ids: Tensor,
        *,
        hard_ratio: float | None = None,
        candidates: Candidates | None = None,
        draws: Draws | None = None,  # unused: nothing is drawn
    ) -> tuple[Tensor, dict[str, Tensor]]:
        c = batch_candidates(anchor, positive, video_ids, candidates)
        negatives = self.negatives(anchor, positive, video_ids, candidates=c)
        s_pos = (anchor * positive).sum(dim=1)
        loss = _query_terms(anchor, s_pos, c.patches, negatives, self.temperature).mean()
        if self.symmetric:
            loss = (loss + _query_terms(positive, s_pos, c.patches, negatives, self.temperature).mean()) / 2
        stats = contrastive_stats(anchor, s_pos, c.patches, negatives)
        return loss, {name: getattr(stats, name) for name in self.stat_names}

    def config(self) -> dict:
        return {"_target_": target_of(self), **asdict(self)}


@torch.no_grad()
def contrastive_stats(anchor: Tensor, s_pos: Tensor, patches: Tensor, negatives: Tensor) -> ContrastiveStats:
    s_an = anchor @ patches.T
    count = negatives.sum(dim=1)
    hardest = s_an.masked_fill(~negatives, float("-inf")).amax(dim=1)
    return ContrastiveStats(
        top1_acc=(s_pos > hardest).float().mean(),
        sim_pos=s_pos.mean(),
        sim_neg=(s_an * negatives).sum() / count.sum().clamp_min(1),
        embed_std=patches.float().std(dim=0).mean(),
        negatives_per_pair=count.float().mean(),
    )
