"""train.py's checks before anything starts (vidrep.preflight runs them on the composed config)."""

from __future__ import annotations

import sys

from omegaconf import DictConfig, OmegaConf

from vidrep.preflight import PreflightError, is_missing, require_path
from vidrep.training.validate import settings_errors


def check_train(cfg: DictConfig, swept: set[str]) -> None:
    if is_missing(cfg, "data.root"):
        raise PreflightError(f"data.num_patches={cfg.data.get('num_patches')} needs a mined corpus: add data.root=<corpus> "
                             "(made by `python mine.py videos=<videos> out=<corpus>`)")
    if cfg.data.get("demo") is None:  # the demo builds its corpus on first use
        require_path(cfg, "data.root", "point it at a corpus made by `python mine.py videos=<videos> out=<corpus>`", swept)
    errors = settings_errors(cfg)
    if errors:
        raise PreflightError("settings that cannot train:\n  " + "\n  ".join(errors))
    require_path(cfg, "resume", "give the run directory of an earlier train.py run (outputs/train/<run>)", swept)
    require_path(cfg, "ckpt_path", "give a checkpoint of an earlier run, e.g. outputs/train/<run>/checkpoints/last.ckpt", swept)
    _note_cpu_ddp(cfg)


def _note_cpu_ddp(cfg: DictConfig) -> None:
    """devices > 1 without a GPU is legal (DDP over gloo on the CPU) but rarely meant: say so."""
    import torch

    devices = OmegaConf.select(cfg, "trainer.devices")
    accelerator = str(OmegaConf.select(cfg, "trainer.accelerator"))
    if isinstance(devices, int) and devices > 1 and accelerator in ("auto", "cpu") and not torch.cuda.is_available():
        print(f"note: trainer.devices={devices} and no GPU: this runs {devices} DDP processes on the CPU (gloo), slower "
              "than one and meant for testing DDP; trainer.devices=1 trains on the CPU in one process", file=sys.stderr)
