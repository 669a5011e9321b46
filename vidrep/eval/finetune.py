"""Fine-tuning of the detection network as a LightningModule run by a Lightning Trainer.

regions=warp: R-CNN's batches (vidrep/eval/windows.py): every step 128 windows drawn from the whole
training split, 32 foreground and 96 background, decoded and warped by `finetune_workers` DataLoader
processes. regions=roi_pool: Fast R-CNN's batches, `images_per_batch` images a step with their
regions (one conv pass per image).

Each step's regions are a function of (seed, step) and each step seeds dropout with (seed, step,
rank), so a run resumed from its last checkpoint (every `finetune_checkpoint_every` steps) trains
exactly the steps an uninterrupted run would have: Lightning does not restore random states or
samplers, so the batch stream starts at the checkpoint's step. With `devices` > 1 the steps run
under DDP (`ddp_spawn`: the ranks exist for the fit only, and the weights come back to this process,
which goes on to the SVMs); every rank trains its own share of the same global batch, and the loss
is weighed so that DDP's average of the ranks' gradients is one process's gradient on the batch.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, IterableDataset

from vidrep.common.loggers import finish_wandb
from vidrep.eval.windows import WindowBatches, WindowCrops, whole_batch, window_file
from vidrep.training.progress import ProgressBar

log = logging.getLogger(__name__)


class RegionSteps(IterableDataset):
    """regions=roi_pool, for steps start..steps-1: this rank's share of the step's `images_per_batch`
    (image, regions, targets) triples sampled as the protocol samples them (horizontal flip of
    image and regions half the time)."""

    def __init__(self, protocol, images, store, start: int, steps: int, world: int = 1, rank: int = 0) -> None:
        self.protocol, self.images, self.store, self.start, self.steps = protocol, images, store, start, steps
        self.world, self.rank = world, rank

    def step(self, step: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        from vidrep.eval.detection import _gt0, read_rgb

        p = self.protocol
        rng = np.random.default_rng([p.seed, step])
        out = []
        for i in rng.choice(len(self.images), p.images_per_batch, replace=len(self.images) < p.images_per_batch):
            im = self.images[i]
            rois, target = p._sample_rois(_gt0(im), im.labels, self.store.boxes(im), rng)
            image = read_rgb(im.path)
            if p.flip and rng.random() < 0.5:
                image = np.ascontiguousarray(image[:, ::-1])
                w = image.shape[1]
                rois = np.stack([w - 1 - rois[:, 2], rois[:, 1], w - 1 - rois[:, 0], rois[:, 3]], 1).astype(np.float32)
            out.append((image, rois, target))
        return out

    def __iter__(self) -> Iterator:
        for s in range(self.start, self.steps):
            yield self.step(s)[self.rank :: self.world]


class FinetuneModule(L.LightningModule):
    """Region classification (classes + background) with R-CNN's per-layer learning rates. Builds
    its own loader in `train_dataloader`, where the rank is known (also in spawned DDP ranks)."""

    def __init__(self, model, net, protocol, start: int, images=None, store=None, windows=None) -> None:
        super().__init__()
        self.model, self.protocol, self.start = model, protocol, start
        self.net_input_size, self.preprocess = net.input_size, net.preprocess
        self.images, self.store, self.windows = images, store, windows
        # roi_pool's outputs need the whole Network; it stays in one process
        self.net = net if windows is None else None

    def train_dataloader(self) -> DataLoader:
        p, world, rank = self.protocol, self.trainer.world_size, self.trainer.global_rank
        if self.windows is None:
            return DataLoader(
                RegionSteps(p, self.images, self.store, self.start, p.iterations, world, rank),
                batch_size=None,
                collate_fn=whole_batch,
            )
        sampler = WindowBatches(
            self.windows, p.batch_size, p.fg_fraction, p.flip, p.seed, self.start, p.iterations, world, rank
        )
        workers = int(p.finetune_workers)
        return DataLoader(
            WindowCrops([im.path for im in self.images], self.windows, self.net_input_size, int(p.warp["padding"])),
            batch_sampler=sampler,
            collate_fn=whole_batch,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def training_step(self, batch, batch_idx):
        p, world = self.protocol, self.trainer.world_size
        # dropout masks as a function of the step (and rank: ranks draw their own)
        torch.manual_seed((p.seed * 1_000_003 + self.global_step) * 64 + self.trainer.global_rank)
        if self.windows is None:
            loss = 0.0
            for image, rois, target in batch:
                out = p._region_outputs(self.model, self.net, image, rois, str(self.device))(np.arange(len(rois)))
                loss = loss + F.cross_entropy(out["logits"], torch.from_numpy(target).long().to(self.device))
            size, total = sum(len(r) for _, r, _ in batch), p.images_per_batch
            local = loss / max(len(batch), 1)
            weighted = loss * world / total
        else:
            logits = self.model.warped(self.preprocess(batch["crops"]) * batch["mask"])["logits"]
            summed = F.cross_entropy(logits, batch["labels"], reduction="sum")
            size = len(batch["labels"])
            local = summed / size
            # DDP averages the ranks: every region of the batch weighs 1 / batch_size
            weighted = summed * world / p.batch_size
        self.log("finetune/loss", local, prog_bar=True, batch_size=size)
        return weighted

    def configure_optimizers(self):
        p = self.protocol
        opt = torch.optim.SGD(p._param_groups(self.model), lr=p.lr, momentum=p.momentum)
        sched = torch.optim.lr_scheduler.StepLR(opt, p.lr_step, 0.1)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}


def checkpoint_step(folder: Path) -> int:
    """The global step of `folder/last.ckpt`, 0 without one."""
    last = folder / "last.ckpt"
    return int(torch.load(last, map_location="cpu", weights_only=False)["global_step"]) if last.exists() else 0


def make_loggers(folder: Path, logger: dict | None, name: str, run_id: str) -> list:
    """The CSV curves in `folder` (appended to on resume) and, with `logger` (evaluate.py's
    `logger` config, conf/logger/*.yaml) holding a `wandb` entry, W&B: one run per fine-tuning,
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
    the progress bar, DDP over `devices` when more than one (ddp_spawn; see the module's docstring)."""
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


def finetune(protocol, model, net, images, store, device: str, folder: Path, logger: dict | None = None) -> None:
    """Fine-tune `model` in place for protocol.iterations steps; checkpoints and curves in `folder`
    (`last.ckpt`, `metrics.csv`, W&B with `logger`); resumes from `folder/last.ckpt`. The split's
    windows (regions=warp) are kept in `folder/../../windows/<key>/`, shared by rounds and networks."""
    devices, per_step = (
        int(protocol.devices),
        protocol.batch_size if protocol.regions == "warp" else protocol.images_per_batch,
    )
    if per_step < devices:
        key = "batch_size" if protocol.regions == "warp" else "images_per_batch"
        raise ValueError(
            f"protocol.{key}={per_step} cannot be dealt to protocol.devices={devices} ranks (each needs at least one "
            f"{'region' if protocol.regions == 'warp' else 'image'} a step): lower protocol.devices"
        )
    folder.mkdir(parents=True, exist_ok=True)
    start = checkpoint_step(folder)
    if start:
        log.info("fine-tuning resumes at step %d of %d from %s", start, protocol.iterations, folder / "last.ckpt")
    windows = None
    if protocol.regions == "warp":
        num_classes = model.cls.out_features - 1
        key = hashlib.blake2b(
            repr(
                (str(store.folder), [im.id for im in images], num_classes, protocol.fg_iou, list(protocol.bg_iou))
            ).encode(),
            digest_size=8,
        ).hexdigest()
        windows = window_file(
            folder.parent.parent / "windows" / key, images, store, num_classes, protocol.fg_iou, protocol.bg_iou
        )
        log.info(
            "fine-tuning windows: %d foreground, %d background (%.0f MB)",
            windows.num_fg,
            windows.num_bg,
            windows.nbytes / 2**20,
        )
    model.train()  # the trunk comes in eval mode; Lightning keeps submodules' modes, and dropout must be on
    module = FinetuneModule(model, net, protocol, start, images, store, windows)
    run_id = f"ft-{folder.parent.name}-{folder.name}"
    trainer = make_trainer(
        folder,
        protocol.iterations,
        device,
        devices,
        protocol.finetune_checkpoint_every,
        make_loggers(folder, logger, f"finetune {folder.parent.name} {folder.name}", run_id),
    )
    last = folder / "last.ckpt"
    try:
        trainer.fit(module, ckpt_path=str(last) if last.exists() else None)
    finally:
        finish_wandb()  # each fine-tuning its own W&B run (a new WandbLogger would join an open one)
    model.to(device).eval()  # Lightning's teardown leaves the module on the CPU
