"""The Lightning Trainer, loggers and resume point shared by the evaluation's two training runs
(detection fine-tuning, vidrep/eval/finetune.py; iterative fine-tuning's re-adaptation,
vidrep/eval/adapt.py). Checkpoints go through train.py's `HashedCheckpointIO` (atomic writes,
tensor hashes checked on load), so a checkpoint damaged by a kill is refused by name, not resumed."""

from __future__ import annotations

from pathlib import Path

import lightning as L

from vidrep.training.checkpoints import HashedCheckpointIO, load_verified
from vidrep.training.progress import ProgressBar


def checkpoint_step(folder: Path) -> int:
    """The global step of `folder/last.ckpt`, 0 without one."""
    last = folder / "last.ckpt"
    return int(load_verified(last, "cpu")["global_step"]) if last.exists() else 0


def make_loggers(folder: Path, logger: dict | None, name: str, run_id: str) -> list:
    """The CSV curves in `folder` (appended to on resume) and, with `logger` (evaluate.py's
    `logger` config, vidrep/conf/logger/*.yaml) holding a `wandb` entry, W&B: one run per fine-tuning,
    continued by a resumed one (a fixed id unless logger.wandb.id is set)."""
    import hydra

    from vidrep.common.loggers import csv_logger

    loggers = [csv_logger(str(folder))]
    if logger and logger.get("wandb"):
        w = logger["wandb"]
        loggers.append(
            hydra.utils.instantiate(
                w,
                save_dir=str(folder),
                name=w.get("name") or name,
                id=w.get("id") or run_id,
                resume=w.get("resume") or "allow",
                job_type="eval-finetune",
            )
        )
    return loggers


def make_trainer(
    folder: Path, max_steps: int, device: str, devices: int, checkpoint_every: int, loggers: list
) -> L.Trainer:
    """A Trainer bounded by steps: checkpoints `folder/last.ckpt` every `checkpoint_every` steps,
    the progress bar, DDP over `devices` when more than one (ddp_spawn; see finetune.py's docstring)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    return L.Trainer(
        max_steps=max_steps,
        max_epochs=-1,
        accelerator="gpu" if device.startswith("cuda") else "cpu",
        devices=devices,
        use_distributed_sampler=False,
        # the trunk's own fc layers are carried along unused by the detection network
        strategy="ddp_spawn_find_unused_parameters_true" if devices > 1 else "auto",
        logger=loggers,
        default_root_dir=folder,
        limit_val_batches=0,
        plugins=[HashedCheckpointIO()],
        callbacks=[
            ProgressBar(),
            ModelCheckpoint(
                dirpath=folder,
                filename="latest",
                every_n_train_steps=checkpoint_every,
                save_top_k=1,
                save_last=True,
                enable_version_counter=False,
            ),
        ],
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=max(1, min(20, max_steps // 2)),
        enable_progress_bar=True,
    )
