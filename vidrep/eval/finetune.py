"""R-CNN's fine-tuning stage: the detection network trained on regions, as a LightningModule run by
a Lightning Trainer (vidrep/eval/trainer.py), and `build_detector`, the stage's entry: the finished
network from the cache, or the fine-tuning (and, for finetune=iterative, the re-adaptations between
rounds, vidrep/eval/adapt.py) resumed from its last checkpoint.

regions=warp: R-CNN's batches (vidrep/eval/windows.py): every step 128 windows drawn from the whole
training split, 32 foreground and 96 background, decoded and warped by `finetune_workers` DataLoader
processes. regions=roi_pool: Fast R-CNN's batches, `images_per_batch` images a step with their
regions (one conv pass per image).

Each step's regions are a function of (seed, step) and each step seeds dropout with (seed, step,
rank), so a run resumed from its last checkpoint (every `finetune_checkpoint_every` steps) trains
exactly the steps an uninterrupted run would have: Lightning does not restore random states or
samplers, so the batch stream starts at the checkpoint's step. With `devices` > 1 the steps run
under DDP (`ddp_spawn`: the ranks exist for the fit only, and the weights come back to this process,
which goes on to the SVMs); every rank trains its own share of the same global batch, and the loss
is weighed so that DDP's average of the ranks' gradients is one process's gradient on the batch.
"""

from __future__ import annotations

import copy
import hashlib
import logging
from collections.abc import Iterator
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, IterableDataset

from vidrep.common.io import write_torch
from vidrep.common.loggers import finish_wandb
from vidrep.eval.adapt import readapt
from vidrep.eval.boxes import box_iou, flip_boxes
from vidrep.eval.features import trained_with_labels
from vidrep.eval.images import read_rgb
from vidrep.eval.regions import DetectionNet, region_outputs
from vidrep.eval.trainer import checkpoint_step, make_loggers, make_trainer
from vidrep.eval.windows import DecodedImages, WindowBatches, WindowCrops, whole_batch, window_file

log = logging.getLogger(__name__)


