"""train.py's checks before anything starts (vidrep.common.preflight runs them on the composed config)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from vidrep.common.preflight import PreflightError, is_missing, require_path
from vidrep.training.validate import settings_errors


def check_train(cfg: DictConfig, swept: set[str]) -> None:
    planning = bool(cfg.get("dry_run"))  # a dry run plans from the data size without a corpus
    if cfg.data.get("train_pairs") is not None and not planning:
        raise PreflightError(
            f"data.train_pairs={cfg.data.train_pairs} plans a corpus not mined yet and only goes with dry_run=true; "
            "a run that trains counts the corpus at data.root (drop data.train_pairs, or set data.num_patches)"
        )
    if is_missing(cfg, "data.root") and not planning:
        raise PreflightError(
            f"data.num_patches={cfg.data.get('num_patches')} needs a mined corpus: add data.root=<corpus> "
            "(made by `python mine.py videos=<videos> out=<corpus>`), or plan it first with dry_run=true"
        )
    if cfg.data.get("demo") is None and not planning:  # the demo builds its corpus on first use
        require_path(
            cfg, "data.root", "point it at a corpus made by `python mine.py videos=<videos> out=<corpus>`", swept
        )
    errors = settings_errors(cfg)
    if errors:
        raise PreflightError("settings that cannot train:\n  " + "\n  ".join(errors))
    require_path(cfg, "resume", "give the run directory of an earlier train.py run (outputs/train/<run>)", swept)
    if cfg.data.get("demo") is None and "data.root" not in swept and not planning:
        _check_corpus_size(cfg)
    require_path(
        cfg, "ckpt_path", "give a checkpoint of an earlier run, e.g. outputs/train/<run>/checkpoints/last.ckpt", swept
    )
    ckpt = OmegaConf.select(cfg, "ckpt_path", throw_on_resolution_failure=False)
    if ckpt is not None and "ckpt_path" not in swept and Path(str(ckpt)).expanduser().is_dir():
        raise PreflightError(
            f"ckpt_path={ckpt} is a directory, not a checkpoint file: pass ckpt_path={ckpt}/checkpoints/last.ckpt "
            f"(a new run directory), or resume={ckpt} to continue that run in its own directory"
        )
    if OmegaConf.select(cfg, "model.net.trunk.weights") is not None:  # a key only some trunks have
        require_path(
            cfg,
            "model.net.trunk.weights",
            "give a local torchvision weights file for the trunk (nothing is "
            "downloaded), or model.net.trunk.weights=null for a random init",
            swept,
        )
    if not planning:  # a dry run plans for the GPUs of another machine
        _note_cpu_ddp(cfg)


def _check_corpus_size(cfg: DictConfig) -> None:
    """A corpus too small for one training batch, from the pair counts mine.py keeps in each
    corpus's summary.json (no manifest is read here; the data module checks the exact split)."""
    roots = OmegaConf.select(cfg, "data.root")
    roots = list(roots) if OmegaConf.is_list(roots) else [roots]
    counts = []
    for root in roots:
        summary = Path(str(root)).expanduser() / "summary.json"
        if not summary.is_file():
            return
        try:
            counts.append(int(json.loads(summary.read_text()).get("pairs", 0)))
        except (ValueError, TypeError, AttributeError):
            return  # a damaged summary is the data module's to report (with the verify command)
    batch, val = cfg.data.get("batch_size"), float(cfg.data.get("val_fraction") or 0.0)
    if isinstance(batch, int) and sum(counts) * (1 - val) < batch:
        raise PreflightError(
            f"data.root holds {sum(counts)} pairs, about {int(sum(counts) * (1 - val))} of them for training "
            f"(data.val_fraction={val:g}), fewer than one batch of data.batch_size={batch}: lower "
            "data.batch_size (at least 2), or add corpora (data.root='[a,b]')"
        )


def _note_cpu_ddp(cfg: DictConfig) -> None:
    """devices > 1 without a GPU is legal (DDP over gloo on the CPU) but rarely meant: say so."""
    import torch

    devices = OmegaConf.select(cfg, "trainer.devices")
    accelerator = str(OmegaConf.select(cfg, "trainer.accelerator"))
    if isinstance(devices, int) and devices > 1 and accelerator in ("auto", "cpu") and not torch.cuda.is_available():
        print(
            f"note: trainer.devices={devices} and no GPU: this runs {devices} DDP processes on the CPU (gloo), slower "
            "than one and meant for testing DDP; trainer.devices=1 trains on the CPU in one process",
            file=sys.stderr,
        )
