"""Checkpoints that survive: written atomically with a hash of every tensor, checked when loaded;
last.ckpt at every epoch end and every periodic checkpoint; a resume into the same run directory
that keeps the history before the checkpoint and moves an abandoned future aside.

Every checkpoint the trainer writes or reads goes through `HashedCheckpointIO` (train.py passes it
as a Trainer plugin): a kill -9 or a full disk while writing leaves the previous file intact (the
new one is written under a temporary name, then renamed), and a file whose bytes changed since is
refused with the file named, instead of loading garbage that trains to NaN.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
import re
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Checkpoint

from vidrep.common.io import write_torch

log = logging.getLogger(__name__)

HASH_KEY = "vidrep_tensor_hashes"
LAST = "last.ckpt"


class DamagedCheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded or whose tensors do not match their stored hashes."""


def _tensors(obj: Any, prefix: str = ""):
    """(path, tensor) for every tensor in nested dicts/lists/tuples, in a fixed order."""
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k in sorted(obj, key=str):
            if k != HASH_KEY:
                yield from _tensors(obj[k], f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{prefix}.{i}")


def _digest(t: torch.Tensor) -> str:
    data = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
    h = hashlib.blake2b(data, digest_size=16)
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    return h.hexdigest()


def tensor_hashes(checkpoint: dict) -> dict[str, str]:
    """{path of a tensor in the checkpoint: blake2b of its bytes, dtype and shape}."""
    return {path: _digest(t) for path, t in _tensors(checkpoint)}


def hash_mismatches(checkpoint: dict) -> list[str] | None:
    """Paths of the tensors that differ from the hashes stored at save (None: no hashes stored,
    a checkpoint written before hashing or by another program)."""
    stored = checkpoint.get(HASH_KEY) if isinstance(checkpoint, dict) else None
    if stored is None:
        return None
    now = tensor_hashes(checkpoint)
    return sorted(k for k in set(stored) | set(now) if stored.get(k) != now.get(k))


def damaged_message(path: Path, what: str, alternative: str = "") -> str:
    others = sorted(p.name for p in path.parent.glob("*.ckpt") if p != path) if path.parent.is_dir() else []
    hint = f" (others there: {', '.join(others[:6])})" if others else ""
    return (
        f"checkpoint {path} is damaged{' ' + alternative if alternative else ''} ({what}); it cannot be used. Resume "
        "from another checkpoint of "
        f"{path.parent}{hint} with ckpt_path=<that file>, or start afresh without ckpt_path"
    )


def load_verified(path: str | Path, map_location=None, weights_only: bool | None = None) -> dict:
    """torch.load, then the stored tensor hashes checked; DamagedCheckpointError names the file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist; pass ckpt_path=<run dir>/checkpoints/last.ckpt")
    if path.stat().st_size == 0:
        raise DamagedCheckpointError(damaged_message(path, "0 bytes"))
    try:
        ckpt = torch.load(path, map_location=map_location or "cpu", weights_only=bool(weights_only))
    except Exception as e:  # noqa: BLE001 - a truncated or overwritten file raises anything from unpickling
        what = f"unreadable with weights_only={bool(weights_only)}: {type(e).__name__}: {str(e)[:200]}"
        raise DamagedCheckpointError(damaged_message(path, what, "or not a checkpoint")) from None
    if not isinstance(ckpt, dict):
        raise DamagedCheckpointError(damaged_message(path, f"holds a {type(ckpt).__name__}, not a checkpoint dict"))
    bad = hash_mismatches(ckpt)
    if bad:
        raise DamagedCheckpointError(
            damaged_message(path, f"{len(bad)} tensors differ from their hashes at save, e.g. {', '.join(bad[:3])}")
        )
    return ckpt


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    write_torch(
        path,
        obj,
        advice="the previous file there is intact. Free space on that disk and resume from the last checkpoint",
    )


class HashedCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO with tensor hashes and atomic writes (temporary name, then rename)."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        checkpoint[HASH_KEY] = tensor_hashes(checkpoint)
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(self, path, map_location=None, weights_only: bool | None = None) -> dict:
        return load_verified(path, map_location, weights_only)


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
            log.error(
                "weights are not finite at step %d: %s keeps the last finite state", trainer.global_step, self.path
            )
            return
        for lg in trainer.loggers:  # the history up to this checkpoint on disk before the checkpoint
            lg.save()
        trainer.save_checkpoint(self.path)
        self._saved_step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        n = self.every_n_train_steps
        if n and trainer.global_step % n == 0:
            self._save(trainer, pl_module)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._save(trainer, pl_module)


_STEP_NAME = re.compile(r"step(\d+)")


def checkpoint_step(path: Path) -> int:
    """The global step of a checkpoint: from a step<N> name, else read (memory-mapped, no copy)."""
    m = _STEP_NAME.fullmatch(path.stem.split("-v")[0])
    if m:
        return int(m.group(1))
    try:
        return int(torch.load(path, map_location="cpu", mmap=True, weights_only=False)["global_step"])
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
