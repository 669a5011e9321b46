"""Callbacks of the training run."""

from __future__ import annotations

import logging

import lightning as L
import torch

log = logging.getLogger(__name__)


class StopOnNonFiniteLoss(L.Callback):
    """Stops training at the first NaN/inf training loss, saying at which step, instead of
    spending the rest of the run on a diverged model."""

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is not None and not torch.isfinite(loss).all():
            log.error("training loss is %s at step %d; stopping (lower model.optimizer.lr or check the data)", loss.item(), trainer.global_step)
            trainer.should_stop = True
            self.stopped_at = trainer.global_step


class CountDamagedPairs(L.Callback):
    """With data.skip_damaged=true: logs data/damaged_skipped, the pairs skipped per epoch (summed
    over ranks once per epoch), so that skipped damage is never silent."""

    def _count(self, pl_module: L.LightningModule, batch) -> None:
        if isinstance(batch, dict) and "damaged" in batch:
            pl_module.log("data/damaged_skipped", batch["damaged"].sum().float(), on_step=False, on_epoch=True,
                          reduce_fx="sum", sync_dist=True, batch_size=1)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self._count(pl_module, batch)
