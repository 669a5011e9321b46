"""The training progress bar, counting epochs as the picture folders and log lines do."""

from __future__ import annotations

from lightning.pytorch.callbacks import RichProgressBar


class ProgressBar(RichProgressBar):
    """Lightning's rich bar, with epochs numbered from 1 ("Epoch 3/14", as pictures/epoch003/) and
    no total when training is bounded by steps (Lightning shows "Epoch 0/-2" there: max_epochs=-1)."""

    def _get_train_description(self, current_epoch: int) -> str:
        total = self.trainer.max_epochs
        text = f"Epoch {current_epoch + 1}" + (f"/{total}" if total is not None and total > 0 else "")
        # padded to the validation bar's width, as Lightning does, so the two do not flicker
        return f"{text:{len(self.validation_description)}}" if len(self.validation_description) > len(text) else text
