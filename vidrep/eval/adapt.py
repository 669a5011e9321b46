"""Iterative fine-tuning's re-adaptation (method.md section 5: fine-tune on VOC, transfer its conv
layers back to the triplet task and re-adapt, fine-tune again): the trunk is trained by the training
module itself, `vidrep.training.module.TripletModule`, built from evaluate.py's `model` config as
train.py builds it (its ranking loss, negatives and optimiser from `model`, vidrep/conf/model/*.yaml), on
the pairs of a mined corpus, for `adapt.steps` steps.

Resumable: a Lightning checkpoint (with the pair sampler's position) every `adapt.checkpoint_every`
steps in its folder; the finished trunk is saved as `adapted.pt`, and a rerun loads it instead of
training again.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from vidrep.common.io import write_torch
from vidrep.eval.trainer import checkpoint_step, make_loggers, make_trainer

log = logging.getLogger(__name__)


def triplet_module(model_cfg, trunk: nn.Module, input_size: int, lr: float | None = None):
    """TripletModule around `trunk` from the model config (Hydra instantiate; `net` is this trunk,
    not the config's fresh one; `lr` overrides model.optimizer.lr)."""
    import hydra
    from omegaconf import DictConfig, OmegaConf

    from vidrep.models import EmbeddingNet

    if isinstance(model_cfg, DictConfig):
        model_cfg = OmegaConf.to_container(model_cfg, resolve=True)
    cfg = OmegaConf.create({k: v for k, v in dict(model_cfg).items() if k != "net"})
    cfg.input_size = input_size
    if lr is not None:
        cfg.optimizer.lr = float(lr)
    return hydra.utils.instantiate(cfg, _partial_=True)(net=EmbeddingNet(trunk))


def readapt(
    trunk: nn.Module,
    input_size: int,
    adapt: dict,
    model_cfg,
    folder: Path,
    device: str,
    devices: int = 1,
    logger: dict | None = None,
    seed: int = 0,
) -> None:
    """Re-adapt `trunk` in place on the pairs of `adapt["corpus"]` for `adapt["steps"]` steps of
    `adapt["batch_size"]` pairs; `folder` holds its checkpoints, curves and `adapted.pt`."""
    from vidrep.common.loggers import finish_wandb
    from vidrep.data.datamodule import PairDataModule

    done = folder / "adapted.pt"
    if done.exists():
        trunk.load_state_dict(torch.load(done, map_location="cpu", weights_only=True))
        log.info("re-adapted trunk from %s", done)
        return
    if model_cfg is None:
        raise ValueError(
            "finetune=iterative re-adapts with the training module: evaluate.py needs its `model` config "
            "(vidrep/conf/evaluate.yaml's defaults: model: caffenet)"
        )
    folder.mkdir(parents=True, exist_ok=True)
    steps = int(adapt["steps"])
    start = checkpoint_step(folder)
    if start:
        log.info("re-adaptation resumes at step %d of %d from %s", start, steps, folder / "last.ckpt")
    module = triplet_module(model_cfg, trunk, input_size, adapt.get("lr"))
    workers = int(adapt.get("workers", 0))
    data = PairDataModule(
        str(adapt["corpus"]),
        batch_size=int(adapt["batch_size"]),
        num_workers=workers,
        input_size=input_size,
        val_fraction=0.0,
        seed=seed,
        persistent_workers=workers > 0,
        pin_memory=True,
    )
    trainer = make_trainer(
        folder,
        steps,
        device,
        devices,
        int(adapt.get("checkpoint_every", 1000)),
        make_loggers(
            folder, logger, f"re-adapt {folder.parent.name} {folder.name}", f"adapt-{folder.parent.name}-{folder.name}"
        ),
    )
    last = folder / "last.ckpt"
    where = next(trunk.parameters()).device
    trunk.train()
    try:
        trainer.fit(module, datamodule=data, ckpt_path=str(last) if last.exists() else None, weights_only=True)
    finally:
        finish_wandb()
    trunk.to(where).eval()  # Lightning's teardown leaves the module on the CPU
    write_torch(done, trunk.state_dict())
    for ckpt in folder.glob("*.ckpt"):
        ckpt.unlink()
