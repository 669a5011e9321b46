"""Fine-tuning of the detection network as a LightningModule run by a Lightning Trainer.

Each step's regions are a function of (seed, step) and each step seeds dropout with (seed, step),
so a run resumed from its last checkpoint (every `finetune_checkpoint_every` steps) trains exactly
the steps an uninterrupted run would have: Lightning does not restore random states, and does not
skip the batches of a partly trained epoch, so the batch stream starts at the checkpoint's step.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, IterableDataset

from vidrep.training.progress import ProgressBar

log = logging.getLogger(__name__)


class RegionSteps(IterableDataset):
    """For steps start..steps-1: `images_per_batch` (image, regions, targets) triples sampled as
    the protocol samples them (horizontal flip of image and regions half the time)."""

    def __init__(self, protocol, images, store, start: int, steps: int) -> None:
        self.protocol, self.images, self.store, self.start, self.steps = protocol, images, store, start, steps

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
            yield self.step(s)


class FinetuneModule(L.LightningModule):
    """Region classification (classes + background) with R-CNN's per-layer learning rates."""

    def __init__(self, model, net, protocol) -> None:
        super().__init__()
        self.model, self.net, self.protocol = model, net, protocol

    def training_step(self, batch, batch_idx):
        p = self.protocol
        torch.manual_seed(p.seed * 1_000_003 + self.global_step)  # dropout masks as a function of the step
        loss = 0.0
        for image, rois, target in batch:
            out = p._region_outputs(self.model, self.net, image, rois, str(self.device))(np.arange(len(rois)))
            loss = loss + F.cross_entropy(out["logits"], torch.from_numpy(target).long().to(self.device)) / len(batch)
        self.log("finetune/loss", loss, prog_bar=True, batch_size=sum(len(r) for _, r, _ in batch))
        return loss

    def configure_optimizers(self):
        p = self.protocol
        opt = torch.optim.SGD(p._param_groups(self.model), lr=p.lr, momentum=p.momentum)
        sched = torch.optim.lr_scheduler.StepLR(opt, p.lr_step, 0.1)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}


def finetune(protocol, model, net, images, store, device: str, folder: Path) -> None:
    """Fine-tune `model` in place for protocol.iterations steps; checkpoints and curves in `folder`
    (`last.ckpt`, `metrics.csv`); resumes from `folder/last.ckpt`."""
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    folder.mkdir(parents=True, exist_ok=True)
    last = folder / "last.ckpt"
    start = 0
    if last.exists():
        start = int(torch.load(last, map_location="cpu", weights_only=False)["global_step"])
        log.info("fine-tuning resumes at step %d of %d from %s", start, protocol.iterations, last)
    model.train()  # the trunk comes in eval mode; Lightning keeps submodules' modes, and dropout must be on
    module = FinetuneModule(model, net, protocol)
    steps = DataLoader(RegionSteps(protocol, images, store, start, protocol.iterations), batch_size=None,
                       collate_fn=lambda step: step)
    trainer = L.Trainer(max_steps=protocol.iterations, max_epochs=-1, accelerator="gpu" if device.startswith("cuda") else "cpu",
                        devices=1, logger=CSVLogger(folder, name="", version=""), default_root_dir=folder,
                        callbacks=[ProgressBar(), ModelCheckpoint(dirpath=folder, filename="latest", every_n_train_steps=protocol.finetune_checkpoint_every,
                                                   save_top_k=1, save_last=True, enable_version_counter=False)],
                        enable_model_summary=False, num_sanity_val_steps=0, log_every_n_steps=max(1, min(20, protocol.iterations // 2)),
                        enable_progress_bar=True)
    trainer.fit(module, train_dataloaders=steps, ckpt_path=str(last) if last.exists() else None)
    model.eval()