def sample_rois(
    p, gt: np.ndarray, labels: np.ndarray, props: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """One image's regions for regions=roi_pool (Fast R-CNN's `images_per_batch` images a step; the
    warp path draws from the whole split, vidrep.eval.windows): ground truth and proposals with IoU
    >= p.fg_iou are their object's class, those in [bg_iou[0], bg_iou[1]) background, fg_fraction of
    `p.rois_per_image` foreground."""
    boxes = np.concatenate([gt, props]).astype(np.float32)
    if len(gt):
        iou = box_iou(boxes, gt)
        best, arg = iou.max(1), iou.argmax(1)
    else:
        best, arg = np.zeros(len(boxes)), np.zeros(len(boxes), int)
    fg = np.nonzero(best >= p.fg_iou)[0]
    bg = np.nonzero((best < p.bg_iou[1]) & (best >= p.bg_iou[0]))[0]
    n_fg = min(len(fg), int(round(p.rois_per_image * p.fg_fraction)))
    fg = rng.choice(fg, n_fg, replace=False) if n_fg else fg[:0]
    bg = rng.choice(bg, min(len(bg), p.rois_per_image - n_fg), replace=False) if len(bg) else bg
    idx = np.concatenate([fg, bg]).astype(int)
    target = np.where(np.isin(idx, fg), labels[arg[idx]] + 1 if len(gt) else 0, 0)
    return boxes[idx], target


def param_groups(p, model: DetectionNet) -> list[dict]:
    """R-CNN's pascal_finetune_train.prototxt: every layer blobs_lr 1 (weights) / 2 (biases), the new
    fc8_pascal 10 / 20; weight decay 1 / 0."""
    groups = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        bias = name.endswith("bias")
        mult = (p.cls_lr_mult if name.startswith("cls.") else 1.0) * (p.bias_lr_mult if bias else 1.0)
        groups.append({"params": [param], "lr": p.lr * mult, "weight_decay": 0.0 if bias else p.weight_decay})
    return groups


class RegionSteps(IterableDataset):
    """regions=roi_pool, for steps start..steps-1: this rank's share of the step's `images_per_batch`
    (image, regions, targets) triples sampled as the protocol samples them (horizontal flip of
    image and regions half the time)."""

    def __init__(self, protocol, images, store, start: int, steps: int, world: int = 1, rank: int = 0) -> None:
        self.protocol, self.images, self.store, self.start, self.steps = protocol, images, store, start, steps
        self.world, self.rank = world, rank

    def step(self, step: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        p = self.protocol
        rng = np.random.default_rng([p.seed, step])
        out = []
        for i in rng.choice(len(self.images), p.images_per_batch, replace=len(self.images) < p.images_per_batch):
            im = self.images[i]
            rois, target = sample_rois(p, im.boxes0, im.labels, self.store.boxes(im), rng)
            image = read_rgb(im.path)
            if p.flip and rng.random() < 0.5:
                image = np.ascontiguousarray(image[:, ::-1])
                rois = flip_boxes(rois, image.shape[1])
            out.append((image, rois, target))
        return out

    def __iter__(self) -> Iterator:
        for s in range(self.start, self.steps):
            yield self.step(s)[self.rank :: self.world]


class FinetuneModule(L.LightningModule):
    """Region classification (classes + background) with R-CNN's per-layer learning rates. Builds
    its own loader in `train_dataloader`, where the rank is known (also in spawned DDP ranks)."""

    def __init__(self, model, net, protocol, start: int, images=None, store=None, windows=None, decoded=None) -> None:
        super().__init__()
        self.model, self.protocol, self.start, self.decoded = model, protocol, start, decoded
        self.net_input_size, self.preprocess = net.input_size, net.preprocess
        self.images, self.store, self.windows = images, store, windows
        # roi_pool's outputs need the whole Network; it stays in one process
        self.net = net if windows is None else None

    def train_dataloader(self) -> DataLoader:
        p, world, rank = self.protocol, self.trainer.world_size, self.trainer.global_rank
        if self.windows is None:
            return DataLoader(
                RegionSteps(p, self.images, self.store, self.start, p.iterations, world, rank),
                batch_size=None,
                collate_fn=whole_batch,
            )
        sampler = WindowBatches(
            self.windows, p.batch_size, p.fg_fraction, p.flip, p.seed, self.start, p.iterations, world, rank
        )
        workers = int(p.finetune_workers)
        return DataLoader(
            WindowCrops(
                [im.path for im in self.images],
                self.windows,
                self.net_input_size,
                int(p.warp["padding"]),
                self.decoded,
            ),
            batch_sampler=sampler,
            collate_fn=whole_batch,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def training_step(self, batch, batch_idx):
        p, world = self.protocol, self.trainer.world_size
        # dropout masks as a function of the step (and rank: ranks draw their own)
        torch.manual_seed((p.seed * 1_000_003 + self.global_step) * 64 + self.trainer.global_rank)
        if self.windows is None:
            loss = 0.0
            for image, rois, target in batch:
                out = region_outputs(p, self.model, self.net, image, rois, str(self.device))(np.arange(len(rois)))
                loss = loss + F.cross_entropy(out["logits"], torch.from_numpy(target).long().to(self.device))
            size, total = sum(len(r) for _, r, _ in batch), p.images_per_batch
            local = loss / max(len(batch), 1)
            weighted = loss * world / total
        else:
            logits = self.model.warped(self.preprocess(batch["crops"]) * batch["mask"])["logits"]
            summed = F.cross_entropy(logits, batch["labels"], reduction="sum")
            size = len(batch["labels"])
            local = summed / size
            # DDP averages the ranks: every region of the batch weighs 1 / batch_size
            weighted = summed * world / p.batch_size
        self.log("finetune/loss", local, prog_bar=True, batch_size=size)
        return weighted

    def configure_optimizers(self):
        p = self.protocol
        opt = torch.optim.SGD(param_groups(p, self.model), lr=p.lr, momentum=p.momentum)
        sched = torch.optim.lr_scheduler.StepLR(opt, p.lr_step, 0.1)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}


def finetune(protocol, model, net, images, store, device: str, folder: Path, logger: dict | None = None) -> None:
    """Fine-tune `model` in place for protocol.iterations steps; checkpoints and curves in `folder`
    (`last.ckpt`, `metrics.csv`, W&B with `logger`); resumes from `folder/last.ckpt`. The split's
    windows (regions=warp) are kept in `folder/../../windows/<key>/`, shared by rounds and networks."""
    devices, per_step = (
        int(protocol.devices),
        protocol.batch_size if protocol.regions == "warp" else protocol.images_per_batch,
    )
    if per_step < devices:
        key = "batch_size" if protocol.regions == "warp" else "images_per_batch"
        raise ValueError(
            f"protocol.{key}={per_step} cannot be dealt to protocol.devices={devices} ranks (each needs at least one "
            f"{'region' if protocol.regions == 'warp' else 'image'} a step): lower protocol.devices"
        )
    folder.mkdir(parents=True, exist_ok=True)
    start = checkpoint_step(folder)
    if start:
        log.info("fine-tuning resumes at step %d of %d from %s", start, protocol.iterations, folder / "last.ckpt")
    windows = decoded = None
    if protocol.regions == "warp":
        num_classes = model.cls.out_features - 1
        key = hashlib.blake2b(
            repr(
                (str(store.folder), [im.id for im in images], num_classes, protocol.fg_iou, list(protocol.bg_iou))
            ).encode(),
            digest_size=8,
        ).hexdigest()
        windows = window_file(
            folder.parent.parent / "windows" / key, images, store, num_classes, protocol.fg_iou, protocol.bg_iou
        )
        if protocol.finetune_decoded_images:
            decoded = DecodedImages.build(folder.parent.parent / "windows" / key, [im.path for im in images])
        log.info(
            "fine-tuning windows: %d foreground, %d background (%.0f MB)",
            windows.num_fg,
            windows.num_bg,
            windows.nbytes / 2**20,
        )
    model.train()  # the trunk comes in eval mode; Lightning keeps submodules' modes, and dropout must be on
    module = FinetuneModule(model, net, protocol, start, images, store, windows, decoded)
    run_id = f"ft-{folder.parent.name}-{folder.name}"
    trainer = make_trainer(
        folder,
        protocol.iterations,
        device,
        devices,
        protocol.finetune_checkpoint_every,
        make_loggers(folder, logger, f"finetune {folder.parent.name} {folder.name}", run_id),
    )
    last = folder / "last.ckpt"
    try:
        trainer.fit(module, ckpt_path=str(last) if last.exists() else None, weights_only=True)
    finally:
        finish_wandb()  # each fine-tuning its own W&B run (a new WandbLogger would join an open one)
    model.to(device).eval()  # Lightning's teardown leaves the module on the CPU


def keeps_fc(net) -> bool:
    """Whether straightforward fine-tuning keeps the network's fc6/fc7 (R-CNN's ImageNet baseline)
    instead of re-initialising them (the paper's unsupervised networks): a network trained with
    ImageNet's labels (vidrep.eval.features.trained_with_labels)."""
    return trained_with_labels(net)


def build_detector(
    p, net, images, store, num_classes: int, device: str, folder: Path, model_cfg=None, logger=None
) -> DetectionNet:
    """The stage's entry: the fine-tuned detection network of `net` (a vidrep.eval.features.Network),
    from `folder/finetuned.pt` when a previous run finished it; a killed fine-tuning or
    re-adaptation resumes from its last checkpoint there, a finished round from `round<r>.pt`.
    `model_cfg`: evaluate.py's `model` config, which builds the re-adaptation's TripletModule;
    `logger`: its `logger` config."""
    torch.manual_seed(p.seed)
    keep_fc = keeps_fc(net)

    def make(trunk):
        return DetectionNet(trunk, num_classes, p.regions, net.input_size, p.fc_dim, p.fc_dim, p.dropout, keep_fc).to(
            device
        )

    model = make(copy.deepcopy(net.trunk))
    if p.finetune == "none":
        return model.eval()
    final = folder / "finetuned.pt"
    if final.exists():
        model.load_state_dict(torch.load(final, map_location=device, weights_only=True))
        log.info("fine-tuned weights from %s", final)
        return model.eval()
    rounds = p.rounds if p.finetune == "iterative" else 1
    if rounds > 1 and keep_fc:
        raise ValueError(
            f"finetune=iterative re-adapts a network trained by train.py with its triplet loss; {net.name} is not "
            "one (its preprocessing is ImageNet's): use protocol.finetune=straightforward"
        )
    triplet = copy.deepcopy(net.trunk).to(device)
    for r in range(rounds):
        done = folder / f"round{r}.pt"
        if done.exists() and r + 1 < rounds:
            model.load_state_dict(torch.load(done, map_location=device, weights_only=True))
        else:
            log.info("fine-tuning round %d/%d", r + 1, rounds)
            finetune(p, model, net, images, store, device, folder / f"round{r}", logger)
            write_torch(done, model.state_dict())
        if r + 1 < rounds:
            triplet.load_state_dict(model.trunk.body_state(), strict=False)
            readapt(
                triplet,
                net.input_size,
                p.adapt,
                model_cfg,
                folder / f"adapt{r}",
                device,
                int(p.devices),
                logger,
                p.seed,
            )
            model.trunk.load_state_dict(triplet.body_state(), strict=False)
            torch.manual_seed(p.seed + r + 1)
            model = make(model.trunk)
    write_torch(final, model.state_dict())
    for r in range(rounds):  # the checkpoints; the curves (metrics.csv) stay
        for ckpt in (folder / f"round{r}").glob("*.ckpt"):
            ckpt.unlink()
    return model.eval()
