"""The siamese-triplet LightningModule: one forward over all 2N patches, the loss of `model.loss`
(vidrep.losses) with its negative schedule, and the released optimiser."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence

import lightning as L
import numpy as np
import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric

from vidrep.data.shares import rank_shares
from vidrep.losses import PairLoss, loss_from_config
from vidrep.models.caffe import init_from as caffe_init_from
from vidrep.training.ranks import loss_across_ranks, world_size

log = logging.getLogger(__name__)


def step_seed(seed: int, step: int) -> int:
    """The seed of a training step's random draws: a function of the run's draw seed and the step
    only, so every rank, and a resumed run, draws the same numbers at that step."""
    return int(np.random.SeedSequence([seed, step]).generate_state(1, np.uint64)[0] >> np.uint64(1))


def batchnorm_across_ranks(net: nn.Module, world: int, device_type: str) -> nn.Module:
    """`net` with its BatchNorm layers (model=resnet18) made SyncBatchNorm under DDP on GPUs, so
    that their batch statistics, hence the gradient, are those of one process on the whole global
    batch (same parameters and buffers: checkpoints load either way). PyTorch's SyncBatchNorm runs
    on GPUs only: on CPU ranks the statistics stay per rank, and a warning says so."""
    if world < 2 or not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules()):
        return net
    if device_type == "cpu":
        log.warning(
            "BatchNorm statistics are per rank on %d CPU processes (SyncBatchNorm needs GPUs): the gradient is not "
            "one process's on the global batch",
            world,
        )
        return net
    return nn.SyncBatchNorm.convert_sync_batchnorm(net)


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
        init_from: str | None = None,
    ) -> None:
        super().__init__()
        if init_from:  # the network of Caffe files in place of the configured one, with its own mean
            net = caffe_init_from(net, init_from)
            pixel_mean = net.trunk.pixel_mean
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
        if compile:
            # in place: the compiled forward without a wrapper module, so checkpoint keys stay net.*
            self.net.compile()
        # Validation means weighted by batch size and synced as (sum, weight) across ranks: with
        # BatchShards' rank-independent batches they do not change with the number of devices.
        self.val_means = nn.ModuleDict({k: MeanMetric() for k in ("loss", *self.loss.stat_names)})
        self.progress_bar_names = ("loss", self.loss.stat_names[0])
        self.register_buffer(
            "pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False
        )
        # The random draws of the loss (vidrep.losses.Draws): one generator re-seeded every step from
        # (draw seed, step), the same on every rank; the seed is kept in checkpoints.
        self.draw_seed: int | None = None
        self._generator: torch.Generator | None = None
        self._shares: list[int] | None = None  # the ranks' pairs per global batch (rank_shares)
        self._flags: dict[float, Tensor] = {}  # train/hard_phase values on the device, made once
        self._epoch_sums: Tensor | None = None  # per train/<name>_epoch: sum of value x pairs; then pairs
        self._epoch_names: list[str] = []

    def setup(self, stage: str) -> None:
        if self.trainer is not None and stage == "fit":
            self.net = batchnorm_across_ranks(self.net, self.trainer.world_size, self.trainer.strategy.root_device.type)

    def on_fit_start(self) -> None:
        if self.draw_seed is None:  # a new run: the seed seed_everything set, rank 0's for all
            self.draw_seed = int(self.trainer.strategy.broadcast(torch.initial_seed() % 2**63))
        world, batch = self.trainer.world_size, getattr(self.trainer.datamodule, "train_batch_size", None)
        self._shares = rank_shares(batch, world) if world > 1 and batch is not None else None

    def step_generator(self) -> torch.Generator:
        """The generator of this step's random draws, on the training device."""
        if self._generator is None or self._generator.device != self.device:
            self._generator = torch.Generator(device=self.device)
        return self._generator.manual_seed(step_seed(self.draw_seed or 0, self.global_step))

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
        return self.net(x)

    def _shared_step(self, batch: dict[str, Tensor], hard_ratio: float, stage: str) -> Tensor:
        n = batch["anchor"].shape[0]
        if batch["anchor"].shape[-2:] != (self.input_size, self.input_size):
            raise ValueError(
                f"patches are {tuple(batch['anchor'].shape[-2:])} but model.input_size is {self.input_size}; set "
                "data.input_size to match"
            )
        embeddings = self(torch.cat([batch["anchor"], batch["positive"]], dim=0)).float()
        anchor, positive = embeddings[:n], embeddings[n:]
        train = stage == "train"
        loss, stats = loss_across_ranks(
            self.loss,
            anchor,
            positive,
            batch["video_id"],
            hard_ratio=hard_ratio,
            gather=train,
            shares=self._shares if train else None,
            generator=self.step_generator() if train else None,
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
        self._log_train(values, batch, n)
        return loss

    def _log_train(self, values: dict[str, Tensor], batch: dict[str, Tensor], n: int) -> None:
        """train/<name>_epoch: summed on the device every step and reduced over the ranks (weighted
        by share) once, at the epoch's end (`on_train_epoch_end`). train/<name>_step,
        train/videos_per_batch_step and train/hard_phase_step: on the steps Lightning logs only
        (log_every_n_steps), the values of the whole global batch (one all_reduce then). Nothing
        here reads the device."""
        phase = self.negative_phase
        if phase is not None:
            flag = float(phase == "hard")
            if flag not in self._flags or self._flags[flag].device != self.device:
                self._flags[flag] = torch.tensor(flag, device=self.device)
            values = {**values, "hard_phase": self._flags[flag]}
        # the pair count last; torch.full fills on the device (no copy from the host)
        count = torch.full((), float(n), device=self.device)
        sums = torch.stack([*(v.detach().float() * n for v in values.values()), count])
        self._epoch_names = list(values)
        self._epoch_sums = sums if self._epoch_sums is None else self._epoch_sums + sums
        if not self._logs_this_step():
            return
        step = dict(on_step=True, on_epoch=False, batch_size=n)
        for name, value in zip(values, self._global_means(values, n)):
            # not prog_bar: Lightning would read prog_bar values on the host after every batch;
            # ProgressBar shows them (progress_bar_names) when it reads
            self.log(f"train/{name}_step", value, **step)
        self.log("train/videos_per_batch_step", batch["video_id"].unique().numel() * 1.0, **step)

    def on_train_epoch_end(self) -> None:
        """The epoch's means over every rank's pairs: one all_reduce, by every rank at once. Not
        Lightning's sync_dist, which reduces when a value is first read, and the progress bar reads
        on rank 0 alone (the other ranks never join: a hang)."""
        if self._epoch_sums is None:
            return
        sums, self._epoch_sums = self._epoch_sums, None
        if world_size() > 1:
            torch.distributed.all_reduce(sums)
        for name, value in zip(self._epoch_names, sums[:-1] / sums[-1]):
            self.log(f"train/{name}_epoch", value, on_step=False, on_epoch=True, sync_dist=False)

    def _logs_this_step(self) -> bool:
        """Whether Lightning writes this step's values to the loggers (as its `should_update_logs`:
        the step count after this step a multiple of log_every_n_steps; every step of fast_dev_run)."""
        every = self.trainer.log_every_n_steps
        return bool(self.trainer.fast_dev_run) or (every > 0 and (self.global_step + 1) % every == 0)

    def _global_means(self, values: dict[str, Tensor], n: int) -> Tensor:
        """The global batch's mean of each value (this rank's alone in one process)."""
        stacked = torch.stack([v.detach().float() for v in values.values()])
        if world_size() == 1:
            return stacked
        total = torch.cat([stacked * n, torch.full((1,), float(n), device=stacked.device)])
        torch.distributed.all_reduce(total)
        return total[:-1] / total[-1]

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
        checkpoint["draw_seed"] = self.draw_seed
        if self.loss.schedule is not None:
            checkpoint["negative_phase"] = self.negative_phase

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if checkpoint.get("draw_seed") is not None:
            self.draw_seed = int(checkpoint["draw_seed"])
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
