"""From a composed train config to the run it describes: the world size, the corpus counts, the
effective schedule (`vidrep.training.schedule`) and the config that carries it out. Used by
train() for the dry run (`dry_run=true`: print, write schedule.json, exit) and the real run.

A dry run plans without a corpus: from `data.train_pairs` (a corpus not mined yet), else from the
corpus at `data.root` when it is there and large enough, else from the data size alone
(`data.num_patches` / 2 training pairs; the validation pairs, which depend on the corpus, unknown)."""

from __future__ import annotations

import copy
import inspect
import json
import logging
import os
from dataclasses import fields
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf, open_dict

from vidrep.data.corpus import CorpusError
from vidrep.losses import NegativeSchedule
from vidrep.losses.base import resolve_target
from vidrep.training.schedule import (
    Schedule,
    Settings,
    compute_schedule,
    format_table,
    global_batch,
    scaled_steps,
    warmup_steps,
)

log = logging.getLogger(__name__)

STEP_LR = "torch.optim.lr_scheduler.StepLR"


def world_size(trainer: DictConfig, dry_run: bool) -> int:
    """trainer.devices x trainer.num_nodes. An integer (or a list of device indices) is needed in a
    dry run; a real run resolves `auto`/-1 as Lightning does (every visible GPU, else 1 CPU process)
    and checks the result against the trainer it builds."""
    devices, nodes = trainer.get("devices", 1), int(trainer.get("num_nodes", 1) or 1)
    if isinstance(devices, str) and devices.strip().lstrip("-").isdigit():
        devices = int(devices)
    if isinstance(devices, str) and "," in devices:
        devices = [d for d in devices.split(",") if d.strip()]
    if OmegaConf.is_list(devices) or isinstance(devices, list):
        return len(devices) * nodes
    if isinstance(devices, int) and devices > 0:
        return devices * nodes
    if dry_run:
        raise ValueError(f"trainer.devices={devices!r}: a dry run needs the number of devices, e.g. trainer.devices=4")
    import torch

    gpus = trainer.get("accelerator", "auto") in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    return (torch.cuda.device_count() if gpus else 1) * nodes


SCHEDULE_KEYS = tuple(f.name for f in fields(NegativeSchedule))


def drop_unused_schedule_keys(cfg: DictConfig) -> DictConfig:
    """`cfg` without the negative schedule's keys (vidrep.losses.NegativeSchedule) that model.loss's
    class does not take, each named in a warning. Configs written for the ranking loss set them on
    model.loss whichever loss is chosen (a data config's hard_after_epochs); a loss without a negative
    schedule (model/loss=infonce) would fail on them at instantiation."""
    loss = cfg.model.get("loss")
    if loss is None or "_target_" not in loss:
        return cfg
    takes = inspect.signature(resolve_target(str(loss._target_))).parameters
    unused = [k for k in SCHEDULE_KEYS if k in loss and k not in takes]
    if not unused:
        return cfg
    log.warning(
        "%s has no negative schedule: ignoring %s",
        loss._target_,
        ", ".join(f"model.loss.{k}={loss.get(k)}" for k in unused),
    )
    cfg = copy.deepcopy(cfg)
    with open_dict(cfg):
        for k in unused:
            cfg.model.loss.pop(k)
    return cfg


def has_negative_schedule(loss: DictConfig) -> bool:
    """Whether model.loss states a negative switch (the keys the run turns into `hard_after_steps`)."""
    return "hard_after_epochs" in loss or "hard_after_pairs" in loss


def settings_of(cfg: DictConfig) -> Settings:
    sched = cfg.model.get("scheduler")
    return Settings(
        batch_size=int(cfg.data.batch_size),
        lr=float(cfg.model.optimizer.lr),
        max_steps=int(cfg.trainer.get("max_steps") if cfg.trainer.get("max_steps") is not None else -1),
        max_epochs=cfg.trainer.get("max_epochs"),
        lr_step_size=None if sched is None else int(sched.step_size),
        hard_after_epochs=cfg.model.loss.get("hard_after_epochs"),
        hard_after_pairs=cfg.model.loss.get("hard_after_pairs"),
        gather_across_ranks=bool(cfg.model.loss.get("gather_across_ranks", True)),
        warmup_pairs=int(cfg.get("warmup_pairs") or 0),
    )


def _check_scheduler(cfg: DictConfig) -> None:
    sched = cfg.model.get("scheduler")
    if sched is not None and sched.get("_target_") != STEP_LR:
        raise ValueError(
            f"model.scheduler is {sched.get('_target_')}; the schedule (and scaling) knows StepLR only: "
            "use model.scheduler._target_=" + STEP_LR + " or model.scheduler=null"
        )


