"""The training task behind train.py: instantiate what the config names, fit, always clean up."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import hydra
import lightning as L
from lightning.fabric.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from vidrep.data.corpus import write_bytes
from vidrep.training import plan
from vidrep.training.checkpoints import (
    HashedCheckpointIO,
    LastCheckpoint,
    prepare_run_dir,
)
from vidrep.training.loggers import finish_wandb
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


def _demo_eval(cfg: DictConfig, model, initial_trunk, loggers, datamodule) -> dict[str, float]:
    """The demo's last word: on videos training never saw, does the trained network find a patch's
    tracked patch among other videos' patches better than its own initialisation and trivial cues?"""
    from vidrep.eval.demo import format_weight_change, held_out_retrieval, weight_change
    from vidrep.eval.retrieval import METRIC_KEYS, retrieval_table

    val = datamodule.val_set
    if len(set(val.video_ids().tolist())) < 2:
        log.warning("demo check skipped: retrieval needs at least 2 held-out videos (raise data.val_fraction)")
        return {}
    log.info("retrieval on the %d held-out pairs: trained vs initial trunk vs colour_histogram vs pixels", len(val))
    report = held_out_retrieval(val.index, val.rows, model.net.trunk, initial_trunk, cfg.model.input_size,
                                list(cfg.model.pixel_mean), cfg.demo_eval.layer, cfg.demo_eval.batch_size)
    table = retrieval_table(report) + "\n\n" + format_weight_change(weight_change(model.net.trunk, initial_trunk))
    print("\nDemo check: retrieval of each held-out pair's tracked patch among the tracked patches of the "
          "other held-out videos (R@k: share of queries ranked <= k)\n" + table)
    write_bytes(Path(cfg.paths.output_dir) / "demo_eval.md", (table + "\n").encode())
    out = {f"demo_eval/{name.split(' ')[0]}/{k}": float(r[k])
           for name, r in report.items() for k in ("recall_at_1", "recall_at_5", "median_rank")}
    for lg in loggers:
        lg.log_metrics(out)
        if hasattr(lg, "log_table"):  # W&B: the table itself, beside the scalars
            lg.log_table(key="demo_eval/retrieval", columns=["features", *METRIC_KEYS],
                         data=[[name, *(r[k] for k in METRIC_KEYS)] for name, r in report.items()])
        lg.save()
    return out


DDP_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")


def _end_distributed(env_before: set[str]) -> None:
    """Close this job's process group and drop the DDP variables Lightning put in the environment
    when it started the other ranks, so that the next job of a multirun (same process) starts its
    own ranks: with LOCAL_RANK left set, Lightning would take the processes as launched already
    and wait for ranks that never come. Variables set by an outer launcher (srun, torchrun) stay."""
    import os

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    for var in DDP_ENV:
        if var not in env_before:
            os.environ.pop(var, None)


def _ddp_children_run_this_job_only() -> None:
    """In a multirun, make the processes Lightning starts for the other DDP ranks run this job,
    in this job's directory, rather than the whole sweep again.

    Lightning starts rank k as `python train.py <sys.argv[1:]> hydra.run.dir=<hydra.run.dir>`: in
    a multirun that is the sweep (`-m` and every value) and a fresh timestamped directory. Here
    argv becomes this job's own overrides, and hydra.run.dir this job's output directory.
    """
    import sys

    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import open_dict

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return
    hc = HydraConfig.get()
    sys.argv = [sys.argv[0], *hc.overrides.task]
    OmegaConf.set_readonly(hc, False)
    with open_dict(hc):
        hc.run.dir = hc.runtime.output_dir


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
        _ddp_children_run_this_job_only()
        trainer: L.Trainer = hydra.utils.instantiate(cfg.trainer, logger=loggers or False, callbacks=callbacks,
                                                     plugins=[HashedCheckpointIO()])
        plan.check_world_size(trainer, schedule)
        if trainer.is_global_zero:
            plan.report(schedule, warmup, cfg.paths.output_dir)
            for lg in loggers:
                lg.log_hyperparams({**OmegaConf.to_container(cfg, resolve=True), "schedule": schedule.to_dict()})
        initial_trunk = copy.deepcopy(model.net.trunk) if cfg.get("demo_eval") else None
        if cfg.get("validate_only"):
            if not cfg.get("ckpt_path"):
                raise ValueError("validate_only=true measures a checkpoint: add ckpt_path=<run dir>/checkpoints/last.ckpt")
            trainer.validate(model, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
            initial_trunk = None
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
            summary = ", ".join(f"{k}={metrics[k]:.4f}" for k in ("train/loss_epoch", "train/triplet_acc_epoch", "val/loss", "val/triplet_acc") if k in metrics)
            log.info("final metrics: %s", summary)
            if initial_trunk is not None:
                metrics.update(_demo_eval(cfg, model, initial_trunk, loggers, datamodule))
        stopped = [cb.stopped_at for cb in callbacks if getattr(cb, "stopped_at", None) is not None]
        if stopped:
            raise RuntimeError(f"training stopped at step {stopped[0]}: the loss is not finite (see the log above); "
                               "last.ckpt keeps the last finite weights")
        return metrics
    finally:
        finish_wandb()
        _end_distributed(env_before)
