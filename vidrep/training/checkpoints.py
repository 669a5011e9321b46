"""Checkpoints that survive: written atomically with a hash of everything they hold, checked when
loaded; never written with non-finite weights; last.ckpt at every epoch end and every periodic
checkpoint; a resume into the same run directory that keeps the history before the checkpoint and
moves an abandoned future aside.

Every checkpoint the trainer writes or reads goes through `HashedCheckpointIO` (train.py passes it
as a Trainer plugin): a kill -9 or a full disk while writing leaves the previous file intact (the
new one is written under a temporary name, then renamed), and a file whose content changed since is
refused with the file named, instead of loading garbage that trains to NaN.

What is hashed is every value a resume reads, tensors and plain values alike (optimiser
hyperparameters, scheduler, loop counters, the data position, hyper_parameters): a learning rate
changed from 0.002 to 0.2 inside the file is refused like a flipped weight. A checkpoint written by
this version carries FORMAT_KEY (itself hashed); one without any vidrep key was written before
checkpoints were hashed and loads with a warning saying so. Anything in between (a vidrep key
without its hash, a renamed hash key) is damage.

Loading never runs code: every load is `torch.load(weights_only=True)`, so a file whose pickle
names anything but tensors and plain containers is refused, naming it, before any of it runs.
"""

from __future__ import annotations

import csv
import logging
import os
import re
import time
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Checkpoint

from vidrep.common.checkpoint_files import (  # noqa: F401 - the format's names, for this module's users
    FORMAT,
    FORMAT_KEY,
    HASH_KEY,
    TENSOR_HASH_KEY,
    DamagedCheckpointError,
    UnsafeCheckpointError,
    _tensor_hashes_v1,
    content_hashes,
    damaged_message,
    hash_mismatches,
    load_verified,
    non_finite_tensors,
    save_hashed,
)

log = logging.getLogger(__name__)

LAST = "last.ckpt"


class HashedCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO with content hashes, atomic writes (temporary name, then rename),
    weights_only loads, and no file written with non-finite weights: every checkpoint of a run
    (last.ckpt, ModelCheckpoint's step<N>.ckpt, Lightning's own) goes through here, so none of
    them can hold a diverged state."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        save_hashed(checkpoint, path)

    def load_checkpoint(self, path, map_location=None, weights_only: bool | None = None) -> dict:
        return load_verified(path, map_location)


def _all_finite(module: torch.nn.Module) -> bool:
    return all(torch.isfinite(p).all() for p in module.parameters())


class LastCheckpoint(Checkpoint):
    """<dirpath>/last.ckpt at the end of every training epoch (after its validation) and every
    `every_n_train_steps` steps, so a run killed at any point resumes from its latest epoch or
    periodic checkpoint. Weights that are no longer finite are not saved: they would overwrite
    the last good state with a diverged one. A `Checkpoint`, so Lightning runs it after the other
    callbacks' hooks, as it runs ModelCheckpoint: their state at the epoch end is in the file."""

    def __init__(self, dirpath: str, every_n_train_steps: int | None = None) -> None:
        self.dirpath = Path(dirpath)
        self.every_n_train_steps = every_n_train_steps
        self._saved_step = -1

    @property
    def path(self) -> Path:
        return self.dirpath / LAST

    def _save(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if (
            trainer.sanity_checking
            or getattr(trainer, "fast_dev_run", False)
            or trainer.global_step in (0, self._saved_step)
        ):
            return
        if not _all_finite(pl_module):
            log.error("weights are not finite at step %d: %s is not overwritten", trainer.global_step, self.path)
            return
        for lg in trainer.loggers:  # the history up to this checkpoint on disk before the checkpoint
            lg.save()
        trainer.save_checkpoint(self.path, weights_only=False)  # said: Lightning logs a line per save when unset
        self._saved_step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        n = self.every_n_train_steps
        if n and trainer.global_step % n == 0:
            self._save(trainer, pl_module)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._save(trainer, pl_module)


_STEP_NAME = re.compile(r"step(\d+)")


def checkpoint_step(path: Path) -> int:
    """The global step of a checkpoint: from a step<N> name, else read (memory-mapped, no copy;
    weights_only: a file that would run code is a damaged one here)."""
    m = _STEP_NAME.fullmatch(path.stem.split("-v")[0])
    if m:
        return int(m.group(1))
    try:
        return int(torch.load(path, map_location="cpu", mmap=True, weights_only=True)["global_step"])
    except Exception:  # noqa: BLE001 - a damaged file belongs to no history; move it aside too
        return 1 << 62


def _rows_before(metrics: Path, step: int) -> tuple[str, list[str], list[str]]:
    """metrics.csv split into (header, rows logged before `step`, rows at or after it)."""

    with open(metrics, newline="") as f:
        lines = f.read().splitlines()
    if not lines:
        return "", [], []
    header = lines[0]
    col = next(csv.reader([header])).index("step") if "step" in header else None
    keep, drop = [], []
    for line in lines[1:]:
        fields = next(csv.reader([line])) if line else []
        try:
            s = int(float(fields[col])) if col is not None else -1
        except (ValueError, IndexError):
            s = -1
        (keep if s < step else drop).append(line)
    return header, keep, drop


def prepare_run_dir(output_dir: str | Path, ckpt_path: str | Path | None) -> Path | None:
    """Make a run directory ready for this run without losing or mixing history.

    Resuming from a checkpoint at step S: metrics.csv keeps its rows logged before S (the resumed
    run appends after them), and the checkpoints in checkpoints/ written after S (the future that
    the resume abandons) move to checkpoints/abandoned-<time>/ with the dropped rows. Starting
    afresh in a directory that holds an earlier run: its metrics.csv and checkpoints move there
    whole. Returns the folder things were moved to, if any. Rank 0 only (before DDP starts).
    """
    out = Path(output_dir)
    ckpt_dir = out / "checkpoints"
    metrics = out / "metrics.csv"
    source = Path(ckpt_path).expanduser().resolve() if ckpt_path else None
    if source is not None and not source.is_file():
        return None  # a wrong path must not move a run's files; loading it fails, naming it
    step = checkpoint_step(source) if source is not None else 0
    existing = sorted(ckpt_dir.glob("*.ckpt")) if ckpt_dir.is_dir() else []
    future = [p for p in existing if p.resolve() != source and checkpoint_step(p) > step]
    header, keep, drop = _rows_before(metrics, step) if metrics.is_file() else ("", [], [])
    if not future and not drop:
        return None
    aside = ckpt_dir / f"abandoned-{time.strftime('%Y%m%d-%H%M%S')}"
    aside.mkdir(parents=True, exist_ok=True)
    for p in future:
        p.rename(aside / p.name)
    if drop:
        (aside / "metrics.csv").write_text("\n".join([header, *drop]) + "\n")
        tmp = metrics.with_name(".metrics.csv.tmp")
        tmp.write_text("\n".join([header, *keep]) + "\n" if keep else "")
        os.replace(tmp, metrics)
        if not keep:
            metrics.unlink()
    log.warning(
        "run directory %s: %d checkpoints and %d metrics rows after step %d moved to %s",
        out,
        len(future),
        len(drop),
        step,
        aside,
    )
    return aside
