"""The siamese-triplet LightningModule: one forward over all 2N patches, the ranking loss with its
negative schedule, and the released optimiser."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import lightning as L
import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric

from vidrep.losses import TripletStats, ranking_loss_from_mask, select_negatives, triplet_stats


def _world() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _weigh_by_share(loss: Tensor, share: int, total: int, world: int) -> Tensor:
    """`loss` (the mean over this rank's `share` pairs) with its gradient scaled by
    world x share / total and its value unchanged. DDP averages the ranks' gradients; with this
    weight every pair of the global batch of `total` weighs 1 / total, as in one process, also
    when the shares are unequal (50 pairs on 4 ranks: 13 + 13 + 12 + 12)."""
    weight = world * share / total
    return loss * weight - (loss * (weight - 1)).detach()


@dataclass(frozen=True)
class LossConfig:
    """Settings of `vidrep.losses.ranking_loss` plus the schedule of the negatives.

    Negatives are chosen with `initial_hard_ratio` until optimiser step `hard_after_steps`, with
    `hard_ratio` from then on. The rule is stated in pairs seen: `hard_after_epochs` epochs of the
    training pairs or `hard_after_pairs` pairs, whichever comes first (None disables a bound); the
    run turns it into `hard_after_steps` for its global batch (`vidrep.training.schedule`), the
    same for every data size and GPU count. Without `hard_after_steps` (the config used outside
    train.py) the epoch bound alone decides. The paper takes random negatives (ratio 0) for 10
    epochs of 1.5M patches (150K steps of 50 pairs = 7.5M pairs), then the top K (ratio 1); the
    released code uses 0.5 from the start.
    """

    margin: float = 0.5
    num_negatives: int = 4
    hard_ratio: float = 1.0
    initial_hard_ratio: float = 0.0
    hard_after_epochs: float | None = 10
    hard_after_pairs: int | None = 7_500_000
    hard_after_steps: int | None = None
    symmetric: bool = False
    violators_only: bool = False
    # Under DDP: draw negatives from the whole global batch (all_gather of embeddings and video
    # ids), as one process would. False: from this rank's share only (a deviation: a smaller pool).
    gather_across_ranks: bool = True

    def phase(self, epoch: int, step: int) -> str:
        if self.hard_after_steps is not None:
            return "hard" if step >= self.hard_after_steps else "random"
        return "hard" if self.hard_after_epochs is not None and epoch >= self.hard_after_epochs else "random"

    def ratio(self, epoch: int, step: int) -> float:
        return self.hard_ratio if self.phase(epoch, step) == "hard" else self.initial_hard_ratio

    def loss(self, anchor: Tensor, positive: Tensor, video_ids: Tensor, hard_ratio: float,
             gather: bool = True) -> tuple[Tensor, TripletStats]:
        """`ranking_loss` with these settings at `hard_ratio`, and the health stats of its selection.

        Under DDP (`gather=True`) the loss's gradient is weighed so that DDP's average over the
        ranks equals one process's gradient on the global batch (`_weigh_by_share`).
        `gather=False` keeps negatives local and skips every collective (validation: its ranks
        may hold different numbers of batches, and a collective there would hang)."""
        world = _world() if gather else 1
        if world > 1 and self.gather_across_ranks:
            return self._gathered_loss(anchor, positive, video_ids, hard_ratio)
        mask = select_negatives(anchor, positive, video_ids, margin=self.margin, num_negatives=self.num_negatives,
                                hard_ratio=hard_ratio, violators_only=self.violators_only)
        loss = ranking_loss_from_mask(anchor, positive, mask, margin=self.margin, num_negatives=self.num_negatives,
                                      symmetric=self.symmetric)
        if world > 1:
            total = torch.tensor(anchor.shape[0], device=anchor.device)
            torch.distributed.all_reduce(total)
            loss = _weigh_by_share(loss, anchor.shape[0], int(total), world)
        return loss, triplet_stats(anchor, positive, mask)

    def _gathered_loss(self, anchor: Tensor, positive: Tensor, video_ids: Tensor, hard_ratio: float) -> tuple[Tensor, TripletStats]:
        """This rank's pairs as anchors, the patches of the whole global batch as candidate negatives.

        all_gather needs equal sizes: every rank pads its share to the largest with zero rows,
        and the padding is cut out of the gathered tensors, leaving the global batch's anchors
        then positives in rank order (the candidates of one process on that batch). The gather
        keeps autograd (its backward sums every rank's gradient into the local embeddings). Each
        rank selects and scores its own pairs only, against all 2 x global patches; with
        `_weigh_by_share`, DDP's average of the ranks' gradients equals one process's gradient
        on the global batch (tested with 4 + 3 + 3 pairs on 3 ranks).
        """
        import torch.distributed as dist
        from torch.distributed.nn.functional import all_gather

        world, n = dist.get_world_size(), anchor.shape[0]
        sizes = [torch.zeros(1, dtype=torch.int64, device=anchor.device) for _ in range(world)]
        dist.all_gather(sizes, torch.tensor([n], dtype=torch.int64, device=anchor.device))
        sizes = [int(s) for s in sizes]
        pad = max(sizes) - n

        def gathered(x: Tensor) -> Tensor:
            parts = all_gather(torch.cat([x, x.new_zeros(pad, *x.shape[1:])]) if pad else x)
            return torch.cat([part[:size] for part, size in zip(parts, sizes)])

        patches = torch.cat([gathered(anchor), gathered(positive)])
        ids = [torch.empty(max(sizes), dtype=video_ids.dtype, device=video_ids.device) for _ in range(world)]
        dist.all_gather(ids, torch.cat([video_ids, video_ids.new_zeros(pad)]) if pad else video_ids)
        all_ids = torch.cat([i[:size] for i, size in zip(ids, sizes)])
        patch_ids = torch.cat([all_ids, all_ids])
        mask = select_negatives(anchor, positive, video_ids, margin=self.margin, num_negatives=self.num_negatives,
                                hard_ratio=hard_ratio, violators_only=self.violators_only, patches=patches, patch_ids=patch_ids)
        loss = ranking_loss_from_mask(anchor, positive, mask, margin=self.margin, num_negatives=self.num_negatives,
                                      symmetric=self.symmetric, patches=patches)
        return _weigh_by_share(loss, n, sum(sizes), world), triplet_stats(anchor, positive, mask, patches.detach())


class TripletModule(L.LightningModule):
    """Trains an `EmbeddingNet` with in-batch triplets (negatives are patches of other videos)."""

    def __init__(
        self,
        net: nn.Module,
        loss: dict | LossConfig,
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
        self.loss_cfg = loss if isinstance(loss, LossConfig) else LossConfig(**loss)
        if pixel_mean is None:  # the mean the trunk expects (vidrep.models.Trunk.pixel_mean)
            pixel_mean = net.trunk.pixel_mean
        # Plain types only, so checkpoints load with torch.load(weights_only=True); the full
        # config is in the run directory (.hydra/config.yaml) and in the loggers. "net" is the
        # network's own config (`model.net` with its _target_s), from which evaluate.py rebuilds it.
        self.save_hyperparameters({"loss": asdict(self.loss_cfg), "bias_lr_mult": bias_lr_mult,
                                   "bias_weight_decay": bias_weight_decay, "input_size": input_size,
                                   "pixel_mean": [float(v) for v in pixel_mean], "net": net.config()})
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.bias_lr_mult, self.bias_weight_decay = bias_lr_mult, bias_weight_decay
        self.input_size = input_size
        self.channels_last = channels_last
        if channels_last:
            self.net.to(memory_format=torch.channels_last)
        # Compiled outside the module tree, so checkpoints keep the plain keys (no "_orig_mod.").
        object.__setattr__(self, "_compiled_net", torch.compile(self.net) if compile else None)
        # Validation means weighted by batch size and synced as (sum, weight) across ranks: with
        # BatchShards' rank-independent batches they do not change with the number of devices.
        self.val_means = nn.ModuleDict({k: MeanMetric() for k in ("loss", "triplet_acc", "sim_pos", "sim_neg", "embed_std")})
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    @property
    def negative_phase(self) -> str:
        return self.loss_cfg.phase(self.current_epoch, self.global_step)

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
            raise ValueError(f"patches are {tuple(batch['anchor'].shape[-2:])} but model.input_size is {self.input_size}; set data.input_size to match")
        embeddings = self(torch.cat([batch["anchor"], batch["positive"]], dim=0)).float()
        anchor, positive = embeddings[:n], embeddings[n:]
        loss, stats = self.loss_cfg.loss(anchor, positive, batch["video_id"], hard_ratio, gather=stage == "train")
        values = {"loss": loss, "triplet_acc": stats.triplet_acc, "sim_pos": stats.sim_pos, "sim_neg": stats.sim_neg,
                  "embed_std": stats.embed_std}
        if stage == "val":
            for name, value in values.items():
                self.val_means[name].update(value.detach(), weight=n)
                self.log(f"val/{name}", self.val_means[name], on_step=False, on_epoch=True, prog_bar=name in ("loss", "triplet_acc"))
            return loss
        log = dict(on_step=True, on_epoch=True, batch_size=n, sync_dist=False)
        for name, value in values.items():
            self.log(f"train/{name}", value, prog_bar=name in ("loss", "triplet_acc"), **log)
        self.log("train/negatives_per_pair", stats.negatives_per_pair, **log)
        if self.global_step % self.trainer.log_every_n_steps == 0:
            # unique() waits for the device; only on the steps that are logged anyway
            self.log("train/videos_per_batch", float(batch["video_id"].unique().numel()), **log)
        self.log("train/hard_phase", float(self.negative_phase == "hard"), **log)
        return loss

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self._shared_step(batch, self.loss_cfg.ratio(self.current_epoch, self.global_step), "train")

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
        checkpoint["negative_phase"] = self.negative_phase

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved = checkpoint.get("negative_phase")
        expected = self.loss_cfg.phase(checkpoint.get("epoch", 0), checkpoint.get("global_step", 0))
        if saved is not None and saved != expected:
            raise ValueError(
                f"checkpoint was in the {saved!r} negative phase at epoch {checkpoint.get('epoch')}, but "
                f"model.loss (hard_after_epochs={self.loss_cfg.hard_after_epochs}, hard_after_steps={self.loss_cfg.hard_after_steps}) puts it in {expected!r}; "
                "resume with the loss settings the run started with"
            )
