"""Serving tracked pairs to training: the dataset over a corpus and the LightningDataModule."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, Sampler

from vidrep.data.corpus import CorpusError, DamagedCorpusError, PairIndex, check_complete, select_pairs
from vidrep.data.demo import build_demo_corpus
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

    def __init__(self, index: PairIndex, rows: np.ndarray, transform: PatchTransform, skip_damaged: bool = False) -> None:
        self.index, self.rows, self.transform = index, np.asarray(rows, np.int64), transform
        self.skip_damaged = skip_damaged

    def __len__(self) -> int:
        return len(self.rows)

    def video_ids(self) -> np.ndarray:
        return self.index.video_id[self.rows]

    def _item(self, row: int) -> dict[str, torch.Tensor]:
        query, tracked = self.index.read_pair(row)
        try:
            anchor, positive = self.transform(query), self.transform(tracked)
        except ValueError:
            raise self.index.damaged(row, "a JPEG does not decode") from None
        return {"anchor": anchor, "positive": positive, "video_id": torch.tensor(int(self.index.video_id[row]), dtype=torch.int64)}

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not self.skip_damaged:
            return self._item(int(self.rows[i]))
        for skipped in range(len(self.rows)):
            try:
                item = self._item(int(self.rows[(i + skipped) % len(self.rows)]))
            except DamagedCorpusError as e:
                log.warning("skipped (data.skip_damaged=true): %s", e)
                continue
            return {**item, "damaged": torch.tensor(skipped, dtype=torch.int64)}
        raise DamagedCorpusError(f"every pair of corpus {self.index.root} in this set is damaged")


def collate_jpegs(items: list[dict]) -> dict:
    """Batches of undecoded patches (data.decoder=device), each side packed by `pack_jpegs`."""
    return {"anchor": pack_jpegs([it["anchor"] for it in items]), "positive": pack_jpegs([it["positive"] for it in items]),
            **{k: torch.stack([it[k] for it in items]) for k in ("video_id", "damaged") if k in items[0]}}


class BatchShards(Sampler[list[int]]):
    """Validation batches that do not depend on the number of ranks: the dataset in order, cut
    into batches of `batch_size` (the last one short), batch i to rank i mod world. Every pair is
    seen once (no padding, unlike DistributedSampler) and every batch holds the same pairs, hence
    the same in-batch negatives, whatever the world size; with means weighted by batch size the
    validation metrics are then identical on 1 or N devices."""

    def __init__(self, length: int, batch_size: int, world: int = 1, rank: int = 0) -> None:
        self.batches = [list(range(i, min(i + batch_size, length))) for i in range(0, length, batch_size)]
        self.mine = self.batches[rank::world]

    def __iter__(self):
        return iter(self.mine)

    def __len__(self) -> int:
        return len(self.mine)


class ResumableSampler(Sampler[int]):
    """The training order of one epoch, resumable in the middle of it.

    Wraps a RandomSampler (one process) or a DistributedSampler (DDP). For a RandomSampler the
    epoch's permutation comes from a seed drawn from torch's global generator exactly as
    RandomSampler draws it, so the order is the one RandomSampler alone would give; the seed is
    kept. `position(batches)` is what a checkpoint stores: the epoch, its seed and the batches
    already trained. Given one (`resume`), the next epoch this sampler starts is that epoch again
    (Lightning creates the first iterator before it sets the epoch), with the same order, minus the
    batches already trained; an epoch that was complete resumes as the next one, in full.
    """

    def __init__(self, base: RandomSampler | DistributedSampler, batch_size: int, resume: dict | None = None) -> None:
        self.base, self.batch_size, self.resume = base, batch_size, resume
        self.epoch, self.seed = 0, None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if isinstance(self.base, DistributedSampler):
            self.base.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.base)

    def position(self, batches: int) -> dict:
        return {"epoch": self.epoch, "seed": self.seed, "batches": int(batches)}

    def __iter__(self):
        resume, self.resume = self.resume, None
        skip, seed = 0, None
        if resume is not None:
            if resume["batches"] >= len(self.base) // self.batch_size:
                self.set_epoch(resume["epoch"] + 1)
            else:
                self.set_epoch(resume["epoch"])
                skip, seed = resume["batches"] * self.batch_size, resume["seed"]
        if isinstance(self.base, RandomSampler):
            self.seed = int(torch.empty((), dtype=torch.int64).random_().item()) if seed is None else seed
            self.base.generator = torch.Generator().manual_seed(self.seed)
        return iter(list(self.base)[skip:])


def _distributed() -> tuple[int, int] | None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.get_world_size(), dist.get_rank()
    return None


class PairDataModule(L.LightningDataModule):
    """Batches of `batch_size` pairs (2 x batch_size patches) with their video ids.

    `num_patches` counts patches as the paper does (2 per pair); None takes the whole corpus. Under
    DDP every rank gets a disjoint, equal share of the training pairs each epoch (the remainder
    that does not divide evenly is left out of that epoch), so no rank waits on another.
    """

    def __init__(
        self,
        root: str,
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
        demo: dict | None = None,
        skip_damaged: bool = False,
    ) -> None:
        super().__init__()
        if root is None or str(root) in ("", "???"):
            raise CorpusError("data.root is not set: point it at a mined corpus, e.g. `python train.py data=8M data.root=/data/corpus`")
        if num_patches is not None and num_patches < 2:
            raise ValueError(f"data.num_patches must be >= 2 (2 patches per pair); got {num_patches}")
        self.root = Path(root).expanduser()
        self.num_patches, self.val_fraction, self.seed = num_patches, val_fraction, seed
        self.batch_size, self.num_workers = batch_size, num_workers
        self.input_size, self.flip_p, self.decoder = input_size, flip_p, decoder
        self.pin_memory, self.persistent_workers = pin_memory, persistent_workers
        self.demo = dict(demo) if demo else None
        self.skip_damaged = skip_damaged
        self.train_set: PairDataset | None = None
        self.val_set: PairDataset | None = None
        self._train_sampler: ResumableSampler | None = None
        self._resume: dict | None = None

    def prepare_data(self) -> None:
        if self.demo is not None and not (self.root / "demo.json").exists():
            log.info("building the demo corpus at %s (once; cached afterwards)", self.root)
            build_demo_corpus(self.root, **self.demo)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        if not self.root.exists():
            raise CorpusError(f"data.root {self.root} does not exist; mine a corpus there with mine.py or fix the path")
        index = PairIndex(self.root)
        check_complete(self.root, len(index))
        num_pairs = None if self.num_patches is None else self.num_patches // 2
        sel = select_pairs(index.video_id, index.query_frame, num_pairs, self.val_fraction, self.seed)
        if len(sel.train) < self.batch_size:
            raise CorpusError(f"corpus {self.root} gives {len(sel.train)} training pairs, fewer than one batch of {self.batch_size}")
        self.train_set = PairDataset(index, sel.train, PatchTransform(self.input_size, self.flip_p, self.decoder), self.skip_damaged)
        self.val_set = PairDataset(index, sel.val, PatchTransform(self.input_size, 0.0, self.decoder), self.skip_damaged)
        log.info("corpus %s: %d train pairs, %d validation pairs, %d videos", self.root, len(sel.train), len(sel.val),
                 len(np.unique(index.video_id[np.concatenate([sel.train, sel.val])])))

    def _loader(self, dataset: PairDataset, train: bool) -> DataLoader:
        world, rank = _distributed() or (1, 0)
        common = dict(num_workers=self.num_workers, pin_memory=self.pin_memory and torch.cuda.is_available(),
                      persistent_workers=self.persistent_workers and self.num_workers > 0,
                      collate_fn=collate_jpegs if self.decoder == "device" else None)
        if not train:
            return DataLoader(dataset, batch_sampler=BatchShards(len(dataset), self.batch_size, world, rank), **common)
        if world > 1:
            base = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=self.seed, drop_last=True)
        else:
            base = RandomSampler(dataset)
        self._train_sampler = ResumableSampler(base, self.batch_size, self._resume)
        self._resume = None
        return DataLoader(dataset, batch_size=self.batch_size, sampler=self._train_sampler, drop_last=True, **common)

    def state_dict(self) -> dict:
        """Where training stands in the data stream (stored in every checkpoint, so that a run
        resumed from a mid-epoch checkpoint trains the rest of that epoch's pairs, not a new shuffle)."""
        if self._train_sampler is None or self.trainer is None:
            return {}
        batches = self.trainer.fit_loop.epoch_loop.batch_progress.current.processed
        return {"train_position": self._train_sampler.position(batches)}

    def load_state_dict(self, state_dict: dict) -> None:
        self._resume = state_dict.get("train_position")
        if self._resume is not None:
            # Lightning looks for the resume state on the DataLoader only and would warn that a
            # mid-epoch resume is unreliable; here the position travels with the datamodule.
            warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")

    def on_before_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        """data.decoder=device: decode the batch's JPEGs on the training device (flips in training only)."""
        if self.decoder != "device":
            return batch
        trainer = self.trainer
        device = trainer.strategy.root_device if trainer is not None else torch.device("cpu")
        return self.decode(batch, device, self.flip_p if trainer is not None and trainer.training else 0.0)

    def decode(self, batch: dict, device: torch.device | str, flip_p: float) -> dict:
        """A batch of packed JPEGs (data.decoder=device) -> the decoded batch on `device`."""
        return {**batch, **{key: decode_batch(unpack_jpegs(*batch[key]), self.input_size, device, flip_p)
                            for key in ("anchor", "positive")}}

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, train=False)