def apply_schedule(cfg: DictConfig, schedule: Schedule, warmup: int) -> DictConfig:
    """A copy of `cfg` that trains `schedule`: its lr, step bound, LR drops (with the warm-up under
    scaling=linear) and the step of the negative switch, so that the logged config is what runs."""
    cfg = copy.deepcopy(cfg)
    world, scaling = schedule.world_size, schedule.scaling
    with open_dict(cfg):
        cfg.model.optimizer.lr = schedule.lr
        if cfg.trainer.get("max_steps") is not None and cfg.trainer.max_steps > 0:
            cfg.trainer.max_steps = schedule.max_steps
        sched = cfg.model.get("scheduler")
        if warmup:
            cfg.model.scheduler = {
                "_target_": "vidrep.training.schedule.warmup_step_lr",
                "_partial_": True,
                "step_size": None if sched is None else scaled_steps(int(sched.step_size), world, scaling),
                "gamma": 1.0 if sched is None else float(sched.gamma),
                "warmup": warmup,
                "start_factor": 1.0 / world,
            }
        elif sched is not None:
            cfg.model.scheduler.step_size = scaled_steps(int(sched.step_size), world, scaling)
        if has_negative_schedule(cfg.model.loss):
            cfg.model.loss.hard_after_steps = schedule.hard_negatives_from_step
    return cfg


# Keys of the data config that only plan (dry_run=true) and are not the data module's arguments.
PLANNING_KEYS = ("train_pairs",)


def data_module(data: DictConfig, **kwargs):
    """The data module `data` describes (its planning-only keys left out)."""
    args = OmegaConf.to_container(data, resolve=True)
    for key in PLANNING_KEYS:
        args.pop(key, None)
    return hydra.utils.instantiate(args, **kwargs)


def _counts(datamodule) -> tuple[int, int]:
    datamodule.setup("fit")
    return len(datamodule.train_set), len(datamodule.val_set)


def planned_counts(data: DictConfig, train_batch_size: int) -> tuple[int, int | None]:
    """The dry run's (training pairs, validation pairs or None when unknown), read from the corpus
    only where one is there to read (module docstring)."""
    if data.get("train_pairs") is not None:
        return int(data.train_pairs), None
    wanted = None if data.get("num_patches") is None else int(data.num_patches) // 2
    roots = [] if OmegaConf.is_missing(data, "root") else data.root
    roots = [str(r) for r in roots] if OmegaConf.is_list(roots) else [str(roots)] if roots else []
    absent = [r for r in roots if not Path(r).expanduser().exists()]
    if data.get("demo") is not None or (roots and not absent):
        datamodule = data_module(data, train_batch_size=train_batch_size)
        if data.get("demo") is not None:
            datamodule.prepare_data()  # the demo builds its corpus (once, cached)
        try:
            return _counts(datamodule)
        except CorpusError as e:
            if wanted is None:
                raise
            log.warning("planning from data.num_patches=%s alone: %s", data.num_patches, e)
    elif absent and wanted is not None:
        log.warning("data.root %s does not exist yet: planning from data.num_patches=%s", absent[0], data.num_patches)
    if wanted is None:
        raise ValueError(
            "dry_run=true without a corpus plans from the data size: give data.num_patches (or data=1.5M|5M|8M), "
            "or data.train_pairs=<training pairs the corpus will have>"
        )
    return wanted, None


def prepare(cfg: DictConfig, dry_run: bool = False):
    """(effective cfg, schedule, warm-up steps, data module; None in a dry run, which plans from
    `planned_counts`)."""
    scaling = cfg.get("scaling", "paper")
    world = world_size(cfg.trainer, dry_run)
    _check_scheduler(cfg)
    cfg = drop_unused_schedule_keys(cfg)
    settings = settings_of(cfg)
    train_batch = global_batch(settings.batch_size, world, scaling)
    datamodule = None
    if dry_run:
        counts = planned_counts(cfg.data, train_batch)
    else:
        datamodule = data_module(cfg.data, train_batch_size=train_batch)
        if int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0))) == 0:
            datamodule.prepare_data()  # the demo builds its corpus here; the counts need it
        counts = _counts(datamodule)
    schedule = compute_schedule(settings, world, scaling, *counts)
    warmup = warmup_steps(settings, world, scaling)
    return apply_schedule(cfg, schedule, warmup), schedule, warmup, datamodule


def report(schedule: Schedule, warmup: int, out_dir: str | Path) -> Path:
    """Print the schedule's table and write <out_dir>/schedule.json (atomically)."""
    print(
        "\nEffective schedule ("
        + {
            "paper": "scaling=paper: one GPU's optimisation, dealt across the ranks",
            "linear": "scaling=linear: Goyal et al. 2017's linear scaling rule",
        }[schedule.scaling]
        + ")\n"
        + format_table(schedule, warmup)
        + "\n",
        flush=True,
    )
    out = Path(out_dir) / "schedule.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(".schedule.json.tmp")
    tmp.write_text(json.dumps(schedule.to_dict(), indent=2) + "\n")
    tmp.replace(out)
    log.info("schedule: %s", out)
    return out


def check_world_size(trainer, schedule: Schedule) -> None:
    if trainer.world_size != schedule.world_size:
        raise ValueError(
            f"the trainer runs {trainer.world_size} processes but the schedule was worked out for "
            f"{schedule.world_size} (trainer.devices x trainer.num_nodes); set trainer.devices to an integer"
        )
