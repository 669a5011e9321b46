"""Losses of the triplet model: pure maths on embeddings, no data, training or evaluation.

`model.loss` instantiates one of these (its `_target_`); the interface every loss offers is
`PairLoss` (vidrep/losses/base.py). To add a loss: a module here with a class like `InfoNCELoss`,
a preset in vidrep/conf/model/loss/, and a test like tests/test_loss_objects.py's.
"""

from vidrep.losses.base import Candidates, Draws, PairLoss, batch_candidates, loss_from_config
from vidrep.losses.infonce import ContrastiveStats, InfoNCELoss, contrastive_stats
from vidrep.losses.ranking import (
    RankingLoss,
    TripletStats,
    ranking_loss,
    ranking_loss_from_mask,
    select_negatives,
    triplet_stats,
)
from vidrep.losses.schedule import NegativeSchedule, switch_step

__all__ = [
    "Candidates",
    "ContrastiveStats",
    "Draws",
    "InfoNCELoss",
    "NegativeSchedule",
    "PairLoss",
    "RankingLoss",
    "TripletStats",
    "batch_candidates",
    "contrastive_stats",
    "loss_from_config",
    "ranking_loss",
    "ranking_loss_from_mask",
    "select_negatives",
    "switch_step",
    "triplet_stats",
]
