"""The training progress bar, counting epochs as the picture folders and log lines do."""

from __future__ import annotations

from lightning.pytorch.callbacks import RichProgressBar


class ProgressBar(RichProgressBar):
    """Lightning's rich bar, with epochs numbered from 1 ("Epoch 3/14", as pictures/epoch003/) and
    no total when training is bounded by steps (Lightning shows "Epoch 0/-2" there: max_epochs=-1).

    Its figures are read from the device (each a host sync that waits for the GPU) only every
    `metrics_every_n_steps` training steps (None: trainer.log_every_n_steps, the steps whose
    values are logged anyway) and at an epoch's end; the bar itself moves every step."""

    def __init__(self, *args, metrics_every_n_steps: int | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if metrics_every_n_steps is not None and metrics_every_n_steps < 1:
            raise ValueError(f"metrics_every_n_steps must be >= 1; got {metrics_every_n_steps}")
        self.metrics_every_n_steps = metrics_every_n_steps

    def get_metrics(self, trainer, pl_module) -> dict:
        """Lightning's figures, with the training values the module names in `progress_bar_names`
        (logged without prog_bar, which Lightning would read on the host after every batch)."""
        items = super().get_metrics(trainer, pl_module)
        metrics = trainer.callback_metrics
        for name in getattr(pl_module, "progress_bar_names", ()):
            if f"train/{name}_step" in metrics:
                items[f"train/{name}"] = float(metrics[f"train/{name}_step"])
        return items

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        every = self.metrics_every_n_steps or trainer.log_every_n_steps or 1
        if trainer.global_step % every == 0 or trainer.is_last_batch:
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if not self.is_disabled and self.train_progress_bar_id is None:
            self._initialize_train_progress_bar_id()
        self._update(self.train_progress_bar_id, batch_idx + 1)
        self.refresh()

    def _get_train_description(self, current_epoch: int) -> str:
        total = self.trainer.max_epochs
        text = f"Epoch {current_epoch + 1}" + (f"/{total}" if total is not None and total > 0 else "")
        # padded to the validation bar's width, as Lightning does, so the two do not flicker
        return f"{text:{len(self.validation_description)}}" if len(self.validation_description) > len(text) else text
