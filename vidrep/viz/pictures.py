"""Pictures of the training run, drawn every N epochs from a fixed set of held-out pairs.

The same held-out pairs every time, so that pictures of successive epochs compare. Drawing runs on
rank 0 only, under no_grad and in a forked RNG: training's random stream (negative draws, flips)
is the same with and without pictures.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from vidrep.viz.canvas import PictureSink, wandb_loggers_of
from vidrep.viz.training import (
    cross_video_neighbours,
    embed_2d,
    embedding_figure,
    filters_figure,
    first_conv_weight,
    hardest_chosen_negative,
    retrieval_figure,
    top_response_figure,
    top_response_indices,
    triplet_figure,
    unit_responses,
)

log = logging.getLogger(__name__)
PICTURES = ("triplets", "retrieval", "conv1", "top_responses", "embedding")


@dataclass
class HeldOut:
    """Pairs that training never sees: uint8 [N, 3, S, S] query and tracked patches, video ids [N]."""

    anchor: Tensor
    positive: Tensor
    video_id: Tensor

    @classmethod
    def from_dataset(cls, dataset, num_pairs: int, seed: int = 0) -> HeldOut:
        """`num_pairs` pairs spread evenly over a PairDataset (validation: no flips), in a fixed
        shuffled order: consecutive held-out pairs come from one video, a training batch does not."""
        if len(dataset) == 0:
            raise ValueError(
                "no held-out pairs to draw pictures from (the validation split is empty); raise data.val_fraction"
            )
        picks = np.unique(np.linspace(0, len(dataset) - 1, min(num_pairs, len(dataset))).round().astype(int))
        picks = np.random.default_rng(seed).permutation(picks)
        items = [dataset[int(i)] for i in picks]
        return cls(
            torch.stack([it["anchor"] for it in items]),
            torch.stack([it["positive"] for it in items]),
            torch.stack([it["video_id"] for it in items]),
        )

    def __len__(self) -> int:
        return len(self.video_id)


@torch.no_grad()
def _features(module, patches: Tensor, chunk: int = 128) -> tuple[Tensor, Tensor]:
    """(L2-normalised embeddings, pool5) of uint8 patches, through the module's own preprocessing;
    "pool5" is the trunk's `pooled_layer` (pool5 for the AlexNets, avgpool for ResNet-18)."""
    trunk = module.net.trunk
    pooled, out = trunk.pooled_layer, trunk.feature_layers[-1]
    embs, pools = [], []
    for start in range(0, len(patches), chunk):
        x = module.preprocess(patches[start : start + chunk].to(module.device))
        feats = trunk.forward_features(x, (pooled, out))
        embs.append(F.normalize(feats[out].float(), dim=1).cpu())
        pools.append(feats[pooled].float().cpu())
    return torch.cat(embs), torch.cat(pools)


