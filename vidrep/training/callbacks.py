"""Callbacks of the training run."""

from __future__ import annotations

import logging

import lightning as L
import torch

log = logging.getLogger(__name__)


class StopOnNonFiniteLoss(L.Callback):
    """Stops training at the first NaN/inf training loss, saying at which step, instead of
    spending the rest of the run on a diverged model.

    Reading the loss on the host waits for the device, which a GPU step should not do every step:
    each step's verdict is folded into a device-side flag, and the flag is read every
    `every_n_steps` steps (1: every step), so a diverged run stops at most that many steps late."""

    def __init__(self, every_n_steps: int = 1) -> None:
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1; got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self._first_bad: torch.Tensor | None = None  # the first step with a non-finite loss, -1 = none yet
        self.stopped_at: int | None = None

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is None:
            return
        loss = loss.detach()
        if self._first_bad is None or self._first_bad.device != loss.device:
            self._first_bad = torch.full((), -1, dtype=torch.long, device=loss.device)
        bad = ~torch.isfinite(loss).all() & (self._first_bad < 0)
        self._first_bad = torch.where(bad, trainer.global_step, self._first_bad)
        if (trainer.global_step + 1) % self.every_n_steps and not trainer.is_last_batch:
            return
        first = int(self._first_bad)
        if first >= 0:
            log.error(
                "training loss is not finite (%s now) since step %d; stopping at step %d (lower model.optimizer.lr or "
                "check the data)",
                loss.item(),
                first,
                trainer.global_step,
            )
            trainer.should_stop = True
            self.stopped_at = first


class CountDamagedPairs(L.Callback):
    """With data.skip_damaged=true: logs data/damaged_skipped, the pairs skipped per epoch (summed
    over ranks once per epoch), so that skipped damage is never silent."""

    def _count(self, pl_module: L.LightningModule, batch) -> None:
        if isinstance(batch, dict) and "damaged" in batch:
            pl_module.log(
                "data/damaged_skipped",
                batch["damaged"].sum().float(),
                on_step=False,
                on_epoch=True,
                reduce_fx="sum",
                sync_dist=True,
                batch_size=1,
            )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self._count(pl_module, batch)
