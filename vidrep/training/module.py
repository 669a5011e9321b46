"""The siamese-triplet LightningModule: one forward over all 2N patches, the loss of `model.loss`
(vidrep.losses) with its negative schedule, and the released optimiser."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import lightning as L
import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric

from vidrep.common.workarounds import compile_outside_module_tree
from vidrep.losses import PairLoss, loss_from_config
from vidrep.training.ranks import loss_across_ranks


class TripletModule(L.LightningModule):
    """Trains an `EmbeddingNet` with in-batch triplets (negatives are patches of other videos)."""

    def __init__(
        self,
        net: nn.Module,
        loss: PairLoss | Mapping,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler] | None = None,
        bias_lr_mult: float = 2.0,
        bias_weight_decay: float = 0.0,
        pixel_mean: Sequence[float] | None = None,
        input_size: int = 227,
        channels_last: bool = False,
        compile: bool = False,
    ) -> None:
        super().__init__()
        self.net = net
        # A loss object (what Hydra instantiates from model.loss), or its config (a checkpoint's).
        self.loss = loss_from_config(loss) if isinstance(loss, Mapping) else loss
        if pixel_mean is None:  # the mean the trunk expects (vidrep.models.Trunk.pixel_mean)
            pixel_mean = net.trunk.pixel_mean
        # Plain types only, so checkpoints load with torch.load(weights_only=True); the full
        # config is in the run directory (.hydra/config.yaml) and in the loggers. "net" is the
        # network's own config (`model.net` with its _target_s), from which evaluate.py rebuilds it.
        self.save_hyperparameters(
            {
                "loss": self.loss.config(),
                "bias_lr_mult": bias_lr_mult,
                "bias_weight_decay": bias_weight_decay,
                "input_size": input_size,
                "pixel_mean": [float(v) for v in pixel_mean],
                "net": net.config(),
            }
        )
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.bias_lr_mult, self.bias_weight_decay = bias_lr_mult, bias_weight_decay
        self.input_size = input_size
        self.channels_last = channels_last
        if channels_last:
            self.net.to(memory_format=torch.channels_last)
        compile_outside_module_tree(self, "_compiled_net", self.net, compile)
        # Validation means weighted by batch size and synced as (sum, weight) across ranks: with
        # BatchShards' rank-independent batches they do not change with the number of devices.
        self.val_means = nn.ModuleDict({k: MeanMetric() for k in ("loss", *self.loss.stat_names)})
        self.progress_bar_names = ("loss", self.loss.stat_names[0])
        self.register_buffer(
            "pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False
        )

    @property
    def negative_phase(self) -> str | None:
        """ "random" or "hard" (vidrep.losses.NegativeSchedule); None for a loss without a schedule."""
        return self.negatives_at(self.current_epoch, self.global_step)[1]

    def negatives_at(self, epoch: int, step: int) -> tuple[float, str | None]:
        """(hard ratio, phase) of the negative schedule at (epoch, step); (1.0, None) without one."""
        schedule = self.loss.schedule
        return (1.0, None) if schedule is None else (schedule.ratio(epoch, step), schedule.phase(epoch, step))

    def preprocess(self, patches: Tensor) -> Tensor:
        """uint8 RGB 0-255 -> float minus the channel means (no scaling), as the released model."""
        return patches.float() - self.pixel_mean

    def forward(self, patches: Tensor) -> Tensor:
        x = self.preprocess(patches)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return (self.net if self._compiled_net is None else self._compiled_net)(x)

    def _shared_step(self, batch: dict[str, Tensor], hard_ratio: float, stage: str) -> Tensor:
        n = batch["anchor"].shape[0]
        if batch["anchor"].shape[-2:] != (self.input_size, self.input_size):
            raise ValueError(
                f"patches are {tuple(batch['anchor'].shape[-2:])} but model.input_size is {self.input_size}; set "
                "data.input_size to match"
            )
        embeddings = self(torch.cat([batch["anchor"], batch["positive"]], dim=0)).float()
        anchor, positive = embeddings[:n], embeddings[n:]
        loss, stats = loss_across_ranks(
            self.loss, anchor, positive, batch["video_id"], hard_ratio=hard_ratio, gather=stage == "train"
        )
        values = {"loss": loss, **stats}
        if stage == "val":
            for name, value in values.items():
                self.val_means[name].update(value.detach(), weight=n)
                self.log(
                    f"val/{name}",
                    self.val_means[name],
                    on_step=False,
                    on_epoch=True,
                    prog_bar=name in self.progress_bar_names,
                )
            return loss
        log = dict(on_step=True, on_epoch=True, batch_size=n, sync_dist=False)
        for name, value in values.items():
            self.log(f"train/{name}", value, prog_bar=name in self.progress_bar_names, **log)
        if self.global_step % self.trainer.log_every_n_steps == 0:
            # unique() waits for the device; only on the steps that are logged anyway
            self.log("train/videos_per_batch", float(batch["video_id"].unique().numel()), **log)
        if self.loss.schedule is not None:
            self.log("train/hard_phase", float(self.negative_phase == "hard"), **log)
        return loss

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self._shared_step(batch, self.negatives_at(self.current_epoch, self.global_step)[0], "train")

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        # Always the top-K: deterministic, and comparable across the switch of the negative phase.
        return self._shared_step(batch, 1.0, "val")

    def configure_optimizers(self):
        """Weights get the weight decay; biases lr x bias_lr_mult and no decay (the released solver)."""
        weights = [p for name, p in self.net.named_parameters() if p.requires_grad and not name.endswith("bias")]
        biases = [p for name, p in self.net.named_parameters() if p.requires_grad and name.endswith("bias")]
        optimizer = self.optimizer_factory([{"params": weights}, {"params": biases}])
        base = optimizer.param_groups[0]
        optimizer.param_groups[1]["lr"] = base["lr"] * self.bias_lr_mult
        optimizer.param_groups[1]["initial_lr"] = base["lr"] * self.bias_lr_mult
        optimizer.param_groups[1]["weight_decay"] = self.bias_weight_decay
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.loss.schedule is not None:
            checkpoint["negative_phase"] = self.negative_phase

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved, schedule = checkpoint.get("negative_phase"), self.loss.schedule
        if saved is None or schedule is None:
            return
        expected = schedule.phase(checkpoint.get("epoch", 0), checkpoint.get("global_step", 0))
        if saved != expected:
            raise ValueError(
                f"checkpoint was in the {saved!r} negative phase at epoch {checkpoint.get('epoch')}, but "
                f"model.loss (hard_after_epochs={schedule.hard_after_epochs}, "
                f"hard_after_steps={schedule.hard_after_steps}) puts it in {expected!r}; "
                "resume with the loss settings the run started with"
            )
