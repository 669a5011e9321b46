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
    `every_n_steps` steps (1: every step; at the steps Lightning logs when equal to
    log_every_n_steps), so a diverged run stops at most that many steps late. It is also read
    before every checkpoint is saved and when training ends, so a run that stops between two
    reads (max_steps, an epoch's end, another callback) still reports it (`stopped_at`)."""

    def __init__(self, every_n_steps: int = 1) -> None:
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1; got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self._first_bad: torch.Tensor | None = None  # the first step with a non-finite loss, -1 = none yet
        self._last: torch.Tensor | None = None
        self.stopped_at: int | None = None

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is None:
            return
        self._last = loss = loss.detach()
        if self._first_bad is None or self._first_bad.device != loss.device:
            self._first_bad = torch.full((), -1, dtype=torch.long, device=loss.device)
        bad = ~torch.isfinite(loss).all() & (self._first_bad < 0)
        # global_step has counted this step already: the bad step is the one before
        self._first_bad = torch.where(bad, trainer.global_step - 1, self._first_bad)
        if trainer.global_step % self.every_n_steps == 0 or trainer.is_last_batch:
            self._read(trainer)

    def _read(self, trainer: L.Trainer) -> None:
        """The host read of the flag: stops the run (once) when a loss was not finite."""
        if self._first_bad is None or self.stopped_at is not None:
            return
        first = int(self._first_bad)
        if first >= 0:
            log.error(
                "training loss is not finite (%s now) since step %d; stopping at step %d (lower model.optimizer.lr or "
                "check the data)",
                float(self._last),
                first,
                trainer.global_step,
            )
            trainer.should_stop = True
            self.stopped_at = first

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        self._read(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._read(trainer)


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
