"""Serving tracked pairs to training: the dataset over a corpus and the LightningDataModule."""

from __future__ import annotations

import json
import logging

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Sampler

from vidrep.common.workarounds import EpochForwarder, quiet_mid_epoch_resume_warning
from vidrep.data.corpora import as_roots, corpus_settings, open_index
from vidrep.data.corpus import CorpusError, DamagedCorpusError, PairIndex, check_split, select_pairs
from vidrep.data.shares import rank_shares
from vidrep.data.transforms import PatchTransform, decode_batch, pack_jpegs, unpack_jpegs

log = logging.getLogger(__name__)


class PairDataset(Dataset):
    """Map-style view of chosen manifest rows: item i -> {"anchor", "positive", "video_id"}.

    Random access into the tar shards (offsets from the manifest) lets one sampler shuffle over the
    whole corpus, so a batch draws pairs from many videos even though each shard holds the
    consecutive pairs of a few.

    A damaged pair (checksum or decoding fails) raises DamagedCorpusError naming its shard, pair id
    and the verify command; with `skip_damaged` the next readable pair takes its place (batches
    keep their size) and item["damaged"] counts the pairs skipped for it.
    """

    def __init__(
        self, index: PairIndex, rows: np.ndarray, transform: PatchTransform, skip_damaged: bool = False
    ) -> None:
        self.index, self.rows, self.transform = index, np.asarray(rows, np.int64), transform
        self.skip_damaged = skip_damaged

    def __len__(self) -> int:
        return len(self.rows)

    def video_ids(self) -> np.ndarray:
        return self.index.video_id[self.rows]

    def _item(self, row: int, flips: tuple[bool, bool] | tuple[None, None]) -> dict[str, torch.Tensor]:
        query, tracked = self.index.read_pair(row)
        try:
            anchor, positive = self.transform(query, flips[0]), self.transform(tracked, flips[1])
        except ValueError:
            raise self.index.damaged(row, "a JPEG does not decode") from None
        item = {
            "anchor": anchor,
            "positive": positive,
            "video_id": torch.tensor(int(self.index.video_id[row]), dtype=torch.int64),
        }
        if self.transform.decoder == "device" and flips[0] is not None:
            item["flip"] = torch.tensor(flips, dtype=torch.bool)  # applied where the batch is decoded
        return item

    def __getitem__(self, key: int | tuple[int, bool, bool]) -> dict[str, torch.Tensor]:
        """`key`: an index, or (index, flip the anchor, flip the positive) as `ResumableSampler`
        draws them (an index alone leaves flips to the transform's own `flip_p`)."""
        i, *flips = (key, None, None) if isinstance(key, (int, np.integer)) else key
        if not self.skip_damaged:
            return self._item(int(self.rows[i]), tuple(flips))
        for skipped in range(len(self.rows)):
            try:
                item = self._item(int(self.rows[(i + skipped) % len(self.rows)]), tuple(flips))
            except DamagedCorpusError as e:
                log.warning("skipped (data.skip_damaged=true): %s", e)
                continue
            return {**item, "damaged": torch.tensor(skipped, dtype=torch.int64)}
        raise DamagedCorpusError(f"every pair of corpus {self.index.root} in this set is damaged")


def collate_jpegs(items: list[dict]) -> dict:
    """Batches of undecoded patches (data.decoder=device), each side packed by `pack_jpegs`."""
    return {
        "anchor": pack_jpegs([it["anchor"] for it in items]),
        "positive": pack_jpegs([it["positive"] for it in items]),
        **{k: torch.stack([it[k] for it in items]) for k in ("video_id", "damaged", "flip") if k in items[0]},
    }


