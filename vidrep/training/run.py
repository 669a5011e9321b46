"""The training task behind train.py: instantiate what the config names, fit, always clean up."""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import lightning as L
from lightning.fabric.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from vidrep.common.loggers import finish_wandb
from vidrep.common.workarounds import ddp_children_run_this_job_only, end_distributed
from vidrep.training import plan
from vidrep.training.checkpoints import (
    HashedCheckpointIO,
    LastCheckpoint,
    prepare_run_dir,
)
from vidrep.training.validate import validate_settings

log = logging.getLogger(__name__)


def _instantiate_list(cfg: DictConfig | None) -> list:
    if not cfg:
        return []
    return [hydra.utils.instantiate(c) for c in cfg.values() if c is not None and "_target_" in c]


def check_config(cfg: DictConfig) -> None:
    """Errors that Hydra cannot see, named with the override that fixes them."""
    missing = OmegaConf.missing_keys(cfg)
    if "data.root" in missing:
        raise ValueError(
            f"data.num_patches={cfg.data.get('num_patches')} needs a mined corpus: add data.root=/path/to/corpus "
            "(made by `python mine.py videos=... out=/path/to/corpus`)"
        )
    if missing:
        raise ValueError(f"config values still unset (set them on the command line, key=value): {sorted(missing)}")


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit the model; returns the final logged metrics (for sweepers)."""
    import os

    env_before = set(os.environ)
    try:
        check_config(cfg)
        validate_settings(cfg)
        if cfg.get("seed") is not None:
            L.seed_everything(cfg.seed, workers=True)
        cfg, schedule, warmup, datamodule = plan.prepare(cfg, dry_run=bool(cfg.get("dry_run")))
        if cfg.get("dry_run"):
            plan.report(schedule, warmup, cfg.paths.output_dir)
            return {}
        if rank_zero_only.rank == 0 and not cfg.get("validate_only"):
            prepare_run_dir(cfg.paths.output_dir, cfg.get("ckpt_path"))
        model = hydra.utils.instantiate(cfg.model)
        loggers = _instantiate_list(cfg.get("logger"))
        callbacks = _instantiate_list(cfg.get("callbacks"))
        ddp_children_run_this_job_only()
        trainer: L.Trainer = hydra.utils.instantiate(
            cfg.trainer, logger=loggers or False, callbacks=callbacks, plugins=[HashedCheckpointIO()]
        )
        plan.check_world_size(trainer, schedule)
        if trainer.is_global_zero:
            plan.report(schedule, warmup, cfg.paths.output_dir)
            for lg in loggers:
                lg.log_hyperparams({**OmegaConf.to_container(cfg, resolve=True), "schedule": schedule.to_dict()})
        if cfg.get("validate_only"):
            if not cfg.get("ckpt_path"):
                raise ValueError(
                    "validate_only=true measures a checkpoint: add ckpt_path=<run dir>/checkpoints/last.ckpt"
                )
            trainer.validate(model, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
        else:
            trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        if trainer.is_global_zero:
            out = Path(cfg.paths.output_dir)
            log.info("run directory: %s", out)
            for cb in callbacks:
                if isinstance(cb, LastCheckpoint) and cb.path.is_file():
                    log.info("last checkpoint: %s", cb.path)
            for lg in loggers:
                log_dir = getattr(lg, "log_dir", None) or getattr(lg, "save_dir", None)
                if log_dir:
                    log.info("%s logs: %s", type(lg).__name__, log_dir)
            summary = ", ".join(
                f"{k}={metrics[k]:.4f}"
                for k in ("train/loss_epoch", "train/triplet_acc_epoch", "val/loss", "val/triplet_acc")
                if k in metrics
            )
            log.info("final metrics: %s", summary)
            for cb in callbacks:  # a callback's closing figures (the demo's check), for sweepers
                metrics.update(getattr(cb, "final_metrics", {}))
        stopped = [cb.stopped_at for cb in callbacks if getattr(cb, "stopped_at", None) is not None]
        if stopped:
            raise RuntimeError(
                f"training stopped at step {stopped[0]}: the loss is not finite (see the log above); "
                "last.ckpt keeps the last finite weights"
            )
        return metrics
    finally:
        finish_wandb()
        end_distributed(env_before)
