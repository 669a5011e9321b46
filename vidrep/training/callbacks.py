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
