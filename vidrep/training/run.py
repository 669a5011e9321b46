"""The training task behind train.py: instantiate what the config names, fit, always clean up."""

from __future__ import annotations

import contextlib
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
    checkpoint_step,
    load_verified,
    prepare_run_dir,
)
from vidrep.training.lock import hold_run_dir
from vidrep.training.resume import finished_run, mark_finished
from vidrep.training.validate import validate_settings

log = logging.getLogger(__name__)


def _instantiate_list(cfg: DictConfig | None) -> list:
    if not cfg:
        return []
    return [hydra.utils.instantiate(c) for c in cfg.values() if c is not None and "_target_" in c]


def check_config(cfg: DictConfig) -> None:
    """Errors that Hydra cannot see, named with the override that fixes them."""
    missing = OmegaConf.missing_keys(cfg) - ({"data.root"} if cfg.get("dry_run") else set())
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
    stack = contextlib.ExitStack()
    try:
        check_config(cfg)
        validate_settings(cfg)
        if cfg.get("seed") is not None:
            L.seed_everything(cfg.seed, workers=True)
        cfg, schedule, warmup, datamodule = plan.prepare(cfg, dry_run=bool(cfg.get("dry_run")))
        if cfg.get("dry_run"):
            plan.report(schedule, warmup, cfg.paths.output_dir)
            return {}
        if cfg.get("resume") and (done := finished_run(cfg.paths.output_dir, schedule.max_steps)) is not None:
            return done  # before any logger: a finished run opens no W&B run
        if rank_zero_only.rank == 0:
            # one run per run directory; the ranks DDP starts are this run's own
            held = stack.enter_context(hold_run_dir(cfg.paths.output_dir))
            if cfg.get("ckpt_path"):
                # refused (damaged, altered, or it would run code) before the run directory changes
                load_verified(cfg.ckpt_path)
            if not cfg.get("validate_only"):
                prepare_run_dir(cfg.paths.output_dir, cfg.get("ckpt_path"))
            log.debug("holding %s", held)
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
            trainer.validate(model, datamodule=datamodule, ckpt_path=cfg.ckpt_path, weights_only=True)
        else:
            trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"), weights_only=True)
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
            if not cfg.get("validate_only") and trainer.global_step >= schedule.max_steps:
                mark_finished(out, trainer.global_step, metrics)
        stopped = [cb.stopped_at for cb in callbacks if getattr(cb, "stopped_at", None) is not None]
        if stopped:
            raise RuntimeError(
                f"training stopped at step {stopped[0]}: the loss is not finite (see the log above); "
                f"{last_finite_checkpoint(Path(cfg.paths.output_dir) / 'checkpoints')}"
            )
        return metrics
    finally:
        stack.close()
        finish_wandb()
        end_distributed(env_before)


def last_finite_checkpoint(ckpt_dir: Path) -> str:
    """Where the last finite weights are: the newest checkpoint of the run directory (no file with
    non-finite weights is ever written, see HashedCheckpointIO), or that there is none."""
    ckpts = [p for p in ckpt_dir.glob("*.ckpt")] if ckpt_dir.is_dir() else []
    steps = {p: checkpoint_step(p) for p in ckpts}
    good = [p for p in ckpts if steps[p] < 1 << 62]  # 1 << 62: unreadable
    if not good:
        return (
            f"no checkpoint holds finite weights of this run ({ckpt_dir} has none): start afresh with a lower "
            "model.optimizer.lr"
        )
    newest = max(good, key=lambda p: (steps[p], p.name == "last.ckpt"))
    return (
        f"the last finite weights are in {newest} (step {steps[newest]}): resume with ckpt_path={newest} and a lower "
        "model.optimizer.lr"
    )