@dataclass
class TrainingPictures:
    """What to draw and how much of it. `pictures` chooses among PICTURES."""

    num_triplets: int = 8
    batch_size: int = 50
    num_queries: int = 6
    num_matches: int = 5
    num_units: int = 6
    num_top: int = 6
    embedding: str = "tsne"
    pictures: tuple[str, ...] = PICTURES
    seed: int = 0

    def __post_init__(self) -> None:
        self.pictures = tuple(self.pictures)  # a ListConfig from Hydra
        unknown = set(self.pictures) - set(PICTURES)
        if unknown:
            raise ValueError(f"unknown pictures {sorted(unknown)}; choose from {PICTURES}")

    def draw(
        self,
        module,
        heldout: HeldOut,
        hard_ratio: float,
        phase: str | None,
        title: str,
        sink: PictureSink,
        step: int | None = None,
        tag: str = "",
    ) -> None:
        """Every chosen picture of `module` (a TripletModule) on `heldout`, into `sink`."""
        was_training = module.training
        module.eval()
        devices = [module.device] if module.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(self.seed)
                self._draw(module, heldout, hard_ratio, phase, title, sink, step, tag)
        finally:
            module.train(was_training)

    def _draw(
        self,
        module,
        heldout: HeldOut,
        hard_ratio: float,
        phase: str | None,
        title: str,
        sink: PictureSink,
        step: int | None,
        tag: str,
    ) -> None:
        n = len(heldout)
        patches = torch.cat([heldout.anchor, heldout.positive])
        emb, pool5 = _features(module, patches)
        anchor, positive = emb[:n], emb[n:]
        videos = torch.cat([heldout.video_id, heldout.video_id])
        add = lambda name, image, caption: sink.add(f"pictures/{name}", image, caption, step, tag)  # noqa: E731
        if "triplets" in self.pictures:
            b = min(self.batch_size, n)
            loss = module.loss
            mask = loss.negatives(anchor[:b], positive[:b], heldout.video_id[:b], hard_ratio=hard_ratio)
            neg, s_pos, s_neg = hardest_chosen_negative(anchor[:b], positive[:b], mask)
            rows = torch.arange(min(self.num_triplets, b))
            batch_patches = torch.cat([heldout.anchor[:b], heldout.positive[:b]])
            negatives = [
                batch_patches[j] if j >= 0 else torch.zeros_like(heldout.anchor[0]) for j in neg[rows].tolist()
            ]
            if phase is None:  # a loss without negative selection: every patch of another video is a negative
                what = f"{title}: every other-video patch a negative, in a batch of {b} held-out pairs"
            else:
                chosen = (
                    "top-K hard negatives"
                    if hard_ratio >= 1
                    else "random negatives"
                    if hard_ratio == 0
                    else f"{hard_ratio:g} hard"
                )
                what = f"{title}: {phase} phase ({chosen}, in a batch of {b} held-out pairs)"
            # Without a margin, red marks a negative that scores above the tracked patch.
            add(
                "triplets",
                triplet_figure(
                    heldout.anchor[rows],
                    heldout.positive[rows],
                    negatives,
                    s_pos[rows].tolist(),
                    s_neg[rows].tolist(),
                    getattr(loss, "margin", 0.0),
                    what,
                ),
                "query, tracked patch, hardest chosen negative",
            )
        if "retrieval" in self.pictures:
            q = torch.linspace(0, n - 1, min(self.num_queries, n)).round().long().unique()
            idx, sims = cross_video_neighbours(anchor[q], heldout.video_id[q], emb, videos, self.num_matches)
            matches = [[patches[j] if j >= 0 else None for j in row] for row in idx.tolist()]
            match_videos = np.where(idx.numpy() >= 0, videos.numpy()[idx.clamp_min(0).numpy()], 0)
            add(
                "retrieval",
                retrieval_figure(
                    heldout.anchor[q], matches, sims.numpy(), heldout.video_id[q].tolist(), match_videos, title
                ),
                "query and its nearest patches from other videos",
            )
        if "conv1" in self.pictures:
            add(
                "conv1", filters_figure(first_conv_weight(module.net.trunk), f"{title}: conv1 filters"), "conv1 filters"
            )
        if "top_responses" in self.pictures:
            responses = unit_responses(pool5, channels=self._pool5_channels(module))
            units, top = top_response_indices(responses, self.num_units, self.num_top, groups=videos)
            values = torch.where(top >= 0, responses[top.clamp_min(0), units[:, None]], float("nan"))
            add(
                "top_responses",
                top_response_figure(
                    [[patches[j] if j >= 0 else None for j in row] for row in top.tolist()],
                    units.tolist(),
                    values.numpy(),
                    title,
                ),
                "held-out patches with the strongest pool5 responses",
            )
        if "embedding" in self.pictures:
            xy = embed_2d(emb.numpy(), self.embedding, self.seed)
            pair_of = np.concatenate([np.arange(n, 2 * n), np.arange(n)])
            add(
                "embedding",
                embedding_figure(xy, videos.numpy(), pair_of, self.embedding, title),
                "held-out embedding by video",
            )

    @staticmethod
    def _pool5_channels(module) -> int:
        convs = [m for m in module.net.trunk.modules() if isinstance(m, torch.nn.Conv2d)]
        return convs[-1].out_channels


class PicturesCallback(L.Callback):
    """Draws TrainingPictures at the end of every `every_n_epochs`-th training epoch and of the last
    one, as PNGs under `folder/epochNNN/` and as W&B media (pictures/<name>) when W&B logs the run.
    `every_n_epochs=0` draws nothing."""

    def __init__(self, folder: str, every_n_epochs: int = 1, num_heldout: int = 256, **pictures) -> None:
        self.folder = Path(folder)
        self.every_n_epochs = every_n_epochs
        self.num_heldout = num_heldout
        self.pictures = TrainingPictures(**pictures)
        self.heldout: HeldOut | None = None
        self.drawn_epochs: list[int] = []

    def _due(self, trainer: L.Trainer) -> bool:
        if self.every_n_epochs <= 0 or not trainer.is_global_zero or trainer.sanity_checking:
            return False
        epoch = trainer.current_epoch + 1
        last = trainer.max_epochs is not None and epoch >= trainer.max_epochs
        return epoch % self.every_n_epochs == 0 or last

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._due(trainer):
            return
        start = time.perf_counter()
        if self.heldout is None:
            dm = trainer.datamodule
            dataset = getattr(dm, "val_set", None) if dm is not None else None
            if dataset is None:
                log.warning("pictures: the datamodule has no val_set to draw from; drawing nothing")
                self.every_n_epochs = 0
                return
            # The data seed, as `python -m vidrep.viz train` uses: both draw the same held-out pairs.
            self.heldout = HeldOut.from_dataset(dataset, self.num_heldout, getattr(dm, "seed", 0))
        epoch = trainer.current_epoch
        sink = PictureSink(self.folder, wandb_loggers_of(trainer.loggers))
        try:
            self.pictures.draw(
                pl_module,
                self.heldout,
                *pl_module.negatives_at(epoch, trainer.global_step),
                f"epoch {epoch + 1}, step {trainer.global_step}",
                sink,
                step=trainer.global_step,
                tag=f"epoch{epoch + 1:03d}",
            )
        except Exception:  # noqa: BLE001 - a failed picture must not end a multi-day run
            log.exception("pictures of epoch %d failed; training goes on", epoch + 1)
            return
        self.drawn_epochs.append(epoch + 1)
        log.info(
            "pictures of epoch %d: %s (%.1f s)",
            epoch + 1,
            self.folder / f"epoch{epoch + 1:03d}",
            time.perf_counter() - start,
        )