class BatchShards(Sampler[list[int]]):
    """Validation batches that do not depend on the number of ranks: the pairs shuffled once with a
    fixed seed (so that a batch spans many videos, as in training), cut into ceil(length /
    batch_size) batches of near-equal size, batch i to rank i mod world. Every pair is seen once
    (no padding, unlike DistributedSampler) and every batch holds the same pairs, hence the same
    in-batch negatives, whatever the world size; with means weighted by batch size the validation
    metrics are then identical on 1 or N devices. A batch of a single video (no candidate
    negatives) is merged into its neighbour, so every batch has candidates when the validation
    set holds two videos or more. Only the permutation and the cut points are kept (memory
    linear in the validation pairs, 8 bytes each)."""

    def __init__(self, video_ids: np.ndarray, batch_size: int, world: int = 1, rank: int = 0, seed: int = 0) -> None:
        video_ids = np.asarray(video_ids)
        n = len(video_ids)
        self.order = np.random.default_rng(seed).permutation(n)
        cuts = np.linspace(0, n, -(-n // batch_size) + 1).round().astype(np.int64) if n else np.zeros(1, np.int64)
        self.cuts = _merge_single_video_batches(video_ids[self.order], cuts)
        self.mine = range(rank, len(self.cuts) - 1, world)

    def __iter__(self):
        return (self.order[self.cuts[b] : self.cuts[b + 1]].tolist() for b in self.mine)

    def __len__(self) -> int:
        return len(self.mine)

    @property
    def num_batches(self) -> int:
        """Batches of every rank together."""
        return len(self.cuts) - 1


def _merge_single_video_batches(ids: np.ndarray, cuts: np.ndarray) -> np.ndarray:
    """Cut points without the batches of one video: each such batch joins the next (the last one
    the previous), until the joined batch spans two videos."""
    if len(cuts) < 3:
        return cuts
    lo, hi = np.minimum.reduceat(ids, cuts[:-1]), np.maximum.reduceat(ids, cuts[:-1])
    if (lo != hi).all():
        return cuts
    keep = [0]
    for b in range(len(cuts) - 1):
        start, end = keep[-1], int(cuts[b + 1])
        if end == len(ids) or ids[start:end].min() != ids[start:end].max():
            keep.append(end)
    if len(keep) > 2 and ids[keep[-2] : keep[-1]].min() == ids[keep[-2] : keep[-1]].max():
        del keep[-2]  # the tail is one video: fold it into the batch before
    return np.asarray(keep, np.int64)


class ResumableSampler(Sampler[list[tuple[int, bool, bool]]]):
    """Training batches: one seeded permutation of the training pairs per epoch, cut into global
    batches of `global_batch` pairs (the last partial one dropped), each dealt across the ranks
    in shares of `rank_shares` (50 on 4 ranks: 13 + 13 + 12 + 12); this rank yields its share of
    every global batch, each pair as (index, flip the anchor, flip the positive). The union of the
    ranks' shares is exactly what one process trains, in the same order and with the same flips,
    whatever the world size.

    The permutation is a function of `seed` (data.seed) and the epoch only, and a global batch's
    flips (each patch with probability `flip_p`) of the seed, the epoch and the batch only, drawn
    for the whole global batch and cut like its pairs: every rank agrees without communicating, and
    no draw depends on a loader worker's random state (which a resumed run cannot restore).

    `position(batches)` is what a checkpoint stores: the epoch, the seed and the global batches
    already trained. Given one (`resume`), the sampler starts at that epoch minus the batches
    already trained (an epoch that was complete resumes as the next one, in full), and keeps that
    start for as many iterators as are made before the epoch changes: torch's multi-process loader
    calls `iter()` twice as it starts, and Lightning creates the first iterator before it sets the
    epoch. The position counts global batches, so under scaling=paper a run resumes exactly on
    another number of devices too.
    """

    def __init__(
        self,
        length: int,
        global_batch: int,
        world: int = 1,
        rank: int = 0,
        seed: int = 0,
        resume: dict | None = None,
        flip_p: float = 0.0,
    ) -> None:
        shares = rank_shares(global_batch, world)
        self.length, self.global_batch, self.seed, self.flip_p = length, global_batch, seed, flip_p
        self.world = world
        self.lo = sum(shares[:rank])
        self.hi = self.lo + shares[rank]
        self.epoch, self.start = 0, (0, 0)
        self._cached: tuple[tuple[int, int], np.ndarray] | None = None
        if resume is not None:
            if resume.get("seed") is not None:  # None: a checkpoint of the earlier DDP sampler
                self.seed = int(resume["seed"])
            done = int(resume["batches"])
            self.start = (resume["epoch"] + 1, 0) if done >= len(self) else (resume["epoch"], done)
            self.epoch = self.start[0]
        # Lightning sets the epoch on `dataloader.sampler` and `dataloader.batch_sampler.sampler`,
        # never on the batch sampler itself: without this every epoch would repeat epoch 0's order.
        self.sampler = EpochForwarder(self)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length // self.global_batch

    def position(self, batches: int) -> dict:
        return {
            "epoch": self.epoch,
            "seed": self.seed,
            "batches": int(batches),
            "global_batch": self.global_batch,
            "world": self.world,
        }

    def flips(self, epoch: int, batch: int) -> np.ndarray:
        """bool [this rank's share, 2]: the flips of (anchor, positive) of global batch `batch`."""
        if self.flip_p <= 0:
            return np.zeros((self.hi - self.lo, 2), bool)
        drawn = np.random.default_rng([self.seed, epoch, batch, 1]).random((self.global_batch, 2)) < self.flip_p
        return drawn[self.lo : self.hi]

    def __iter__(self):
        # epoch and start read now, not at the first batch: Lightning may set the epoch in between
        epoch, skip = self.epoch, self.start[1] if self.epoch == self.start[0] else 0
        return self._batches(epoch, skip)

    def _order(self, epoch: int) -> np.ndarray:
        """The epoch's permutation, kept for the next iterator of the same epoch (torch's
        multi-process loader makes two as it starts; 4M pairs take ~0.3 s to permute)."""
        if self._cached is None or self._cached[0] != (self.seed, epoch):
            self._cached = ((self.seed, epoch), np.random.default_rng([self.seed, epoch]).permutation(self.length))
        return self._cached[1]

    def _batches(self, epoch: int, skip: int):
        order = self._order(epoch)
        g, lo, hi = self.global_batch, self.lo, self.hi
        for b in range(skip, len(self)):
            yield [(i, *f) for i, f in zip(order[b * g + lo : b * g + hi].tolist(), self.flips(epoch, b).tolist())]


def _distributed() -> tuple[int, int] | None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.get_world_size(), dist.get_rank()
    return None


class PairDataModule(L.LightningDataModule):
    """Batches of pairs (2 patches each) with their video ids.

    `batch_size` is the global batch in pairs, whatever the number of processes: under DDP each
    rank trains its share of every global batch (`ResumableSampler`), so one process and N ranks
    train the same batches. `train_batch_size` overrides it for training only (the run sets it
    under scaling=linear, where the global batch is world x batch_size); validation batches are
    always of `batch_size`. `num_patches` counts training patches as the paper does (2 per pair;
    the validation videos come on top); None takes the whole corpus.
    """

    def __init__(
        self,
        root: str | list[str],
        num_patches: int | None = None,
        val_fraction: float = 0.05,
        batch_size: int = 50,
        num_workers: int = 4,
        input_size: int = 227,
        flip_p: float = 0.5,
        decoder: str = "opencv",
        seed: int = 0,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        train_batch_size: int | None = None,
        skip_damaged: bool = False,
    ) -> None:
        super().__init__()
        if num_patches is not None and num_patches < 2:
            raise ValueError(f"data.num_patches must be >= 2 (2 patches per pair); got {num_patches}")
        self.roots = as_roots(root)
        self.root = self.roots[0]
        self.num_patches, self.val_fraction, self.seed = num_patches, val_fraction, seed
        self.batch_size, self.num_workers = batch_size, num_workers
        self.train_batch_size = batch_size if train_batch_size is None else train_batch_size
        self.input_size, self.flip_p, self.decoder = input_size, flip_p, decoder
        self.pin_memory, self.persistent_workers = pin_memory, persistent_workers
        self.skip_damaged = skip_damaged
        self.train_set: PairDataset | None = None
        self.val_set: PairDataset | None = None
        self._train_sampler: ResumableSampler | None = None
        self._resume: dict | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        index = open_index(self.roots)
        self.corpora = corpus_settings(self.roots)
        self._record_corpora()
        num_pairs = None if self.num_patches is None else self.num_patches // 2
        sel = select_pairs(index.video_id, index.query_frame, num_pairs, self.val_fraction, self.seed)
        if len(sel.train) < self.train_batch_size:
            raise CorpusError(
                f"corpus {', '.join(map(str, self.roots))} gives {len(sel.train)} training pairs, fewer than one batch "
                f"of {self.train_batch_size}: lower data.batch_size (at least 2), or add corpora (data.root='[a,b]')"
            )
        check_split(index.video_id, sel, ", ".join(map(str, self.roots)), self.val_fraction)
        # training flips come with each pair from the sampler (ResumableSampler.flips)
        unflipped = PatchTransform(self.input_size, 0.0, self.decoder)
        self.train_set = PairDataset(index, sel.train, unflipped, self.skip_damaged)
        self.val_set = PairDataset(index, sel.val, unflipped, self.skip_damaged)
        log.info(
            "corpus %s: %d train pairs, %d validation pairs, %d videos",
            ", ".join(map(str, self.roots)),
            len(sel.train),
            len(sel.val),
            len(np.unique(index.video_id[np.concatenate([sel.train, sel.val])])),
        )

    def _record_corpora(self) -> None:
        """Several corpora may have been mined with different settings: say which differ, and keep
        each one's settings with the run (hparams.yaml, the W&B config)."""
        if len(self.corpora) > 1:
            keys = sorted({k for s in self.corpora.values() for k in s})
            differ = [k for k in keys if len({json.dumps(s.get(k), sort_keys=True) for s in self.corpora.values()}) > 1]
            if differ:
                log.warning(
                    "the corpora were mined with different settings (%s); each one's are logged as `corpora`",
                    ", ".join(differ),
                )
        for lg in self.trainer.loggers if self.trainer is not None else []:
            lg.log_hyperparams({"corpora": self.corpora})

    def _loader(self, dataset: PairDataset, train: bool) -> DataLoader:
        world, rank = _distributed() or (1, 0)
        common = dict(
            num_workers=self.num_workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            persistent_workers=self.persistent_workers and self.num_workers > 0,
            collate_fn=collate_jpegs if self.decoder == "device" else None,
        )
        if not train:
            shards = BatchShards(dataset.video_ids(), self.batch_size, world, rank, self.seed)
            batches = shards.num_batches
            if 0 < batches < world:
                # every rank sees the same count, so all of them stop here: none waits for the others
                raise CorpusError(
                    f"validation holds {batches} batch(es) of data.batch_size={self.batch_size} pairs for {world} "
                    "processes, and a process without one would stall the others: lower data.batch_size, raise "
                    "data.val_fraction, or run fewer processes (trainer.devices)"
                )
            return DataLoader(dataset, batch_sampler=shards, **common)
        self._train_sampler = ResumableSampler(
            len(dataset), self.train_batch_size, world, rank, self.seed, self._resume, self.flip_p
        )
        self._resume = None
        return DataLoader(dataset, batch_sampler=self._train_sampler, **common)

    def state_dict(self) -> dict:
        """Where training stands in the data stream (stored in every checkpoint, so that a run
        resumed from a mid-epoch checkpoint trains the rest of that epoch's pairs, not a new shuffle)."""
        if self._train_sampler is None or self.trainer is None:
            return {}
        batches = self.trainer.fit_loop.epoch_loop.batch_progress.current.processed
        return {"train_position": self._train_sampler.position(batches)}

    def load_state_dict(self, state_dict: dict) -> None:
        self._resume = state_dict.get("train_position")
        saved = (self._resume or {}).get("global_batch")
        if saved is not None and saved != self.train_batch_size:
            # scaling=linear: the global batch (and the LR schedule) are world x batch_size
            raise ValueError(
                f"the checkpoint trained global batches of {saved} pairs on {self._resume.get('world')} device(s), "
                f"this run's are {self.train_batch_size}: its data position and learning-rate schedule belong to "
                "that batch (scaling=linear scales both with the devices); resume with "
                f"trainer.devices={self._resume.get('world')} (or the batch size it ran with)"
            )
        if self._resume is not None:
            quiet_mid_epoch_resume_warning()

    def on_before_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        """data.decoder=device: decode the batch's JPEGs on the training device (flips in training only)."""
        if self.decoder != "device":
            return batch
        trainer = self.trainer
        device = trainer.strategy.root_device if trainer is not None else torch.device("cpu")
        return self.decode(batch, device, self.flip_p if trainer is not None and trainer.training else 0.0)

    def decode(self, batch: dict, device: torch.device | str, flip_p: float) -> dict:
        """A batch of packed JPEGs (data.decoder=device) -> the decoded batch on `device`; with
        `flip_p` > 0 flipped as the sampler drew it (batch["flip"]), else at random with `flip_p`."""
        drawn = batch.get("flip") if flip_p > 0 else None
        decoded = {}
        for side, key in enumerate(("anchor", "positive")):
            flips = None if drawn is None else drawn[:, side]
            decoded[key] = decode_batch(unpack_jpegs(*batch[key]), self.input_size, device, flip_p, flips)
        return {**batch, **decoded}

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, train=False)
