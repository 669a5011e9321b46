"""A retrieval curve while training runs (`callbacks.retrieval_monitor`), as solo-learn's and
lightly's online kNN monitors give one: on a fixed sample of the held-out videos, the protocol of
evaluate.py protocol=retrieval (vidrep/eval/retrieval.py, hard candidates by default), at step 0
(the initialisation), every `every_n_steps` steps and at the end of training. Logged to every
logger (metrics.csv, W&B) at the global step:

    monitor/<candidates>/recall_at_1, monitor/<candidates>/recall_at_5, monitor/<candidates>/median_rank
    monitor/dead_<layer>   share of the layer's units that are zero on every sampled patch

The sample is whole videos, drawn (seeded) from the data module's validation split until it holds
`num_pairs` pairs, so that the same-video candidates exist. A corpus without distractors falls back
to candidates=other_videos with a warning naming the command that cuts them (the key says which).

Cost: each measurement decodes (2 + distractors) x num_pairs patches and runs the trunk on them on
rank 0 (the other ranks wait at their next step): 256 pairs x 10 patches = 2,560 forwards, ~3 s of
JPEG decoding on one core plus ~0.2 s of CaffeNet on a GPU, and a 256 x 2,300 similarity. At the
paper's scale (150K+ steps at ~0.2 s on a GPU) every 1,000 steps that is ~1.5 % of the run; the
sample's JPEGs are read each time (nothing held but row numbers and 20K distractor JPEGs, ~25 MB).
"""

from __future__ import annotations

import logging
from dataclasses import replace

import lightning as L
import numpy as np

from vidrep.data.corpus import CorpusError
from vidrep.eval.features import Network, mean_subtract
from vidrep.eval.retrieval import (
    RetrievalSettings,
    candidate_features,
    load_queries,
    network_featurizer,
    ranks_of,
    retrieval_metrics,
)

log = logging.getLogger(__name__)


def sample_videos(video: np.ndarray, num_pairs: int, seed: int = 0) -> np.ndarray:
    """Positions of whole videos of `video` [N], in a seeded random order of videos, until at least
    `num_pairs` pairs (all when fewer); sorted."""
    videos = np.unique(video)
    order = np.random.default_rng(seed).permutation(len(videos))
    counts = np.array([np.sum(video == videos[i]) for i in order])
    keep = order[: int(np.searchsorted(np.cumsum(counts), num_pairs)) + 1]
    return np.flatnonzero(np.isin(video, videos[keep]))


def readable(index, rows: np.ndarray) -> np.ndarray:
    """`rows` less the pairs whose JPEGs fail their checks (said, not fatal: training may be skipping
    damaged pairs too, data.skip_damaged)."""
    from vidrep.data.corpus import DamagedCorpusError

    good = []
    for r in rows:
        try:
            index.read_pair(int(r))
            good.append(r)
        except DamagedCorpusError as e:
            log.warning("retrieval monitor: pair left out of its sample: %s", e)
    return np.asarray(good, np.int64)


def dead_share(features: np.ndarray) -> float:
    """The share of columns (units) of `features` [N, D] that are zero on every row."""
    return float(np.mean(np.all(np.asarray(features) == 0, axis=0)))


class RetrievalMonitor(L.Callback):
    """See the module doc. `history` holds (step, metrics) of every measurement of this process."""

    def __init__(
        self,
        every_n_steps: int = 500,
        num_pairs: int = 256,
        candidates: str = "hard",
        min_gap_frames: int = 90,
        distractors: int = 8,
        max_distractor_iou: float = 0.3,
        layer: str | None = None,
        batch_size: int = 64,
        seed: int = 0,
    ) -> None:
        if every_n_steps < 1 or num_pairs < 2:
            raise ValueError(f"need every_n_steps >= 1 and num_pairs >= 2; got {every_n_steps}, {num_pairs}")
        self.every_n_steps, self.num_pairs, self.layer = every_n_steps, num_pairs, layer
        self.settings = RetrievalSettings(candidates, min_gap_frames, distractors, max_distractor_iou)
        self.batch_size, self.seed = batch_size, seed
        self.queries = None
        self.history: list[tuple[int, dict[str, float]]] = []
        self._last_step = -1

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or not trainer.is_global_zero or self.queries is not None:
            return
        val = getattr(getattr(trainer, "datamodule", None), "val_set", None)
        if val is None or len(np.unique(val.video_ids())) < 2:
            log.warning("retrieval monitor off: it needs a validation split of at least 2 videos (data.val_fraction)")
            return
        rows = readable(val.index, val.rows[sample_videos(val.video_ids(), self.num_pairs, self.seed)])
        if len(np.unique(val.index.video_id[rows])) < 2:
            log.warning("retrieval monitor off: fewer than 2 held-out videos with readable pairs")
            return
        try:
            self.queries = load_queries(val.index, rows, self.settings)
        except CorpusError as e:
            if self.settings.candidates != "hard":
                raise
            log.warning("retrieval monitor: %s. Monitoring with candidates=other_videos meanwhile.", e)
            self.settings = replace(self.settings, candidates="other_videos")
            self.queries = load_queries(val.index, rows, self.settings)
        self._last_step = -1

    def measure(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        trunk = pl_module.net.trunk
        layer = self.layer or trunk.feature_layers[-1]
        mean = list(pl_module.hparams.get("pixel_mean", trunk.pixel_mean))
        net = Network("monitor", trunk, pl_module.input_size, mean_subtract(mean), "monitor")
        training = trunk.training
        try:
            featurizer = network_featurizer([net], [layer], str(pl_module.device))
            feats = candidate_features(self.queries, [featurizer], self.batch_size)[layer]
        finally:
            trunk.train(training)
        ranks = ranks_of(self.queries, feats, str(pl_module.device))
        m = retrieval_metrics(ranks, self.queries.video, self.queries.num_candidates)
        c = self.settings.candidates
        metrics = {f"monitor/{c}/{k}": float(m[k]) for k in ("recall_at_1", "recall_at_5", "median_rank")}
        metrics[f"monitor/dead_{layer}"] = dead_share(np.concatenate([feats.query, feats.tracked]))
        step = trainer.global_step
        for lg in trainer.loggers:
            lg.log_metrics(metrics, step=step)
        self.history.append((step, metrics))
        self._last_step = step
        log.info("step %d: %s", step, ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
        return metrics

    def _due(self, trainer: L.Trainer) -> bool:
        return trainer.is_global_zero and self.queries is not None and trainer.global_step != self._last_step

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._due(trainer) and trainer.global_step == 0:
            self.measure(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self._due(trainer) and trainer.global_step % self.every_n_steps == 0:
            self.measure(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._due(trainer):
            self.measure(trainer, pl_module)
        if len(self.history) >= 2 and trainer.is_global_zero:
            (s0, first), (s1, last) = self.history[0], self.history[-1]
            key = f"monitor/{self.settings.candidates}/recall_at_1"
            verdict = "above" if last[key] > first[key] else "NOT above"
            log.info(
                "held-out retrieval (%s candidates): recall@1 %.3f at step %d, %.3f at step %d: %s where it started",
                self.settings.candidates,
                first[key],
                s0,
                last[key],
                s1,
                verdict,
            )
